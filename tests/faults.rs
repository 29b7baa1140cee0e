//! Fault injection against the real binary: SIGKILL at random points of a
//! cross-device relocation burst, of a retention pass and of the state
//! write (100 rounds each, seeded so a failing round can be replayed); a
//! full target file system; files and directories that cannot be removed;
//! a directory swapped for a symbolic link mid-walk; the target deleted
//! under a running daemon; the cgroup root removed while governing; the
//! config file deleted before a SIGHUP.
//!
//! Each test says what must hold after the fault, and checks it on the
//! files themselves: content derived from each file's name shows a torn or
//! mixed-up copy, not just a missing one.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{Daemon, Sandbox, wait_for};
use edgekeeper::services::relocate::mover::PARTIAL_PREFIX;
use nix::sys::signal::Signal;
use serde_json::Value;

/// Deadlines are generous: under qemu everything is 5-10x slower.
const LIMIT: Duration = Duration::from_secs(30);
const DAY: u64 = 86_400;

// ---------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------

/// xorshift64: a small, seeded, reproducible source of "random" choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut r = Rng((seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03) | 1);
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `len` bytes that only the file called `name` has: its name, then a
/// stream seeded from the name. A torn, mixed or misnamed copy shows.
fn content(name: &str, len: usize) -> Vec<u8> {
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    v.extend_from_slice(name.as_bytes());
    v.push(b'\n');
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `content(name, len)` at `dir/name`, last modified `age` ago
/// (zero: left as written, for files the daemon may take at once).
fn put(dir: &Path, name: &str, len: usize, age: Duration) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content(name, len)).unwrap();
    if !age.is_zero() {
        set_age(&p, age);
    }
    p
}

fn set_age(p: &Path, age: Duration) {
    std::fs::File::open(p)
        .unwrap()
        .set_modified(SystemTime::now() - age)
        .unwrap();
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n * DAY)
}

/// The file's bytes, `None` if it does not exist.
fn read_opt(p: &Path) -> Option<Vec<u8>> {
    match std::fs::read(p) {
        Ok(c) => Some(c),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("{}: {e}", p.display()),
    }
}

/// Names in `dir` (empty if it does not exist).
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `edgekeeper run` without waiting for anything, stderr discarded: for
/// the kill rounds, where a status snapshot per round would cost seconds.
fn spawn_quiet(sb: &Sandbox) -> Child {
    sb.command(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until `child` wrote its first status snapshot: it holds the
/// lock, has done its start-up scans and is in its loop.
fn wait_up(sb: &Sandbox, child: &mut Child) {
    let status = sb.path("run/status.json");
    let needle = format!("\"pid\":{},", child.id());
    let end = Instant::now() + LIMIT;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("edgekeeper exited before it was up: {st}");
        }
        if std::fs::read_to_string(&status).is_ok_and(|s| s.contains(&needle)) {
            return;
        }
        assert!(Instant::now() < end, "edgekeeper wrote no status snapshot");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    child.wait().unwrap();
}

/// Waits for a snapshot (asked for with SIGUSR1 each time) in which `ok`
/// holds; unlike `Daemon::status_where`, the condition may take several
/// snapshots to come true.
fn until(d: &Daemon, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_for(LIMIT, || {
        d.signal(Signal::SIGUSR1);
        std::thread::sleep(Duration::from_millis(50));
        let v = serde_json::from_str::<Value>(&std::fs::read_to_string(&d.status).ok()?).ok()?;
        ok(&v).then_some(v)
    })
    .unwrap_or_else(|| panic!("never: {what}; last status: {:#}", d.status()))
}

fn svc<'a>(s: &'a Value, name: &str) -> &'a Value {
    &s["services"][name]
}

fn counter(s: &Value, service: &str, name: &str) -> u64 {
    svc(s, service)["counters"][name].as_u64().unwrap_or(0)
}

fn json_path(p: &Path) -> String {
    serde_json::to_string(p.to_str().unwrap()).unwrap()
}

/// A directory on /dev/shm, which is another file system than the
/// sandbox; `None` (said on stderr) where it is not.
struct ShmDir(PathBuf);

impl ShmDir {
    fn new(sb: &Sandbox, name: &str) -> Option<ShmDir> {
        let base = Path::new("/dev/shm");
        let dev = std::fs::metadata(base).ok()?.dev();
        if dev == std::fs::metadata(&sb.dir).unwrap().dev() {
            eprintln!(
                "SKIPPED: /dev/shm is on the same file system as {}",
                sb.dir.display()
            );
            return None;
        }
        let p = base.join(format!("edgekeeper-faults-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Some(ShmDir(p))
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small tmpfs mounted for one test, lazily unmounted when dropped
/// (declare it after the Sandbox so it goes first).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Option<Tmpfs> {
        use nix::mount::{MsFlags, mount};
        std::fs::create_dir_all(dir).unwrap();
        match mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(options),
        ) {
            Ok(()) => Some(Tmpfs(dir.to_path_buf())),
            Err(e) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs at {} ({e}); a file system image would need a mount too, so this fault is not injected here (run as root)",
                    dir.display()
                );
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Files and directories made impossible to unlink or rename, as root:
/// the immutable attribute (`chattr +i`), or where that is missing or
/// refused, a read-only bind mount of the directory. Undone when dropped
/// (declare it after the Sandbox so it goes first).
struct Locks {
    chattr: Vec<PathBuf>,
    mounts: Vec<PathBuf>,
}

impl Locks {
    fn new() -> Locks {
        Locks {
            chattr: Vec::new(),
            mounts: Vec::new(),
        }
    }

    fn chattr(flag: &str, p: &Path) -> bool {
        Command::new("chattr")
            .arg(flag)
            .arg(p)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Makes the entries of directory `dir` impossible to remove or rename
    /// away. Returns how ("chattr" or "ro-bind"), `None` if neither works.
    fn lock_dir(&mut self, dir: &Path) -> Option<&'static str> {
        if Self::chattr("+i", dir) {
            self.chattr.push(dir.to_path_buf());
            return Some("chattr");
        }
        use nix::mount::{MsFlags, mount};
        let bound = mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>);
        if let Err(e) = bound {
            eprintln!("cannot bind-mount {} ({e})", dir.display());
            return None;
        }
        self.mounts.push(dir.to_path_buf());
        let ro = mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        );
        if let Err(e) = ro {
            eprintln!("cannot remount {} read-only ({e})", dir.display());
            return None;
        }
        Some("ro-bind")
    }

    /// Makes file `p` impossible to remove (chattr only).
    fn lock_file(&mut self, p: &Path) -> bool {
        if Self::chattr("+i", p) {
            self.chattr.push(p.to_path_buf());
            true
        } else {
            false
        }
    }

    fn unlock_all(&mut self) {
        for p in self.chattr.drain(..) {
            Self::chattr("-i", &p);
        }
        for p in self.mounts.drain(..).rev() {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for Locks {
    fn drop(&mut self) {
        self.unlock_all();
    }
}

// ---------------------------------------------------------------------
// 1. SIGKILL during a cross-device relocation burst
// ---------------------------------------------------------------------

/// A file of the burst: where it was made, and how long it is.
struct Made {
    src: PathBuf,
    len: usize,
}

/// `casa-R-I.log`, or `casa-R-I.K.log` for a copy whose name was taken.
fn original_name(name: &str) -> String {
    let stem = name.strip_suffix(".log").unwrap_or(name);
    match stem.rsplit_once('.') {
        Some((s, k)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{s}.log")
        }
        _ => name.to_string(),
    }
}

/// After a kill: every pending file must be whole at its source or in the
/// target (never partial under a final name, never damaged at its
/// source). Files no longer at their source have arrived: their copies are
/// counted into `arrived` and removed from the target, so the next rounds
/// only look at what is still in flight, and any later copy of them would
/// show as unknown. Returns the temporaries left in the target.
fn check_burst(
    target: &Path,
    pending: &mut BTreeMap<String, Made>,
    arrived: &mut BTreeMap<String, usize>,
    when: &str,
) -> usize {
    let prefix = std::str::from_utf8(PARTIAL_PREFIX).unwrap();
    let mut copies: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut partials = 0;
    for name in names_in(target) {
        if name.starts_with(prefix) {
            partials += 1;
            continue;
        }
        let original = original_name(&name);
        assert!(
            pending.contains_key(&original),
            "{when}: {name} in the target is no file in flight (unknown, or a second copy of one that had arrived)"
        );
        copies.entry(original).or_default().push(target.join(&name));
    }
    pending.retain(|name, made| {
        let want = content(name, made.len);
        let at_source = match read_opt(&made.src) {
            Some(c) => {
                assert!(c == want, "{when}: {name} damaged at its source");
                true
            }
            None => false,
        };
        let here = copies.remove(name).unwrap_or_default();
        for p in &here {
            let c = std::fs::read(p).unwrap();
            assert!(
                c == want,
                "{when}: {} is not whole in the target ({} of {} bytes, or other bytes; {})",
                p.display(),
                c.len(),
                want.len(),
                if at_source {
                    "whole at its source"
                } else {
                    "gone from its source"
                }
            );
        }
        assert!(
            at_source || !here.is_empty(),
            "{when}: {name} is whole nowhere"
        );
        if at_source {
            return true;
        }
        *arrived.entry(name.clone()).or_default() += here.len();
        for p in here {
            std::fs::remove_file(p).unwrap();
        }
        false
    });
    partials
}

/// Runs the burst rounds; returns, per file, how many copies arrived.
/// `in_place`: a third of the files are written in place (created under
/// the root by their writer) rather than renamed in.
fn burst_rounds(tag: &str, in_place: bool) -> Option<BTreeMap<String, usize>> {
    const ROUNDS: u64 = 100;
    let sb = Sandbox::new(tag);
    let target = ShmDir::new(&sb, tag)?;
    std::fs::create_dir_all(sb.path("data/sub")).unwrap();
    sb.write_config(&format!(
        r#""relocate": [{{"name": "casa", "root": "data", "match": ["casa-*.log"], "target": {}}}]"#,
        json_path(&target.0)
    ));
    let mut pending: BTreeMap<String, Made> = BTreeMap::new();
    let mut arrived: BTreeMap<String, usize> = BTreeMap::new();
    let (mut made, mut early_kills, mut in_flight, mut both_places, mut partials) = (0, 0, 0, 0, 0);
    for round in 0..ROUNDS {
        let mut rng = Rng::new(round);
        let mut child = spawn_quiet(&sb);
        if rng.below(4) == 0 {
            // Killed while starting: during the start-up scan, which
            // moves what earlier rounds left at the source.
            early_kills += 1;
            std::thread::sleep(Duration::from_micros(rng.below(20_000)));
        } else {
            // Made beforehand on the source's file system, outside the
            // root: renamed in, they appear at once, closed, so the daemon
            // has a backlog of copies to be killed in the middle of.
            let staging = sb.path(&format!("staging/r{round}"));
            let mut staged = Vec::new();
            for i in 0..4 + rng.below(16) {
                let len = if rng.below(10) < 7 {
                    rng.below(16 * 1024)
                } else {
                    16 * 1024 + rng.below(240 * 1024)
                } as usize;
                let name = format!("casa-{round}-{i}.log");
                // Some go in a directory that is renamed in whole.
                let dir = if rng.below(4) == 0 {
                    staging.join("dir")
                } else {
                    staging.clone()
                };
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(&name), content(&name, len)).unwrap();
                staged.push((dir, name, len));
            }
            wait_up(&sb, &mut child);
            let kill_at = Duration::from_micros(rng.below(12_000));
            let began = Instant::now();
            let new_dir = sb.path(&format!("data/r{round}"));
            std::fs::create_dir_all(&new_dir).unwrap();
            let mut dir_moved = false;
            for (dir, name, len) in staged {
                let to = if dir != staging {
                    if !dir_moved {
                        std::fs::rename(&dir, new_dir.join("moved-in")).unwrap();
                        dir_moved = true;
                    }
                    new_dir.join("moved-in").join(&name)
                } else if rng.below(2) == 0 {
                    std::fs::rename(dir.join(&name), sb.path("data/sub").join(&name)).unwrap();
                    sb.path("data/sub").join(&name)
                } else if in_place {
                    // Written in place: the copy must wait for the close.
                    std::fs::remove_file(dir.join(&name)).unwrap();
                    std::fs::write(new_dir.join(&name), content(&name, len)).unwrap();
                    new_dir.join(&name)
                } else {
                    // Into the new directory, maybe before its watch.
                    std::fs::rename(dir.join(&name), new_dir.join(&name)).unwrap();
                    new_dir.join(&name)
                };
                pending.insert(name, Made { src: to, len });
                made += 1;
            }
            if let Some(rest) = kill_at.checked_sub(began.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        kill9(&mut child);
        let before = arrived.len();
        partials += check_burst(
            &target.0,
            &mut pending,
            &mut arrived,
            &format!("round {round}"),
        );
        if !pending.is_empty() && arrived.len() > before {
            in_flight += 1;
        }
        both_places += pending.keys().filter(|n| target.0.join(n).exists()).count();
    }

    // Restarted once, the daemon finishes the job: everything arrives,
    // whole, and the temporaries of killed copies are gone.
    let daemon = sb.start();
    let done = wait_for(LIMIT, || pending.values().all(|m| !m.src.exists()));
    assert!(
        done.is_some(),
        "sources left after the restart: {:?}",
        pending.keys().collect::<Vec<_>>()
    );
    let (code, _, _) = daemon.stop();
    assert_eq!(code, 0);
    let left = check_burst(&target.0, &mut pending, &mut arrived, "after the restart");
    assert_eq!(left, 0, "temporaries not cleaned at start");
    assert!(pending.is_empty());
    assert_eq!(arrived.len(), made, "every file arrived");
    eprintln!(
        "burst: {made} files in {ROUNDS} rounds ({early_kills} kills during start-up); {in_flight} kills left work in flight; {both_places} time(s) a file was in both places after a kill; {partials} temporaries seen; {} file(s) arrived twice",
        arrived.values().filter(|n| **n > 1).count()
    );
    assert!(in_flight > 0, "no kill landed while files were in flight");
    Some(arrived)
}

/// 100 rounds: the daemon is started, a burst of files appears under its
/// root (renamed into a watched directory, into a new one, a whole
/// directory moved in), and it is killed with SIGKILL at a random point;
/// after every kill each file is whole at its source or in the target,
/// and after a restart every file has arrived, whole, with no temporaries
/// left. (Files written in place: see the ignored test below.)
#[test]
fn sigkill_during_a_cross_device_burst_never_loses_or_tears_a_file() {
    burst_rounds("faults-burst", false);
}

/// The same rounds with a third of the files written in place by their
/// writer (`std::fs::write` under the root). Now and then one of them ends
/// up empty in the target and gone from its source, its content lost:
/// seen three times in sixteen runs of this file (round 25
/// `casa-25-7.log`: 0 of 14745 bytes; round 30 `casa-30-1.log`: 0 of 16217
/// bytes; round 87 `casa-87-0.log`: 0 of 13478 bytes), each time under the
/// load of the other tests running beside it, never alone. The kill plays no part
/// (the writer had finished before it): the daemon took its read lease
/// while the writer's `open(O_CREAT)` had made the name but not yet
/// registered as a writer, copied nothing, unlinked the source, and the
/// writer's open then completed on the unlinked inode. See the report.
#[test]
fn sigkill_during_a_burst_of_files_written_in_place_never_loses_one() {
    burst_rounds("faults-burst-in-place", true);
}

/// The same rounds, held to "exactly once": a kill between linking the
/// copy and unlinking the source leaves the file in both places, and the
/// restart copies the source again under a suffix. See
/// `a_copy_killed_between_link_and_unlink_is_not_copied_again` for the
/// deterministic reproduction.
#[test]
fn sigkill_during_a_cross_device_burst_never_makes_a_file_arrive_twice() {
    if let Some(arrived) = burst_rounds("faults-burst-once", false) {
        let twice: Vec<_> = arrived.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "arrived more than once: {twice:?}");
    }
}

/// The state a SIGKILL between `linkat` and `unlinkat` leaves, made by
/// hand: the copy is whole in the target and the source is still there.
/// At restart the daemon copies the source again, as `casa-1.1.log`: the
/// target then holds the same log twice, and every further crash in that
/// window adds another.
#[test]
fn a_copy_killed_between_link_and_unlink_is_not_copied_again() {
    let sb = Sandbox::new("faults-link-unlink");
    let Some(target) = ShmDir::new(&sb, "link-unlink") else {
        return;
    };
    let name = "casa-1.log";
    put(&sb.path("data"), name, 100_000, Duration::ZERO);
    put(&target.0, name, 100_000, Duration::ZERO);
    // A different file that merely has a taken name still gets a suffix.
    put(&sb.path("data"), "casa-2.log", 5_000, Duration::ZERO);
    std::fs::write(target.0.join("casa-2.log"), "another casa-2.log").unwrap();
    sb.write_config(&format!(
        r#""relocate": [{{"name": "casa", "root": "data", "match": ["casa-*.log"], "target": {}}}]"#,
        json_path(&target.0)
    ));
    let daemon = sb.start();
    wait_for(LIMIT, || names_in(&sb.path("data")).is_empty()).expect("sources handled");
    assert_eq!(daemon.stop().0, 0);
    assert_eq!(
        names_in(&target.0),
        ["casa-1.log", "casa-2.1.log", "casa-2.log"],
        "casa-1.log was already whole in the target: its source is the same file"
    );
    assert_eq!(
        std::fs::read(target.0.join(name)).unwrap(),
        content(name, 100_000)
    );
}

// ---------------------------------------------------------------------
// 2. SIGKILL during a retention pass
// ---------------------------------------------------------------------

/// One file of the retention tree and what retention may do to it.
struct Kept {
    path: PathBuf,
    name: String,
    len: usize,
    /// Matching and older than max_age: may go. Anything else must stay.
    expired: bool,
}

impl Kept {
    fn make(&self) {
        let age = if self.expired {
            days(2)
        } else if self.name.ends_with(".jpg") {
            Duration::from_secs(3600)
        } else {
            days(3) // old, but not matching: never deleted
        };
        put(self.path.parent().unwrap(), &self.name, self.len, age);
    }
}

/// Checks every file of the tree: what must stay is there and whole, what
/// may go is whole or absent. Returns how many expired files are gone.
fn check_retention(files: &[Kept], when: &str) -> usize {
    let mut gone = 0;
    for f in files {
        match read_opt(&f.path) {
            Some(c) => assert!(
                c == content(&f.name, f.len),
                "{when}: {} changed ({} of {} bytes)",
                f.path.display(),
                c.len(),
                f.len
            ),
            None if f.expired => gone += 1,
            None => panic!("{when}: {} was deleted, and it must stay", f.path.display()),
        }
    }
    gone
}

/// 100 rounds: the daemon starts a retention pass over expired and young
/// files and is killed with SIGKILL at a random point of it. After every
/// kill no young or non-matching file is gone or changed, and expired ones
/// are either whole or gone; the deleted ones are made again for the next
/// round. After a last restart every expired file is gone and every other
/// one stays.
#[test]
fn sigkill_during_a_retention_pass_deletes_only_expired_matches() {
    const ROUNDS: u64 = 100;
    let sb = Sandbox::new("faults-retention");
    // On tmpfs, where making the deleted files again for every round is
    // quick (the file system plays no part in what is checked).
    let Some(disk) = ShmDir::new(&sb, "retention") else {
        return;
    };
    let mut files = Vec::new();
    let mut rng = Rng::new(7);
    for d in 0..8 {
        let dir = disk.0.join(format!("live/d{d}"));
        for (prefix, count, expired, ext) in [
            ("old", 50, true, "jpg"),
            ("young", 12, false, "jpg"),
            ("notes", 8, false, "txt"),
        ] {
            for i in 0..count {
                let name = format!("{prefix}-{d}-{i}.{ext}");
                files.push(Kept {
                    path: dir.join(&name),
                    len: 64 + rng.below(2048) as usize,
                    name,
                    expired,
                });
            }
        }
    }
    for f in &files {
        f.make();
    }
    let expired = files.iter().filter(|f| f.expired).count();
    sb.write_config(&format!(
        r#""storage": {{"check_every": "1s",
    "retention": [{{"name": "live", "root": {}, "match": ["*.jpg"], "max_age": "24h"}}]}}"#,
        json_path(&disk.0.join("live"))
    ));

    // A first pass, not killed, shows how long a whole pass takes here.
    let mut child = spawn_quiet(&sb);
    wait_up(&sb, &mut child);
    let up = Instant::now();
    wait_for(LIMIT, || check_retention(&files, "first pass") == expired)
        .expect("the first pass deletes every expired file");
    let pass = up.elapsed();
    kill9(&mut child);

    let (mut interrupted, mut untouched, mut completed) = (0, 0, 0);
    for round in 0..ROUNDS {
        for f in files.iter().filter(|f| f.expired && !f.path.exists()) {
            f.make();
        }
        let mut rng = Rng::new(1000 + round);
        let mut child = spawn_quiet(&sb);
        wait_up(&sb, &mut child);
        let window = pass.as_micros() as u64 * 6 / 5;
        std::thread::sleep(Duration::from_micros(rng.below(window)));
        kill9(&mut child);
        match check_retention(&files, &format!("round {round}")) {
            0 => untouched += 1,
            n if n == expired => completed += 1,
            _ => interrupted += 1,
        }
    }

    let daemon = sb.start();
    wait_for(LIMIT, || {
        check_retention(&files, "after the restart") == expired
    })
    .expect("every expired file deleted after the restart");
    let (code, _, _) = daemon.stop();
    assert_eq!(code, 0);
    check_retention(&files, "at the end");
    eprintln!(
        "retention: a pass over {expired} expired files took {pass:?}; of {ROUNDS} kills, {interrupted} landed mid-pass, {untouched} before any deletion, {completed} after the pass"
    );
    assert!(interrupted > 0, "no kill landed in the middle of a pass");
}

/// What a SIGKILL in the middle of removing an expired `kind: "dir"`
/// entry leaves, made by hand: its files are all old, but the directories
/// the removal had already unlinked files from have a fresh mtime. The
/// restarted daemon measures that mtime as the directory's age and keeps
/// the half-removed directory for another `max_age`.
// max_age 2m: retention is walked at most every 1/24 of max_age (and
// every check_every at least), so a rule that must be walked again within
// the test needs a short one; the files it must keep are younger than that.
#[test]
fn a_directory_half_removed_by_a_kill_is_removed_after_the_restart() {
    let sb = Sandbox::new("faults-half-dir");
    let p = sb.path("disk/pointing");
    // TMPPOINTING_b, just as old but never touched, is the control.
    for top in ["TMPPOINTING_a", "TMPPOINTING_b"] {
        for sub in ["x", "y"] {
            for i in 0..5 {
                put(&p.join(top).join(sub), &format!("f{i}.dat"), 100, days(3));
            }
            set_age(&p.join(top).join(sub), days(3));
        }
        set_age(&p.join(top), days(3));
    }
    put(
        &p.join("TMPPOINTING_young"),
        "new.dat",
        100,
        Duration::from_secs(60),
    );
    // The removal was killed after unlinking x/f0.dat and y/ entirely.
    std::fs::remove_file(p.join("TMPPOINTING_a/x/f0.dat")).unwrap();
    std::fs::remove_dir_all(p.join("TMPPOINTING_a/y")).unwrap();
    sb.write_config(
        r#""storage": {"check_every": "1s",
    "retention": [{"name": "tmppointing", "root": "disk/pointing", "match": ["TMPPOINTING*"], "kind": "dir", "depth": 1, "max_age": "2m"}]}"#,
    );
    let daemon = sb.start();
    let s = until(&daemon, "a retention pass", |s| {
        counter(s, "storage", "retention_passes_total") >= 2
    });
    assert_eq!(daemon.stop().0, 0);
    assert!(
        sb.path("disk/pointing/TMPPOINTING_young/new.dat").exists(),
        "the young one stays"
    );
    assert_eq!(
        names_in(&p),
        ["TMPPOINTING_young"],
        "TMPPOINTING_a holds only 3-day-old files: {}",
        svc(&s, "storage")
    );
}

// ---------------------------------------------------------------------
// 3. SIGKILL during state writes
// ---------------------------------------------------------------------

/// The state directory after a kill: state.json parses, nothing was moved
/// aside as corrupt, and no temporaries pile up. Returns state.json and
/// whether a temporary was left.
fn check_state(sb: &Sandbox, when: &str) -> (Value, bool) {
    let mut tmp = false;
    for name in names_in(&sb.path("state")) {
        assert!(
            !name.starts_with("state.json.corrupt-"),
            "{when}: the state was found corrupt and moved aside as {name}"
        );
        match name.as_str() {
            "state.json" => {}
            ".state.json.tmp" => tmp = true,
            other => panic!("{when}: unexpected {other} in state_dir"),
        }
    }
    let text = std::fs::read_to_string(sb.path("state/state.json"))
        .unwrap_or_else(|e| panic!("{when}: state.json: {e}"));
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{when}: state.json is not whole JSON ({e}): {text:?}"));
    assert_eq!(v["version"], 1, "{when}: {text}");
    (v, tmp)
}

/// How long a clean stop takes from SIGTERM: until `.state.json.tmp`
/// appears, until it is renamed, until the exit; and the start before it.
struct StopTimes {
    up: Duration,
    tmp_from: Option<Duration>,
    tmp_to: Option<Duration>,
    exit: Duration,
}

fn time_stop(sb: &Sandbox) -> StopTimes {
    let began = Instant::now();
    let mut child = spawn_quiet(sb);
    wait_up(sb, &mut child);
    let up = began.elapsed();
    let tmp = sb.path("state/.state.json.tmp");
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let (mut tmp_from, mut tmp_to) = (None, None);
    loop {
        let seen = tmp.exists();
        if seen && tmp_from.is_none() {
            tmp_from = Some(t0.elapsed());
        }
        if !seen && tmp_from.is_some() && tmp_to.is_none() {
            tmp_to = Some(t0.elapsed());
        }
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        // Not a spin: the daemon needs the CPU more than we do.
        std::thread::sleep(Duration::from_micros(100));
    }
    StopTimes {
        up,
        tmp_from,
        tmp_to,
        exit: t0.elapsed(),
    }
}

/// 100 rounds: the daemon is killed with SIGKILL while it writes
/// state.json: at a random point of its start (which saves the state
/// once), or after SIGTERM, which flushes the state on the way out: at a
/// random point of the stretch where three timed stops wrote it, or
/// within a write's time of its temporary appearing. After every kill state.json is whole and holds
/// what the earlier runs saved (an alert cooldown, the start count never
/// going back); the next start loads it instead of moving it aside.
#[test]
fn sigkill_during_state_writes_never_leaves_a_corrupt_state() {
    const ROUNDS: u64 = 100;
    let sb = Sandbox::new("faults-state");
    sb.write_config("");
    let good = std::fs::read_to_string(sb.config_path()).unwrap();
    // Something worth keeping: an alert cooldown, saved at stop.
    let daemon = sb.start();
    sb.write_raw_config("{ broken");
    daemon.signal(Signal::SIGHUP);
    daemon.status_where(|v| v["alerts"]["raised"] == 1);
    sb.write_raw_config(&good);
    assert_eq!(daemon.stop().0, 0);
    // Where the write falls in a stop, here (qemu is slower than the host
    // at everything but the fsync): the window the kills aim at covers
    // every write seen in three stops, with a margin.
    let times: Vec<StopTimes> = (0..3).map(|_| time_stop(&sb)).collect();
    let up = times.iter().map(|t| t.up).max().unwrap();
    let exit = times.iter().map(|t| t.exit).max().unwrap();
    let from = times.iter().filter_map(|t| t.tmp_from).min();
    let to = times.iter().filter_map(|t| t.tmp_to).max();
    let mut writes: Vec<Duration> = times
        .iter()
        .filter_map(|t| Some(t.tmp_to? - t.tmp_from?))
        .collect();
    writes.sort();
    let write = writes
        .get(writes.len() / 2)
        .copied()
        .unwrap_or(Duration::from_millis(1))
        .max(Duration::from_micros(200));
    let (from, len) = match (from, to) {
        (Some(from), Some(to)) if to > from => {
            let d = (to - from).max(Duration::from_millis(1));
            (from.saturating_sub(d), to - from + 2 * d)
        }
        _ => (Duration::ZERO, exit),
    };
    let (mut last, _) = check_state(&sb, "before the rounds");
    assert_eq!(last["alert_cooldowns"][0]["kind"], "config_invalid");

    let (mut temporaries, mut saved_at_start, mut mid_start, mut mid_stop) = (0, 0, 0, 0);
    for round in 0..ROUNDS {
        let mut rng = Rng::new(round);
        let mut child = spawn_quiet(&sb);
        if rng.below(3) == 0 {
            mid_start += 1;
            let window = up.as_micros() as u64 * 6 / 5;
            std::thread::sleep(Duration::from_micros(rng.below(window)));
        } else {
            mid_stop += 1;
            wait_up(&sb, &mut child);
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                Signal::SIGTERM,
            )
            .unwrap();
            if rng.below(2) == 0 {
                // Blind: anywhere around where writes were seen.
                std::thread::sleep(from + Duration::from_micros(rng.below(len.as_micros() as u64)));
            } else {
                // Aimed: once the temporary is there, within the time a
                // write takes.
                let tmp = sb.path("state/.state.json.tmp");
                let end = Instant::now() + LIMIT;
                while !tmp.exists() && child.try_wait().unwrap().is_none() && Instant::now() < end {
                    std::thread::sleep(Duration::from_micros(50));
                }
                std::thread::sleep(Duration::from_micros(rng.below(write.as_micros() as u64)));
            }
        }
        kill9(&mut child);
        let when = format!("round {round}");
        let (state, tmp) = check_state(&sb, &when);
        temporaries += usize::from(tmp);
        let starts = |v: &Value| v["lifetime"]["starts"].as_u64().unwrap();
        assert!(
            starts(&state) >= starts(&last) && starts(&state) <= starts(&last) + 1,
            "{when}: starts went from {} to {}",
            starts(&last),
            starts(&state)
        );
        saved_at_start += usize::from(starts(&state) > starts(&last));
        assert_eq!(
            state["alert_cooldowns"][0]["kind"], "config_invalid",
            "{when}: the cooldown was lost: {state}"
        );
        last = state;
    }

    // The last start loads what the rounds left, counts on from it, and a
    // clean stop leaves no temporary.
    let daemon = sb.start();
    let s = daemon.status();
    assert_eq!(
        s["lifetime"]["starts"].as_u64().unwrap(),
        last["lifetime"]["starts"].as_u64().unwrap() + 1,
        "state.json was loaded"
    );
    assert!(
        s["alerts"]["last"]
            .as_array()
            .is_none_or(|a| a.iter().all(|x| x["kind"] != "state_corrupt")),
        "{s}"
    );
    assert_eq!(daemon.stop().0, 0);
    let (_, tmp) = check_state(&sb, "after a clean stop");
    assert!(!tmp, "a clean stop left .state.json.tmp");
    eprintln!(
        "state: up in {up:?}; kills {from:?}..{:?} after SIGTERM (stops wrote the state at {:?}, exit after {exit:?}); {mid_start} kills during start, {mid_stop} after SIGTERM; {saved_at_start} starts were saved before the kill; {temporaries} kills left a temporary",
        from + len,
        times
            .iter()
            .map(|t| (t.tmp_from, t.tmp_to))
            .collect::<Vec<_>>()
    );
    assert!(
        temporaries > 0,
        "no kill landed in the middle of a state write"
    );
}

// ---------------------------------------------------------------------
// 4. ENOSPC on the target file system
// ---------------------------------------------------------------------

/// A relocate rule with a 1 s sweep (the shortest allowed), so failed
/// moves are retried quickly.
fn fast_rule(name: &str, root: &Path, target: &Path) -> String {
    format!(
        r#"{{"name": "{name}", "root": {}, "match": ["casa-*.log"], "target": {}, "sweep_every": "1s", "sweep_every_busy": "1s"}}"#,
        json_path(root),
        json_path(target)
    )
}

/// Files relocated into a 256 KiB tmpfs until it is full: the ones that
/// do not fit stay whole at their source, the failures are counted and
/// shown, no partial copy is left under a final name; once space is freed
/// the periodic sweep brings the rest, each file arriving exactly once.
#[test]
fn a_full_target_leaves_sources_whole_until_space_returns() {
    let sb = Sandbox::new("faults-enospc");
    let Some(small) = Tmpfs::mount(&sb.path("small"), "size=256k") else {
        return;
    };
    let target = small.0.join("logs");
    std::fs::create_dir_all(sb.path("data")).unwrap();
    sb.write_config(&format!(
        r#""relocate": [{}]"#,
        fast_rule("casa", &sb.path("data"), &target)
    ));
    let daemon = sb.start();
    // 10 × 48 KiB: about twice what the file system holds.
    let names: Vec<String> = (0..10).map(|i| format!("casa-{i}.log")).collect();
    for n in &names {
        put(&sb.path("data"), n, 48 * 1024, Duration::ZERO);
    }
    let s = until(&daemon, "the target full and a sweep failing", |s| {
        let d = &svc(s, "relocate")["details"][0];
        counter(s, "relocate", "move_failures_total") > 0
            && d["last_failure"]
                .as_str()
                .is_some_and(|f| f.contains("No space left on device"))
            && svc(s, "relocate")["health"] == "degraded"
    });
    let r = svc(&s, "relocate");
    assert!(
        r["reason"].as_str().unwrap().contains("could not be moved"),
        "{r}"
    );
    assert!(
        sb.files_in("alerts")
            .iter()
            .any(|f| f.ends_with("-relocate_failed.json")),
        "an alert says so"
    );
    let at_source = names_in(&sb.path("data"));
    let in_target = names_in(&target);
    assert!(
        !at_source.is_empty() && !in_target.is_empty(),
        "{at_source:?} {in_target:?}"
    );
    for n in &at_source {
        assert_eq!(
            std::fs::read(sb.path("data").join(n)).unwrap(),
            content(n, 48 * 1024),
            "{n} is whole at its source"
        );
    }
    for n in &in_target {
        assert!(names.contains(n), "{n}: only whole files under final names");
        assert_eq!(
            std::fs::read(target.join(n)).unwrap(),
            content(n, 48 * 1024),
            "{n} is whole in the target"
        );
    }
    assert_eq!(at_source.len() + in_target.len(), names.len());

    // Space returns: whatever was moved is taken away (as a log shipper
    // would), and the sweep moves the rest.
    for n in &in_target {
        std::fs::remove_file(target.join(n)).unwrap();
    }
    wait_for(LIMIT, || names_in(&sb.path("data")).is_empty())
        .expect("the rest moved once there was room");
    assert_eq!(names_in(&target), at_source, "each arrived once");
    for n in &at_source {
        assert_eq!(
            std::fs::read(target.join(n)).unwrap(),
            content(n, 48 * 1024)
        );
    }
    until(&daemon, "healthy again after a clean sweep", |s| {
        svc(s, "relocate")["health"] == "healthy"
    });
    assert_eq!(daemon.stop().0, 0);
}

// ---------------------------------------------------------------------
// 5. Files and directories that cannot be removed
// ---------------------------------------------------------------------

/// The locked files of the relocate tests, where they are, and their
/// targets. Fields drop in order: the locks go before what they lock.
struct LockedRelocation {
    locks: Locks,
    cross_target: ShmDir,
    sb: Sandbox,
    /// (source path, name, length, target dir)
    locked: Vec<(PathBuf, String, usize, PathBuf)>,
    how: &'static str,
}

/// Two rules, one across file systems and one on the same, each with a
/// file that cannot be unlinked (immutable file, or a file in an
/// immutable directory) and a free control file.
fn locked_relocation(tag: &str) -> Option<LockedRelocation> {
    let sb = Sandbox::new(tag);
    let cross_target = ShmDir::new(&sb, tag)?;
    let same_target = sb.path("same-target");
    let mut locks = Locks::new();
    let mut locked = Vec::new();
    put(
        &sb.path("cross/locked-dir"),
        "casa-in-dir.log",
        70_000,
        Duration::ZERO,
    );
    put(
        &sb.path("same/locked-dir"),
        "casa-same.log",
        3_000,
        Duration::ZERO,
    );
    let Some(how) = locks.lock_dir(&sb.path("cross/locked-dir")) else {
        eprintln!("SKIPPED: neither chattr +i nor a read-only bind mount works here");
        return None;
    };
    locks.lock_dir(&sb.path("same/locked-dir")).unwrap();
    locked.push((
        sb.path("cross/locked-dir/casa-in-dir.log"),
        "casa-in-dir.log".to_string(),
        70_000,
        cross_target.0.clone(),
    ));
    locked.push((
        sb.path("same/locked-dir/casa-same.log"),
        "casa-same.log".to_string(),
        3_000,
        same_target.clone(),
    ));
    let imm = put(
        &sb.path("cross"),
        "casa-immutable.log",
        20_000,
        Duration::ZERO,
    );
    if locks.lock_file(&imm) {
        locked.push((
            imm,
            "casa-immutable.log".to_string(),
            20_000,
            cross_target.0.clone(),
        ));
    } else {
        std::fs::remove_file(&imm).unwrap();
        eprintln!("no chattr: only directories are locked (read-only bind mounts)");
    }
    put(&sb.path("cross"), "casa-free.log", 1_000, Duration::ZERO);
    sb.write_config(&format!(
        r#""relocate": [{}, {}]"#,
        fast_rule("cross", &sb.path("cross"), &cross_target.0),
        fast_rule("same", &sb.path("same"), &same_target)
    ));
    Some(LockedRelocation {
        locks,
        cross_target,
        sb,
        locked,
        how,
    })
}

/// Copies of `name` in `dir`: `name` itself and `stem.K.log`.
fn copies_of(dir: &Path, name: &str) -> Vec<String> {
    names_in(dir)
        .into_iter()
        .filter(|n| original_name(n) == name)
        .collect()
}

/// A relocate source that cannot be unlinked (or renamed) stays whole at
/// its source while the daemon goes on: the failure is counted, shown in
/// health, retried at each sweep; once the lock is lifted the file moves.
#[test]
fn a_source_that_cannot_be_unlinked_stays_whole_and_is_retried() {
    let Some(mut t) = locked_relocation("faults-locked-src") else {
        return;
    };
    let daemon = t.sb.start_with(|c| {
        c.stderr(Stdio::piped());
    });
    let s = until(&daemon, "three sweeps with the locked files", |s| {
        counter(s, "relocate", "sweeps_total") >= 2 * 3
    });
    let r = svc(&s, "relocate");
    assert_eq!(r["health"], "degraded", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("could not be moved in the last sweep"),
        "{r}"
    );
    assert!(
        counter(&s, "relocate", "move_failures_total") >= 2 * t.locked.len() as u64,
        "each sweep tries again: {r}"
    );
    let failure = r["details"][0]["last_failure"].as_str().unwrap_or("");
    assert!(
        failure.contains("Operation not permitted") || failure.contains("Read-only file system"),
        "{r}"
    );
    assert!(
        t.cross_target.0.join("casa-free.log").exists(),
        "the free file moved"
    );
    for (src, name, len, target) in &t.locked {
        assert_eq!(
            std::fs::read(src).unwrap(),
            content(name, *len),
            "{name} whole at its source ({})",
            t.how
        );
        for c in copies_of(target, name) {
            assert_eq!(std::fs::read(target.join(&c)).unwrap(), content(name, *len));
        }
    }
    t.locks.unlock_all();
    wait_for(LIMIT, || t.locked.iter().all(|(src, ..)| !src.exists()))
        .expect("moved once it could be");
    for (_, name, len, target) in &t.locked {
        let copies = copies_of(target, name);
        assert!(!copies.is_empty(), "{name} arrived");
        for c in copies {
            assert_eq!(std::fs::read(target.join(&c)).unwrap(), content(name, *len));
        }
    }
    until(&daemon, "healthy again", |s| {
        svc(s, "relocate")["health"] == "healthy"
    });
    let (code, _, err) = daemon.stop();
    assert_eq!(code, 0);
    assert!(
        err.contains("cannot move casa-") && err.contains("retried at each sweep"),
        "{err}"
    );
}

/// The same locked sources, held to "no duplicates": across file systems
/// the copy is linked into the target before the source's unlink fails;
/// the mover keeps that copy ("the file is in both places"), and every
/// later sweep copies the source again under the next suffix, so the
/// target fills with copies of one file (one per sweep_every).
#[test]
fn a_source_that_cannot_be_unlinked_is_not_copied_again_at_every_sweep() {
    let Some(mut t) = locked_relocation("faults-locked-dup") else {
        return;
    };
    let daemon = t.sb.start();
    until(&daemon, "three sweeps with the locked files", |s| {
        counter(s, "relocate", "sweeps_total") >= 2 * 3
    });
    for (_, name, _, target) in &t.locked {
        let copies = copies_of(target, name);
        assert!(
            copies.len() <= 1,
            "{name}: {} copies after three sweeps: {copies:?}",
            copies.len()
        );
    }
    t.locks.unlock_all();
    wait_for(LIMIT, || t.locked.iter().all(|(src, ..)| !src.exists()))
        .expect("moved once it could be");
    for (_, name, _, target) in &t.locked {
        assert_eq!(copies_of(target, name), vec![name.clone()], "exactly once");
    }
    assert_eq!(daemon.stop().0, 0);
}

/// Expired files that cannot be deleted (an immutable file, a file in an
/// immutable directory) stay; the daemon counts and logs each failure,
/// reports storage as degraded, deletes everything else, and tries again
/// at every pass; once the lock is lifted they go.
#[test]
fn an_expired_file_that_cannot_be_deleted_is_counted_and_retried() {
    let sb = Sandbox::new("faults-locked-retention");
    let mut locks = Locks::new();
    let live = sb.path("disk/live");
    put(&live, "old-free.jpg", 500, days(2));
    put(&live, "young.jpg", 500, Duration::from_secs(60));
    let mut locked = vec![put(&live.join("locked"), "old-in-dir.jpg", 700, days(2))];
    let Some(how) = locks.lock_dir(&live.join("locked")) else {
        eprintln!("SKIPPED: neither chattr +i nor a read-only bind mount works here");
        return;
    };
    let imm = put(&live, "old-immutable.jpg", 900, days(2));
    if locks.lock_file(&imm) {
        locked.push(imm);
    } else {
        std::fs::remove_file(&imm).unwrap();
    }
    sb.write_config(
        r#""storage": {"check_every": "1s",
    "retention": [{"name": "live", "root": "disk/live", "match": ["*.jpg"], "max_age": "2m"}]}"#,
    );
    let daemon = sb.start_with(|c| {
        c.stderr(Stdio::piped());
    });
    let n = locked.len() as u64;
    let s = until(&daemon, "three passes", |s| {
        counter(s, "storage", "retention_passes_total") >= 3
    });
    let st = svc(&s, "storage");
    assert_eq!(st["health"], "degraded", "{st}");
    assert!(
        st["reason"]
            .as_str()
            .unwrap()
            .contains("could not be deleted"),
        "{st}"
    );
    assert!(
        counter(&s, "storage", "delete_failures_total") >= 3 * n,
        "retried at every pass ({how}): {st}"
    );
    assert!(!live.join("old-free.jpg").exists(), "the rest is deleted");
    assert!(live.join("young.jpg").exists());
    for p in &locked {
        let name = p.file_name().unwrap().to_str().unwrap();
        let len = std::fs::metadata(p).unwrap().len() as usize;
        assert_eq!(
            std::fs::read(p).unwrap(),
            content(name, len),
            "{name} stays whole"
        );
    }
    locks.unlock_all();
    wait_for(LIMIT, || locked.iter().all(|p| !p.exists())).expect("deleted once it could be");
    until(&daemon, "healthy again", |s| {
        svc(s, "storage")["health"] == "healthy"
    });
    assert!(live.join("young.jpg").exists());
    let (code, _, err) = daemon.stop();
    assert_eq!(code, 0);
    assert!(
        err.contains("cannot delete") && err.contains("it stays"),
        "{err}"
    );
}

// ---------------------------------------------------------------------
// 6. A directory replaced by a symbolic link mid-walk
// ---------------------------------------------------------------------

/// Replaces `root/name` (a directory) with a symbolic link to `to`; the
/// directory itself goes to `aside/name`, out of the root.
fn swap_for_link(root: &Path, name: &str, aside: &Path, to: &Path) {
    std::fs::rename(root.join(name), aside.join(name)).unwrap();
    std::os::unix::fs::symlink(to, root.join(name)).unwrap();
}

/// A retention pass over 20,000 expired files in 200 directories takes
/// several seconds of slices. While it runs, half of the directories are
/// replaced by symbolic links to a directory outside the root full of
/// expired, matching files: not one of those is deleted, during that pass
/// or the next; everything left inside the root is.
#[test]
fn a_directory_swapped_for_a_symlink_mid_pass_is_not_followed_by_retention() {
    const DIRS: usize = 200;
    const PER_DIR: usize = 100;
    let sb = Sandbox::new("faults-swap-retention");
    let Some(shm) = ShmDir::new(&sb, "swap-retention") else {
        return;
    };
    let root = shm.0.join("live");
    let aside = shm.0.join("aside");
    let outside = shm.0.join("outside");
    std::fs::create_dir_all(&aside).unwrap();
    let victims: Vec<PathBuf> = (0..PER_DIR)
        .map(|i| put(&outside, &format!("victim-{i}.jpg"), 40, days(5)))
        .collect();
    for d in 0..DIRS {
        for i in 0..PER_DIR {
            put(
                &root.join(format!("d{d:03}")),
                &format!("f{i}.jpg"),
                0,
                days(2),
            );
        }
    }
    sb.write_config(&format!(
        r#""storage": {{"check_every": "1s",
    "retention": [{{"name": "live", "root": {}, "match": ["*.jpg"], "max_age": "2m"}}]}}"#,
        json_path(&root)
    ));
    let daemon = sb.start();
    // The pass is under way once files start to go.
    let total = DIRS * PER_DIR;
    let remaining = || -> usize {
        (0..DIRS)
            .map(|d| std::fs::read_dir(root.join(format!("d{d:03}"))).map_or(0, |r| r.count()))
            .sum()
    };
    wait_for(LIMIT, || remaining() < total).expect("the pass started");
    let mut swapped = Vec::new();
    for d in (0..DIRS).step_by(2) {
        let name = format!("d{d:03}");
        swap_for_link(&root, &name, &aside, &outside);
        swapped.push(name);
    }
    let s = until(&daemon, "the pass over and another after it", |s| {
        counter(s, "storage", "retention_passes_total") >= 2
    });
    for v in &victims {
        assert!(v.exists(), "{} deleted through a symlink", v.display());
    }
    // Directories swapped before the walk reached them were refused whole
    // (moved out of the root, they are none of its business any more).
    let untouched = swapped
        .iter()
        .filter(|n| names_in(&aside.join(n)).len() == PER_DIR)
        .count();
    for d in (1..DIRS).step_by(2) {
        let dir = root.join(format!("d{d:03}"));
        assert_eq!(
            names_in(&dir),
            Vec::<String>::new(),
            "{} emptied",
            dir.display()
        );
    }
    for n in &swapped {
        assert!(
            std::fs::symlink_metadata(root.join(n))
                .unwrap()
                .file_type()
                .is_symlink(),
            "the links themselves are left alone"
        );
    }
    eprintln!(
        "swap (retention): {untouched} of {} directories were swapped before the pass reached them; storage: {}",
        swapped.len(),
        svc(&s, "storage")["counters"]
    );
    assert!(untouched > 0, "no swap landed before the walk reached it");
    assert_eq!(daemon.stop().0, 0);
}

/// relocate's sweeps walk a tree of 10,000 files (nothing to move) once a
/// second; during three sweeps, directories are replaced by symbolic
/// links to a directory outside the root that holds matching files. Those
/// never move; matching files made inside the root meanwhile do.
#[test]
fn a_directory_swapped_for_a_symlink_mid_sweep_is_not_followed_by_relocate() {
    const DIRS: usize = 100;
    let sb = Sandbox::new("faults-swap-relocate");
    let Some(shm) = ShmDir::new(&sb, "swap-relocate") else {
        return;
    };
    let root = shm.0.join("data");
    let aside = shm.0.join("aside");
    let outside = shm.0.join("outside");
    let target = shm.0.join("target");
    std::fs::create_dir_all(&aside).unwrap();
    let mut victims: Vec<PathBuf> = (0..20)
        .map(|i| {
            put(
                &outside,
                &format!("casa-outside-{i}.log"),
                100,
                Duration::ZERO,
            )
        })
        .collect();
    for d in 0..DIRS {
        for i in 0..100 {
            put(
                &root.join(format!("d{d:03}")),
                &format!("other-{i}.dat"),
                0,
                Duration::ZERO,
            );
        }
    }
    sb.write_config(&format!(
        r#""relocate": [{}]"#,
        fast_rule("casa", &root, &target)
    ));
    let daemon = sb.start();
    let first = counter(&daemon.status(), "relocate", "sweeps_total");
    let mut rng = Rng::new(66);
    let mut order: Vec<usize> = (0..DIRS).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let began = Instant::now();
    let mut made = Vec::new();
    for (k, d) in order.iter().take(60).enumerate() {
        let name = format!("d{d:03}");
        swap_for_link(&root, &name, &aside, &outside);
        // Written through the link: it lands outside, and stays there.
        let through = format!("casa-through-{k}.log");
        put(&root.join(&name), &through, 10, Duration::ZERO);
        victims.push(outside.join(through));
        // A matching file inside the root (in a directory never swapped),
        // which must move.
        let inside = format!("casa-inside-{k}.log");
        let keep = order[60 + k % (DIRS - 60)];
        put(
            &root.join(format!("d{keep:03}")),
            &inside,
            10,
            Duration::ZERO,
        );
        made.push(inside);
        std::thread::sleep(Duration::from_millis(rng.below(60)));
    }
    let swaps_took = began.elapsed();
    wait_for(LIMIT, || names_in(&target).len() == made.len()).expect("inside files moved");
    let s = until(&daemon, "two more sweeps", |s| {
        counter(s, "relocate", "sweeps_total") >= first + 2
    });
    for v in &victims {
        assert!(v.exists(), "{} moved through a symlink", v.display());
    }
    assert_eq!(names_in(&target), {
        let mut m = made.clone();
        m.sort();
        m
    });
    eprintln!(
        "swap (relocate): 60 directories swapped over {swaps_took:?}, during sweeps {first}..{}",
        counter(&s, "relocate", "sweeps_total")
    );
    assert_eq!(daemon.stop().0, 0);
}

// ---------------------------------------------------------------------
// 7. The relocate target deleted while running
// ---------------------------------------------------------------------

/// Both targets (one on the root's file system, one across) are deleted
/// under the running daemon, once with their parent; files made afterwards
/// are not lost: the daemon makes the target again and they arrive, whole
/// and once, and health stays or comes back healthy. Once the user makes
/// the target again themselves (a new directory under the same name), files
/// go into that one.
#[test]
fn a_target_deleted_while_running_is_made_again_and_nothing_is_lost() {
    let sb = Sandbox::new("faults-target-gone");
    let Some(shm) = ShmDir::new(&sb, "target-gone") else {
        return;
    };
    let same = sb.path("out/same/logs");
    let cross = shm.0.join("cross/logs");
    sb.write_config(&format!(
        r#""relocate": [{}, {}]"#,
        fast_rule("same", &sb.path("a"), &same),
        fast_rule("cross", &sb.path("b"), &cross)
    ));
    std::fs::create_dir_all(sb.path("a/sub")).unwrap();
    std::fs::create_dir_all(sb.path("b/sub")).unwrap();
    let daemon = sb.start();
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let round = |what: &str, expected: &mut BTreeMap<String, BTreeSet<String>>| {
        for (root, target) in [("a", &same), ("b", &cross)] {
            for i in 0..5 {
                let name = format!("casa-{what}-{i}.log");
                put(
                    &sb.path(root).join("sub"),
                    &name,
                    3000 + i * 7000,
                    Duration::ZERO,
                );
                expected
                    .entry(target.display().to_string())
                    .or_default()
                    .insert(name);
            }
        }
        for (root, target) in [("a", &same), ("b", &cross)] {
            let want = &expected[&target.display().to_string()];
            wait_for(LIMIT, || {
                names_in(&sb.path(root).join("sub")).is_empty()
                    && want.iter().all(|n| target.join(n).exists())
            })
            .unwrap_or_else(|| {
                panic!(
                    "{what}: left at the source {:?}, in {} {:?}",
                    names_in(&sb.path(root).join("sub")),
                    target.display(),
                    names_in(target)
                )
            });
        }
    };
    round("before", &mut expected);

    // Deleted, with what was in them (the user's doing): new files still
    // arrive, in a target made again.
    std::fs::remove_dir_all(&same).unwrap();
    std::fs::remove_dir_all(&cross).unwrap();
    expected.clear();
    round("after-rm", &mut expected);

    // Deleted with their parents.
    std::fs::remove_dir_all(sb.path("out")).unwrap();
    std::fs::remove_dir_all(shm.0.join("cross")).unwrap();
    expected.clear();
    round("after-rm-parent", &mut expected);

    // Deleted and made again by the user at once: files go into the new
    // directory, not the deleted one the daemon had open.
    std::fs::remove_dir_all(&same).unwrap();
    std::fs::remove_dir_all(&cross).unwrap();
    std::fs::create_dir_all(&same).unwrap();
    std::fs::create_dir_all(&cross).unwrap();
    expected.clear();
    round("after-remake", &mut expected);

    for target in [&same, &cross] {
        let want = &expected[&target.display().to_string()];
        assert_eq!(
            names_in(target).into_iter().collect::<BTreeSet<_>>(),
            *want,
            "each file once in {}",
            target.display()
        );
        for n in want {
            let i: usize = n
                .rsplit('-')
                .next()
                .unwrap()
                .trim_end_matches(".log")
                .parse()
                .unwrap();
            assert_eq!(
                std::fs::read(target.join(n)).unwrap(),
                content(n, 3000 + i * 7000)
            );
        }
    }
    let s = until(&daemon, "healthy", |s| {
        svc(s, "relocate")["health"] == "healthy"
    });
    assert_eq!(counter(&s, "relocate", "files_moved_total"), 40);
    assert_eq!(daemon.stop().0, 0);
}

/// The target renamed away (`mv logs logs.old`, as a rotation script
/// does) while the daemon runs: the daemon keeps the old directory open
/// and goes on moving files into `logs.old`, under a path that is not the
/// configured target, where no one looks for them (nothing is lost, but
/// files go to the wrong place until a restart).
#[test]
fn a_target_renamed_away_is_not_used_any_more() {
    let sb = Sandbox::new("faults-target-renamed");
    let target = sb.path("out/logs");
    sb.write_config(&format!(
        r#""relocate": [{}]"#,
        fast_rule("casa", &sb.path("a"), &target)
    ));
    std::fs::create_dir_all(sb.path("a")).unwrap();
    let daemon = sb.start();
    put(&sb.path("a"), "casa-1.log", 100, Duration::ZERO);
    wait_for(LIMIT, || target.join("casa-1.log").exists()).expect("moved");
    std::fs::rename(&target, sb.path("out/logs.old")).unwrap();
    put(&sb.path("a"), "casa-2.log", 100, Duration::ZERO);
    wait_for(LIMIT, || !sb.path("a/casa-2.log").exists()).expect("moved");
    // Give a sweep the chance to find a misplaced file (it cannot).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(names_in(&sb.path("out/logs.old")), ["casa-1.log"]);
    assert_eq!(
        names_in(&target),
        ["casa-2.log"],
        "casa-2.log went into {}",
        sb.path("out/logs.old").display()
    );
    assert_eq!(daemon.stop().0, 0);
}

// ---------------------------------------------------------------------
// 8. The cgroup root removed while governing
// ---------------------------------------------------------------------

/// govern over a directory standing in for cgroupfs, scanning every
/// second, no filters, the given comm names as targets.
fn govern_config(sb: &Sandbox, root: &Path, comms: &[&str]) {
    let targets: Vec<String> = comms
        .iter()
        .map(|c| format!(r#"{{"comm": "{c}", "cpu_quota": 50}}"#))
        .collect();
    sb.write_config(&format!(
        r#""status_every": "200ms",
  "govern": {{"cgroup_root": {}, "scan_every": "1s",
    "filters": {{"min_runtime": "0s", "blocked_uids": [], "blocked_dirs": []}},
    "targets": [{}]}}"#,
        json_path(root),
        targets.join(", ")
    ));
}

fn process(s: &Value, pid: u32) -> Option<&Value> {
    svc(s, "govern")["details"]["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"] == pid)
}

fn governed_in(s: &Value, pid: u32) -> bool {
    process(s, pid).is_some_and(|p| p["state"] == "governed")
}

fn named(name: &CStr) -> (edgekeeper::sys::named_child::NamedChild, u32) {
    let c = edgekeeper::sys::named_child::NamedChild::spawn(name, None, 0).unwrap();
    let pid = c.pid().as_raw() as u32;
    (c, pid)
}

/// The cgroup root (with its parent) is removed while a process is
/// governed: the daemon goes on (status still written); the next process
/// to attach finds the root gone, which makes govern unhealthy with a
/// reason naming the root, and it waits; once the parent is back the
/// daemon makes the root again and governs the waiting process.
#[test]
fn a_cgroup_root_removed_while_governing_is_reported_and_made_again() {
    let sb = Sandbox::new("faults-cgroot");
    let parent = sb.path("cgroupfs");
    let root = parent.join("edgekeeper.slice");
    std::fs::create_dir_all(&parent).unwrap();
    govern_config(&sb, &root, &["ek-fcg-a1", "ek-fcg-a2"]);
    let d = sb.start();
    let (_first, p1) = named(c"ek-fcg-a1");
    until(&d, "the first governed", |s| governed_in(s, p1));
    assert!(root.join(format!("ek-fcg-a1-{p1}/cgroup.procs")).exists());

    std::fs::remove_dir_all(&parent).unwrap();
    let (_second, p2) = named(c"ek-fcg-a2");
    let s = until(&d, "govern unhealthy, naming the root", |s| {
        let g = svc(s, "govern");
        g["health"] == "unhealthy"
            && g["reason"]
                .as_str()
                .is_some_and(|r| r.contains(root.to_str().unwrap()))
    });
    assert_eq!(s["running"], true);
    let p = process(&s, p2).expect("the second is tracked");
    assert_eq!(p["state"], "waiting", "{p}");
    let writes = s["core"]["status_writes"].as_u64().unwrap();
    wait_for(LIMIT, || {
        d.status()["core"]["status_writes"].as_u64().unwrap() > writes + 2
    })
    .expect("status still written every 200 ms");

    std::fs::create_dir_all(&parent).unwrap();
    let s = until(&d, "the second governed in a new root", |s| {
        governed_in(s, p2) && svc(s, "govern")["health"] != "unhealthy"
    });
    assert_eq!(
        std::fs::read_to_string(root.join(format!("ek-fcg-a2-{p2}/cgroup.procs"))).unwrap(),
        format!("{p2}\n")
    );
    assert_eq!(
        std::fs::read_to_string(root.join(format!("ek-fcg-a2-{p2}/cpu.max"))).unwrap(),
        "50000 100000\n"
    );
    eprintln!(
        "cgroup root: after it came back, the first process is shown as {}; its group exists: {}",
        process(&s, p1).map_or("untracked".into(), |p| p["state"].to_string()),
        root.join(format!("ek-fcg-a1-{p1}")).exists()
    );
    assert_eq!(d.stop().0, 0);
}

/// The root removed while its only process is governed, and nothing new
/// starts: the daemon never looks at the root again, so govern stays
/// healthy, the process is still shown as governed in a group that no
/// longer exists, and it is not put back when the root returns.
#[test]
fn a_cgroup_root_removed_under_a_governed_process_is_noticed_and_the_process_governed_again() {
    let sb = Sandbox::new("faults-cgroot-quiet");
    let parent = sb.path("cgroupfs");
    let root = parent.join("edgekeeper.slice");
    std::fs::create_dir_all(&parent).unwrap();
    govern_config(&sb, &root, &["ek-fcg-b1"]);
    let d = sb.start();
    let (_child, pid) = named(c"ek-fcg-b1");
    until(&d, "governed", |s| governed_in(s, pid));
    std::fs::remove_dir_all(&parent).unwrap();
    until(&d, "govern unhealthy, naming the root", |s| {
        svc(s, "govern")["health"] == "unhealthy"
            && svc(s, "govern")["reason"]
                .as_str()
                .is_some_and(|r| r.contains(root.to_str().unwrap()))
    });
    std::fs::create_dir_all(&parent).unwrap();
    let procs = root.join(format!("ek-fcg-b1-{pid}/cgroup.procs"));
    wait_for(LIMIT, || procs.exists()).expect("governed again in the new root");
    assert_eq!(std::fs::read_to_string(procs).unwrap(), format!("{pid}\n"));
    assert_eq!(d.stop().0, 0);
}

// ---------------------------------------------------------------------
// 9. The config file deleted, then SIGHUP
// ---------------------------------------------------------------------

/// SIGHUP with the config file deleted (and then left empty, as an editor
/// killed mid-save leaves it): the daemon stays up on the config it has
/// and goes on working by it, the error names the file (status, alert,
/// log); once the file is back, the next SIGHUP applies it.
#[test]
fn a_deleted_config_is_refused_on_sighup_and_the_old_one_kept() {
    let sb = Sandbox::new("faults-config-gone");
    let rule = |patterns: &str| {
        format!(
            r#""relocate": [{{"name": "casa", "root": "data", "match": [{patterns}], "target": "out"}}]"#
        )
    };
    std::fs::create_dir_all(sb.path("data")).unwrap();
    sb.write_config(&rule(r#""casa-*.log""#));
    let path = sb.config_path();
    let path_text = path.to_str().unwrap();
    let daemon = sb.start_with(|c| {
        c.stderr(Stdio::piped());
    });
    let moves = |name: &str| {
        put(&sb.path("data"), name, 100, Duration::ZERO);
        wait_for(LIMIT, || sb.path("out").join(name).exists()).is_some()
    };
    assert!(moves("casa-1.log"));

    std::fs::remove_file(&path).unwrap();
    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["core"]["config_reload_failures"] == 1);
    assert_eq!(s["running"], true);
    let err = s["config"]["last_reload_error"].as_str().unwrap();
    assert!(
        err.contains("cannot read config") && err.contains(path_text),
        "{err}"
    );
    let alert = &s["alerts"]["last"][0];
    assert_eq!(alert["kind"], "config_invalid", "{s}");
    assert_eq!(alert["source"], path_text);
    assert_eq!(svc(&s, "relocate")["health"], "healthy");
    assert!(moves("casa-2.log"), "still relocating by the old config");

    // Left empty: refused as well, the old config still in force.
    std::fs::write(&path, "").unwrap();
    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["core"]["config_reload_failures"] == 2);
    let err = s["config"]["last_reload_error"].as_str().unwrap();
    assert!(err.contains("edgekeeper.json"), "{err}");
    assert_eq!(s["core"]["config_reloads"], 0);
    assert!(moves("casa-3.log"));

    // Back, with a second pattern: applied.
    sb.write_config(&rule(r#""casa-*.log", "extra-*.log""#));
    daemon.signal(Signal::SIGHUP);
    let s = daemon.status_where(|v| v["core"]["config_reloads"] == 1);
    assert_eq!(s["config"]["last_reload_error"], Value::Null);
    assert!(moves("extra-1.log"), "the new pattern is used");
    assert!(moves("casa-4.log"));
    let (code, _, err) = daemon.stop();
    assert_eq!(code, 0);
    let refused: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("config reload refused"))
        .collect();
    assert_eq!(refused.len(), 2, "{err}");
    assert!(
        refused[0].contains(path_text),
        "the log names the file: {}",
        refused[0]
    );
    let field_log = std::fs::read_to_string(sb.path("log/edgekeeper.log")).unwrap();
    assert!(
        field_log.contains("config reload refused") && field_log.contains(path_text),
        "{field_log}"
    );
}
