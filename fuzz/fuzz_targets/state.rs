//! The state file loader turns any bytes into state or an error (the
//! daemon then moves the file aside), never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgekeeper::state::parse(data);
});
