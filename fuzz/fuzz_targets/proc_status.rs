//! /proc/PID/status never panics the parser.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgekeeper::sys::procfs::parse_status(data);
});
