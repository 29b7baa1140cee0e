//! storage's steady state allocates nothing: with a counting global
//! allocator, the real daemon loop in this thread runs mount checks (a real
//! file system and a quota), retention passes that delete expired files,
//! orphan cleanup, and emergencies on the quota, round after round, and the
//! allocation count does not move. (Jobs are not part of it: starting a
//! program is a fork and exec through std's Command, which allocates, once
//! a day or so.)

use std::path::Path;
use std::time::{Duration, SystemTime};

use edgekeeper::daemon::Daemon;
use edgekeeper::sys::alloc::{CountingAllocator, start_counting, stop_counting};
use edgekeeper::sys::notify::Notifier;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run/status.json")).unwrap()).unwrap()
}

fn put(p: &Path, bytes: usize, age_secs: u64) {
    std::fs::write(p, vec![b's'; bytes]).unwrap();
    let t = SystemTime::now() - Duration::from_secs(age_secs);
    std::fs::File::open(p).unwrap().set_modified(t).unwrap();
}

#[test]
fn checks_retention_orphans_and_emergencies_allocate_nothing() {
    let dir =
        std::env::temp_dir().join(format!("edgekeeper-storage-steady-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["disk/live", "disk/meta"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let config = dir.join("edgekeeper.json");
    std::fs::write(
        &config,
        r#"{"state_dir": "state", "run_dir": "run", "status_every": "500ms",
            "log": {"file": "log/edgekeeper.log", "level": "info"},
            "alerts": {"dir": "alerts", "cooldown": "1s"},
            "storage": {"check_every": "1s",
              "mounts": [{"path": "disk", "quota": "256KiB", "warn_used": 60, "critical_used": 80}, {"path": "/"}],
              "emergency": {"at_used": 90, "until_used": 50},
              "retention": [{"name": "live", "root": "disk/live", "match": ["*.jpg"], "max_age": "30s", "emergency_keep": 2}],
              "orphans": [{"dir": "disk/meta", "companion_dir": "disk/live", "companion_ext": ".jpg", "min_age": "1h"}]}}"#,
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, Notifier::none()).unwrap();
    let mut n = 0;
    let mut counted = 0;
    // One round: expired files, orphans and young files that push the
    // quota past the emergency threshold every few rounds; then the loop
    // runs through the next check and what it starts. (max_age is 30 s so
    // that a retention pass is due at every check: 1/24 of it is less
    // than check_every.)
    let mut round = |daemon: &mut Daemon, count: bool| {
        for _ in 0..20 {
            put(&dir.join(format!("disk/live/old-{n}.jpg")), 512, 3 * 86_400);
            put(&dir.join(format!("disk/meta/old-{n}.json")), 64, 7200);
            put(&dir.join(format!("disk/live/young-{n}.jpg")), 4096, 0);
            n += 1;
        }
        let checks = status(&dir)["services"]["storage"]["counters"]["checks_total"]
            .as_u64()
            .unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            for _ in 0..20 {
                if count {
                    start_counting();
                }
                daemon.turn(Some(50)).unwrap();
                if count {
                    counted = stop_counting();
                }
            }
            let s = status(&dir);
            let c = &s["services"]["storage"]["counters"];
            if c["checks_total"].as_u64().unwrap() >= checks + 2 || std::time::Instant::now() > end
            {
                break;
            }
        }
    };
    for _ in 0..3 {
        round(&mut daemon, false);
    }
    let warm = status(&dir);
    let before = stop_counting();
    for _ in 0..6 {
        round(&mut daemon, true);
    }
    let after = status(&dir);
    let c =
        |s: &serde_json::Value, k: &str| s["services"]["storage"]["counters"][k].as_u64().unwrap();
    assert_eq!(
        counted - before,
        0,
        "{} allocations; status: {}",
        counted - before,
        after["services"]["storage"]
    );
    // The rounds really did the work being counted.
    assert!(c(&after, "checks_total") >= c(&warm, "checks_total") + 6);
    assert!(c(&after, "files_deleted_total") >= c(&warm, "files_deleted_total") + 100);
    assert!(c(&after, "orphans_deleted_total") >= c(&warm, "orphans_deleted_total") + 100);
    assert!(
        c(&after, "emergencies_total") > c(&warm, "emergencies_total"),
        "no emergency in the counted rounds: {}",
        after["services"]["storage"]
    );
    daemon.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
