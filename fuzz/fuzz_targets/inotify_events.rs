//! The inotify event buffer parser never reads past its buffer and never
//! panics, whatever the kernel (or a bug) put in it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut total = 0usize;
    for ev in edgekeeper::sys::inotify::Events::new(data) {
        total += edgekeeper::sys::inotify::HEADER + ev.name.len();
        assert!(total <= data.len());
    }
});
