//! `edgekeeper demo` runs the real daemon in a sandbox and says what
//! happened; it refuses to clear a directory it did not make.

mod common;

use common::{BIN, Sandbox, stdout};

#[test]
fn the_demo_runs_every_service_it_has_and_reports_ok() {
    let sb = Sandbox::new("demo");
    let dir = sb.path("demo");
    let out = std::process::Command::new(BIN)
        .args(["demo", "--seconds", "3", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        common::stderr(&out)
    );
    assert!(text.contains("OK: every log arrived once"), "{text}");
    assert!(
        text.contains("OK: the freeze, the stall and the corrupt frame were each alerted"),
        "{text}"
    );
    assert!(dir.join("run/status.json").exists());
    // Run again: the sandbox it made is cleared and reused.
    let again = std::process::Command::new(BIN)
        .args(["demo", "--seconds", "1", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(0), "{}", stdout(&again));
}

#[test]
fn the_demo_never_clears_a_directory_it_did_not_make() {
    let sb = Sandbox::new("demo-refuse");
    std::fs::write(sb.path("precious.txt"), "keep me").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["demo", "--seconds", "1", "--dir"])
        .arg(&sb.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(common::stderr(&out).contains("not an edgekeeper demo sandbox"));
    assert_eq!(
        std::fs::read_to_string(sb.path("precious.txt")).unwrap(),
        "keep me"
    );
}
