//! Scheduled jobs in the real daemon: output lines in the field log, a
//! timeout that kills, a job that never overlaps itself, failures alerted,
//! and a run missed while the daemon was stopped made up once at start.
//! (When a job runs on the wall clock, across days, weeks and DST, is
//! tested through the clock seam in src/services/storage/jobs.rs.)

mod common;

use std::time::Duration;

use common::{Sandbox, wait_for};

fn job(s: &serde_json::Value, name: &str) -> serde_json::Value {
    s["services"]["storage"]["details"]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no job {name} in {}", s["services"]["storage"]))
}

#[test]
fn jobs_log_their_output_time_out_never_overlap_and_alert_on_failure() {
    let sb = Sandbox::new("jobs");
    sb.write_config(
        r#""storage": {"jobs": [
            {"name": "tick", "every": "1s", "command": ["/bin/sh", "-c", "echo tick-out; echo tick-err >&2"]},
            {"name": "stuck", "every": "1s", "timeout": "300ms", "command": ["/bin/sleep", "30"]},
            {"name": "long", "every": "1s", "command": ["/bin/sleep", "2.5"]},
            {"name": "broken", "every": "1s", "command": ["/bin/false"]},
            {"name": "missing", "every": "1s", "command": ["/nonexistent/backup"]}]}"#,
    );
    let daemon = sb.start();
    let s = daemon.status_where(|s| {
        let runs = |n: &str| job(s, n)["runs"].as_u64().unwrap_or(0);
        runs("tick") >= 3
            && runs("stuck") >= 2
            && job(s, "long")["skipped_overlaps"].as_u64() >= Some(2)
    });
    let tick = job(&s, "tick");
    assert_eq!(tick["last_outcome"], "ok", "{tick}");
    assert_eq!(tick["failures"], 0);
    let stuck = job(&s, "stuck");
    assert!(stuck["timeouts"].as_u64().unwrap() >= 2, "{stuck}");
    assert_eq!(stuck["last_outcome"], "timed_out", "{stuck}");
    let long = job(&s, "long");
    // 2.5 s runs due every 1 s: the two ticks that come during each run
    // are skipped rather than started beside it.
    let (runs, skipped) = (
        long["runs"].as_u64().unwrap(),
        long["skipped_overlaps"].as_u64().unwrap(),
    );
    assert!(skipped >= 2 * (runs - 1), "{long}");
    let log = std::fs::read_to_string(sb.path("log/edgekeeper.log")).unwrap();
    assert!(log.contains("job tick: tick-out"), "{log}");
    assert!(log.contains("job tick: tick-err"), "{log}");
    // A timed-out job is killed: no `sleep 30` of ours is left.
    let pids = std::process::Command::new("pgrep")
        .args(["-f", "^/bin/sleep 30$"])
        .output()
        .unwrap();
    let ours: Vec<i32> = String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit(')')
                        .next()
                        .map(|r| r.split_whitespace().nth(1).map(str::to_string))
                })
                .flatten()
                .is_some_and(|ppid| ppid == daemon.pid().to_string())
        })
        .collect();
    assert!(
        ours.len() <= 1,
        "timed-out jobs were left running: {ours:?}"
    );
    let alerts = wait_for(Duration::from_secs(10), || {
        let a = sb.files_in("alerts");
        let failed: Vec<String> = a.into_iter().filter(|f| f.contains("job_failed")).collect();
        (failed.len() >= 3).then_some(failed)
    })
    .expect("job_failed alerts for stuck, broken and missing");
    let sources: std::collections::BTreeSet<String> = alerts
        .iter()
        .map(|f| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(sb.path("alerts").join(f)).unwrap())
                    .unwrap();
            assert_eq!(v["kind"], "job_failed");
            v["source"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(
        sources.contains("broken") && sources.contains("missing") && sources.contains("stuck"),
        "{sources:?}"
    );
    assert_eq!(
        s["services"]["storage"]["health"], "degraded",
        "a job whose last run failed degrades"
    );
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn a_run_missed_while_stopped_is_made_up_once_at_start() {
    let sb = Sandbox::new("jobs-catch-up");
    let marker = sb.path("ran");
    let config = format!(
        r#""storage": {{"jobs": [{{"name": "nightly", "at": "03:00", "catch_up": true,
            "command": ["/bin/sh", "-c", "echo run >> {}"]}}]}}"#,
        marker.display()
    );
    sb.write_config(&config);
    // First start ever: nothing known of earlier runs, nothing made up.
    let daemon = sb.start();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!marker.exists());
    assert_eq!(daemon.stop().0, 0);
    // Pretend the last run was three days ago: the 03:00 runs since were
    // missed, and one (not three) is made up at start.
    let state_path = sb.path("state/state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    state["services"]["storage"]["jobs"] = serde_json::json!([
        {"name": "nightly", "started": now - 3 * 86_400, "outcome": "ok", "exit_code": 0, "duration_ms": 5}
    ]);
    std::fs::write(&state_path, state.to_string()).unwrap();
    let daemon = sb.start();
    let ran = wait_for(Duration::from_secs(10), || marker.exists());
    assert!(ran.is_some(), "the missed run was not made up");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "run\n",
        "made up once"
    );
    assert_eq!(daemon.stop().0, 0);
    // Its run is now recorded: another restart makes nothing up.
    let daemon = sb.start();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n");
    assert_eq!(daemon.stop().0, 0);
}
