//! Netlink proc connector messages: the parser stays inside its buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for ev in edgekeeper::sys::proc_connector::events(data) {
        let _ = ev;
    }
});
