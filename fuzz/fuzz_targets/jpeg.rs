//! The JPEG marker scanner never reads past the head it is given, and a
//! size it reports comes from a SOF segment inside it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let head = edgekeeper::services::frames::jpeg::scan_head(data);
    if head.sof {
        assert!(head.soi && data.len() >= 11);
    }
    let _ = edgekeeper::services::frames::jpeg::ends_with_eoi(data);
});
