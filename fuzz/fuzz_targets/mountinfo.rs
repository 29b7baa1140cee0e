//! /proc/self/mountinfo and a block device's stat file: any text parses
//! into entries or is skipped, escapes never read past the field, a path
//! is placed on one of the entries or none, and nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

use edgekeeper::sys::mounts::{BlockDevice, mount_of, parse_mountinfo, parse_sectors_written};

fuzz_target!(|data: &[u8]| {
    let _ = parse_sectors_written(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let entries = parse_mountinfo(text);
    for e in &entries {
        let _ = BlockDevice::from_source(&e.source, e.major);
        if let Some(m) = mount_of(&entries, &e.mount_point, Some((e.major, e.minor))) {
            assert!(e.mount_point.starts_with(&m.mount_point));
        }
    }
    let _ = mount_of(&entries, std::path::Path::new("/var/lib/edgekeeper"), None);
});
