//! `edgekeeper check` on real files: a valid config round-trips, and every
//! kind of mistake exits 78 naming the key path or the line and column.

mod common;

use common::{Sandbox, stderr, stdout};

#[test]
fn the_full_spec_example_round_trips_through_check() {
    let sb = Sandbox::new("roundtrip");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/edgekeeper-full.json"
    ))
    .unwrap();
    sb.write_raw_config(&example);
    let first = sb.run_cli(&["check"]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let effective = stdout(&first);
    // Every default is filled in: keys the example leaves out appear.
    let v: serde_json::Value = serde_json::from_str(&effective).unwrap();
    assert_eq!(v["storage"]["retention"][0]["kind"], "file");
    assert_eq!(v["storage"]["orphans"][0]["match"][0], "*.json");
    assert_eq!(v["govern"]["targets"][1]["comm"], "gst-launch-1.0");
    assert_eq!(v["storage"]["retention"][3]["kind"], "dir");
    assert_eq!(v["storage"]["jobs"][1]["at"], "Sun 03:00");
    assert_eq!(v["govern"]["targets"][0]["memory_max"], "8GiB");
    // Fed back in, the effective config is accepted and prints the same.
    sb.write_raw_config(&effective);
    let second = sb.run_cli(&["check"]);
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert_eq!(stdout(&second), effective);
}

#[test]
fn relative_paths_resolve_against_the_config_file() {
    let sb = Sandbox::new("relative");
    sb.write_config(
        r#""relocate": [{"name": "logs", "root": "data", "match": ["*.log"], "target": "moved"}]"#,
    );
    let out = sb.run_cli(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let dir = sb.dir.to_str().unwrap();
    assert_eq!(v["relocate"][0]["root"], format!("{dir}/data"));
    assert_eq!(v["state_dir"], format!("{dir}/state"));
}

#[test]
fn comments_and_trailing_commas_are_accepted() {
    let sb = Sandbox::new("comments");
    sb.write_raw_config(
        "// field config\n{\n  /* where state lives */ \"state_dir\": \"/var/lib/x\", // SD card\n  \"status_every\": \"5s\",\n}\n",
    );
    let out = sb.run_cli(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"status_every\": \"5s\""));
}

#[test]
fn the_config_path_comes_from_the_environment_when_not_given() {
    let sb = Sandbox::new("env");
    sb.write_raw_config("{\"status_every\": \"7s\"}");
    let out = std::process::Command::new(common::BIN)
        .arg("check")
        .env("EDGEKEEPER_CONFIG", sb.config_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"7s\""));
}

/// (what is wrong, config text, what the error must name)
const BAD: &[(&str, &str, &str)] = &[
    (
        "unknown top-level key",
        r#"{"stat_dir": "/x"}"#,
        "stat_dir: unknown field",
    ),
    (
        "unknown nested key",
        r#"{"log": {"levle": "info"}}"#,
        "log.levle: unknown field",
    ),
    (
        "unknown key deep in a list",
        r#"{"govern": {"targets": [{"comm": "ffmpeg"}, {"comm": "x", "memory_maxx": "1GiB"}]}}"#,
        "govern.targets[1].memory_maxx",
    ),
    (
        "bad duration unit",
        r#"{"status_every": "10x"}"#,
        "status_every: invalid duration \"10x\"",
    ),
    (
        "duration without unit",
        r#"{"alerts": {"cooldown": "6"}}"#,
        "alerts.cooldown: invalid duration",
    ),
    (
        "bad size",
        r#"{"log": {"max_size": "1 megabyte"}}"#,
        "log.max_size: invalid size",
    ),
    (
        "size with wrong case",
        r#"{"govern": {"targets": [{"comm": "a", "memory_max": "8gib"}]}}"#,
        "govern.targets[0].memory_max: invalid size",
    ),
    (
        "negative number",
        r#"{"govern": {"targets": [{"comm": "a", "cpu_quota": -100}]}}"#,
        "govern.targets[0].cpu_quota",
    ),
    (
        "percent out of range",
        r#"{"storage": {"mounts": [{"path": "/", "warn_used": 120}]}}"#,
        "storage.mounts[0].warn_used: 120 is out of range",
    ),
    (
        "warn above critical",
        r#"{"storage": {"mounts": [{"path": "/", "warn_used": 95, "critical_used": 90}]}}"#,
        "storage.mounts[0].warn_used: 95 must be below critical_used 90",
    ),
    (
        "emergency stops above where it starts",
        r#"{"storage": {"emergency": {"at_used": 80, "until_used": 90}}}"#,
        "storage.emergency.until_used",
    ),
    (
        "missing required key",
        r#"{"relocate": [{"name": "a", "root": "/d", "match": ["*.log"]}]}"#,
        "relocate[0]: missing field `target`",
    ),
    (
        "missing govern targets",
        r#"{"govern": {}}"#,
        "govern: missing field `targets`",
    ),
    (
        "wrong type: number for path",
        r#"{"state_dir": 5}"#,
        "state_dir: invalid type",
    ),
    (
        "wrong type: string for list",
        r#"{"relocate": "casa"}"#,
        "relocate: invalid type",
    ),
    (
        "wrong type: string for bool",
        r#"{"storage": {"wait_for_clock_sync": "yes"}}"#,
        "storage.wait_for_clock_sync",
    ),
    (
        "duplicate relocate names",
        r#"{"relocate": [{"name": "a", "root": "/d", "match": ["*.log"], "target": "/t"}, {"name": "a", "root": "/e", "match": ["*.log"], "target": "/u"}]}"#,
        "relocate[1].name: \"a\" is used by another entry",
    ),
    (
        "duplicate retention names",
        r#"{"storage": {"retention": [{"name": "live", "root": "/a", "match": ["*"]}, {"name": "live", "root": "/b", "match": ["*"]}]}}"#,
        "storage.retention[1].name",
    ),
    (
        "root inside the target",
        r#"{"relocate": [{"name": "a", "root": "/data/logs/in", "match": ["*.log"], "target": "/data/logs"}]}"#,
        "relocate[0].target",
    ),
    (
        "exclude escaping the root",
        r#"{"relocate": [{"name": "a", "root": "/d", "match": ["*.log"], "target": "/d/t", "exclude": ["../etc"]}]}"#,
        "relocate[0].exclude[0]",
    ),
    (
        "pattern with a slash",
        r#"{"frames": [{"name": "cam0", "dir": "/c", "match": ["sub/*.jpg"]}]}"#,
        "frames[0].match[0]",
    ),
    (
        "empty command",
        r#"{"storage": {"jobs": [{"name": "b", "at": "02:00", "command": []}]}}"#,
        "storage.jobs[0].command",
    ),
    (
        "bad job time",
        r#"{"storage": {"jobs": [{"name": "b", "at": "25:00", "command": ["/bin/true"]}]}}"#,
        "storage.jobs[0].at",
    ),
    (
        "job with both at and every",
        r#"{"storage": {"jobs": [{"name": "b", "at": "02:00", "every": "1h", "command": ["/bin/true"]}]}}"#,
        "storage.jobs[0]: has both at and every",
    ),
    (
        "job with neither at nor every",
        r#"{"storage": {"jobs": [{"name": "b", "command": ["/bin/true"]}]}}"#,
        "storage.jobs[0]: needs at",
    ),
    (
        "job every too short",
        r#"{"storage": {"jobs": [{"name": "b", "every": "10ms", "command": ["/bin/true"]}]}}"#,
        "storage.jobs[0].every",
    ),
    (
        "empty quota",
        r#"{"storage": {"mounts": [{"path": "/", "quota": "0B"}]}}"#,
        "storage.mounts[0].quota",
    ),
    (
        "unknown alert placeholder",
        r#"{"alerts": {"command": ["/bin/echo", "{lvl}"]}}"#,
        "alerts.command[1]",
    ),
    (
        "bad log level",
        r#"{"log": {"level": "loud"}}"#,
        "log.level: unknown variant",
    ),
    (
        "duplicate key",
        "{\"status_every\": \"1s\",\n \"status_every\": \"2s\"}",
        "duplicate field `status_every`",
    ),
    (
        "unclosed block comment",
        "{\n  \"state_dir\": \"/x\"\n  /* forgot to close\n}",
        ":3:3: comment is never closed",
    ),
    (
        "unclosed string",
        "{\n  \"state_dir\": \"/x\n}",
        ":2:16: string is never closed",
    ),
    (
        "trailing garbage",
        "{\"state_dir\": \"/x\"}\n}",
        ":2:1: trailing characters",
    ),
    (
        "missing comma",
        "{\n  \"state_dir\": \"/x\"\n  \"run_dir\": \"/y\"\n}",
        ":3:3: expected `,` or `}`",
    ),
    ("empty file", "", ":1:0: EOF while parsing"),
    ("not an object", "[]", "(top level): invalid type: a list"),
    (
        "an object given as a list",
        r#"{"log": ["/var/log/x.log", "1MB"]}"#,
        "log: invalid type: a list",
    ),
    (
        "a list of lists",
        r#"{"govern": {"targets": [["ffmpeg", 300]]}}"#,
        "govern.targets[0]: invalid type: a list inside a list",
    ),
];

#[test]
fn every_bad_config_exits_78_and_names_the_place() {
    let sb = Sandbox::new("bad");
    let mut failures = Vec::new();
    for (what, text, expected) in BAD {
        sb.write_raw_config(text);
        let out = sb.run_cli(&["check"]);
        let err = stderr(&out);
        if out.status.code() != Some(78)
            || !err.contains(expected)
            || !err.contains("edgekeeper.json")
        {
            failures.push(format!(
                "{what}: exit {:?}, stderr {err:?}, expected it to contain {expected:?}",
                out.status.code()
            ));
        }
    }
    assert!(BAD.len() >= 15);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn run_refuses_a_bad_config_with_78_too() {
    let sb = Sandbox::new("badrun");
    sb.write_raw_config(r#"{"status_every": "soon"}"#);
    let out = sb.run_cli(&["run"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("status_every: invalid duration"));
}

#[test]
fn a_missing_config_file_is_a_config_error() {
    let sb = Sandbox::new("missing");
    let out = sb.run_cli(&["check"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("cannot read config"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = std::process::Command::new(common::BIN)
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(common::BIN)
        .arg("fly")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(common::BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("check"));
}

#[test]
fn version_names_the_target() {
    let out = std::process::Command::new(common::BIN)
        .arg("version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.starts_with(&format!("edgekeeper {}", env!("CARGO_PKG_VERSION"))));
    assert!(text.contains("target: "), "{text}");
}
