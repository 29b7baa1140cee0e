//! SIGHUP: a broken config is refused and the daemon goes on with the old
//! one; a good one takes effect and shows in the status snapshot.

mod common;

use common::Sandbox;
use nix::sys::signal::Signal;

#[test]
fn a_broken_config_is_refused_and_a_good_one_applied() {
    let sb = Sandbox::new("reload");
    sb.write_config(r#""status_every": "10s""#);
    let daemon = sb.start();
    assert_eq!(daemon.status()["status_every_ms"], 10_000);

    // Broken: the daemon stays up on the old config and says why.
    sb.write_raw_config("{ \"status_every\": \"fast\" }");
    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["core"]["config_reload_failures"] == 1);
    assert_eq!(s["status_every_ms"], 10_000, "old config kept");
    let err = s["config"]["last_reload_error"].as_str().unwrap();
    assert!(
        err.contains("status_every: invalid duration \"fast\""),
        "{err}"
    );
    assert_eq!(s["running"], true);

    // Deleted: the same.
    std::fs::remove_file(sb.config_path()).unwrap();
    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["core"]["config_reload_failures"] == 2);
    assert!(
        s["config"]["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("cannot read config")
    );

    // Good: applied, and visible.
    sb.write_config(r#""status_every": "2s""#);
    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["core"]["config_reloads"] == 1);
    assert_eq!(s["status_every_ms"], 2_000);
    assert_eq!(s["config"]["last_reload_error"], serde_json::Value::Null);

    // The new cadence is really used: two snapshots come ~2 s apart without
    // any SIGUSR1 (the old one would take 10 s).
    let first = s["core"]["status_writes"].as_u64().unwrap();
    let seen = common::wait_for(std::time::Duration::from_secs(7), || {
        daemon.status()["core"]["status_writes"].as_u64().unwrap() >= first + 2
    });
    assert!(seen.is_some(), "status_every of 2s not applied");

    let (code, _, stderr) = daemon.stop();
    assert_eq!(code, 0);
    assert!(stderr.contains("config reload refused"), "{stderr}");
}

#[test]
fn restart_only_settings_wait_for_a_restart() {
    let sb = Sandbox::new("reload-restart-only");
    sb.write_config("");
    let daemon = sb.start();
    sb.write_raw_config(
        "{\"state_dir\": \"state\", \"run_dir\": \"elsewhere\", \"log\": {\"file\": \"log/edgekeeper.log\"}, \"status_every\": \"3s\"}",
    );
    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["core"]["config_reloads"] == 1);
    assert_eq!(
        s["status_every_ms"], 3_000,
        "the rest of the config is applied"
    );
    assert!(
        !sb.path("elsewhere").exists(),
        "run_dir is not moved under a running daemon"
    );
    let (code, _, stderr) = daemon.stop();
    assert_eq!(code, 0);
    assert!(stderr.contains("run_dir changed"), "{stderr}");
}
