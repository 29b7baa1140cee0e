//! Mounts, disks and the clock, as the storage service needs them.
//!
//! What it is: file-system usage from `statvfs` computed the way `df`
//! does (so the percentage matches what users see); the parser of
//! `/proc/self/mountinfo` (fields, `\ooo` escapes) and the lookup of the
//! mount a path lives on; the block device behind a mount (through
//! `/sys/dev/block/MAJ:MIN`, because the root file system of a Raspberry Pi
//! shows as `/dev/root`), whether it is an SD card (MMC major 179,
//! `mmcblk*`), and its sectors written since boot (`/sys/block/<disk>/stat`,
//! read into a caller buffer through an fd held open); whether the kernel
//! says the system clock is synchronised (`adjtimex`).
//! What it is not: thresholds or policy; `services::storage` decides what a
//! percentage means.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// The major number of MMC block devices (SD cards, eMMC): `mmcblk*`.
pub const MMC_BLOCK_MAJOR: u32 = 179;

/// How full a file system is, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Size of the file system.
    pub total: u64,
    /// In use (`f_blocks - f_bfree`).
    pub used: u64,
    /// Free for unprivileged users (`f_bavail`): what `df` shows as Avail.
    pub avail: u64,
}

impl Usage {
    pub fn of(path: &Path) -> io::Result<Usage> {
        let st = nix::sys::statvfs::statvfs(path)?;
        let unit = st.fragment_size() as u64;
        let blocks = st.blocks() as u64;
        let bfree = st.blocks_free() as u64;
        Ok(Usage {
            total: blocks * unit,
            used: blocks.saturating_sub(bfree) * unit,
            avail: st.blocks_available() as u64 * unit,
        })
    }

    /// Used % as `df` computes it: used / (used + available to users),
    /// rounded up, so the reserved blocks of ext4 count as not available.
    pub fn used_percent(&self) -> u8 {
        let base = self.used + self.avail;
        if base == 0 {
            return 0;
        }
        (self.used.saturating_mul(100).div_ceil(base)).min(100) as u8
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub major: u32,
    pub minor: u32,
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount source (`/dev/mmcblk0p2`, `/dev/root`, `tmpfs`).
    pub source: String,
}

/// Parses mountinfo text; lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let _id = l.next()?;
    let _parent = l.next()?;
    let (major, minor) = l.next()?.split_once(':')?;
    let _root = l.next()?;
    let mount_point = l.next()?;
    let mut r = right.split(' ');
    let fstype = r.next()?;
    let source = r.next().unwrap_or("");
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point: PathBuf::from(OsStr::from_bytes(&unescape(mount_point))),
        fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
        source: String::from_utf8_lossy(&unescape(source)).into_owned(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4);
        match octal {
            Some(o) if b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                let v = u32::from(o[0] - b'0') * 64
                    + u32::from(o[1] - b'0') * 8
                    + u32::from(o[2] - b'0');
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// The mount `path` (absolute, symlinks resolved) lives on: the entry with
/// the longest mount point that contains it, preferring entries with the
/// device number `dev` the path's `stat` reported (a bind mount or an
/// over-mounted directory can hide a shorter one).
pub fn mount_of<'a>(
    entries: &'a [MountEntry],
    path: &Path,
    dev: Option<(u32, u32)>,
) -> Option<&'a MountEntry> {
    let best = |same_dev: bool| {
        entries
            .iter()
            .filter(|e| path.starts_with(&e.mount_point))
            .filter(|e| !same_dev || dev == Some((e.major, e.minor)))
            .max_by_key(|e| e.mount_point.as_os_str().len())
    };
    best(true).or_else(|| best(false))
}

/// Major and minor of a `st_dev`.
pub fn dev_numbers(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

/// The block device behind a mount, as the kernel names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    /// The partition or device the mount is on (`mmcblk0p2`, `sda1`).
    pub name: String,
    /// The whole disk (`mmcblk0`, `sda`): where write statistics live.
    pub disk: String,
    /// An SD card or eMMC (`mmcblk*`, major 179).
    pub sd: bool,
}

impl BlockDevice {
    /// Finds the device `major:minor` in `sys_dev_block` (normally
    /// `/sys/dev/block`); `None` for a file system without one (tmpfs).
    pub fn find(sys_dev_block: &Path, major: u32, minor: u32) -> Option<BlockDevice> {
        if major == 0 {
            return None; // anonymous devices: tmpfs, overlay, btrfs subvolumes
        }
        let link = sys_dev_block.join(format!("{major}:{minor}"));
        let target = std::fs::read_link(&link).ok()?;
        let name = target.file_name()?.to_string_lossy().into_owned();
        let disk = if link.join("partition").exists() {
            target.parent()?.file_name()?.to_string_lossy().into_owned()
        } else {
            name.clone()
        };
        Some(BlockDevice::named(name, disk, major))
    }

    /// From the names alone (a mountinfo source such as `/dev/mmcblk0p2`
    /// when sysfs is not there to ask).
    pub fn from_source(source: &str, major: u32) -> Option<BlockDevice> {
        let name = source.strip_prefix("/dev/")?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        let disk = disk_of_partition(name);
        Some(BlockDevice::named(name.to_string(), disk, major))
    }

    fn named(name: String, disk: String, major: u32) -> BlockDevice {
        let sd = major == MMC_BLOCK_MAJOR || disk.starts_with("mmcblk");
        BlockDevice { name, disk, sd }
    }
}

/// `mmcblk0p2` → `mmcblk0`, `nvme0n1p1` → `nvme0n1`, `sda1` → `sda`.
fn disk_of_partition(name: &str) -> String {
    let digits = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if digits.len() == name.len() {
        return name.to_string();
    }
    if (name.starts_with("mmcblk") || name.starts_with("nvme")) && digits.ends_with('p') {
        let disk = &digits[..digits.len() - 1];
        if disk.ends_with(|c: char| c.is_ascii_digit()) {
            return disk.to_string();
        }
        return name.to_string(); // mmcblk0 itself
    }
    if name.starts_with("mmcblk") || name.starts_with("nvme") {
        return name.to_string();
    }
    digits.to_string()
}

/// `/sys/block/<disk>/stat`, held open and re-read from the start.
pub struct DiskStat {
    fd: OwnedFd,
}

impl DiskStat {
    pub fn open(sys_block: &Path, disk: &str) -> io::Result<DiskStat> {
        let path = sys_block.join(disk).join("stat");
        let fd = nix::fcntl::open(&path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
        Ok(DiskStat { fd })
    }

    /// Bytes written to the disk since boot.
    pub fn bytes_written(&self) -> io::Result<u64> {
        let mut buf = [0u8; 256];
        let n = nix::sys::uio::pread(self.fd.as_fd(), &mut buf, 0)?;
        parse_sectors_written(&buf[..n])
            .map(|s| s * 512)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// The "sectors written" field (the 7th) of a block device's `stat` file;
/// sectors are always 512 bytes there, whatever the device's block size.
pub fn parse_sectors_written(stat: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(stat).ok()?;
    text.split_ascii_whitespace().nth(6)?.parse().ok()
}

/// True unless the kernel reports the clock unsynchronised (`adjtimex`
/// answers `TIME_ERROR`, or `STA_UNSYNC` is set): on a board without a
/// real-time clock, before NTP has set the time.
pub fn clock_synchronised() -> bool {
    // SAFETY: an all-zero `timex` is a valid value of the plain C struct;
    // with `modes` 0, adjtimex(2) only reads the kernel's clock state into
    // the struct it is given, which lives for the call.
    let (state, status) = unsafe {
        let mut tx: libc::timex = core::mem::zeroed();
        let state = libc::adjtimex(&mut tx);
        (state, tx.status)
    };
    state != libc::TIME_ERROR && status & libc::STA_UNSYNC == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const PI_MOUNTINFO: &str = "\
22 1 179:2 / / rw,noatime shared:1 - ext4 /dev/root rw
24 22 0:21 / /proc rw,relatime shared:12 - proc proc rw
30 22 179:1 / /boot/firmware rw,relatime shared:14 - vfat /dev/mmcblk0p1 rw,fmask=0022
31 22 8:1 / /mnt/storage rw,relatime shared:15 - ext4 /dev/sda1 rw
32 31 8:1 /camera /mnt/storage/camera\\040capture rw,relatime - ext4 /dev/sda1 rw
33 22 0:25 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,size=188788k,mode=755
garbage line
";

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let m = parse_mountinfo(PI_MOUNTINFO);
        assert_eq!(m.len(), 6, "the garbage line is skipped");
        assert_eq!(m[0].mount_point, Path::new("/"));
        assert_eq!((m[0].major, m[0].minor), (179, 2));
        assert_eq!(m[0].source, "/dev/root");
        assert_eq!(m[4].mount_point, Path::new("/mnt/storage/camera capture"));
        assert_eq!(m[5].fstype, "tmpfs");
    }

    #[test]
    fn a_path_lives_on_the_longest_mount_that_holds_it() {
        let m = parse_mountinfo(PI_MOUNTINFO);
        let on = |p: &str, dev| mount_of(&m, Path::new(p), dev).unwrap().mount_point.clone();
        assert_eq!(on("/var/log", Some((179, 2))), Path::new("/"));
        assert_eq!(
            on("/mnt/storage/logs", Some((8, 1))),
            Path::new("/mnt/storage")
        );
        assert_eq!(
            on("/mnt/storage/camera capture/live", Some((8, 1))),
            Path::new("/mnt/storage/camera capture")
        );
        // Without a device number the longest prefix wins.
        assert_eq!(on("/run/edgekeeper", None), Path::new("/run"));
        // /mnt/storageX is not under /mnt/storage.
        assert_eq!(on("/mnt/storageX", None), Path::new("/"));
    }

    #[test]
    fn sd_cards_are_told_from_the_mountinfo_fixture() {
        let m = parse_mountinfo(PI_MOUNTINFO);
        // The Pi's root shows as /dev/root: the major number says MMC.
        let root = BlockDevice::from_source(&m[0].source, m[0].major).unwrap();
        assert!(root.sd, "{root:?}");
        let boot = BlockDevice::from_source(&m[2].source, m[2].major).unwrap();
        assert_eq!(
            (boot.name.as_str(), boot.disk.as_str(), boot.sd),
            ("mmcblk0p1", "mmcblk0", true)
        );
        let usb = BlockDevice::from_source(&m[3].source, m[3].major).unwrap();
        assert_eq!(
            (usb.name.as_str(), usb.disk.as_str(), usb.sd),
            ("sda1", "sda", false)
        );
        assert_eq!(BlockDevice::from_source("tmpfs", 0), None);
        assert_eq!(disk_of_partition("nvme0n1p3"), "nvme0n1");
        assert_eq!(disk_of_partition("mmcblk1"), "mmcblk1");
        assert_eq!(disk_of_partition("vda"), "vda");
    }

    #[test]
    fn block_devices_are_resolved_through_a_sysfs_tree() {
        // A stand-in for /sys: dev/block/179:2 -> ../../block/mmcblk0/mmcblk0p2
        let root = std::env::temp_dir().join(format!("edgekeeper-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let part = root.join("block/mmcblk0/mmcblk0p2");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::write(part.join("partition"), "2\n").unwrap();
        std::fs::create_dir_all(root.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(
            "../../block/mmcblk0/mmcblk0p2",
            root.join("dev/block/179:2"),
        )
        .unwrap();
        std::os::unix::fs::symlink("../../block/mmcblk0", root.join("dev/block/179:0")).unwrap();
        let d = BlockDevice::find(&root.join("dev/block"), 179, 2).unwrap();
        assert_eq!(
            (d.name.as_str(), d.disk.as_str(), d.sd),
            ("mmcblk0p2", "mmcblk0", true)
        );
        let whole = BlockDevice::find(&root.join("dev/block"), 179, 0).unwrap();
        assert_eq!(whole.disk, "mmcblk0");
        assert_eq!(BlockDevice::find(&root.join("dev/block"), 0, 44), None);
        std::fs::write(
            root.join("block/mmcblk0/stat"),
            "   12904     3467  1188906    17180    40913    34780  2934176   187960        0    62740   205140\n",
        )
        .unwrap();
        let stat = DiskStat::open(&root.join("block"), "mmcblk0").unwrap();
        assert_eq!(stat.bytes_written().unwrap(), 2_934_176 * 512);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn used_percent_matches_df() {
        // df: 1K-blocks 100, used 41, avail 50 (5 % reserved) -> 46 %.
        let u = Usage {
            total: 100 << 10,
            used: 41 << 10,
            avail: 50 << 10,
        };
        assert_eq!(u.used_percent(), 46);
        assert_eq!(Usage::default().used_percent(), 0);
        let here = Usage::of(Path::new("/")).unwrap();
        assert!(here.total > 0 && here.used <= here.total);
    }

    #[test]
    fn the_sectors_written_field_is_the_seventh() {
        assert_eq!(parse_sectors_written(b"1 2 3 4 5 6 77 8 9 10 11"), Some(77));
        assert_eq!(parse_sectors_written(b"1 2 3"), None);
        assert_eq!(parse_sectors_written(b"1 2 3 4 5 6 x"), None);
    }
}
