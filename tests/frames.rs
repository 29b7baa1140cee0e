//! frames on real capture directories with real inotify and the real
//! binary: sidecars for every frame, corrupt, frozen, dark and dropped
//! frames, stalls, capture restarts, catch-up over a big directory, the
//! external analyzer, and unreadable frames.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Sandbox, wait_for};
use edgekeeper::services::frames::writer::{FrameWriter, Kind};

fn frames_config(extra: &str) -> String {
    format!(
        r#""alerts": {{"dir": "alerts", "cooldown": "1h"}},
  "frames": [{{"name": "cam0", "dir": "cam0", "match": ["capture_*.jpg"], "catch_up": 10{extra}}}]"#
    )
}

fn sidecar(sb: &Sandbox, n: u64) -> Option<serde_json::Value> {
    let name = FrameWriter::name(n).replace(".jpg", ".json");
    let text = std::fs::read_to_string(sb.path("cam0").join(name)).ok()?;
    serde_json::from_str(&text).ok()
}

fn sidecars(sb: &Sandbox) -> usize {
    sb.files_in("cam0")
        .iter()
        .filter(|n| n.ends_with(".json"))
        .count()
}

fn alerts_of(sb: &Sandbox, kind: &str) -> usize {
    sb.files_in("alerts")
        .iter()
        .filter(|n| n.ends_with(&format!("-{kind}.json")))
        .count()
}

#[test]
fn two_thousand_frames_get_two_thousand_matching_sidecars() {
    let sb = Sandbox::new("frames-2000");
    std::fs::create_dir_all(sb.path("cam0")).unwrap();
    sb.write_config(&frames_config(r#", "stall_after": "0s""#));
    let daemon = sb.start();
    let mut w = FrameWriter::new(&sb.path("cam0"), 1280, 720, 20_000);
    let mut expected = Vec::new();
    for _ in 0..2000 {
        let (name, bytes) = w.write(Kind::Fresh).unwrap();
        expected.push((name, bytes.len() as u64, xxhash_rust::xxh3::xxh3_64(bytes)));
    }
    // The first frame's hash as `xxhsum -H3 capture_000000001.jpg` (xxHash
    // 0.8.1, Debian 12) prints it: sidecars can be checked in the field.
    assert_eq!(expected[0].2, 0x302b_ea09_c3f2_a20e);
    wait_for(Duration::from_secs(120), || sidecars(&sb) == 2000).expect("2000 sidecars");
    for (i, (name, len, hash)) in expected.iter().enumerate() {
        let s = sidecar(&sb, i as u64 + 1).unwrap();
        assert_eq!(s["frame"], name.as_str());
        assert_eq!(s["seq"], i + 1);
        assert_eq!(s["bytes"], *len);
        assert_eq!(
            (s["width"].as_u64(), s["height"].as_u64()),
            (Some(1280), Some(720))
        );
        assert_eq!(s["valid"], true);
        assert_eq!(s["hash"], format!("{hash:016x}"), "{name}");
        assert_eq!(s["dropped_before"], 0);
        assert!(s["analysed_at"].as_str().unwrap().ends_with('Z'));
    }
    let st = daemon
        .status_where(|v| v["services"]["frames"]["counters"]["frames_analysed_total"] == 2000);
    let c = &st["services"]["frames"]["counters"];
    assert_eq!(c["frames_invalid_total"], 0);
    assert_eq!(c["frames_dropped_total"], 0);
    assert_eq!(st["services"]["frames"]["health"], "healthy");
    // No temporary sidecar is left behind.
    assert!(sb.files_in("cam0").iter().all(|n| !n.ends_with(".tmp")));
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn corrupt_frozen_dark_and_dropped_frames_raise_their_alerts_once() {
    let sb = Sandbox::new("frames-alerts");
    std::fs::create_dir_all(sb.path("cam0")).unwrap();
    sb.write_config(&frames_config(
        r#", "stall_after": "0s", "freeze_after": 30"#,
    ));
    let daemon = sb.start();
    let mut w = FrameWriter::new(&sb.path("cam0"), 640, 480, 20_000);
    for _ in 0..10 {
        w.write(Kind::Fresh).unwrap();
    }
    w.write(Kind::Truncated).unwrap(); // 11
    w.write(Kind::Dark).unwrap(); // 12
    w.jump_to(20); // 13..19 dropped
    w.write(Kind::Fresh).unwrap(); // 20
    for _ in 0..39 {
        w.write(Kind::Repeat).unwrap(); // 21..59: 40 identical in a row
    }
    wait_for(Duration::from_secs(60), || sidecar(&sb, 59).is_some()).expect("all analysed");
    let s11 = sidecar(&sb, 11).unwrap();
    assert_eq!(s11["valid"], false);
    assert_eq!(sidecar(&sb, 12).unwrap()["dark"], true);
    assert_eq!(sidecar(&sb, 20).unwrap()["dropped_before"], 7);
    assert_eq!(sidecar(&sb, 49).unwrap()["identical_run"], 30);
    assert_eq!(alerts_of(&sb, "frame_corrupt"), 1);
    assert_eq!(alerts_of(&sb, "frame_dark"), 1);
    assert_eq!(alerts_of(&sb, "frame_gap"), 1);
    assert_eq!(
        alerts_of(&sb, "frame_freeze"),
        1,
        "one alert for the whole frozen run"
    );
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            sb.path("alerts").join(
                sb.files_in("alerts")
                    .iter()
                    .find(|n| n.ends_with("-frame_freeze.json"))
                    .unwrap(),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(doc["source"], "cam0");
    // A second frozen run within the cooldown is not alerted again.
    w.write(Kind::Fresh).unwrap(); // 60
    for _ in 0..31 {
        w.write(Kind::Repeat).unwrap();
    }
    let last = w.next - 1;
    wait_for(Duration::from_secs(60), || sidecar(&sb, last).is_some())
        .expect("second run analysed");
    let st = daemon.status_where(|v| v["services"]["frames"]["counters"]["freezes_total"] == 2);
    assert_eq!(alerts_of(&sb, "frame_freeze"), 1, "cooldown holds");
    assert!(st["alerts"]["suppressed"].as_u64().unwrap() >= 1);
    let c = &st["services"]["frames"]["counters"];
    assert_eq!(c["frames_dropped_total"], 7);
    assert_eq!(c["frames_invalid_total"], 1);
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn a_pause_longer_than_stall_after_raises_one_stall_and_logs_the_recovery() {
    let sb = Sandbox::new("frames-stall");
    std::fs::create_dir_all(sb.path("cam0")).unwrap();
    sb.write_config(&frames_config(r#", "stall_after": "1s""#));
    let daemon = sb.start();
    let mut w = FrameWriter::new(&sb.path("cam0"), 640, 480, 5_000);
    for _ in 0..10 {
        w.write(Kind::Fresh).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let st = daemon.status_where(|v| v["services"]["frames"]["counters"]["stalls_total"] == 1);
    assert_eq!(st["services"]["frames"]["health"], "degraded");
    assert_eq!(st["services"]["frames"]["details"][0]["stalled"], true);
    assert_eq!(alerts_of(&sb, "frame_stall"), 1, "one alert for one pause");
    for _ in 0..5 {
        w.write(Kind::Fresh).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = daemon.status_where(|v| v["services"]["frames"]["details"][0]["stalled"] == false);
    assert_eq!(st["services"]["frames"]["counters"]["stalls_total"], 1);
    let (code, _, err) = daemon.stop();
    assert_eq!(code, 0);
    assert!(err.contains("frames resumed after"), "{err}");
    assert_eq!(alerts_of(&sb, "frame_stall"), 1);
}

#[test]
fn a_capture_restart_is_a_reset_and_stale_sidecars_are_redone() {
    let sb = Sandbox::new("frames-restart");
    std::fs::create_dir_all(sb.path("cam0")).unwrap();
    sb.write_config(&frames_config(r#", "stall_after": "0s""#));
    let daemon = sb.start();
    let mut w = FrameWriter::new(&sb.path("cam0"), 640, 480, 5_000);
    for _ in 0..20 {
        w.write(Kind::Fresh).unwrap();
    }
    wait_for(Duration::from_secs(30), || sidecar(&sb, 20).is_some()).expect("first run analysed");
    let before = sidecar(&sb, 3).unwrap()["hash"].clone();
    // ffmpeg restarted without -start_number: names from 1 again, new
    // content, while the old sidecars are still there.
    std::thread::sleep(Duration::from_millis(20));
    w.jump_to(1);
    for _ in 0..5 {
        w.write(Kind::Dark).unwrap();
    }
    wait_for(Duration::from_secs(30), || {
        sidecar(&sb, 5)
            .is_some_and(|s| s["hash"] != sidecar(&sb, 1).unwrap()["hash"] || s["dark"] == true)
    })
    .expect("re-analysed");
    let st =
        daemon.status_where(|v| v["services"]["frames"]["counters"]["sequence_resets_total"] == 1);
    let c = &st["services"]["frames"]["counters"];
    assert_eq!(c["frames_dropped_total"], 0, "a reset is not a gap");
    assert!(c["stale_sidecars_total"].as_u64().unwrap() >= 5);
    assert_ne!(
        sidecar(&sb, 3).unwrap()["hash"],
        before,
        "the stale sidecar was rewritten"
    );
    assert_eq!(sidecar(&sb, 1).unwrap()["reset"], true);
    assert_eq!(alerts_of(&sb, "frame_gap"), 0);
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn catch_up_analyses_exactly_the_newest_unanalysed_frames_of_fifty_thousand() {
    let sb = Sandbox::new("frames-catchup");
    let dir = sb.path("cam0");
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = FrameWriter::new(&dir, 64, 48, 200);
    for _ in 0..50_000 {
        w.write(Kind::Fresh).unwrap();
    }
    // The newest three already have sidecars: they do not count.
    for n in [49_998u64, 49_999, 50_000] {
        std::fs::write(
            dir.join(FrameWriter::name(n).replace(".jpg", ".json")),
            "{}",
        )
        .unwrap();
    }
    sb.write_config(&frames_config(r#", "stall_after": "0s""#));
    let t0 = Instant::now();
    let daemon = sb.start();
    let ready = t0.elapsed();
    let st = daemon.status();
    assert_eq!(st["services"]["frames"]["counters"]["catch_up_total"], 10);
    assert_eq!(
        st["services"]["frames"]["counters"]["skipped_total"],
        50_000 - 3 - 10,
        "the rest is counted"
    );
    let mut with_sidecar: Vec<u64> = sb
        .files_in("cam0")
        .iter()
        .filter_map(|n| {
            n.strip_suffix(".json")?
                .strip_prefix("capture_")?
                .parse()
                .ok()
        })
        .collect();
    with_sidecar.sort();
    let expect: Vec<u64> = (49_988..=50_000).collect();
    assert_eq!(
        with_sidecar, expect,
        "the 10 newest without a sidecar, plus the 3 that had one"
    );
    assert_eq!(sidecar(&sb, 49_988).unwrap()["seq"], 49_988);
    eprintln!("ready after {ready:?} with 50,000 frames present");
    assert!(
        ready < Duration::from_secs(20),
        "catch-up must not stat every frame: {ready:?}"
    );
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn an_unreadable_frame_gets_an_error_sidecar_once() {
    let sb = Sandbox::new("frames-unreadable");
    let dir = sb.path("cam0");
    std::fs::create_dir_all(&dir).unwrap();
    // A FIFO named like a frame: opening it for reading must neither block
    // the loop nor be retried forever.
    nix::unistd::mkfifo(
        &dir.join("capture_000000005.jpg"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    sb.write_config(&frames_config(r#", "stall_after": "0s""#));
    let daemon = sb.start();
    let s = sidecar(&sb, 5).expect("error sidecar");
    assert!(
        s["error"].as_str().unwrap().contains("not a regular file"),
        "{s}"
    );
    assert_eq!(daemon.stop().0, 0);
    let daemon = sb.start();
    let st = daemon.status();
    assert_eq!(
        st["services"]["frames"]["counters"]["read_errors_total"], 0,
        "not retried after a restart"
    );
    assert_eq!(daemon.stop().0, 0);
}

fn script(sb: &Sandbox, name: &str, body: &str) -> String {
    let p = sb.path(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

#[test]
fn the_external_analyzer_merges_its_output_and_failures_are_recorded() {
    let sb = Sandbox::new("frames-analyzer");
    std::fs::create_dir_all(sb.path("cam0")).unwrap();
    // Prints a JSON object for odd frames, fails for frame 4, hangs for 6.
    let analyse = script(
        &sb,
        "analyse.sh",
        r#"case "$1" in
  *000000004.jpg) echo oops; exit 3 ;;
  *000000006.jpg) sleep 31.5 ;;
  *000000008.jpg) echo 'not json' ;;
  *) printf '{"objects": 3, "path": "%s"}\n' "$1" ;;
esac"#,
    );
    sb.write_config(&frames_config(&format!(
        r#", "stall_after": "0s", "analyzer": {{"command": ["{analyse}", "{{path}}"], "timeout": "700ms", "max_parallel": 2}}"#
    )));
    let daemon = sb.start();
    let mut w = FrameWriter::new(&sb.path("cam0"), 640, 480, 5_000);
    for _ in 0..8 {
        w.write(Kind::Fresh).unwrap();
    }
    wait_for(Duration::from_secs(30), || {
        (1..=8).all(|n| sidecar(&sb, n).is_some())
    })
    .expect("all 8 sidecars");
    let s1 = sidecar(&sb, 1).unwrap();
    assert_eq!(s1["analyzer"]["objects"], 3, "{s1}");
    assert!(
        s1["analyzer"]["path"]
            .as_str()
            .unwrap()
            .ends_with("/cam0/capture_000000001.jpg")
    );
    assert_eq!(s1["width"], 640, "built-in fields stay");
    assert_eq!(
        sidecar(&sb, 4).unwrap()["analyzer"]["error"],
        "exited with status 3"
    );
    assert!(
        sidecar(&sb, 6).unwrap()["analyzer"]["error"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    assert_eq!(
        sidecar(&sb, 8).unwrap()["analyzer"]["error"],
        "output is not a JSON object"
    );
    let st =
        daemon.status_where(|v| v["services"]["frames"]["counters"]["analyzer_runs_total"] == 8);
    let c = &st["services"]["frames"]["counters"];
    assert_eq!(c["analyzer_failures_total"], 3);
    assert_eq!(c["analyzer_timeouts_total"], 1);
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn the_analyzer_never_runs_more_than_max_parallel_at_once() {
    let sb = Sandbox::new("frames-parallel");
    std::fs::create_dir_all(sb.path("cam0")).unwrap();
    let log = sb.path("runs.log");
    // Each run notes its start and end with a monotonic-enough clock.
    let analyse = script(
        &sb,
        "analyse.sh",
        &format!(
            r#"echo "start $(date +%s%N)" >> {log}
sleep 0.3
echo "end $(date +%s%N)" >> {log}
echo '{{}}'"#,
            log = log.display()
        ),
    );
    sb.write_config(&frames_config(&format!(
        r#", "stall_after": "0s", "analyzer": {{"command": ["{analyse}", "{{path}}"], "timeout": "10s", "max_parallel": 2}}"#
    )));
    let daemon = sb.start();
    let mut w = FrameWriter::new(&sb.path("cam0"), 640, 480, 5_000);
    for _ in 0..8 {
        w.write(Kind::Fresh).unwrap();
    }
    wait_for(Duration::from_secs(60), || {
        (1..=8).all(|n| sidecar(&sb, n).is_some_and(|s| s["analyzer"].is_object()))
    })
    .expect("all analysed");
    let text = std::fs::read_to_string(&log).unwrap();
    let mut events: Vec<(u128, i32)> = text
        .lines()
        .map(|l| {
            let (what, t) = l.split_once(' ').unwrap();
            (t.parse().unwrap(), if what == "start" { 1 } else { -1 })
        })
        .collect();
    events.sort();
    let mut running = 0;
    let mut most = 0;
    for (_, d) in events {
        running += d;
        most = most.max(running);
    }
    assert_eq!(
        most, 2,
        "at most max_parallel at once, and it was used:\n{text}"
    );
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn a_missing_capture_directory_is_unhealthy_until_it_appears() {
    let sb = Sandbox::new("frames-missing");
    sb.write_config(&frames_config(r#", "stall_after": "0s""#));
    let daemon = sb.start();
    let st = daemon.status();
    assert_eq!(st["services"]["frames"]["health"], "unhealthy");
    std::fs::create_dir_all(sb.path("cam0")).unwrap();
    let st = daemon.status_where(|v| v["services"]["frames"]["health"] == "healthy");
    assert_eq!(st["services"]["frames"]["watches"], 1);
    let mut w = FrameWriter::new(&sb.path("cam0"), 64, 48, 500);
    w.write(Kind::Fresh).unwrap();
    wait_for(Duration::from_secs(20), || sidecar(&sb, 1).is_some()).expect("analysed");
    assert!(Path::new(&sb.path("cam0/capture_000000001.json")).exists());
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn a_reload_adopts_new_limits_without_losing_the_stream() {
    let sb = Sandbox::new("frames-reload");
    std::fs::create_dir_all(sb.path("cam0")).unwrap();
    sb.write_config(&frames_config(
        r#", "stall_after": "0s", "freeze_after": 0"#,
    ));
    let daemon = sb.start();
    let mut w = FrameWriter::new(&sb.path("cam0"), 320, 240, 2_000);
    for _ in 0..5 {
        w.write(Kind::Fresh).unwrap();
    }
    wait_for(Duration::from_secs(20), || sidecar(&sb, 5).is_some()).expect("analysed");
    // Stall detection on, freezes at 3: applied live.
    sb.write_config(&frames_config(
        r#", "stall_after": "1s", "freeze_after": 3"#,
    ));
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let st = daemon.status_where(|v| v["core"]["config_reloads"] == 1);
    assert_eq!(
        st["services"]["frames"]["counters"]["frames_analysed_total"], 5,
        "the stream's state is kept"
    );
    for _ in 0..3 {
        w.write(Kind::Repeat).unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    let st = daemon.status_where(|v| v["services"]["frames"]["counters"]["stalls_total"] == 1);
    assert_eq!(st["services"]["frames"]["counters"]["freezes_total"], 1);
    assert_eq!(
        sidecar(&sb, 6).unwrap()["dropped_before"],
        0,
        "no false gap after the reload"
    );
    assert_eq!(daemon.stop().0, 0);
}
