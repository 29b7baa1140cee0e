#!/bin/bash -e
# Installs edgekeeper into the image pi-gen builds: the static binary, the
# systemd unit, its slice and sandbox generator, a default config (kept if
# the image already has one), and enables the service. The files come from
# files/, filled by image/pi-gen/prepare from an edgekeeper checkout.
install -D -m 755 files/edgekeeper "${ROOTFS_DIR}/usr/bin/edgekeeper"
install -D -m 644 files/edgekeeper.service "${ROOTFS_DIR}/lib/systemd/system/edgekeeper.service"
install -D -m 644 files/edgekeeper.slice "${ROOTFS_DIR}/lib/systemd/system/edgekeeper.slice"
install -D -m 755 files/edgekeeper-sandbox-generator "${ROOTFS_DIR}/lib/systemd/system-generators/edgekeeper-sandbox-generator"
if [ ! -e "${ROOTFS_DIR}/etc/edgekeeper/edgekeeper.json" ]; then
    install -D -m 644 files/edgekeeper.json "${ROOTFS_DIR}/etc/edgekeeper/edgekeeper.json"
fi
on_chroot << CHROOT
systemctl enable edgekeeper.service
CHROOT
