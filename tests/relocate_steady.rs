//! relocate's event path allocates nothing after start: with a counting
//! global allocator, a thousand inotify events (files created, moved, new
//! nested directories watched and scanned) handled by the real daemon loop
//! in this thread leave the allocation count unchanged.

use edgekeeper::daemon::Daemon;
use edgekeeper::sys::alloc::{CountingAllocator, start_counting, stop_counting};
use edgekeeper::sys::notify::Notifier;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn status(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run/status.json")).unwrap()).unwrap()
}

#[test]
fn a_thousand_relocate_events_allocate_nothing() {
    let dir =
        std::env::temp_dir().join(format!("edgekeeper-relocate-steady-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let config = dir.join("edgekeeper.json");
    std::fs::write(
        &config,
        r#"{"state_dir": "state", "run_dir": "run", "status_every": "200ms",
            "log": {"file": "log/edgekeeper.log", "level": "info"},
            "relocate": [{"name": "casa", "root": "data", "match": ["casa-*.log"], "target": "data/state/logs", "exclude": ["state/logs"]}]}"#,
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, Notifier::none()).unwrap();
    let mut counted = 0u64;
    let mut n = 0;
    // Creates a batch of files (some in new nested directories) outside the
    // count, then lets the daemon handle them inside it.
    let mut round = |daemon: &mut Daemon, count: bool, n: &mut usize| {
        let sub = dir.join(format!("data/d{}/e/f", *n / 50));
        std::fs::create_dir_all(&sub).unwrap();
        for _ in 0..10 {
            let place = if *n % 2 == 0 {
                dir.join("data")
            } else {
                sub.clone()
            };
            std::fs::write(place.join(format!("casa-{n}.log")), b"x").unwrap();
            *n += 1;
        }
        for _ in 0..3 {
            if count {
                start_counting();
            }
            daemon.turn(Some(50)).unwrap();
            if count {
                counted = stop_counting();
            }
        }
    };
    for _ in 0..30 {
        round(&mut daemon, false, &mut n);
    }
    let before_events = status(&dir)["services"]["relocate"]["counters"]["events_total"]
        .as_u64()
        .unwrap();
    let before = stop_counting();
    for _ in 0..120 {
        round(&mut daemon, true, &mut n);
    }
    // Let everything settle, still counting, and write a snapshot.
    for _ in 0..10 {
        start_counting();
        daemon.turn(Some(50)).unwrap();
        counted = stop_counting();
    }
    let after = status(&dir);
    let events = after["services"]["relocate"]["counters"]["events_total"]
        .as_u64()
        .unwrap()
        - before_events;
    assert!(events >= 1000, "only {events} events were handled");
    assert_eq!(
        counted - before,
        0,
        "{} allocations while handling {events} events",
        counted - before
    );
    let moved = std::fs::read_dir(dir.join("data/state/logs"))
        .unwrap()
        .count();
    assert_eq!(moved, n, "every file was moved");
    daemon.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
