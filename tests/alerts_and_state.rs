//! Alerts and state through the real daemon: the cooldown suppresses a
//! second alert of the same kind and source, and still does after a
//! restart (it is kept in state.json); a corrupt state.json is moved aside.
//! (The rise-to-critical bypass is shown in `report::alerts`'s unit tests,
//! since the core itself raises only warnings.)

mod common;

use common::Sandbox;
use nix::sys::signal::Signal;

fn alert_files(sb: &Sandbox) -> Vec<String> {
    sb.files_in("alerts")
        .into_iter()
        .filter(|n| n.ends_with(".json"))
        .collect()
}

#[test]
fn the_cooldown_suppresses_repeats_and_survives_a_restart() {
    let sb = Sandbox::new("cooldown");
    sb.write_config("");
    let good = std::fs::read_to_string(sb.config_path()).unwrap();
    let daemon = sb.start();

    sb.write_raw_config("{ broken");
    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["alerts"]["raised"] == 1);
    let last = &s["alerts"]["last"][0];
    assert_eq!(last["kind"], "config_invalid");
    assert_eq!(last["level"], "warning");
    assert_eq!(last["source"], sb.config_path().to_str().unwrap());
    let files = alert_files(&sb);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with("-config_invalid.json"), "{files:?}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.path("alerts").join(&files[0])).unwrap())
            .unwrap();
    assert_eq!(doc["kind"], "config_invalid");
    assert!(
        doc["message"]
            .as_str()
            .unwrap()
            .contains("edgekeeper.json:1:3"),
        "{doc}"
    );

    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["core"]["config_reload_failures"] == 2);
    assert_eq!(s["alerts"]["raised"], 1);
    assert_eq!(s["alerts"]["suppressed"], 1);
    assert_eq!(alert_files(&sb).len(), 1, "the repeat wrote no file");
    let (code, _, _) = daemon.stop();
    assert_eq!(code, 0);

    // The cooldown is in state.json and applies to the next run.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.path("state/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["alert_cooldowns"][0]["kind"], "config_invalid");
    assert_eq!(state["lifetime"]["starts"], 1);
    sb.write_raw_config(&good);
    let daemon = sb.start();
    sb.write_raw_config("{ broken again");
    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["core"]["config_reload_failures"] == 1);
    assert_eq!(s["alerts"]["raised"], 0);
    assert_eq!(s["alerts"]["suppressed"], 1);
    assert_eq!(s["lifetime"]["starts"], 2);
    assert_eq!(alert_files(&sb).len(), 1);
    let (code, _, _) = daemon.stop();
    assert_eq!(code, 0);
}

#[test]
fn a_corrupt_state_file_is_moved_aside_and_the_daemon_starts_fresh() {
    let sb = Sandbox::new("corrupt-state");
    sb.write_config("");
    std::fs::create_dir_all(sb.path("state")).unwrap();
    let garbage = b"{\"lifetime\": {\"starts\": 41}, \"alert_cooldowns\": [{\"kind\": 7";
    std::fs::write(sb.path("state/state.json"), garbage).unwrap();
    let daemon = sb.start();
    let aside: Vec<_> = sb
        .files_in("state")
        .into_iter()
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{:?}", sb.files_in("state"));
    assert_eq!(
        std::fs::read(sb.path("state").join(&aside[0])).unwrap(),
        garbage,
        "kept byte for byte"
    );
    let s = daemon.status();
    assert_eq!(s["lifetime"]["starts"], 1, "started fresh");
    assert_eq!(s["alerts"]["last"][0]["kind"], "state_corrupt");
    let (code, _, _) = daemon.stop();
    assert_eq!(code, 0);
    // The fresh state is whole JSON again.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.path("state/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["version"], 1);
    assert_eq!(state["lifetime"]["starts"], 1);
}

#[test]
fn the_alert_command_gets_each_value_as_one_argument_without_a_shell() {
    use std::os::unix::fs::PermissionsExt;
    let sb = Sandbox::new("alert-command");
    let script = sb.path("notify.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf '%s\\n' \"$#\" \"$@\" > \"$0.args\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    // `$(touch pwned)` would run if a shell were involved.
    sb.write_config(r#""alerts": {"dir": "alerts", "command": ["./notify.sh", "{level}", "{kind}", "{source}", "{message} $(touch pwned)", "v={value}"]}"#);
    let good = std::fs::read_to_string(sb.config_path()).unwrap();
    let daemon = sb.start();
    sb.write_raw_config("{\"status_every\": 5}");
    daemon.signal(Signal::SIGHUP);
    let args = common::wait_for(std::time::Duration::from_secs(20), || {
        std::fs::read_to_string(sb.path("notify.sh.args")).ok()
    })
    .expect("the alert command ran");
    let lines: Vec<&str> = args.lines().collect();
    assert_eq!(lines[0], "5", "five arguments: {args:?}");
    assert_eq!(lines[1], "warning");
    assert_eq!(lines[2], "config_invalid");
    assert_eq!(lines[3], sb.config_path().to_str().unwrap());
    assert!(
        lines[4].contains("status_every: invalid type: integer `5`"),
        "{args:?}"
    );
    assert!(lines[4].ends_with(" $(touch pwned)"));
    assert_eq!(lines[5], "v=");
    assert!(!sb.path("pwned").exists());
    // The child is reaped from the loop, not left a zombie.
    let s = daemon.status_where(|v| v["core"]["children_reaped"] == 1);
    assert_eq!(s["alerts"]["command_failures"], 0);
    sb.write_raw_config(&good);
    assert_eq!(daemon.stop().0, 0);
}
