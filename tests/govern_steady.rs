//! `govern` after READY=1 allocates nothing: with a counting global
//! allocator, the real daemon loop runs /proc scans, proc-connector events
//! (where available), attaches (group, limit files, cgroup.procs), exits
//! (group removal) and status snapshots with the governed-process details,
//! and the count does not move.
//!
//! The daemon runs in this test's thread. Named children are forked and
//! killed with counting paused: spawning is the test's doing, not the
//! daemon's.

mod common;

use std::time::{Duration, Instant};

use edgekeeper::daemon::Daemon;
use edgekeeper::sys::alloc::{CountingAllocator, start_counting, stop_counting};
use edgekeeper::sys::named_child::NamedChild;
use edgekeeper::sys::notify::Notifier;
use nix::sys::signal::{Signal, raise};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn governing_processes_allocates_nothing() {
    let (dir, config) = common::scratch_config(
        "govern-steady",
        r#"{"state_dir": "state", "run_dir": "run", "status_every": "100ms",
            "log": {"file": "log/edgekeeper.log", "level": "info"},
            "govern": {"cgroup_root": "cg", "scan_every": "1s",
              "filters": {"min_runtime": "0s", "blocked_uids": [], "blocked_dirs": []},
              "targets": [{"comm": "ek-steady", "cpu_quota": 150}, {"comm": "ek-steady-other"}]}}"#,
    );
    let mut daemon = Daemon::start(&config, Notifier::none()).unwrap();
    let run_for = |daemon: &mut Daemon, how_long: Duration, turns: &mut u32| {
        let end = Instant::now() + how_long;
        while Instant::now() < end {
            if *turns % 2 == 0 {
                raise(Signal::SIGUSR1).unwrap();
            }
            daemon.turn(Some(100)).unwrap();
            *turns += 1;
        }
    };
    // Warm-up: one process found, governed, exited, every path once.
    let mut turns = 0;
    let child = NamedChild::spawn(c"ek-steady", None, 0).unwrap();
    run_for(&mut daemon, Duration::from_millis(2500), &mut turns);
    drop(child);
    run_for(&mut daemon, Duration::from_millis(2500), &mut turns);

    let before = stop_counting();
    let mut counted_turns = 0;
    for _ in 0..3 {
        let child = NamedChild::spawn(c"ek-steady", None, 0).unwrap();
        start_counting();
        run_for(&mut daemon, Duration::from_millis(1300), &mut counted_turns);
        stop_counting();
        drop(child);
        start_counting();
        run_for(&mut daemon, Duration::from_millis(1300), &mut counted_turns);
        stop_counting();
    }
    let after = stop_counting();
    assert_eq!(
        after - before,
        0,
        "{} allocations in {counted_turns} turns",
        after - before
    );
    assert!(counted_turns > 100, "{counted_turns} turns");
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/status.json")).unwrap())
            .unwrap();
    let c = &status["services"]["govern"]["counters"];
    assert_eq!(c["attached_total"], 4, "{c}");
    assert_eq!(c["exited_total"], 4, "{c}");
    assert_eq!(c["groups_removed_total"], 4, "{c}");
    assert!(c["scans_total"].as_u64().unwrap() >= 6, "{c}");
    daemon.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
