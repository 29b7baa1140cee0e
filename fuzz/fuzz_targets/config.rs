//! The config parser (JSON with comments, schema, validation) never panics
//! on any text, and what it accepts prints back to a config it accepts
//! unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = std::path::Path::new("/etc/edgekeeper/fuzz.json");
    if let Ok(config) = edgekeeper::config::Config::parse(text, path) {
        let again = edgekeeper::config::Config::parse(&config.to_pretty_json(), path)
            .expect("the effective config must load back");
        assert_eq!(config, again);
    }
});
