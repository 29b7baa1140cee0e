//! The getdents64 record parser stays inside its buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for e in edgekeeper::sys::dir::Entries::new(data) {
        assert!(e.name.to_bytes().len() < data.len());
        let _ = e.kind();
    }
});
