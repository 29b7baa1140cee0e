//! frames' event path allocates nothing after start (without an external
//! analyzer): with a counting global allocator, a thousand frames renamed
//! into a real capture directory are analysed, hashed and given sidecars by
//! the real daemon loop in this thread without a single allocation.

use edgekeeper::daemon::Daemon;
use edgekeeper::services::frames::writer::{FrameWriter, Kind};
use edgekeeper::sys::alloc::{CountingAllocator, start_counting, stop_counting};
use edgekeeper::sys::notify::Notifier;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn a_thousand_frames_allocate_nothing() {
    let dir = std::env::temp_dir().join(format!("edgekeeper-frames-steady-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("cam0")).unwrap();
    let config = dir.join("edgekeeper.json");
    std::fs::write(
        &config,
        r#"{"state_dir": "state", "run_dir": "run", "status_every": "200ms",
            "log": {"file": "log/edgekeeper.log", "level": "info"},
            "alerts": {"dir": "alerts", "cooldown": "1h"},
            "frames": [{"name": "cam0", "dir": "cam0", "match": ["capture_*.jpg"], "stall_after": "2s", "freeze_after": 5}]}"#,
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, Notifier::none()).unwrap();
    let mut writer = FrameWriter::new(&dir.join("cam0"), 1280, 720, 30_000);
    let mut counted = 0u64;
    let mut turn = |daemon: &mut Daemon, count: bool| {
        if count {
            start_counting();
        }
        daemon.turn(Some(20)).unwrap();
        if count {
            counted = stop_counting();
        }
    };
    // Warm up every path: fresh, frozen (with its alert), dark, corrupt,
    // gaps and a reset, so each alert has been raised once (cooldown).
    let kinds = [
        Kind::Fresh,
        Kind::Repeat,
        Kind::Repeat,
        Kind::Repeat,
        Kind::Repeat,
        Kind::Repeat,
        Kind::Dark,
        Kind::Truncated,
    ];
    for round in 0..40 {
        writer.write(kinds[round % kinds.len()]).unwrap();
        if round == 20 {
            writer.jump_to(writer.next + 3);
        }
        turn(&mut daemon, false);
    }
    let before = stop_counting();
    for round in 0..1000 {
        writer.write(kinds[round % kinds.len()]).unwrap();
        if round % 250 == 0 {
            writer.jump_to(writer.next + 2);
        }
        turn(&mut daemon, true);
    }
    for _ in 0..20 {
        turn(&mut daemon, true);
    }
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/status.json")).unwrap())
            .unwrap();
    let analysed = status["services"]["frames"]["counters"]["frames_analysed_total"]
        .as_u64()
        .unwrap();
    assert!(analysed >= 1040, "{analysed} frames analysed");
    assert_eq!(
        counted - before,
        0,
        "{} allocations while analysing 1000 frames",
        counted - before
    );
    daemon.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
