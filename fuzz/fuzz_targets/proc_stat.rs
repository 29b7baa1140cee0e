//! /proc/PID/stat: the comm (which may hold spaces and parentheses) never
//! shifts the fields after it, and nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgekeeper::sys::procfs::parse_stat(data);
    let _ = edgekeeper::sys::procfs::argv0_basename(data);
});
