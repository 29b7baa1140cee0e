//! One instance per run_dir, and `edgekeeper status` (table, `--json`, exit 3
//! when no daemon is running or its snapshot is stale).

mod common;

use common::{Sandbox, stderr, stdout};

#[test]
fn a_second_instance_exits_1_naming_the_holder() {
    let sb = Sandbox::new("lock");
    sb.write_config("");
    let daemon = sb.start();
    let out = sb.run_cli(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("pid {}", daemon.pid())), "{err}");
    assert!(err.contains("edgekeeper.lock"), "{err}");
    // The first one is unharmed.
    assert_eq!(daemon.status_where(|_| true)["running"], true);
    let (code, _, _) = daemon.stop();
    assert_eq!(code, 0);
    // Once it is gone the lock is free again.
    let again = sb.start();
    assert_eq!(again.stop().0, 0);
}

#[test]
fn status_prints_a_table_or_json_while_running_and_exits_3_otherwise() {
    let sb = Sandbox::new("status");
    sb.write_config("");
    let out = sb.run_cli(&["status"]);
    assert_eq!(out.status.code(), Some(3), "no snapshot yet");
    assert!(stderr(&out).contains("does not exist"));

    let daemon = sb.start();
    let out = sb.run_cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains(&format!("(pid {})", daemon.pid())),
        "{table}"
    );
    assert!(table.contains("no services configured"), "{table}");
    let out = sb.run_cli(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"], daemon.pid());

    let (code, _, _) = daemon.stop();
    assert_eq!(code, 0);
    let out = sb.run_cli(&["status"]);
    assert_eq!(out.status.code(), Some(3), "stopped");
    assert!(stderr(&out).contains("stopped at"), "{}", stderr(&out));
}

#[test]
fn a_stale_snapshot_means_no_running_daemon() {
    let sb = Sandbox::new("stale");
    sb.write_config("");
    std::fs::create_dir_all(sb.path("run")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A daemon killed with SIGKILL 31 s ago, writing every 10 s.
    let snapshot = format!(
        "{{\"pid\": 1, \"running\": true, \"written_at\": \"x\", \"written_at_unix\": {}, \"status_every_ms\": 10000}}",
        now - 31
    );
    std::fs::write(sb.path("run/status.json"), &snapshot).unwrap();
    let out = sb.run_cli(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    // The age is read when the CLI runs, which under qemu may be a second
    // or two after the snapshot was written: 31 s or a little more.
    let err = stderr(&out);
    let age: u64 = err
        .split_once("s old")
        .and_then(|(before, _)| before.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no age in: {err}"));
    assert!((31..=40).contains(&age), "{err}");
    assert!(err.contains("every 10s"), "{err}");
    // 25 s old is within three intervals (with room for a slow CLI start).
    std::fs::write(
        sb.path("run/status.json"),
        snapshot.replace(&(now - 31).to_string(), &(now - 25).to_string()),
    )
    .unwrap();
    assert_eq!(sb.run_cli(&["status", "--json"]).status.code(), Some(0));
}

#[test]
fn metrics_are_written_beside_the_status() {
    let sb = Sandbox::new("prom");
    sb.write_config("");
    let daemon = sb.start();
    let prom = std::fs::read_to_string(sb.path("run/edgekeeper.prom")).unwrap();
    for name in [
        "edgekeeper_uptime_seconds",
        "edgekeeper_loop_iterations_total",
        "edgekeeper_watchdog_pings_total",
        "edgekeeper_config_reloads_total",
    ] {
        assert!(
            prom.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{prom}"
        );
        assert!(
            prom.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} has no sample"
        );
    }
    assert!(prom.contains("edgekeeper_service_enabled{service=\"relocate\"} 0"));
    // Every sample line is `name{labels} value` with a numeric value.
    for line in prom.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(name.starts_with("edgekeeper_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn every_configured_service_reports_its_own_health() {
    let sb = Sandbox::new("all-services");
    for d in ["data", "captures", "disk", "cgroup"] {
        std::fs::create_dir_all(sb.path(d)).unwrap();
    }
    sb.write_config(
        r#""relocate": [{"name": "logs", "root": "data", "match": ["*.log"], "target": "data/state/logs", "exclude": ["state/logs"]}],
  "frames": [{"name": "cam0", "dir": "captures"}],
  "govern": {"cgroup_root": "cgroup/edgekeeper", "targets": [{"comm": "ffmpeg"}]},
  "storage": {"mounts": [{"path": "disk"}]}"#,
    );
    let daemon = sb.start();
    let s = daemon.status();
    for name in ["relocate", "frames", "govern", "storage"] {
        let svc = &s["services"][name];
        assert!(
            ["healthy", "degraded"].contains(&svc["health"].as_str().unwrap()),
            "{name}: {svc}"
        );
        let reason = svc["reason"].as_str().unwrap_or("");
        assert!(!reason.contains("does not provide"), "{name}: {reason}");
    }
    let prom = std::fs::read_to_string(sb.path("run/edgekeeper.prom")).unwrap();
    for name in ["relocate", "frames", "govern", "storage"] {
        let line = format!("edgekeeper_service_enabled{{service=\"{name}\"}} 1");
        assert!(prom.contains(&line), "{line} missing");
    }
    assert_eq!(daemon.stop().0, 0);
    let version = sb.run_cli(&["version"]);
    assert!(
        stdout(&version).contains("services: relocate frames govern storage"),
        "{}",
        stdout(&version)
    );
}
