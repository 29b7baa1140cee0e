//! One pass over a storage tree: retention by age, emergency planning and
//! purging, orphan cleanup, analysis and quota measurement, in slices.
//!
//! What it is: [`Pass`], a resumable walk of one [`Scope`] (a root, the
//! names that match, files or whole directories, a depth) that does one
//! [`Goal`] to every matching entry. Everything is dirfd-relative: each
//! directory is opened beneath its parent with `O_NOFOLLOW`, each entry is
//! looked at with `fstatat(AT_SYMLINK_NOFOLLOW)` and removed with
//! `unlinkat` on the directory it was found in, so a symbolic link is
//! never followed, a directory swapped for a link mid-walk is refused, and
//! nothing outside the root is reached. A matching directory (`kind:
//! "dir"`, such as `TMPPOINTING*`) is a unit: its age is the newest mtime
//! anywhere inside it (measured by a second walk), and it is removed
//! bottom-up, keeping (and so failing to remove) anything inside that
//! turned young meanwhile. A file that vanishes or cannot be deleted is
//! counted and skipped; nothing aborts a pass. Work is cut into slices by
//! a deadline and a cap on deletions, so the event loop stays responsive
//! and an SD card is not flooded with metadata writes. Walkers, heaps and
//! buffers are made once; a pass allocates nothing.
//! What it is not: the policy of when passes run, over which rules, and
//! when an emergency has freed enough; `storage/mod.rs` decides that.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{FileStat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::config::EntryKind;
use crate::sys::clock::Instant;
use crate::sys::dir::{Decision, DirStream, Kind, Progress, Visit, Walker};
use crate::sys::pattern::Patterns;

/// How entries are ordered by age: mtime in nanoseconds since the epoch,
/// then inode number, so no two entries compare equal.
pub type Key = (i64, u64);

/// Below every real key.
pub const KEY_MIN: Key = (i64::MIN, 0);

/// Levels a walk may go down (a deeper entry is counted, not visited).
pub const MAX_LEVELS: usize = 32;
/// Bytes of getdents64 buffer per level.
const LEVEL_BUFFER: usize = 16 * 1024;

/// Where a pass walks and which entries it acts on.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub root: &'a Path,
    /// Names that match; empty matches every name.
    pub patterns: &'a Patterns,
    pub kind: EntryKind,
    /// `None`: unlimited; 1: entries directly in the root.
    pub depth: Option<u32>,
}

/// What a pass does with each matching entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Count and measure only; entries older than `cutoff_ns` are counted
    /// as expired.
    Analyse { cutoff_ns: Option<i64> },
    /// Delete entries older than `cutoff_ns`; entries newer than
    /// `future_ns` have a clock-skewed mtime and are never deleted by age.
    Expire { cutoff_ns: i64, future_ns: i64 },
    /// Find the oldest entries above `after` (emergency planning; see
    /// [`Pass::plan`]).
    Plan { after: Key },
    /// Delete entries with `after < key <= upto`, oldest-first batches
    /// chosen by a plan.
    Purge { after: Key, upto: Key },
    /// Delete files older than `cutoff_ns` whose companion is gone.
    Orphans { cutoff_ns: i64 },
}

/// One thing a pass did, or would do in a dry run.
#[derive(Clone, Copy, Debug)]
pub struct Action<'a> {
    pub path: &'a [u8],
    pub dir: bool,
    pub bytes: u64,
    pub mtime_ns: i64,
    /// `None`: done (or, in a dry run, would be); `Some`: failed, and the
    /// entry is where it was.
    pub error: Option<Errno>,
}

/// What a pass found and did. For `Expire`, the counts of matching
/// entries describe what remains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Matching entries seen (and, for Expire, kept).
    pub entries: u64,
    /// Their bytes on disk (`st_blocks` × 512; a directory's contents).
    pub bytes: u64,
    pub oldest_ns: Option<i64>,
    pub newest_ns: Option<i64>,
    /// Matching entries older than the cutoff (Analyse).
    pub expired: u64,
    /// Entries deleted (or, in a dry run, that would be).
    pub deleted: u64,
    pub bytes_freed: u64,
    /// Deletions that failed; those entries stay.
    pub failed: u64,
    /// Entries gone before they could be looked at or deleted.
    pub vanished: u64,
    /// Entries with an mtime in the future: never deleted by age.
    pub future: u64,
    /// Matching names that are not regular files (symbolic links, fifos):
    /// never followed or deleted.
    pub not_regular: u64,
    /// Files inside an expired directory that had turned young, kept.
    pub kept_inside: u64,
    /// Directories that could not be read, or too deep to walk.
    pub unreadable: u64,
}

impl Tally {
    fn saw(&mut self, bytes: u64, mtime_ns: i64) {
        self.entries += 1;
        self.bytes += bytes;
        self.oldest_ns = Some(self.oldest_ns.map_or(mtime_ns, |o| o.min(mtime_ns)));
        self.newest_ns = Some(self.newest_ns.map_or(mtime_ns, |n| n.max(mtime_ns)));
    }
}

/// Why a slice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slice {
    /// The pass is over.
    Done,
    /// The deadline came; call again soon.
    Paused,
    /// The cap on deletions was reached; call again after a pause.
    Capped,
}

/// A matching directory being measured or removed.
struct Matched {
    /// A duplicate of the fd of the directory that holds it.
    parent: OwnedFd,
    /// Its name there, NUL-terminated.
    name: [u8; 256],
    name_len: usize,
    /// Its path, for messages.
    path: [u8; 4096],
    path_len: usize,
    ino: u64,
    /// The newest mtime seen so far: the directories' while measuring,
    /// then (once measured) the files' if there are any.
    newest_ns: i64,
    newest_file_ns: Option<i64>,
    bytes: u64,
    removing: Option<i64>,
}

impl Matched {
    fn name(&self) -> &CStr {
        CStr::from_bytes_until_nul(&self.name[..=self.name_len]).unwrap_or(c"")
    }
    fn path(&self) -> &[u8] {
        &self.path[..self.path_len]
    }
}

/// The oldest entries of a tree, and the `keep` newest that emergency
/// must not touch.
struct Planner {
    keep: usize,
    batch: usize,
    /// The `keep` newest keys (a min-heap: the top is the oldest of them).
    newest: BinaryHeap<Reverse<Key>>,
    /// The `batch + keep` oldest keys above `after` with their bytes (a
    /// max-heap: the top is the newest of them).
    oldest: BinaryHeap<(Key, u64)>,
    after: Key,
    seen: u64,
}

impl Planner {
    fn new(keep: usize, batch: usize) -> Planner {
        Planner {
            keep,
            batch,
            newest: BinaryHeap::with_capacity(keep + 1),
            oldest: BinaryHeap::with_capacity(batch + keep + 1),
            after: KEY_MIN,
            seen: 0,
        }
    }

    fn reset(&mut self, keep: usize, after: Key) {
        self.newest.clear();
        self.oldest.clear();
        if keep > self.keep {
            self.newest.reserve(keep + 1);
            self.oldest.reserve(self.batch + keep + 1);
        }
        self.keep = keep;
        self.after = after;
        self.seen = 0;
    }

    fn offer(&mut self, key: Key, bytes: u64) {
        self.seen += 1;
        if self.keep > 0 {
            if self.newest.len() < self.keep {
                self.newest.push(Reverse(key));
            } else if self.newest.peek().is_some_and(|Reverse(k)| key > *k) {
                self.newest.pop();
                self.newest.push(Reverse(key));
            }
        }
        if key <= self.after {
            return;
        }
        if self.oldest.len() < self.batch + self.keep {
            self.oldest.push((key, bytes));
        } else if self.oldest.peek().is_some_and(|(k, _)| key < *k) {
            self.oldest.pop();
            self.oldest.push((key, bytes));
        }
    }
}

/// What a finished plan says to delete next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Delete entries with `after < key <= upto`.
    pub upto: Key,
    pub entries: u64,
    pub bytes: u64,
    /// More deletable entries remain beyond this batch.
    pub more: bool,
}

pub struct Pass {
    main: Walker,
    sub: Walker,
    goal: Goal,
    dry_run: bool,
    active: bool,
    matched: Option<Matched>,
    planner: Planner,
    /// The companion directory and extension of an orphan pass.
    companion: Option<(OwnedFd, heapless::Vec<u8, 64>)>,
    pub tally: Tally,
}

impl Pass {
    /// A pass whose emergency plans may keep up to `keep` entries and
    /// choose batches of `batch`.
    pub fn new(keep: usize, batch: usize) -> Pass {
        Pass {
            main: Walker::new(MAX_LEVELS, LEVEL_BUFFER),
            sub: Walker::new(MAX_LEVELS, LEVEL_BUFFER),
            goal: Goal::Analyse { cutoff_ns: None },
            dry_run: false,
            active: false,
            matched: None,
            planner: Planner::new(keep, batch.max(1)),
            companion: None,
            tally: Tally::default(),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn goal(&self) -> Goal {
        self.goal
    }

    /// Starts a pass over `scope.root`. `keep` is the rule's
    /// `emergency_keep` (for `Plan`).
    pub fn begin(
        &mut self,
        scope: &Scope<'_>,
        goal: Goal,
        keep: usize,
        dry_run: bool,
    ) -> io::Result<()> {
        self.abort();
        self.tally = Tally::default();
        self.goal = goal;
        self.dry_run = dry_run;
        if let Goal::Plan { after } = goal {
            self.planner.reset(keep, after);
        }
        self.main.start(scope.root)?;
        self.active = true;
        Ok(())
    }

    /// Starts an orphan pass: `companions` is opened now; a companion
    /// directory that is missing fails the pass (deleting every metadata
    /// file because their storage is not mounted would be a disaster).
    pub fn begin_orphans(
        &mut self,
        scope: &Scope<'_>,
        cutoff_ns: i64,
        companions: &Path,
        ext: &[u8],
        dry_run: bool,
    ) -> io::Result<()> {
        let fd = crate::sys::fs::open_dir(companions)?;
        let mut e = heapless::Vec::new();
        e.extend_from_slice(&ext[..ext.len().min(64)]).ok();
        self.begin(scope, Goal::Orphans { cutoff_ns }, 0, dry_run)?;
        self.companion = Some((fd, e));
        Ok(())
    }

    pub fn abort(&mut self) {
        self.main.abort();
        self.sub.abort();
        self.matched = None;
        self.companion = None;
        self.active = false;
    }

    /// Works until `deadline` or until `max_deletions` entries were deleted
    /// in this slice, reporting each action to `out`.
    pub fn slice(
        &mut self,
        scope: &Scope<'_>,
        deadline: Instant,
        max_deletions: u64,
        out: &mut dyn FnMut(&Action<'_>),
    ) -> Slice {
        if !self.active {
            return Slice::Done;
        }
        let deleted_before = self.tally.deleted;
        let max_depth = scope.depth.unwrap_or(u32::MAX);
        let mut turns = 0u32;
        loop {
            if self.tally.deleted - deleted_before >= max_deletions {
                return Slice::Capped;
            }
            turns += 1;
            if (turns % 16 == 0
                || !matches!(self.goal, Goal::Purge { .. }) && self.matched.is_none())
                && Instant::now() >= deadline
            {
                return Slice::Paused;
            }
            if self.matched.is_some() {
                self.sub_step(out);
                continue;
            }
            let Pass {
                main,
                sub,
                goal,
                dry_run,
                matched,
                planner,
                companion,
                tally,
                ..
            } = self;
            let ctx = &mut Visitor {
                scope,
                goal: *goal,
                dry_run: *dry_run,
                max_depth,
                sub,
                matched,
                planner,
                companion: companion.as_ref().map(|(fd, e)| (fd.as_fd(), e.as_slice())),
                tally,
                out,
            };
            // A matching directory must be taken up before the next entry
            // (it becomes the sub-walk), and a purge stops between two
            // deletions once enough is freed: one entry per step then.
            // Otherwise a few dozen per step.
            let budget = if scope.kind == EntryKind::Dir || matches!(ctx.goal, Goal::Purge { .. }) {
                1
            } else {
                32
            };
            let progress = main.step(budget, &mut |v| ctx.visit(v));
            if progress == Progress::Done && self.matched.is_none() {
                self.tally.unreadable += self.main.errors.unreadable + self.main.errors.too_deep;
                self.active = false;
                self.companion = None;
                return Slice::Done;
            }
        }
    }

    /// One step of the walk inside a matching directory.
    fn sub_step(&mut self, out: &mut dyn FnMut(&Action<'_>)) {
        let Some(m) = self.matched.as_mut() else {
            return;
        };
        let dry_run = self.dry_run;
        let tally = &mut self.tally;
        let progress = self.sub.step(64, &mut |v| match (v, m.removing) {
            // Measuring: the age is the newest mtime of what is inside.
            // Directories' own mtimes count only while no file is found
            // (an empty tree is as old as its directories): removing
            // entries refreshes them, so counting them would make a
            // directory half removed before a crash look young for ever.
            (Visit::Entry { dir, name, .. }, None) => {
                if let Ok(st) = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    let t = mtime_ns(&st);
                    m.newest_file_ns = Some(m.newest_file_ns.map_or(t, |n| n.max(t)));
                    m.bytes += disk_bytes(&st);
                }
                Decision::Descend
            }
            (Visit::Dir { dir, name, .. }, None) => {
                if let Ok(st) = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    m.newest_ns = m.newest_ns.max(mtime_ns(&st));
                    m.bytes += disk_bytes(&st);
                }
                Decision::Descend
            }
            (
                Visit::Entry {
                    dir, name, path, ..
                },
                Some(limit),
            ) => {
                match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) if mtime_ns(&st) > limit => tally.kept_inside += 1,
                    Ok(st) if !dry_run => {
                        if let Err(e) = unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
                            if e != Errno::ENOENT {
                                tally.failed += 1;
                                out(&Action {
                                    path,
                                    dir: false,
                                    bytes: disk_bytes(&st),
                                    mtime_ns: mtime_ns(&st),
                                    error: Some(e),
                                });
                            }
                        }
                    }
                    _ => {}
                }
                Decision::Descend
            }
            (Visit::Dir { .. }, Some(_)) => Decision::Descend,
            (
                Visit::Left {
                    parent: Some(parent),
                    name,
                    path,
                    ..
                },
                Some(_),
            ) if !dry_run => {
                let mut buf = [0u8; 256];
                if let Some(name) = c_name(name, &mut buf) {
                    match unlinkat(parent, name, UnlinkatFlags::RemoveDir) {
                        Ok(()) | Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) => {}
                        Err(e) => out(&Action {
                            path,
                            dir: true,
                            bytes: 0,
                            mtime_ns: 0,
                            error: Some(e),
                        }),
                    }
                }
                Decision::Descend
            }
            (Visit::Left { .. }, _) => Decision::Descend,
        });
        if progress == Progress::Paused {
            return;
        }
        let Some(mut m) = self.matched.take() else {
            return;
        };
        if m.removing.is_none() {
            if let Some(files) = m.newest_file_ns {
                m.newest_ns = files;
            }
        }
        let errors = self.sub.errors;
        self.tally.unreadable += errors.unreadable + errors.too_deep;
        self.matched_done(m, errors.unreadable + errors.too_deep > 0, out);
    }

    /// A matching directory was measured or emptied: decide or finish.
    fn matched_done(&mut self, mut m: Matched, incomplete: bool, out: &mut dyn FnMut(&Action<'_>)) {
        let key = (m.newest_ns, m.ino);
        if m.removing.is_some() {
            let result = if self.dry_run {
                Ok(())
            } else {
                unlinkat(m.parent.as_fd(), m.name(), UnlinkatFlags::RemoveDir)
            };
            let p = m.path();
            match result {
                Ok(()) => {
                    self.tally.deleted += 1;
                    self.tally.bytes_freed += m.bytes;
                    out(&Action {
                        path: p,
                        dir: true,
                        bytes: m.bytes,
                        mtime_ns: m.newest_ns,
                        error: None,
                    });
                }
                Err(Errno::ENOENT) => self.tally.vanished += 1,
                Err(Errno::ENOTEMPTY) => {
                    // Something inside turned young, or could not be
                    // removed: the directory stays, as what remains does.
                    self.tally.saw(m.bytes, m.newest_ns);
                }
                Err(e) => {
                    self.tally.failed += 1;
                    out(&Action {
                        path: p,
                        dir: true,
                        bytes: m.bytes,
                        mtime_ns: m.newest_ns,
                        error: Some(e),
                    });
                }
            }
            return;
        }
        // Measured. A directory that could not be read whole has an age we
        // do not know: it is kept.
        let remove_below = match self.goal {
            Goal::Analyse { cutoff_ns } => {
                self.tally.saw(m.bytes, m.newest_ns);
                if cutoff_ns.is_some_and(|c| m.newest_ns < c) {
                    self.tally.expired += 1;
                }
                None
            }
            Goal::Expire {
                cutoff_ns,
                future_ns,
            } => {
                if m.newest_ns > future_ns {
                    self.tally.future += 1;
                    self.tally.saw(m.bytes, m.newest_ns);
                    None
                } else if m.newest_ns < cutoff_ns && !incomplete {
                    Some(cutoff_ns - 1)
                } else {
                    self.tally.saw(m.bytes, m.newest_ns);
                    None
                }
            }
            Goal::Plan { .. } => {
                self.tally.saw(m.bytes, m.newest_ns);
                if !incomplete {
                    self.planner.offer(key, m.bytes);
                }
                None
            }
            Goal::Purge { after, upto } => {
                if key > after && key <= upto && !incomplete {
                    Some(m.newest_ns)
                } else {
                    self.tally.saw(m.bytes, m.newest_ns);
                    None
                }
            }
            Goal::Orphans { .. } => None,
        };
        let Some(limit) = remove_below else { return };
        // Walk it again, removing bottom-up.
        match DirStream::open_at(m.parent.as_fd(), m.name()) {
            Ok(stream) => {
                if self.sub.start_dir(stream, m.path()).is_ok() {
                    m.removing = Some(limit);
                    self.matched = Some(m);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.tally.vanished += 1,
            Err(_) => self.tally.unreadable += 1,
        }
    }

    /// Runs a pass that reports nothing (analysis, quota) to its end, in
    /// one go: the one-shot commands.
    pub fn run_to_end(&mut self, scope: &Scope<'_>) {
        while self.slice(
            scope,
            Instant::now().after_millis(1000),
            u64::MAX,
            &mut |_| {},
        ) != Slice::Done
        {}
    }

    /// After a finished `Plan` pass: the next batch to delete so that at
    /// least `need` bytes are freed (or as much as there is), oldest
    /// first, never touching the `keep` newest entries. `None`: nothing
    /// deletable is left.
    pub fn plan(&mut self, need: u64) -> Option<Batch> {
        let planner = &mut self.planner;
        // The `keep` newest are off limits; with fewer entries than that,
        // everything is.
        let boundary = if planner.keep == 0 {
            None
        } else if planner.newest.len() < planner.keep {
            return None;
        } else {
            planner.newest.peek().map(|Reverse(k)| *k)
        };
        let sorted = std::mem::take(&mut planner.oldest).into_sorted_vec();
        let mut batch: Option<Batch> = None;
        let mut more = false;
        for &(key, bytes) in &sorted {
            if boundary.is_some_and(|b| key >= b) {
                break;
            }
            match &mut batch {
                Some(b) if b.bytes >= need => {
                    more = true;
                    break;
                }
                Some(b) => {
                    b.upto = key;
                    b.entries += 1;
                    b.bytes += bytes;
                }
                None => {
                    batch = Some(Batch {
                        upto: key,
                        entries: 1,
                        bytes,
                        more: false,
                    })
                }
            }
        }
        let deletable_beyond_heap = planner.seen > sorted.len() as u64 + planner.keep as u64;
        // Give the heap its storage back, emptied, for the next plan.
        let mut v = sorted;
        v.clear();
        planner.oldest = BinaryHeap::from(v);
        batch.map(|mut b| {
            b.more = more || deletable_beyond_heap;
            b
        })
    }
}

/// The state a visit of the main walk works with.
struct Visitor<'a, 'b, 'c> {
    scope: &'a Scope<'a>,
    goal: Goal,
    dry_run: bool,
    max_depth: u32,
    sub: &'b mut Walker,
    matched: &'b mut Option<Matched>,
    planner: &'b mut Planner,
    companion: Option<(BorrowedFd<'b>, &'b [u8])>,
    tally: &'b mut Tally,
    out: &'c mut dyn FnMut(&Action<'_>),
}

impl Visitor<'_, '_, '_> {
    fn visit(&mut self, v: Visit<'_>) -> Decision {
        match v {
            Visit::Dir {
                dir,
                name,
                path,
                depth,
            } => {
                let matches = self.scope.kind == EntryKind::Dir
                    && self.scope.patterns.matches(name.to_bytes());
                if matches {
                    self.match_dir(dir, name, path);
                    return Decision::Skip;
                }
                if depth < self.max_depth && !matches!(self.goal, Goal::Orphans { .. }) {
                    Decision::Descend
                } else {
                    Decision::Skip
                }
            }
            Visit::Entry {
                dir,
                name,
                kind,
                path,
                ..
            } => {
                if self.scope.kind == EntryKind::Dir {
                    return Decision::Descend;
                }
                if !self.scope.patterns.is_empty() && !self.scope.patterns.matches(name.to_bytes())
                {
                    return Decision::Descend;
                }
                if kind != Kind::File {
                    self.tally.not_regular += 1;
                    return Decision::Descend;
                }
                match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) if Kind::of_stat(&st) == Kind::File => self.file(dir, name, path, &st),
                    Ok(_) => self.tally.not_regular += 1,
                    Err(_) => self.tally.vanished += 1,
                }
                Decision::Descend
            }
            Visit::Left { .. } => Decision::Descend,
        }
    }

    fn file(&mut self, dir: BorrowedFd<'_>, name: &CStr, path: &[u8], st: &FileStat) {
        let m = mtime_ns(st);
        let bytes = disk_bytes(st);
        let key = (m, ino(st));
        let delete = match self.goal {
            Goal::Analyse { cutoff_ns } => {
                self.tally.saw(bytes, m);
                if cutoff_ns.is_some_and(|c| m < c) {
                    self.tally.expired += 1;
                }
                false
            }
            Goal::Expire {
                cutoff_ns,
                future_ns,
            } => {
                if m > future_ns {
                    self.tally.future += 1;
                }
                let old = m < cutoff_ns;
                if !old {
                    self.tally.saw(bytes, m);
                }
                old
            }
            Goal::Plan { .. } => {
                self.tally.saw(bytes, m);
                self.planner.offer(key, bytes);
                false
            }
            Goal::Purge { after, upto } => {
                let hit = key > after && key <= upto;
                if !hit {
                    self.tally.saw(bytes, m);
                }
                hit
            }
            Goal::Orphans { cutoff_ns } => {
                self.tally.saw(bytes, m);
                m < cutoff_ns && self.companion_gone(name.to_bytes())
            }
        };
        if !delete {
            return;
        }
        let result = if self.dry_run {
            Ok(())
        } else {
            unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
        };
        match result {
            Ok(()) => {
                self.tally.deleted += 1;
                self.tally.bytes_freed += bytes;
                (self.out)(&Action {
                    path,
                    dir: false,
                    bytes,
                    mtime_ns: m,
                    error: None,
                });
            }
            Err(Errno::ENOENT) => self.tally.vanished += 1,
            Err(e) => {
                self.tally.failed += 1;
                (self.out)(&Action {
                    path,
                    dir: false,
                    bytes,
                    mtime_ns: m,
                    error: Some(e),
                });
            }
        }
    }

    /// Is the companion of metadata file `name` missing? Its name is
    /// `name` without a `.json` suffix, plus the rule's extension.
    fn companion_gone(&self, name: &[u8]) -> bool {
        let Some((dir, ext)) = self.companion else {
            return false;
        };
        let stem = name.strip_suffix(b".json").unwrap_or(name);
        let mut buf = [0u8; 256];
        if stem.len() + ext.len() >= buf.len() {
            return false;
        }
        buf[..stem.len()].copy_from_slice(stem);
        buf[stem.len()..stem.len() + ext.len()].copy_from_slice(ext);
        let Ok(companion) = CStr::from_bytes_until_nul(&buf[..=stem.len() + ext.len()]) else {
            return false;
        };
        matches!(
            fstatat(dir, companion, AtFlags::AT_SYMLINK_NOFOLLOW),
            Err(Errno::ENOENT)
        )
    }

    /// A directory that matches a `kind: "dir"` rule: measure it (its age
    /// is the newest mtime inside) with the second walker.
    fn match_dir(&mut self, dir: BorrowedFd<'_>, name: &CStr, path: &[u8]) {
        let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(_) => {
                self.tally.vanished += 1;
                return;
            }
        };
        let (Ok(parent), Ok(stream)) = (dir.try_clone_to_owned(), DirStream::open_at(dir, name))
        else {
            self.tally.unreadable += 1;
            return;
        };
        let bytes = name.to_bytes();
        let path_len = path.len().min(4096);
        let mut m = Matched {
            parent,
            name: [0; 256],
            name_len: bytes.len().min(255),
            path: [0; 4096],
            path_len,
            ino: ino(&st),
            newest_ns: mtime_ns(&st),
            newest_file_ns: None,
            bytes: disk_bytes(&st),
            removing: None,
        };
        m.name[..m.name_len].copy_from_slice(&bytes[..m.name_len]);
        m.path[..path_len].copy_from_slice(&path[..path_len]);
        if self.sub.start_dir(stream, path).is_ok() {
            *self.matched = Some(m);
        } else {
            self.tally.unreadable += 1;
        }
    }
}

fn c_name<'b>(name: &[u8], buf: &'b mut [u8; 256]) -> Option<&'b CStr> {
    if name.len() >= buf.len() {
        return None;
    }
    buf[..name.len()].copy_from_slice(name);
    buf[name.len()] = 0;
    CStr::from_bytes_until_nul(&buf[..=name.len()]).ok()
}

/// mtime in nanoseconds since the epoch.
pub fn mtime_ns(st: &FileStat) -> i64 {
    let (s, ns) = crate::sys::clock::mtime(st);
    s.saturating_mul(1_000_000_000).saturating_add(ns)
}

/// The inode number as u64 on every target.
#[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
pub fn ino(st: &FileStat) -> u64 {
    st.st_ino as u64
}

/// Bytes a file takes on disk (what deleting it frees).
#[allow(clippy::unnecessary_cast)]
pub fn disk_bytes(st: &FileStat) -> u64 {
    (st.st_blocks as u64).saturating_mul(512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime};

    const DAY: u64 = 86_400;

    fn scratch(name: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("edgekeeper-tree-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    /// Writes `bytes` bytes at `root/rel`, last modified `age` seconds ago
    /// (negative: in the future).
    fn put(root: &Path, rel: &str, bytes: usize, age: i64) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![b'x'; bytes]).unwrap();
        set_age(&p, age);
    }

    fn set_age(p: &Path, age: i64) {
        let now = SystemTime::now();
        let t = if age >= 0 {
            now - Duration::from_secs(age as u64)
        } else {
            now + Duration::from_secs((-age) as u64)
        };
        std::fs::File::open(p).unwrap().set_modified(t).unwrap();
    }

    fn now_ns() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64
    }

    fn files(root: &Path) -> BTreeSet<String> {
        fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                if e.file_type().unwrap().is_dir() {
                    out.insert(format!("{rel}/"));
                    walk(base, &p, out);
                } else {
                    out.insert(rel);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(root, root, &mut out);
        out
    }

    /// Runs a pass to its end in slices of at most 3 deletions; returns
    /// the paths acted on (relative to the root) and the failures.
    fn run(pass: &mut Pass, scope: &Scope<'_>) -> (Vec<String>, Vec<String>) {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut slices = 0;
        loop {
            slices += 1;
            assert!(slices < 100_000);
            let end = pass.slice(scope, Instant::now().after_millis(50), 3, &mut |a| {
                let rel = String::from_utf8_lossy(&a.path[scope.root.as_os_str().len() + 1..])
                    .into_owned();
                match a.error {
                    None => done.push(rel),
                    Some(e) => failed.push(format!("{rel}: {e}")),
                }
            });
            if end == Slice::Done {
                break;
            }
        }
        done.sort();
        (done, failed)
    }

    fn expire(max_age: u64) -> Goal {
        let now = now_ns();
        Goal::Expire {
            cutoff_ns: now - (max_age as i64) * 1_000_000_000,
            future_ns: now + 60_000_000_000,
        }
    }

    #[test]
    fn exactly_the_expired_matching_files_go() {
        let root = scratch("expire");
        put(&root, "a.jpg", 10, 3 * DAY as i64);
        put(&root, "b.jpg", 10, 60);
        put(&root, "c.png", 10, 3 * DAY as i64);
        put(&root, "sub/d.jpg", 10, 2 * DAY as i64);
        put(&root, "sub/deeper/e.jpg", 10, 2 * DAY as i64);
        put(&root, "sub/f.jpg", 10, 3600);
        put(&root, "future.jpg", 10, -(30 * DAY as i64));
        let patterns = Patterns::new(&["*.jpg"]);
        let scope = Scope {
            root: &root,
            patterns: &patterns,
            kind: EntryKind::File,
            depth: None,
        };
        let mut pass = Pass::new(0, 16);
        pass.begin(&scope, expire(DAY), 0, false).unwrap();
        let (done, failed) = run(&mut pass, &scope);
        assert_eq!(done, ["a.jpg", "sub/d.jpg", "sub/deeper/e.jpg"]);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            files(&root),
            [
                "b.jpg",
                "c.png",
                "future.jpg",
                "sub/",
                "sub/deeper/",
                "sub/f.jpg"
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        );
        let t = pass.tally;
        assert_eq!((t.deleted, t.entries, t.future), (3, 3, 1), "{t:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn depth_limits_how_far_down_a_rule_reaches() {
        let root = scratch("depth");
        put(&root, "a.jpg", 10, 3 * DAY as i64);
        put(&root, "sub/b.jpg", 10, 3 * DAY as i64);
        put(&root, "sub/deeper/c.jpg", 10, 3 * DAY as i64);
        let patterns = Patterns::new(&["*.jpg"]);
        let scope = Scope {
            root: &root,
            patterns: &patterns,
            kind: EntryKind::File,
            depth: Some(2),
        };
        let mut pass = Pass::new(0, 16);
        pass.begin(&scope, expire(DAY), 0, false).unwrap();
        assert_eq!(run(&mut pass, &scope).0, ["a.jpg", "sub/b.jpg"]);
        assert!(root.join("sub/deeper/c.jpg").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_dry_run_reports_and_deletes_nothing() {
        let root = scratch("dry");
        put(&root, "a.jpg", 10, 3 * DAY as i64);
        put(&root, "TMPPOINTING_1/x", 10, 3 * DAY as i64);
        set_age(&root.join("TMPPOINTING_1"), 3 * DAY as i64);
        let before = files(&root);
        for (kind, pat, expect) in [
            (EntryKind::File, "*.jpg", "a.jpg"),
            (EntryKind::Dir, "TMPPOINTING*", "TMPPOINTING_1"),
        ] {
            let patterns = Patterns::new(&[pat]);
            let scope = Scope {
                root: &root,
                patterns: &patterns,
                kind,
                depth: Some(1),
            };
            let mut pass = Pass::new(0, 16);
            pass.begin(&scope, expire(DAY), 0, true).unwrap();
            assert_eq!(run(&mut pass, &scope).0, [expect]);
        }
        assert_eq!(files(&root), before);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn symlinks_out_of_the_root_are_never_followed_or_deleted_through() {
        let root = scratch("links");
        let outside = scratch("links-outside");
        put(&outside, "victim.jpg", 10, 3 * DAY as i64);
        put(&outside, "dir/victim2.jpg", 10, 3 * DAY as i64);
        put(&outside, "TMPPOINTING_outside/x", 10, 3 * DAY as i64);
        set_age(&outside.join("TMPPOINTING_outside"), 3 * DAY as i64);
        std::os::unix::fs::symlink(outside.join("victim.jpg"), root.join("link.jpg")).unwrap();
        std::os::unix::fs::symlink(outside.join("dir"), root.join("linkdir")).unwrap();
        std::os::unix::fs::symlink(
            outside.join("TMPPOINTING_outside"),
            root.join("TMPPOINTING_link"),
        )
        .unwrap();
        put(&root, "real.jpg", 10, 3 * DAY as i64);
        for (kind, pat) in [(EntryKind::File, "*.jpg"), (EntryKind::Dir, "TMPPOINTING*")] {
            let patterns = Patterns::new(&[pat]);
            let scope = Scope {
                root: &root,
                patterns: &patterns,
                kind,
                depth: None,
            };
            let mut pass = Pass::new(0, 16);
            pass.begin(&scope, expire(DAY), 0, false).unwrap();
            run(&mut pass, &scope);
            // An emergency plan and purge, which deletes the oldest
            // regardless of age, does not go through links either.
            pass.begin(&scope, Goal::Plan { after: KEY_MIN }, 0, false)
                .unwrap();
            run(&mut pass, &scope);
            if let Some(b) = pass.plan(u64::MAX) {
                pass.begin(
                    &scope,
                    Goal::Purge {
                        after: KEY_MIN,
                        upto: b.upto,
                    },
                    0,
                    false,
                )
                .unwrap();
                run(&mut pass, &scope);
            }
        }
        assert!(outside.join("victim.jpg").exists());
        assert!(outside.join("dir/victim2.jpg").exists());
        assert!(outside.join("TMPPOINTING_outside/x").exists());
        assert!(
            root.join("link.jpg").symlink_metadata().is_ok(),
            "the link itself stays"
        );
        assert!(root.join("TMPPOINTING_link").symlink_metadata().is_ok());
        assert!(!root.join("real.jpg").exists(), "the real file went");
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn old_tmppointing_directories_go_whole_and_young_ones_stay() {
        let root = scratch("tmppointing");
        // Old throughout.
        put(&root, "TMPPOINTING_old/a/b/file.ms", 1000, 3 * DAY as i64);
        put(&root, "TMPPOINTING_old/table.dat", 1000, 3 * DAY as i64);
        for d in [
            "TMPPOINTING_old/a/b",
            "TMPPOINTING_old/a",
            "TMPPOINTING_old",
        ] {
            set_age(&root.join(d), 3 * DAY as i64);
        }
        // Old directory, but one file inside is still being rewritten.
        put(&root, "TMPPOINTING_busy/old.dat", 1000, 3 * DAY as i64);
        put(&root, "TMPPOINTING_busy/deep/live.dat", 1000, 10);
        set_age(&root.join("TMPPOINTING_busy/deep"), 3 * DAY as i64);
        set_age(&root.join("TMPPOINTING_busy"), 3 * DAY as i64);
        // Not matching.
        put(&root, "other/old.dat", 10, 3 * DAY as i64);
        set_age(&root.join("other"), 3 * DAY as i64);
        let patterns = Patterns::new(&["TMPPOINTING*"]);
        let scope = Scope {
            root: &root,
            patterns: &patterns,
            kind: EntryKind::Dir,
            depth: Some(1),
        };
        let mut pass = Pass::new(0, 16);
        pass.begin(&scope, expire(DAY), 0, false).unwrap();
        let (done, failed) = run(&mut pass, &scope);
        assert_eq!(done, ["TMPPOINTING_old"]);
        assert!(failed.is_empty(), "{failed:?}");
        assert!(!root.join("TMPPOINTING_old").exists());
        assert!(
            root.join("TMPPOINTING_busy/old.dat").exists(),
            "young inside: kept whole"
        );
        assert!(root.join("TMPPOINTING_busy/deep/live.dat").exists());
        assert!(root.join("other/old.dat").exists());
        assert_eq!(pass.tally.deleted, 1);
        assert!(pass.tally.bytes_freed >= 2000, "{:?}", pass.tally);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn emergency_plans_take_the_oldest_first_and_keep_the_newest() {
        let root = scratch("plan");
        // 10 files of 4 KiB, aged 10 .. 1 hours.
        for i in 0..10 {
            put(&root, &format!("f{i}.jpg"), 4096, (10 - i) * 3600);
        }
        let patterns = Patterns::new(&["*.jpg"]);
        let scope = Scope {
            root: &root,
            patterns: &patterns,
            kind: EntryKind::File,
            depth: None,
        };
        let mut pass = Pass::new(3, 2);
        let mut after = KEY_MIN;
        let mut order = Vec::new();
        // Free 8 KiB at a time: batches of two, oldest first, until only
        // the three newest are left.
        loop {
            pass.begin(&scope, Goal::Plan { after }, 3, false).unwrap();
            run(&mut pass, &scope);
            let Some(batch) = pass.plan(8192) else { break };
            assert!(batch.entries <= 2, "{batch:?}");
            pass.begin(
                &scope,
                Goal::Purge {
                    after,
                    upto: batch.upto,
                },
                0,
                false,
            )
            .unwrap();
            let (done, _) = run(&mut pass, &scope);
            order.push(done);
            after = batch.upto;
        }
        assert_eq!(
            order,
            [
                vec!["f0.jpg", "f1.jpg"],
                vec!["f2.jpg", "f3.jpg"],
                vec!["f4.jpg", "f5.jpg"],
                vec!["f6.jpg"],
            ]
        );
        assert_eq!(
            files(&root),
            ["f7.jpg", "f8.jpg", "f9.jpg"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn orphans_go_when_their_companion_is_gone_and_they_are_old_enough() {
        let root = scratch("orphans");
        let live = root.join("live");
        let meta = root.join("meta");
        put(&live, "a.jpg", 10, 0);
        put(&live, "b.jpg", 10, 0);
        put(&meta, "a.json", 10, 7200); // companion a.jpg: kept
        put(&meta, "c.json", 10, 7200); // c.jpg gone: orphan
        put(&meta, "d.json", 10, 60); // orphan, but too young
        put(&meta, "b.jpg.json", 10, 7200); // companion b.jpg.jpg: gone
        put(&meta, "notes.txt", 10, 7200); // not matching
        let patterns = Patterns::new(&["*.json"]);
        let scope = Scope {
            root: &meta,
            patterns: &patterns,
            kind: EntryKind::File,
            depth: Some(1),
        };
        let cutoff = now_ns() - 3600 * 1_000_000_000;
        let mut pass = Pass::new(0, 16);
        pass.begin_orphans(&scope, cutoff, &live, b".jpg", false)
            .unwrap();
        let (done, _) = run(&mut pass, &scope);
        assert_eq!(done, ["b.jpg.json", "c.json"]);
        // With an empty extension, x.jpg.json's companion is x.jpg.
        put(&meta, "b.jpg.json", 10, 7200);
        put(&meta, "z.jpg.json", 10, 7200);
        pass.begin_orphans(&scope, cutoff, &live, b"", false)
            .unwrap();
        // a.json's companion is now "a" (gone); d.json is too young.
        assert_eq!(run(&mut pass, &scope).0, ["a.json", "z.jpg.json"]);
        assert!(meta.join("b.jpg.json").exists());
        // A missing companion directory deletes nothing: the pass refuses.
        assert!(
            pass.begin_orphans(&scope, cutoff, &root.join("unmounted"), b".jpg", false)
                .is_err()
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn names_are_bytes() {
        let root = scratch("bytes");
        let odd = std::ffi::OsStr::from_bytes(b"a b\nc\xff.jpg");
        std::fs::write(root.join(odd), b"x").unwrap();
        set_age(&root.join(odd), 3 * DAY as i64);
        let patterns = Patterns::new(&["*.jpg"]);
        let scope = Scope {
            root: &root,
            patterns: &patterns,
            kind: EntryKind::File,
            depth: None,
        };
        let mut pass = Pass::new(0, 16);
        pass.begin(&scope, expire(DAY), 0, false).unwrap();
        run(&mut pass, &scope);
        assert_eq!(pass.tally.deleted, 1);
        assert!(!root.join(odd).exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    use std::os::unix::ffi::OsStrExt;
}
