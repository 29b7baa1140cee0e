//! After READY=1 the event path allocates nothing: with a counting global
//! allocator installed, a thousand turns of the real daemon loop (status
//! snapshots on SIGUSR1 and on their timer, watchdog pings to a real notify
//! socket, signals, state and log flushes) leave the count unchanged.
//!
//! The daemon runs in this test's thread; signals are raised at this thread
//! (`raise` is thread-directed), where the daemon's signalfd takes them.

use std::os::unix::net::UnixDatagram;

use edgekeeper::daemon::Daemon;
use edgekeeper::sys::alloc::{CountingAllocator, start_counting, stop_counting};
use edgekeeper::sys::notify::Notifier;
use nix::sys::signal::{Signal, raise};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn a_thousand_events_allocate_nothing() {
    let dir = std::env::temp_dir().join(format!("edgekeeper-steady-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("edgekeeper.json");
    std::fs::write(
        &config,
        r#"{"state_dir": "state", "run_dir": "run", "status_every": "100ms",
            "log": {"file": "log/edgekeeper.log", "level": "info"},
            "alerts": {"dir": "alerts"}}"#,
    )
    .unwrap();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_nonblocking(true).unwrap();
    let notifier = Notifier::to_path(&socket_path, Some(20_000)).unwrap(); // ping every 10 ms
    let mut daemon = Daemon::start(&config, notifier).unwrap();

    let mut drain = [0u8; 512];
    let mut pings = 0;
    let mut turn = |daemon: &mut Daemon, i: u32| {
        if i % 2 == 0 {
            raise(Signal::SIGUSR1).unwrap();
        }
        daemon.turn(Some(1000)).unwrap();
        while let Ok(n) = socket.recv(&mut drain) {
            if &drain[..n] == b"WATCHDOG=1" {
                pings += 1;
            }
        }
    };
    // Warm up: every path once (first writes, first flushes, the STATUS=
    // line settling).
    for i in 0..50 {
        turn(&mut daemon, i);
    }
    let before = stop_counting();
    start_counting();
    for i in 0..1000 {
        turn(&mut daemon, i);
    }
    let after = stop_counting();
    assert_eq!(
        after - before,
        0,
        "{} allocations in 1000 turns",
        after - before
    );
    assert!(pings > 50, "watchdog pings were part of the load: {pings}");
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/status.json")).unwrap())
            .unwrap();
    assert!(status["core"]["status_writes"].as_u64().unwrap() >= 500);
    assert!(!daemon.is_stopping());
    daemon.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
