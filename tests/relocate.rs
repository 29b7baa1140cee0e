//! relocate on real directories with real inotify: bursts into new nested
//! directories, queue overflow, renamed directories, exclusions, collisions,
//! odd names, the watch limit, failures that stay put, and the one-shot
//! `edgekeeper sweep`.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Sandbox, stderr, stdout, wait_for};
use nix::sys::signal::Signal;

/// Every regular file below `dir`, path relative to `dir` → content.
fn files_under(dir: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(dir).unwrap().as_os_str().as_bytes().to_vec();
                if let Ok(content) = std::fs::read(&p) {
                    out.insert(rel, content);
                }
            }
        }
    }
    out
}

fn count_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0)
}

fn rule(root: &str, target: &str, extra: &str) -> String {
    format!(
        r#""relocate": [{{"name": "casa", "root": "{root}", "match": ["casa-*.log"], "target": "{target}", "exclude": ["state/logs", ".git"], "sweep_every": "1m"{extra}}}]"#
    )
}

/// A directory on another file system than the sandbox (tmpfs), if any.
struct OtherFs(PathBuf);

impl OtherFs {
    fn new(sb: &Sandbox, name: &str) -> Option<OtherFs> {
        use std::os::unix::fs::MetadataExt;
        let base = Path::new("/dev/shm");
        let dev = std::fs::metadata(base).ok()?.dev();
        if dev == std::fs::metadata(&sb.dir).unwrap().dev() {
            eprintln!(
                "skipping: /dev/shm is on the same file system as {}",
                sb.dir.display()
            );
            return None;
        }
        let p = base.join(format!("edgekeeper-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Some(OtherFs(p))
    }
}

impl Drop for OtherFs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_burst_into_new_nested_directories_arrives_whole_and_once() {
    let sb = Sandbox::new("burst");
    std::fs::create_dir_all(sb.path("data")).unwrap();
    sb.write_config(&rule("data", "data/state/logs", ""));
    let daemon = sb.start();
    // 100 chains of 5 nested directories made during the burst, 20 files in
    // each: 500 new directories, 10,000 files, many written before the
    // watch on their directory can exist.
    let mut expected = BTreeMap::new();
    for top in 0..100 {
        let mut dir = sb.path("data").join(format!("run{top}"));
        for level in 0..5 {
            dir = dir.join(format!("l{level}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..20 {
                let name = format!("casa-{top}-{level}-{f}.log");
                let content = format!("{name} content\n").repeat(f + 1);
                std::fs::write(dir.join(&name), &content).unwrap();
                expected.insert(name.into_bytes(), content.into_bytes());
            }
        }
    }
    let target = sb.path("data/state/logs");
    let done = wait_for(Duration::from_secs(120), || count_in(&target) >= 10_000);
    assert!(
        done.is_some(),
        "only {} of 10000 arrived",
        count_in(&target)
    );
    let moved = files_under(&target);
    assert_eq!(
        moved, expected,
        "every file once, byte for byte, under its own name"
    );
    let left: Vec<_> = files_under(&sb.path("data"))
        .into_keys()
        .filter(|k| !k.starts_with(b"state/"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let s = daemon.status();
    assert_eq!(s["services"]["relocate"]["health"], "healthy");
    assert_eq!(
        s["services"]["relocate"]["counters"]["move_failures_total"],
        0
    );
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn files_created_while_the_daemon_is_stopped_past_the_queue_all_arrive() {
    let sb = Sandbox::new("overflow");
    std::fs::create_dir_all(sb.path("data/a")).unwrap();
    sb.write_config(&rule("data", "data/state/logs", ""));
    let daemon = sb.start();
    daemon.signal(Signal::SIGSTOP);
    // More events than fs.inotify.max_queued_events (16384 by default).
    for i in 0..20_000 {
        let dir = if i % 2 == 0 { "data" } else { "data/a" };
        std::fs::write(sb.path(dir).join(format!("casa-{i}.log")), i.to_string()).unwrap();
    }
    daemon.signal(Signal::SIGCONT);
    let target = sb.path("data/state/logs");
    let done = wait_for(Duration::from_secs(120), || count_in(&target) >= 20_000);
    assert!(
        done.is_some(),
        "only {} of 20000 arrived",
        count_in(&target)
    );
    let moved = files_under(&target);
    for i in 0..20_000 {
        assert_eq!(
            moved
                .get(format!("casa-{i}.log").as_bytes())
                .map(Vec::as_slice),
            Some(i.to_string().as_bytes())
        );
    }
    let s = daemon.status_where(|_| true);
    let overflows = s["services"]["relocate"]["counters"]["overflows_total"]
        .as_u64()
        .unwrap();
    let max_queued: u64 = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if max_queued < 20_000 {
        assert!(overflows >= 1, "the queue must have overflowed: {s}");
    }
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn renamed_directories_are_followed_and_excluded_subtrees_left_alone() {
    let sb = Sandbox::new("rename");
    for d in [
        "data/a/b",
        "data/.git/objects",
        "data/state/logs",
        "data/keep/state/logs",
    ] {
        std::fs::create_dir_all(sb.path(d)).unwrap();
    }
    std::fs::write(sb.path("data/.git/objects/casa-git.log"), "in .git").unwrap();
    std::fs::write(sb.path("data/state/logs/casa-old.log"), "already moved").unwrap();
    sb.write_config(&rule("data", "data/state/logs", ""));
    let daemon = sb.start();
    // Rename a watched directory, then create a file inside its child: the
    // watch table must know the new path.
    std::fs::rename(sb.path("data/a"), sb.path("data/renamed")).unwrap();
    std::fs::write(sb.path("data/renamed/b/casa-after-rename.log"), "x").unwrap();
    // A directory renamed twice, quickly, with a file made in between.
    std::fs::create_dir_all(sb.path("data/one")).unwrap();
    std::fs::rename(sb.path("data/one"), sb.path("data/two")).unwrap();
    std::fs::write(sb.path("data/two/casa-two.log"), "two").unwrap();
    std::fs::rename(sb.path("data/two"), sb.path("data/renamed/b/three")).unwrap();
    std::fs::write(sb.path("data/renamed/b/three/casa-three.log"), "three").unwrap();
    // New excluded directories are not watched either.
    std::fs::create_dir_all(sb.path("data/sub/.git")).unwrap();
    std::fs::write(sb.path("data/sub/.git/casa-deep-git.log"), "deep .git").unwrap();
    let target = sb.path("data/state/logs");
    let done = wait_for(Duration::from_secs(20), || {
        ["casa-after-rename.log", "casa-two.log", "casa-three.log"]
            .iter()
            .all(|f| target.join(f).exists())
    });
    assert!(
        done.is_some(),
        "target holds {:?}",
        files_under(&target).keys().collect::<Vec<_>>()
    );
    // A full one-shot sweep with the same rules, then look again at what
    // must not move.
    assert_eq!(sb.run_cli(&["sweep"]).status.code(), Some(0));
    assert_eq!(
        std::fs::read(sb.path("data/.git/objects/casa-git.log")).unwrap(),
        b"in .git"
    );
    assert_eq!(
        std::fs::read(sb.path("data/sub/.git/casa-deep-git.log")).unwrap(),
        b"deep .git"
    );
    assert_eq!(
        std::fs::read(target.join("casa-old.log")).unwrap(),
        b"already moved"
    );
    assert!(
        !target.join("casa-old.1.log").exists(),
        "the target is never swept into itself"
    );
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn files_made_just_before_an_ancestor_is_renamed_still_arrive() {
    // Found by the demo under qemu: files created in a watched directory,
    // then its grandparent renamed, all before the daemon reads the queue.
    // The file events name the directory by its old path; they must not be
    // dropped as "gone" but scanned once the rename is known. The sweep is
    // an hour away, so only events and scans can deliver them.
    let sb = Sandbox::new("stale-path");
    std::fs::create_dir_all(sb.path("data/state/logs")).unwrap();
    sb.write_config(&rule("data", "data/state/logs", "").replace("\"1m\"", "\"1h\""));
    let daemon = sb.start();
    let mut made = Vec::new();
    for round in 0..5 {
        let dir = sb.path(&format!("data/obs-{round}/beam/scan"));
        std::fs::create_dir_all(&dir).unwrap();
        // Until the deepest directory is watched: a file made there
        // arrives by its event.
        let probe = format!("casa-{round}-probe.log");
        std::fs::write(dir.join(&probe), "probe").unwrap();
        made.push(probe.clone());
        let arrived = wait_for(Duration::from_secs(20), || {
            sb.path("data/state/logs").join(&probe).exists()
        });
        assert!(arrived.is_some(), "{probe} never arrived");
        daemon.signal(Signal::SIGSTOP);
        for i in 0..3 {
            let name = format!("casa-{round}-{i}.log");
            std::fs::write(dir.join(&name), format!("{round} {i}")).unwrap();
            made.push(name);
        }
        std::fs::rename(
            sb.path(&format!("data/obs-{round}")),
            sb.path(&format!("data/obs-{round}-renamed")),
        )
        .unwrap();
        daemon.signal(Signal::SIGCONT);
    }
    let target = sb.path("data/state/logs");
    let all = wait_for(Duration::from_secs(20), || {
        made.iter().all(|f| target.join(f).exists())
    });
    let left: Vec<_> = files_under(&sb.path("data"))
        .into_keys()
        .filter(|k| !k.starts_with(b"state/"))
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .collect();
    assert!(all.is_some(), "left behind: {left:?}");
    assert!(left.is_empty(), "{left:?}");
    let s = daemon.status();
    assert_eq!(
        s["services"]["relocate"]["counters"]["sweeps_total"], 1,
        "only the start-up sweep ran"
    );
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn the_same_name_from_two_directories_keeps_both() {
    let sb = Sandbox::new("collision");
    std::fs::create_dir_all(sb.path("data/x")).unwrap();
    std::fs::create_dir_all(sb.path("data/y")).unwrap();
    std::fs::create_dir_all(sb.path("data/state/logs")).unwrap();
    std::fs::write(sb.path("data/state/logs/casa-1.log"), "was here first").unwrap();
    sb.write_config(&rule("data", "data/state/logs", ""));
    let daemon = sb.start();
    std::fs::write(sb.path("data/x/casa-1.log"), "from x").unwrap();
    std::fs::write(sb.path("data/y/casa-1.log"), "from y").unwrap();
    let target = sb.path("data/state/logs");
    wait_for(Duration::from_secs(20), || count_in(&target) == 3).expect("three files");
    let mut contents: Vec<_> = files_under(&target).into_values().collect();
    contents.sort();
    assert_eq!(
        contents,
        [
            b"from x".to_vec(),
            b"from y".to_vec(),
            b"was here first".to_vec()
        ]
    );
    assert_eq!(
        std::fs::read(target.join("casa-1.log")).unwrap(),
        b"was here first"
    );
    assert!(target.join("casa-1.1.log").exists() && target.join("casa-1.2.log").exists());
    let s = daemon.status_where(|v| v["services"]["relocate"]["counters"]["collisions_total"] == 2);
    assert_eq!(
        s["services"]["relocate"]["counters"]["files_moved_total"],
        2
    );
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn names_with_spaces_newlines_and_invalid_utf8_move() {
    let sb = Sandbox::new("names");
    std::fs::create_dir_all(sb.path("data/dir with space")).unwrap();
    sb.write_config(&rule("data", "data/state/logs", ""));
    let daemon = sb.start();
    let names: [&[u8]; 4] = [
        b"casa- spaced out .log",
        b"casa-new\nline.log",
        b"casa-\xff\xfe.log",
        b"casa-\xc3\xa9t\xc3\xa9.log",
    ];
    for (i, n) in names.iter().enumerate() {
        std::fs::write(
            sb.path("data/dir with space").join(OsStr::from_bytes(n)),
            i.to_string(),
        )
        .unwrap();
    }
    let target = sb.path("data/state/logs");
    wait_for(Duration::from_secs(20), || count_in(&target) == names.len())
        .expect("all odd names moved");
    for (i, n) in names.iter().enumerate() {
        assert_eq!(
            std::fs::read(target.join(OsStr::from_bytes(n))).unwrap(),
            i.to_string().as_bytes()
        );
    }
    let (code, _, err) = daemon.stop();
    assert_eq!(code, 0);
    // The field log stays one line per event: the newline is escaped.
    let log = std::fs::read(sb.path("log/edgekeeper.log")).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("casa-new\\nline.log"), "{text}");
    assert!(text.contains("casa-\\xff\\xfe.log"), "{text}");
    assert!(err.contains("moved"), "{err}");
}

#[test]
fn beyond_the_watch_limit_the_sweep_still_moves_everything() {
    let sb = Sandbox::new("watch-limit");
    for i in 0..40 {
        std::fs::create_dir_all(sb.path(&format!("data/d{i}"))).unwrap();
    }
    sb.write_raw_config(&format!(
        "{{\"state_dir\": \"state\", \"run_dir\": \"run\", \"log\": {{\"file\": \"log/edgekeeper.log\"}}, \"alerts\": {{\"dir\": \"alerts\"}},\n\"limits\": {{\"max_watches\": 10}},\n{}}}",
        rule("data", "data/state/logs", "").replace(r#""sweep_every": "1m""#, r#""sweep_every": "1s", "sweep_every_busy": "1s""#)
    ));
    let daemon = sb.start();
    let s = daemon.status();
    let svc = &s["services"]["relocate"];
    assert_eq!(svc["health"], "degraded", "{svc}");
    assert!(
        svc["reason"]
            .as_str()
            .unwrap()
            .contains("limits.max_watches"),
        "{svc}"
    );
    assert!(svc["counters"]["unwatched_directories"].as_u64().unwrap() > 0);
    assert!(
        sb.files_in("alerts")
            .iter()
            .any(|f| f.ends_with("-watch_limit.json")),
        "{:?}",
        sb.files_in("alerts")
    );
    // Files in every directory, watched or not, arrive through the sweep.
    for i in 0..40 {
        std::fs::write(sb.path(&format!("data/d{i}/casa-{i}.log")), i.to_string()).unwrap();
    }
    let target = sb.path("data/state/logs");
    let done = wait_for(Duration::from_secs(30), || count_in(&target) == 40);
    assert!(done.is_some(), "{} of 40 moved", count_in(&target));
    let s = daemon.status_where(|_| true);
    assert!(
        s["services"]["relocate"]["counters"]["sweep_found_total"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn an_unusable_target_is_unhealthy_and_files_wait_at_their_source() {
    let sb = Sandbox::new("bad-target");
    std::fs::create_dir_all(sb.path("data/locked")).unwrap();
    std::fs::write(sb.path("data/locked/casa-stuck.log"), "stuck").unwrap();
    sb.write_config(&rule("data", "data/state/logs", "").replace(
        r#""sweep_every": "1m""#,
        r#""sweep_every": "1s", "sweep_every_busy": "1s""#,
    ));
    // The target path is taken by a file: it can be neither made nor used.
    std::fs::create_dir_all(sb.path("data/state")).unwrap();
    std::fs::write(sb.path("data/state/logs"), "not a directory").unwrap();
    let daemon = sb.start();
    let s = daemon.status();
    let svc = &s["services"]["relocate"];
    assert_eq!(svc["health"], "unhealthy", "{svc}");
    assert!(svc["reason"].as_str().unwrap().contains("target"), "{svc}");
    assert_eq!(
        std::fs::read(sb.path("data/locked/casa-stuck.log")).unwrap(),
        b"stuck",
        "still at its source"
    );
    // Fix the target: the next sweep moves the file and health recovers.
    std::fs::remove_file(sb.path("data/state/logs")).unwrap();
    let target = sb.path("data/state/logs");
    wait_for(Duration::from_secs(20), || {
        target.join("casa-stuck.log").exists()
    })
    .expect("retried and moved");
    daemon.status_where(|v| v["services"]["relocate"]["health"] == "healthy");
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn a_failed_move_is_logged_once_counted_and_retried() {
    let sb = Sandbox::new("failures");
    std::fs::create_dir_all(sb.path("data/state/logs")).unwrap();
    sb.write_config(&rule("data", "data/state/logs", "").replace(
        r#""sweep_every": "1m""#,
        r#""sweep_every": "1s", "sweep_every_busy": "1s""#,
    ));
    let daemon = sb.start();
    // While running, the target is replaced by a file (as root, permissions
    // would not stop a move; this does): every move fails at the target.
    std::fs::remove_dir_all(sb.path("data/state/logs")).unwrap();
    std::fs::write(sb.path("data/state/logs"), "blocker").unwrap();
    for i in 0..3 {
        std::fs::write(sb.path(&format!("data/casa-{i}.log")), "x").unwrap();
    }
    let s = daemon.status_where(|v| {
        v["services"]["relocate"]["counters"]["move_failures_total"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    });
    let relocate = &s["services"]["relocate"];
    assert!(
        relocate["details"][0]["last_failure"]
            .as_str()
            .unwrap()
            .contains("target"),
        "{relocate}"
    );
    for i in 0..3 {
        assert!(
            sb.path(&format!("data/casa-{i}.log")).exists(),
            "stays at its source"
        );
    }
    std::fs::remove_file(sb.path("data/state/logs")).unwrap();
    let target = sb.path("data/state/logs");
    wait_for(Duration::from_secs(20), || count_in(&target) == 3)
        .expect("moved once the target is back");
    let (code, _, err) = daemon.stop();
    assert_eq!(code, 0);
    assert_eq!(
        err.matches("cannot move casa-").count(),
        1,
        "logged once per cause: {err}"
    );
    assert!(
        sb.files_in("alerts")
            .iter()
            .any(|f| f.ends_with("-relocate_failed.json"))
    );
}

#[test]
fn min_age_holds_a_file_back_until_it_is_quiet() {
    let sb = Sandbox::new("min-age");
    std::fs::create_dir_all(sb.path("data")).unwrap();
    sb.write_config(&rule("data", "data/state/logs", r#", "min_age": "1500ms""#));
    let daemon = sb.start();
    let start = std::time::Instant::now();
    std::fs::write(sb.path("data/casa-young.log"), "young").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sb.path("data/casa-young.log").exists(),
        "not moved before min_age"
    );
    let target = sb.path("data/state/logs/casa-young.log");
    wait_for(Duration::from_secs(20), || target.exists()).expect("moved after min_age");
    assert!(start.elapsed() >= Duration::from_millis(1000));
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn sweep_moves_everything_once_and_dry_run_changes_nothing() {
    let sb = Sandbox::new("sweep-cmd");
    for d in ["data/a/b", "data/.git"] {
        std::fs::create_dir_all(sb.path(d)).unwrap();
    }
    for f in [
        "data/casa-1.log",
        "data/a/casa-2.log",
        "data/a/b/casa-3.log",
        "data/.git/casa-4.log",
        "data/a/other.txt",
    ] {
        std::fs::write(sb.path(f), f).unwrap();
    }
    std::os::unix::fs::symlink("/etc/hostname", sb.path("data/a/casa-link.log")).unwrap();
    sb.write_config(&rule("data", "data/state/logs", ""));
    let dry = sb.run_cli(&["sweep", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    let text = stdout(&dry);
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("would move "))
            .count(),
        3,
        "{text}"
    );
    assert!(sb.path("data/casa-1.log").exists(), "dry run moved nothing");
    let out = sb.run_cli(&["sweep", "--only", "relocate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("moved ")).count(),
        3,
        "{text}"
    );
    assert!(text.contains("/data/a/b/casa-3.log -> "), "{text}");
    let moved = files_under(&sb.path("data/state/logs"));
    assert_eq!(moved.len(), 3);
    assert!(sb.path("data/.git/casa-4.log").exists(), "excluded");
    assert!(sb.path("data/a/other.txt").exists(), "not matching");
    assert!(
        std::fs::symlink_metadata(sb.path("data/a/casa-link.log"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "links are never moved"
    );
    // A second sweep finds nothing.
    let again = sb.run_cli(&["sweep"]);
    assert_eq!(stdout(&again).lines().count(), 0);
}

#[test]
fn a_missing_root_is_unhealthy_until_it_appears() {
    let sb = Sandbox::new("missing-root");
    sb.write_config(
        &rule("data", "/dev/null/never", "")
            .replace("/dev/null/never", &sb.path("target").display().to_string())
            .replace(
                r#""sweep_every": "1m""#,
                r#""sweep_every": "1s", "sweep_every_busy": "1s""#,
            ),
    );
    let daemon = sb.start();
    let s = daemon.status();
    assert_eq!(s["services"]["relocate"]["health"], "unhealthy");
    assert!(
        s["services"]["relocate"]["reason"]
            .as_str()
            .unwrap()
            .contains("No such file"),
        "{}",
        s["services"]
    );
    std::fs::create_dir_all(sb.path("data/x")).unwrap();
    std::fs::write(sb.path("data/x/casa-late.log"), "late").unwrap();
    wait_for(Duration::from_secs(20), || {
        sb.path("target/casa-late.log").exists()
    })
    .expect("found once the root exists");
    let s = daemon.status_where(|v| v["services"]["relocate"]["health"] == "healthy");
    assert!(s["services"]["relocate"]["watches"].as_u64().unwrap() >= 2);
    // And now it is watched: a new file moves at once, not at the sweep.
    std::fs::write(sb.path("data/x/casa-watched.log"), "w").unwrap();
    wait_for(Duration::from_secs(20), || {
        sb.path("target/casa-watched.log").exists()
    })
    .expect("moved");
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn a_log_kept_open_by_its_writer_is_not_copied_across_file_systems_until_closed() {
    let sb = Sandbox::new("open-writer");
    let Some(other) = OtherFs::new(&sb, "open-writer") else {
        return;
    };
    std::fs::create_dir_all(sb.path("data")).unwrap();
    sb.write_config(&rule("data", other.0.to_str().unwrap(), ""));
    let daemon = sb.start();
    // A writer that opens its log and writes to it for 2 s.
    let path = sb.path("data/casa-live.log");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut expected = String::new();
    for i in 0..100 {
        let line = format!("line {i}\n");
        std::io::Write::write_all(&mut f, line.as_bytes()).unwrap();
        expected.push_str(&line);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(path.exists(), "never copied while open");
    drop(f);
    let moved = other.0.join("casa-live.log");
    wait_for(Duration::from_secs(20), || moved.exists()).expect("moved after close");
    assert_eq!(
        std::fs::read_to_string(&moved).unwrap(),
        expected,
        "every line"
    );
    assert!(!path.exists());
    let s = daemon.status_where(|_| true);
    let c = &s["services"]["relocate"]["counters"];
    assert_eq!(c["files_copied_total"], 1);
    assert_eq!(c["bytes_copied_total"], expected.len());
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn files_move_across_file_systems_byte_for_byte() {
    let sb = Sandbox::new("exdev");
    let Some(other) = OtherFs::new(&sb, "exdev") else {
        return;
    };
    std::fs::create_dir_all(sb.path("data/deep/er")).unwrap();
    sb.write_config(&rule("data", other.0.to_str().unwrap(), ""));
    let daemon = sb.start();
    let mut expected = BTreeMap::new();
    for i in 0..200usize {
        let content: Vec<u8> = (0..(i * 997) % 200_000)
            .map(|b| (b * 31 + i) as u8)
            .collect();
        let name = format!("casa-{i}.log");
        std::fs::write(sb.path("data/deep/er").join(&name), &content).unwrap();
        expected.insert(name.into_bytes(), content);
    }
    wait_for(Duration::from_secs(60), || {
        count_in(&other.0) == 200 && files_under(&sb.path("data")).is_empty()
    })
    .expect("all copied and their sources unlinked");
    assert_eq!(files_under(&other.0), expected);
    assert_eq!(daemon.stop().0, 0);
}

#[test]
fn a_symlink_to_a_directory_outside_the_root_is_never_followed() {
    let sb = Sandbox::new("symlink-dir");
    std::fs::create_dir_all(sb.path("outside")).unwrap();
    std::fs::create_dir_all(sb.path("data")).unwrap();
    std::fs::write(sb.path("outside/casa-outside.log"), "not ours").unwrap();
    std::os::unix::fs::symlink(sb.path("outside"), sb.path("data/link")).unwrap();
    sb.write_config(&rule("data", "data/state/logs", ""));
    let daemon = sb.start();
    // Files created through the link are created outside the root.
    std::fs::write(sb.path("data/link/casa-through-link.log"), "also not ours").unwrap();
    std::fs::write(sb.path("data/casa-inside.log"), "ours").unwrap();
    let target = sb.path("data/state/logs");
    wait_for(Duration::from_secs(20), || {
        target.join("casa-inside.log").exists()
    })
    .expect("inside file moved");
    let sweep = sb.run_cli(&["sweep"]);
    assert_eq!(
        stdout(&sweep),
        "",
        "a full sweep finds nothing to move either"
    );
    assert!(sb.path("outside/casa-outside.log").exists());
    assert!(sb.path("outside/casa-through-link.log").exists());
    assert_eq!(count_in(&target), 1);
    assert_eq!(daemon.stop().0, 0);
}
