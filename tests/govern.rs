//! `govern` end to end: the real binary, real child processes in /proc
//! (copies of `sleep` under the names of ffmpeg & co, and forked children
//! that name themselves), a directory standing in for cgroupfs for the
//! limit files, and the machine's real cgroup v2 tree where it is writable
//! (groups made, processes really moved, groups removed).
//!
//! Tests run in parallel, and every daemon sees every process on the
//! machine: each test governs names no other test uses.

mod common;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Sandbox, wait_for};
use edgekeeper::sys::named_child::NamedChild;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);

/// A running copy of `sleep` under another name, killed when dropped.
struct Sleeper {
    child: Child,
}

impl Sleeper {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A copy of `sleep` named `name` in the sandbox's `bin/`.
fn fake_binary(sb: &Sandbox, name: &str) -> PathBuf {
    let bin = sb.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = bin.join(name);
    if !path.exists() {
        let sleep = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("a sleep binary");
        std::fs::copy(sleep, &path).unwrap();
    }
    path
}

/// Starts `name` (a copy of sleep) in `cwd`.
fn spawn(sb: &Sandbox, name: &str, cwd: &Path) -> Sleeper {
    let child = Command::new(fake_binary(sb, name))
        .arg("600")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Sleeper { child }
}

/// The govern block with a stand-in root, fast status and scans.
fn config(sb: &Sandbox, root: &Path, govern: &str) {
    sb.write_config(&format!(
        r#""status_every": "200ms",
  "govern": {{"cgroup_root": {root:?}, {govern}}}"#,
        root = root.display().to_string()
    ));
}

/// The govern block most tests use: scans every second, no filters
/// (whoever runs the tests, wherever), `targets` as given.
fn unfiltered(sb: &Sandbox, root: &Path, targets: &str) {
    config(
        sb,
        root,
        &format!(
            r#""scan_every": "1s",
    "filters": {{"min_runtime": "0s", "blocked_uids": [], "blocked_dirs": []}},
    "targets": {targets}"#
        ),
    );
}

/// Whether `pid` is tracked in `state` (`governed`, `young`, …).
fn is(status: &Value, pid: u32, state: &str) -> bool {
    state_of(status, pid).as_deref() == Some(state)
}

/// Waits until `pid` is governed.
fn governed(d: &Daemon, pid: u32) -> Value {
    until(d, "governed", |s| is(s, pid, "governed"))
}

fn govern(status: &Value) -> &Value {
    &status["services"]["govern"]
}

fn process(status: &Value, pid: u32) -> Option<&Value> {
    govern(status)["details"]["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"] == pid)
}

fn state_of(status: &Value, pid: u32) -> Option<String> {
    process(status, pid).and_then(|p| p["state"].as_str().map(str::to_owned))
}

fn counter(status: &Value, name: &str) -> u64 {
    govern(status)["counters"][name]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// Waits for a snapshot in which `ok` holds.
fn until(d: &Daemon, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_for(LIMIT, || {
        d.signal(nix::sys::signal::Signal::SIGUSR1);
        std::thread::sleep(Duration::from_millis(50));
        let v = serde_json::from_str::<Value>(&std::fs::read_to_string(&d.status).ok()?).ok()?;
        ok(&v).then_some(v)
    })
    .unwrap_or_else(|| panic!("never: {what}; last status: {:#}", d.status()))
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

/// A group directory under the machine's real cgroup v2 tree, for this
/// test only; `None` (with the reason printed) where there is none or it is
/// not writable. Removed when dropped, after its processes are killed.
struct RealRoot {
    path: PathBuf,
}

impl RealRoot {
    fn new(name: &str) -> Option<RealRoot> {
        let Some(mount) = edgekeeper::sys::cgroup::cgroup2_mount() else {
            eprintln!("SKIPPED: no cgroup v2 file system is mounted on this machine");
            return None;
        };
        let path = mount.join(format!("edgekeeper-test-{}-{name}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&path).and_then(|()| std::fs::remove_dir(&path)) {
            eprintln!(
                "SKIPPED: cgroup v2 at {} is not writable here ({e}); run as root to test real groups",
                mount.display()
            );
            return None;
        }
        Some(RealRoot { path })
    }
}

impl Drop for RealRoot {
    fn drop(&mut self) {
        // Whatever is left in it goes back to the top, then it goes.
        let top = self.path.parent().unwrap().join("cgroup.procs");
        if let Ok(rd) = std::fs::read_dir(&self.path) {
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                for pid in std::fs::read_to_string(e.path().join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                {
                    let _ = std::fs::write(&top, pid);
                }
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The cgroup v2 path of `pid` (`0::/a/b` → `/a/b`).
fn cgroup_of(pid: u32) -> String {
    read(format!("/proc/{pid}/cgroup"))
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_owned()
}

#[test]
fn targets_are_found_others_ignored_and_limit_files_hold_exact_values() {
    let sb = Sandbox::new("govern-find");
    let root = sb.path("cgroupfs/edgekeeper.slice");
    std::fs::create_dir_all(sb.path("cgroupfs")).unwrap();
    config(
        &sb,
        &root,
        r#""scan_every": "1s",
    "filters": {"min_runtime": "0s", "blocked_uids": [], "blocked_dirs": []},
    "defaults": {"cpu_quota": 200, "cpu_weight": 100, "memory_max": "4GiB"},
    "targets": [
      {"comm": "ffmpeg", "cpu_quota": 300, "memory_max": "8GiB"},
      {"comm": "gst-launch-1.0", "cpu_weight": 50},
      {"comm": "camera-recorder-main", "cpu_quota": 25}]"#,
    );
    let here = sb.dir.clone();
    // Started before the daemon: found by the start-up scan.
    let ffmpeg = spawn(&sb, "ffmpeg", &here);
    let d = sb.start();
    // Started after: found by the proc connector or the next scan.
    let gst = spawn(&sb, "gst-launch-1.0", &here);
    let other = spawn(&sb, "other", &here);
    // comm is cut to 15 bytes ("camera-recorder"): argv[0] decides.
    let long = spawn(&sb, "camera-recorder-main", &here);
    let long_other = spawn(&sb, "camera-recorder-aux", &here);

    let s = until(&d, "three processes governed", |s| {
        [&ffmpeg, &gst, &long]
            .iter()
            .all(|p| is(s, p.pid(), "governed"))
    });
    assert!(process(&s, other.pid()).is_none(), "other is not a target");
    assert!(
        process(&s, long_other.pid()).is_none(),
        "camera-recorder-aux shares the 15-byte comm but not argv[0]"
    );
    let group = |name: &str, pid: u32| root.join(format!("{name}-{pid}"));
    let ff = group("ffmpeg", ffmpeg.pid());
    assert_eq!(read(ff.join("cpu.max")), "300000 100000\n");
    assert_eq!(read(ff.join("cpu.weight")), "100\n");
    assert_eq!(read(ff.join("memory.max")), "8589934592\n");
    assert_eq!(read(ff.join("cgroup.procs")), format!("{}\n", ffmpeg.pid()));
    let g = group("gst-launch-1.0", gst.pid());
    assert_eq!(read(g.join("cpu.max")), "200000 100000\n");
    assert_eq!(read(g.join("cpu.weight")), "50\n");
    assert_eq!(read(g.join("memory.max")), "4294967296\n");
    let l = group("camera-recorder", long.pid());
    assert_eq!(read(l.join("cpu.max")), "25000 100000\n");
    assert_eq!(read(root.join("cgroup.subtree_control")), "+cpu +memory\n");
    let mut groups = sb.files_in("cgroupfs/edgekeeper.slice");
    groups.retain(|n| n != "cgroup.subtree_control");
    assert_eq!(groups.len(), 3, "{groups:?}");

    let p = process(&s, ffmpeg.pid()).unwrap();
    assert_eq!(p["comm"], "ffmpeg");
    assert_eq!(p["target"], "ffmpeg");
    assert_eq!(p["group"], format!("ffmpeg-{}", ffmpeg.pid()));
    assert_eq!(p["cpu_max"], "300000 100000");
    assert_eq!(p["memory_max"], 8_589_934_592u64);
    assert!(p["since"].as_str().unwrap().ends_with('Z'));
    let details = &govern(&s)["details"];
    assert_eq!(details["cgroupfs"], "stand-in directory");
    assert_eq!(
        govern(&s)["health"],
        "degraded",
        "a stand-in enforces nothing"
    );
    assert!(
        govern(&s)["reason"]
            .as_str()
            .unwrap()
            .contains("standing in for cgroupfs")
    );
    assert_eq!(counter(&s, "attached_total"), 3);
    assert_eq!(counter(&s, "governed_processes"), 3);

    // The human status lists the governed processes. (A snapshot older
    // than 3 × 200 ms reads as "not running": under qemu, ask afresh.)
    let text = wait_for(LIMIT, || {
        d.signal(nix::sys::signal::Signal::SIGUSR1);
        std::thread::sleep(Duration::from_millis(20));
        let out = sb.run_cli(&["status"]);
        out.status.success().then(|| common::stdout(&out))
    })
    .expect("edgekeeper status");
    assert!(text.contains("govern processes:"), "{text}");
    assert!(text.contains(&format!("ffmpeg-{}", ffmpeg.pid())), "{text}");
    // Metrics per target.
    let prom = read(sb.path("run/edgekeeper.prom"));
    assert!(
        prom.contains("edgekeeper_govern_target_attached_total{target=\"gst-launch-1.0\"} 1"),
        "{prom}"
    );
    assert!(prom.contains("edgekeeper_govern_target_governed_processes{target=\"ffmpeg\"} 1"));
    assert_eq!(
        prom.matches("# TYPE edgekeeper_govern_target_attached_total counter")
            .count(),
        1
    );
    let (code, _, _) = d.stop();
    assert_eq!(code, 0);
}

#[test]
fn min_runtime_holds_a_young_process_back_then_attaches_it() {
    let sb = Sandbox::new("govern-young");
    let root = sb.path("cg");
    config(
        &sb,
        &root,
        r#""scan_every": "1s",
    "filters": {"min_runtime": "3s", "blocked_uids": [], "blocked_dirs": []},
    "targets": [{"comm": "ek-young"}]"#,
    );
    let d = sb.start();
    let started = Instant::now();
    let p = spawn(&sb, "ek-young", &sb.dir);
    let group = root.join(format!("ek-young-{}", p.pid()));
    // Found (by the connector at once, or by the next scan), but held back.
    let state = wait_for(LIMIT, || {
        d.signal(nix::sys::signal::Signal::SIGUSR1);
        std::thread::sleep(Duration::from_millis(50));
        state_of(&d.status(), p.pid())
    })
    .unwrap_or_else(|| panic!("never seen: {:#}", d.status()));
    let seen_after = started.elapsed();
    if seen_after < Duration::from_millis(2900) {
        assert_eq!(state, "young");
        assert!(!group.exists(), "no group while it is young");
    } else {
        eprintln!("NOTE: first seen only after {seen_after:?}; the young phase was not observed");
    }
    let s = governed(&d, p.pid());
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "attached after {:?}, before its min_runtime",
        started.elapsed()
    );
    assert!(group.join("cgroup.procs").exists());
    assert_eq!(counter(&s, "held_young_total"), 1);
    d.stop();
}

#[test]
fn blocked_uids_blocked_dirs_and_allowed_users_hold() {
    let sb = Sandbox::new("govern-filters");
    let root = sb.path("cg");
    let me = nix::unistd::getuid().as_raw();
    let blocked = sb.path("blocked");
    let fine = sb.path("fine");
    std::fs::create_dir_all(blocked.join("deeper")).unwrap();
    std::fs::create_dir_all(&fine).unwrap();
    // Someone other than us, who exists on every Linux.
    let stranger = if me == 0 { "nobody" } else { "root" };
    config(
        &sb,
        &root,
        &format!(
            r#""scan_every": "1s",
    "filters": {{"min_runtime": "0s", "blocked_uids": [], "blocked_dirs": [{blocked:?}]}},
    "targets": [
      {{"comm": "ek-uid", "blocked_uids": [{me}]}},
      {{"comm": "ek-dir"}},
      {{"comm": "ek-user", "allowed_users": ["{stranger}"]}}]"#,
            blocked = blocked.display().to_string()
        ),
    );
    let d = sb.start();
    let by_uid = spawn(&sb, "ek-uid", &fine);
    let in_blocked = spawn(&sb, "ek-dir", &blocked.join("deeper"));
    let elsewhere = spawn(&sb, "ek-dir", &fine);
    let by_user = spawn(&sb, "ek-user", &fine);
    let s = until(&d, "all four judged", |s| {
        [&by_uid, &in_blocked, &elsewhere, &by_user]
            .iter()
            .all(|p| state_of(s, p.pid()).is_some_and(|st| st == "governed" || st == "ignored"))
    });
    assert_eq!(state_of(&s, by_uid.pid()).unwrap(), "ignored");
    let note = process(&s, by_uid.pid()).unwrap()["note"].as_str().unwrap();
    assert!(
        note.contains(&format!("uid {me} is in blocked_uids")),
        "{note}"
    );
    assert_eq!(state_of(&s, in_blocked.pid()).unwrap(), "ignored");
    let note = process(&s, in_blocked.pid()).unwrap()["note"]
        .as_str()
        .unwrap();
    assert!(note.contains("blocked_dirs"), "{note}");
    assert_eq!(state_of(&s, elsewhere.pid()).unwrap(), "governed");
    assert_eq!(state_of(&s, by_user.pid()).unwrap(), "ignored");
    assert_eq!(counter(&s, "filtered_uid_total"), 1);
    assert_eq!(counter(&s, "filtered_dir_total"), 1);
    assert_eq!(counter(&s, "filtered_user_total"), 1);
    assert_eq!(sb.files_in("cg").len(), 2, "one group and subtree_control");
    assert!(root.join(format!("ek-dir-{}", elsewhere.pid())).is_dir());
    // Passed-over processes stay passed over: later scans do not count them again.
    std::thread::sleep(Duration::from_millis(2500));
    let s = until(&d, "scans went on", |s| counter(s, "scans_total") >= 3);
    assert_eq!(counter(&s, "filtered_uid_total"), 1);
    d.stop();
}

#[test]
fn an_exited_process_loses_its_group_and_is_forgotten() {
    let sb = Sandbox::new("govern-exit");
    let root = sb.path("cg");
    unfiltered(&sb, &root, r#"[{"comm": "ek-exit"}]"#);
    let d = sb.start();
    let mut p = spawn(&sb, "ek-exit", &sb.dir);
    let pid = p.pid();
    governed(&d, pid);
    let group = root.join(format!("ek-exit-{pid}"));
    assert!(group.is_dir());
    p.kill();
    let s = until(&d, "forgotten", |s| process(s, pid).is_none());
    assert!(!group.exists(), "the group is removed");
    assert_eq!(counter(&s, "exited_total"), 1);
    assert_eq!(counter(&s, "groups_removed_total"), 1);
    assert_eq!(govern(&s)["tracked"], 0);
    d.stop();
}

#[test]
fn real_cgroup2_moves_the_process_keeps_it_across_a_restart_and_removes_the_group() {
    let Some(real) = RealRoot::new("move") else {
        return;
    };
    let sb = Sandbox::new("govern-real");
    unfiltered(
        &sb,
        &real.path,
        r#"[{"comm": "ek-real", "cpu_quota": 150, "memory_max": "1GiB"}]"#,
    );
    let d = sb.start();
    let mut p = spawn(&sb, "ek-real", &sb.dir);
    let pid = p.pid();
    let s = governed(&d, pid);
    let group = real.path.join(format!("ek-real-{pid}"));
    let name = real.path.file_name().unwrap().to_str().unwrap();
    assert!(
        cgroup_of(pid).ends_with(&format!("/{name}/ek-real-{pid}")),
        "really moved: {}",
        cgroup_of(pid)
    );
    assert!(read(group.join("cgroup.procs")).contains(&pid.to_string()));
    assert_eq!(govern(&s)["details"]["cgroupfs"], "cgroup2");
    // Controllers the machine lacks are named; the process is grouped anyway.
    let enabled = read(real.path.join("cgroup.subtree_control"));
    if !enabled.contains("cpu") {
        let reason = govern(&s)["reason"].as_str().unwrap();
        assert_eq!(govern(&s)["health"], "degraded");
        assert!(reason.contains("cpu"), "{reason}");
        assert!(process(&s, pid).unwrap()["cpu_max"].is_null());
    } else {
        assert_eq!(read(group.join("cpu.max")), "150000 100000\n");
    }
    if enabled.contains("memory") {
        assert_eq!(read(group.join("memory.max")), "1073741824\n");
    }

    // Stopping leaves the process running in its group.
    let (code, _, _) = d.stop();
    assert_eq!(code, 0);
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert!(cgroup_of(pid).ends_with(&format!("/ek-real-{pid}")));

    // A restart recognises it by (pid, start time): not attached twice.
    let d = sb.start();
    let s = governed(&d, pid);
    assert_eq!(counter(&s, "recognised_total"), 1);
    assert_eq!(
        counter(&s, "attached_total"),
        1,
        "kept in state.json, not attached again"
    );

    p.kill();
    let s = until(&d, "forgotten", |s| process(s, pid).is_none());
    assert!(!group.exists(), "the emptied group is removed");
    assert_eq!(counter(&s, "groups_removed_total"), 1);
    d.stop();
}

#[test]
fn a_group_left_holding_children_lingers_until_it_is_empty() {
    let Some(real) = RealRoot::new("linger") else {
        return;
    };
    let sb = Sandbox::new("govern-linger");
    unfiltered(&sb, &real.path, r#"[{"comm": "ek-linger"}]"#);
    // A copy of sh named ek-linger that, once governed, starts a child
    // (born in its group) and waits.
    let sh = sb.path("bin/ek-linger");
    std::fs::create_dir_all(sb.path("bin")).unwrap();
    std::fs::copy("/bin/sh", &sh).unwrap();
    let d = sb.start();
    let mut parent = Sleeper {
        child: Command::new(&sh)
            .args(["-c", "sleep 1; sleep 600 & wait"])
            .spawn()
            .unwrap(),
    };
    let pid = parent.pid();
    governed(&d, pid);
    let group = real.path.join(format!("ek-linger-{pid}"));
    let procs = group.join("cgroup.procs");
    let child: i32 = wait_for(LIMIT, || {
        read(&procs)
            .lines()
            .map(|l| l.parse::<i32>().unwrap())
            .find(|&p| p != pid as i32)
    })
    .expect("the child in the group");
    parent.kill();
    let s = until(&d, "lingering", |s| is(s, pid, "lingering"));
    assert!(group.is_dir(), "kept while its child runs in it");
    let note = process(&s, pid).unwrap()["note"].as_str().unwrap();
    assert!(note.contains("still holds processes"), "{note}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = until(&d, "forgotten", |s| process(s, pid).is_none());
    assert!(!group.exists(), "removed once empty");
    assert_eq!(counter(&s, "groups_removed_total"), 1);
    d.stop();
}

#[test]
fn a_full_table_turns_processes_away_until_there_is_room() {
    let sb = Sandbox::new("govern-full");
    let root = sb.path("cg");
    sb.write_config(&format!(
        r#""status_every": "200ms", "limits": {{"max_tracked_processes": 2}},
  "govern": {{"cgroup_root": {root:?}, "scan_every": "1s",
    "filters": {{"min_runtime": "0s", "blocked_uids": [], "blocked_dirs": []}},
    "targets": [{{"comm": "ek-full"}}]}}"#,
        root = root.display().to_string()
    ));
    let d = sb.start();
    let mut first = spawn(&sb, "ek-full", &sb.dir);
    let second = spawn(&sb, "ek-full", &sb.dir);
    governed(&d, first.pid());
    governed(&d, second.pid());
    let third = spawn(&sb, "ek-full", &sb.dir);
    let s = until(&d, "turned away", |s| counter(s, "table_full_total") >= 1);
    assert!(process(&s, third.pid()).is_none());
    assert_eq!(govern(&s)["tracked"], 2);
    assert_eq!(govern(&s)["health"], "degraded");
    let reason = govern(&s)["reason"].as_str().unwrap();
    assert!(reason.contains("max_tracked_processes"), "{reason}");
    first.kill();
    let s = governed(&d, third.pid());
    assert_eq!(govern(&s)["health"], "degraded", "still a stand-in");
    assert!(
        !govern(&s)["reason"]
            .as_str()
            .unwrap()
            .contains("max_tracked_processes")
    );
    d.stop();
}

#[test]
fn a_restart_recognises_living_processes_and_forgets_exited_ones() {
    let sb = Sandbox::new("govern-restart");
    let root = sb.path("cg");
    unfiltered(&sb, &root, r#"[{"comm": "ek-restart"}]"#);
    let d = sb.start();
    let stays = spawn(&sb, "ek-restart", &sb.dir);
    let mut goes = spawn(&sb, "ek-restart", &sb.dir);
    until(&d, "both governed", |s| {
        [&stays, &goes].iter().all(|p| is(s, p.pid(), "governed"))
    });
    d.stop();
    let state: Value = serde_json::from_str(&read(sb.path("state/state.json"))).unwrap();
    let saved = state["services"]["govern"]["processes"].as_array().unwrap();
    assert_eq!(saved.len(), 2);
    let start_of = |pid: u32| {
        let stat = read(format!("/proc/{pid}/stat"));
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(19).unwrap().parse::<u64>().unwrap()
    };
    let entry = saved.iter().find(|p| p["pid"] == stays.pid()).unwrap();
    assert_eq!(entry["start_ticks"], start_of(stays.pid()));
    assert_eq!(entry["phase"], "governed");

    goes.kill();
    let d = sb.start();
    let s = until(&d, "restored", |s| {
        is(s, stays.pid(), "governed") && process(s, goes.pid()).is_none()
    });
    assert_eq!(counter(&s, "recognised_total"), 1);
    assert_eq!(counter(&s, "attached_total"), 2, "nothing attached twice");
    assert_eq!(counter(&s, "exited_total"), 1);
    assert!(!root.join(format!("ek-restart-{}", goes.pid())).exists());
    assert!(root.join(format!("ek-restart-{}", stays.pid())).is_dir());
    d.stop();
}

/// Makes the next process forked on this machine get PID `pid` (root
/// only), then spawns `name`; retries if another fork took the PID first.
fn spawn_with_pid(sb: &Sandbox, name: &str, pid: u32) -> Option<Sleeper> {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let s = spawn(sb, name, &sb.dir);
        if s.pid() == pid {
            return Some(s);
        }
    }
    None
}

#[test]
fn a_reused_pid_is_a_new_process() {
    let sb = Sandbox::new("govern-reuse");
    let root = sb.path("cg");
    unfiltered(&sb, &root, r#"[{"comm": "ek-reuse"}]"#);
    let d = sb.start();
    let mut first = spawn(&sb, "ek-reuse", &sb.dir);
    let pid = first.pid();
    governed(&d, pid);
    d.stop();
    let saved: Value = serde_json::from_str(&read(sb.path("state/state.json"))).unwrap();
    let old_start = saved["services"]["govern"]["processes"][0]["start_ticks"].clone();
    first.kill();
    // Let the clock move on a tick or more, so the new start time differs.
    std::thread::sleep(Duration::from_millis(50));
    let Some(second) = spawn_with_pid(&sb, "ek-reuse", pid) else {
        eprintln!(
            "SKIPPED: cannot choose the next PID here (needs root and /proc/sys/kernel/ns_last_pid)"
        );
        return;
    };
    assert_eq!(second.pid(), pid);
    let d = sb.start();
    let s = until(&d, "the new process governed", |s| {
        is(s, pid, "governed") && counter(s, "attached_total") == 2
    });
    assert_eq!(
        counter(&s, "recognised_total"),
        0,
        "the old identity was not taken for the new process"
    );
    assert_eq!(counter(&s, "exited_total"), 1);
    d.stop();
    let saved: Value = serde_json::from_str(&read(sb.path("state/state.json"))).unwrap();
    let entry = &saved["services"]["govern"]["processes"][0];
    assert_eq!(entry["pid"], pid);
    assert_ne!(entry["start_ticks"], old_start);
}

#[test]
fn the_proc_connector_finds_an_exec_within_50_ms() {
    let sb = Sandbox::new("govern-connector");
    let root = sb.path("cg");
    config(
        &sb,
        &root,
        r#""scan_every": "10m",
    "filters": {"min_runtime": "0s", "blocked_uids": [], "blocked_dirs": []},
    "targets": [{"comm": "ek-fast"}]"#,
    );
    let binary = fake_binary(&sb, "ek-fast");
    let d = sb.start();
    let s = d.status();
    if govern(&s)["details"]["discovery"] != "proc_connector" {
        eprintln!(
            "SKIPPED: the proc connector is not available here ({}); discovery is by scanning",
            govern(&s)["details"]["scan_only_because"]
        );
        assert_eq!(govern(&s)["details"]["discovery"], "scan");
        d.stop();
        return;
    }
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t0 = Instant::now();
        let child = Command::new(&binary).arg("600").spawn().unwrap();
        let p = Sleeper { child };
        let procs = root
            .join(format!("ek-fast-{}", p.pid()))
            .join("cgroup.procs");
        while !procs.exists() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_micros(500));
        }
        let took = t0.elapsed();
        assert!(procs.exists(), "never grouped");
        worst = worst.max(took);
    }
    eprintln!("exec to grouped, worst of 5: {worst:?}");
    assert!(worst < Duration::from_millis(50), "took {worst:?}");
    let s = until(&d, "latency reported", |s| {
        counter(s, "attached_total") == 5
    });
    let latency = counter(&s, "discovery_latency_max_microseconds");
    assert!(latency < 50_000, "{latency} µs");
    assert_eq!(counter(&s, "scans_total"), 1, "only the start-up scan ran");
    d.stop();
}

#[test]
fn a_memory_limit_below_current_usage_is_refused_with_a_warning() {
    let sb = Sandbox::new("govern-memory");
    let root = sb.path("cg");
    unfiltered(
        &sb,
        &root,
        r#"[{"comm": "ek-hungry", "memory_max": "16MiB"}, {"comm": "ek-modest", "memory_max": "1GiB"}]"#,
    );
    let d = sb.start();
    let hungry = NamedChild::spawn(c"ek-hungry", None, 64 << 20).unwrap();
    let modest = NamedChild::spawn(c"ek-modest", None, 4 << 20).unwrap();
    let (h, m) = (hungry.pid().as_raw() as u32, modest.pid().as_raw() as u32);
    let s = until(&d, "both governed", |s| {
        is(s, h, "governed") && is(s, m, "governed")
    });
    let p = process(&s, h).unwrap();
    assert!(p["memory_max"].is_null());
    let note = p["note"].as_str().unwrap();
    assert!(note.contains("memory.max 16777216 refused"), "{note}");
    assert!(note.contains("VmRSS"), "{note}");
    assert!(!root.join(format!("ek-hungry-{h}/memory.max")).exists());
    assert!(
        root.join(format!("ek-hungry-{h}/cpu.max")).exists(),
        "the rest still applies"
    );
    assert_eq!(
        read(root.join(format!("ek-modest-{m}/memory.max"))),
        "1073741824\n"
    );
    assert_eq!(counter(&s, "memory_limits_refused_total"), 1);
    let (_, _, _) = d.stop();
    let log = read(sb.path("log/edgekeeper.log"));
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("govern") && l.contains("refused")),
        "{log}"
    );
}

#[test]
fn names_with_spaces_and_parentheses_are_governed() {
    let sb = Sandbox::new("govern-odd");
    let root = sb.path("cg");
    unfiltered(&sb, &root, r#"[{"comm": "ek) (x y"}]"#);
    let d = sb.start();
    let name = CString::new("ek) (x y").unwrap();
    let child = NamedChild::spawn(&name, None, 0).unwrap();
    let pid = child.pid().as_raw() as u32;
    let s = governed(&d, pid);
    assert_eq!(process(&s, pid).unwrap()["comm"], "ek) (x y");
    assert_eq!(
        read(root.join(format!("ek) (x y-{pid}")).join("cgroup.procs")),
        format!("{pid}\n")
    );
    d.stop();
}

#[test]
fn failed_attaches_are_retried_then_given_up_with_an_alert() {
    let sb = Sandbox::new("govern-retry");
    let root = sb.path("cg");
    std::fs::create_dir_all(&root).unwrap();
    config(
        &sb,
        &root,
        r#""scan_every": "1s", "max_attempts": 2,
    "filters": {"min_runtime": "2s", "blocked_uids": [], "blocked_dirs": []},
    "targets": [{"comm": "ek-retry"}]"#,
    );
    let d = sb.start();
    let p = spawn(&sb, "ek-retry", &sb.dir);
    // A file where its group should go: every attach fails.
    std::fs::write(root.join(format!("ek-retry-{}", p.pid())), "in the way").unwrap();
    let s = until(&d, "given up", |s| is(s, p.pid(), "gave_up"));
    assert_eq!(counter(&s, "attach_failures_total"), 2);
    assert_eq!(counter(&s, "gave_up_total"), 1);
    assert_eq!(govern(&s)["health"], "degraded");
    let reason = govern(&s)["reason"].as_str().unwrap();
    assert!(reason.contains("after 2 attempts"), "{reason}");
    let alerts = sb.files_in("alerts");
    assert!(
        alerts
            .iter()
            .any(|a| a.ends_with("-govern_attach_failed.json")),
        "{alerts:?}"
    );
    d.stop();
}

#[test]
fn an_unusable_cgroup_root_is_unhealthy_until_it_can_be_made() {
    let sb = Sandbox::new("govern-unusable");
    let parent = sb.path("not-yet");
    let root = parent.join("slice");
    unfiltered(&sb, &root, r#"[{"comm": "ek-wait"}]"#);
    let d = sb.start();
    let p = spawn(&sb, "ek-wait", &sb.dir);
    let s = until(&d, "waiting", |s| is(s, p.pid(), "waiting"));
    assert_eq!(govern(&s)["health"], "unhealthy");
    let reason = govern(&s)["reason"].as_str().unwrap();
    assert!(reason.contains("its parent does not exist"), "{reason}");
    std::fs::create_dir_all(&parent).unwrap();
    let s = governed(&d, p.pid());
    assert_ne!(govern(&s)["health"], "unhealthy");
    assert!(root.join(format!("ek-wait-{}", p.pid())).is_dir());
    d.stop();
}

#[test]
fn a_reload_applies_new_limits_to_governed_processes() {
    let sb = Sandbox::new("govern-reload");
    let root = sb.path("cg");
    let block = |quota: u32| {
        format!(
            r#""scan_every": "1s",
    "filters": {{"min_runtime": "0s", "blocked_uids": [], "blocked_dirs": []}},
    "targets": [{{"comm": "ek-reload", "cpu_quota": {quota}}}]"#
        )
    };
    config(&sb, &root, &block(300));
    let d = sb.start();
    let p = spawn(&sb, "ek-reload", &sb.dir);
    governed(&d, p.pid());
    let cpu_max = root.join(format!("ek-reload-{}/cpu.max", p.pid()));
    assert_eq!(read(&cpu_max), "300000 100000\n");
    config(&sb, &root, &block(50));
    d.signal(nix::sys::signal::Signal::SIGHUP);
    until(&d, "new limits", |s| {
        process(s, p.pid()).is_some_and(|e| e["cpu_max"] == "50000 100000")
    });
    assert_eq!(read(&cpu_max), "50000 100000\n");
    d.stop();
}

#[test]
fn check_names_the_cgroup_root_and_the_memory_controller() {
    let sb = Sandbox::new("govern-check");
    config(&sb, &sb.path("cg"), r#""targets": [{"comm": "ffmpeg"}]"#);
    let out = sb.run_cli(&["check"]);
    assert_eq!(out.status.code(), Some(0));
    let err = common::stderr(&out);
    assert!(
        err.contains("note: govern: cgroup_root") && err.contains("not on a cgroup2 file system"),
        "{err}"
    );
    let host = edgekeeper::sys::cgroup::MemoryController::detect()
        .ok()
        .and_then(edgekeeper::services::govern::memory_note);
    match host {
        Some(note) => assert!(err.contains(&note), "{err}"),
        None => assert!(!err.contains("memory controller"), "{err}"),
    }
}
