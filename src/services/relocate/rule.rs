//! One relocate rule at work: its watch tree, its events, its walks.
//!
//! What it is: for one `relocate` block, an inotify instance watching every
//! directory under `root` (minus `exclude` and the target), a [`WatchTable`]
//! that follows renames of directories inside the tree, and two walkers: the
//! sweeper (the start-up scan, periodic sweeps and the full rescan after a
//! queue overflow) and the scanner (each new directory right after its watch
//! is added, so files made before the watch existed are found). Both walk in
//! bounded slices. Every matching file goes through [`Target::relocate`].
//! What it is not: the Service glue (timers ids, reports, reload): see
//! `relocate/mod.rs`.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::config::RelocateRule;
use crate::report::alerts::{Alert, AlertLevel};
use crate::services::Ctx;
use crate::sys::clock::{Instant, WallTime};
use crate::sys::dir::{Decision, Kind, Progress, Visit, Walker};
use crate::sys::fs::{open_dir, open_dir_beneath};
use crate::sys::inotify::{self, Events, Inotify};
use crate::sys::pattern::Patterns;
use crate::watch::{Full, NO_SLOT, Slot, WatchTable};

use super::mover::{Name, Outcome, Request, Skip, Target};

const PATH_MAX: usize = libc::PATH_MAX as usize;
/// Directory levels a walk follows below its start.
pub const MAX_LEVELS: usize = 64;
const LEVEL_BUFFER: usize = 4096;
const EVENT_BUFFER: usize = 64 * 1024;
/// New directories waiting for their first scan; beyond this a full rescan
/// is queued instead.
const SCAN_QUEUE: usize = 4096;
/// Entries a walk visits per slice, between which the loop serves events.
pub const SLICE: usize = 512;
/// Files waiting for `min_age`.
const DEFERRED: usize = 256;
/// inotify reads handled per loop turn (each up to EVENT_BUFFER bytes).
const READS_PER_TURN: usize = 4;

/// Events each directory watch asks for. IN_CLOSE_WRITE is added only for
/// directories on another file system than the target (see [`mask_for`]):
/// on one file system a file is renamed at IN_CREATE and its close is of no
/// interest, which halves the events of a burst.
const DIR_MASK: u32 = inotify::IN_CREATE
    | inotify::IN_MOVED_TO
    | inotify::IN_MOVED_FROM
    | inotify::IN_DELETE_SELF
    | inotify::IN_MOVE_SELF
    | inotify::IN_ONLYDIR
    | inotify::IN_DONT_FOLLOW
    | inotify::IN_EXCL_UNLINK;

/// What a rule has done, since start.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Counters {
    pub events: u64,
    pub moved: u64,
    pub renamed: u64,
    pub copied: u64,
    pub bytes_copied: u64,
    pub collisions: u64,
    pub failures: u64,
    pub overflows: u64,
    pub sweeps: u64,
    pub sweep_found: u64,
    pub scans: u64,
    pub scan_found: u64,
    pub writer_waits: u64,
    pub young_waits: u64,
    pub not_regular: u64,
    pub vanished: u64,
    pub watch_limit_hits: u64,
    pub partials_cleaned: u64,
}

/// Why the tree is not fully watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `limits.max_watches` (our table) is used up.
    Table,
    /// The kernel refused more watches (`fs.inotify.max_user_watches`).
    Kernel,
}

struct Deferred {
    dir: Slot,
    name: heapless::Vec<u8, 256>,
    due: Instant,
}

/// Which walk a visit belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WalkKind {
    Sweep,
    Scan,
}

/// Everything but the walkers, so a walker can step while its visitor
/// borrows the rest.
pub struct Tree {
    pub name: String,
    pub root: PathBuf,
    root_bytes: Vec<u8>,
    target_bytes: Vec<u8>,
    patterns: Patterns,
    /// Exclude entries with a '/': paths relative to the root.
    exclude_paths: Vec<Vec<u8>>,
    /// Exclude entries without '/': directory names at any depth.
    exclude_names: Vec<Vec<u8>>,
    min_age_ms: u64,
    pub target: Target,
    inotify: Option<Inotify>,
    table: WatchTable,
    root_slot: Slot,
    /// The root, opened when it is watched: event-side directories are
    /// opened beneath it, refusing symlinks on the way.
    root_fd: Option<OwnedFd>,
    /// Walk depth → the slot of the directory entered there.
    sweep_stack: Vec<Slot>,
    scan_stack: Vec<Slot>,
    moved_from: heapless::Vec<(u32, Slot), 64>,
    deferred: VecDeque<Deferred>,
    path: Vec<u8>,
    events: Vec<u8>,
    /// The last directory a file event came from, kept open.
    dir_cache: Option<(Slot, OwnedFd)>,
    /// Watched directories whose path did not open while handling an
    /// event or a scan: an ancestor was renamed and its rename events are
    /// still queued behind. They are scanned once the batch is handled and
    /// the table knows their new paths.
    stale: heapless::Vec<Slot, 32>,
    /// More went stale than `stale` holds: only a full walk covers them.
    stale_overflow: bool,
    final_name: heapless::Vec<u8, 256>,
    logged_errnos: heapless::Vec<i32, 16>,
    pub counters: Counters,
    /// Directories the current or last full walk could not watch.
    pub unwatched: u64,
    pub limit: Option<Limit>,
    pub root_error: Option<i32>,
    /// The target could not be made or opened (checked at each sweep).
    pub target_error: Option<i32>,
    pub last_failure: heapless::String<240>,
    /// Moves that failed during the last full sweep.
    pub sweep_failures: u64,
    sweep_found_now: u64,
    sweep_failures_now: u64,
    unwatched_now: u64,
    dry_run: bool,
    /// A limit was hit since the last alert check.
    limit_alert: Option<Limit>,
    now_secs: i64,
}

pub struct Rule {
    pub tree: Tree,
    sweeper: Walker,
    scanner: Walker,
    scans: VecDeque<Slot>,
    /// A full rescan is wanted (queue overflow, lost events).
    pub rescan: bool,
    pub sweeping: bool,
    pub scanning: bool,
    pub sweep_every_ms: u64,
    pub sweep_every_busy_ms: u64,
    pub busy_threshold: u64,
    pub last_sweep: Option<(WallTime, u64)>,
    pub busy: bool,
}

impl Rule {
    /// Prepares a rule; touches nothing on disk.
    pub fn new(cfg: &RelocateRule, max_watches: usize) -> Rule {
        let bytes = |p: &Path| std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()).to_vec();
        let (paths, names): (Vec<_>, Vec<_>) = cfg.exclude.iter().partition(|e| e.contains('/'));
        let tree = Tree {
            name: cfg.name.clone(),
            root: cfg.root.clone(),
            root_bytes: bytes(&cfg.root),
            target_bytes: bytes(&cfg.target),
            patterns: Patterns::new(&cfg.patterns),
            exclude_paths: paths
                .iter()
                .map(|e| e.trim_end_matches('/').as_bytes().to_vec())
                .collect(),
            exclude_names: names.iter().map(|e| e.as_bytes().to_vec()).collect(),
            min_age_ms: cfg.min_age.as_millis(),
            target: Target::new(cfg.target.clone()),
            inotify: None,
            table: WatchTable::new(max_watches),
            root_slot: NO_SLOT,
            root_fd: None,
            sweep_stack: Vec::with_capacity(MAX_LEVELS + 1),
            scan_stack: Vec::with_capacity(MAX_LEVELS + 1),
            moved_from: heapless::Vec::new(),
            // Files wait here for min_age, or (across file systems) for
            // their first second, when no close event says they are done.
            deferred: VecDeque::with_capacity(DEFERRED),
            path: vec![0; PATH_MAX + 1],
            events: vec![0; EVENT_BUFFER],
            dir_cache: None,
            stale: heapless::Vec::new(),
            stale_overflow: false,
            final_name: heapless::Vec::new(),
            logged_errnos: heapless::Vec::new(),
            counters: Counters::default(),
            unwatched: 0,
            limit: None,
            root_error: None,
            target_error: None,
            last_failure: heapless::String::new(),
            sweep_failures: 0,
            sweep_found_now: 0,
            sweep_failures_now: 0,
            unwatched_now: 0,
            dry_run: false,
            limit_alert: None,
            now_secs: 0,
        };
        Rule {
            tree,
            sweeper: Walker::new(MAX_LEVELS, LEVEL_BUFFER),
            scanner: Walker::new(MAX_LEVELS, LEVEL_BUFFER),
            scans: VecDeque::with_capacity(SCAN_QUEUE),
            rescan: false,
            sweeping: false,
            scanning: false,
            sweep_every_ms: cfg.sweep_every.as_millis(),
            sweep_every_busy_ms: cfg.sweep_every_busy.as_millis(),
            busy_threshold: cfg.busy_threshold.into(),
            last_sweep: None,
            busy: false,
        }
    }

    pub fn inotify_fd(&self) -> Option<BorrowedFd<'_>> {
        self.tree.inotify.as_ref().map(|i| i.as_fd())
    }

    pub fn watches(&self) -> usize {
        self.tree.table.len()
    }

    /// Start-up: the target is made and cleaned of crash leftovers, the
    /// root is watched, and a first full sweep is started. Returns the
    /// inotify fd to register, if the root could be watched.
    pub fn setup(&mut self) -> io::Result<()> {
        if self.check_target() {
            match self.tree.target.clean_partials() {
                Ok(n) if n > 0 => {
                    self.tree.counters.partials_cleaned += n;
                    log::info!(
                        "{}: removed {n} partial copies a crash left in {}; their sources are intact",
                        self.tree.name,
                        self.tree.target.path.display()
                    );
                }
                _ => {}
            }
        }
        if self.tree.inotify.is_none() {
            self.tree.inotify = Some(Inotify::new()?);
        }
        self.watch_root();
        Ok(())
    }

    /// Makes sure the target exists and opens; the answer is kept for
    /// health. Moves are still tried (and fail, counted) while it is broken.
    fn check_target(&mut self) -> bool {
        let t = &mut self.tree;
        match t.target.open() {
            Ok(_) => {
                if t.target_error.take().is_some() {
                    log::info!(
                        "{}: target {} is usable again",
                        t.name,
                        t.target.path.display()
                    );
                }
                true
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                if t.target_error != Some(errno) {
                    log::error!("{}: target {}: {e}", t.name, t.target.path.display());
                }
                t.target_error = Some(errno);
                false
            }
        }
    }

    /// Watches the root (again); on failure the rule is unhealthy and the
    /// next sweep tries again.
    pub fn watch_root(&mut self) -> bool {
        let t = &mut self.tree;
        if t.root_slot != NO_SLOT && t.table.wd_of(t.root_slot).is_some() {
            return true;
        }
        let Some(ino) = &t.inotify else { return false };
        let len = t.root_bytes.len();
        if len > PATH_MAX {
            t.root_error = Some(libc::ENAMETOOLONG);
            return false;
        }
        t.path[..len].copy_from_slice(&t.root_bytes);
        t.path[len] = 0;
        let Ok(cpath) = CStr::from_bytes_with_nul(&t.path[..=len]) else {
            return false;
        };
        match ino.add_watch(cpath, mask_for(cpath, t.target.dev())) {
            Ok(wd) => match t.table.insert(wd, NO_SLOT, &t.root_bytes) {
                Ok(slot) => {
                    t.root_slot = slot;
                    t.root_fd = open_dir(&t.root).ok();
                    if t.root_error.take().is_some() {
                        log::info!("{}: root {} is back", t.name, t.root.display());
                    }
                    true
                }
                Err(_) => {
                    let _ = ino.rm_watch(wd);
                    t.root_error = Some(libc::ENOSPC);
                    false
                }
            },
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                if t.root_error != Some(errno) {
                    log::error!("{}: cannot watch root {}: {e}", t.name, t.root.display());
                }
                t.root_error = Some(errno);
                false
            }
        }
    }

    /// Starts a full sweep unless one is running.
    pub fn begin_sweep(&mut self) {
        if self.sweeping {
            return;
        }
        // A sweep that cannot start now is retried by the periodic timer,
        // not by spinning on the request.
        self.rescan = false;
        self.check_target();
        if !self.watch_root() {
            return;
        }
        match self.sweeper.start(&self.tree.root) {
            Ok(()) => {
                self.sweeping = true;
                self.tree.sweep_stack.clear();
                self.tree.sweep_stack.push(self.tree.root_slot);
                self.tree.sweep_found_now = 0;
                self.tree.sweep_failures_now = 0;
                self.tree.unwatched_now = 0;
            }
            Err(e) => {
                self.tree.root_error = Some(e.raw_os_error().unwrap_or(libc::EIO));
                log::error!(
                    "{}: cannot read root {}: {e}",
                    self.tree.name,
                    self.tree.root.display()
                );
            }
        }
    }

    /// One slice of whatever walking is pending. Returns true if more
    /// remains (the caller schedules another slice right away).
    pub fn walk_slice(&mut self, ctx: &mut Ctx<'_>) -> bool {
        self.tree.now_secs = ctx.wall.secs;
        let mut budget = SLICE;
        // New directories first: their files are the ones waiting.
        while budget > 0 {
            if !self.scanning {
                let Some(slot) = self.scans.pop_front() else {
                    break;
                };
                if !self.start_scan(slot) {
                    continue;
                }
            }
            let before = self.scanner.visited;
            let tree = &mut self.tree;
            let progress = self
                .scanner
                .step(budget, &mut |v| tree.visit(v, WalkKind::Scan, ctx));
            budget = budget.saturating_sub((self.scanner.visited - before) as usize + 1);
            if progress == Progress::Done {
                self.scanning = false;
                self.tree.counters.scans += 1;
            }
        }
        if budget > 0 {
            if self.rescan && !self.sweeping {
                self.begin_sweep();
            }
            if self.sweeping {
                let tree = &mut self.tree;
                let progress = self
                    .sweeper
                    .step(budget, &mut |v| tree.visit(v, WalkKind::Sweep, ctx));
                if progress == Progress::Done {
                    self.finish_sweep(ctx);
                }
            }
        }
        self.tree.raise_limit_alert(ctx);
        self.scanning || !self.scans.is_empty() || self.sweeping
    }

    fn start_scan(&mut self, slot: Slot) -> bool {
        let t = &mut self.tree;
        let Some(len) = t.table.path(slot, &mut t.path[..PATH_MAX]) else {
            return false;
        };
        let path = Path::new(super::mover::os(&t.path[..len]));
        if self.scanner.start(path).is_err() {
            // Gone again already, or its path is stale behind a rename
            // whose events are not read yet: tried again after the next
            // batch of events (a removed directory's watch is forgotten
            // by then, so this cannot go round for ever).
            t.mark_stale(slot);
            return false;
        }
        t.scan_stack.clear();
        t.scan_stack.push(slot);
        self.scanning = true;
        true
    }

    fn finish_sweep(&mut self, ctx: &mut Ctx<'_>) {
        self.sweeping = false;
        let t = &mut self.tree;
        t.counters.sweeps += 1;
        let found = t.sweep_found_now;
        t.sweep_failures = t.sweep_failures_now;
        self.busy = found > self.busy_threshold;
        self.last_sweep = Some((ctx.wall, found));
        t.unwatched = t.unwatched_now + self.sweeper.errors.too_deep;
        if t.unwatched == 0 && t.limit.take().is_some() {
            log::info!("{}: every directory is watched again", t.name);
        }
        if found > 0 {
            log::info!(
                "{}: sweep found {found} file(s) events had not delivered{}",
                t.name,
                if t.unwatched > 0 {
                    " (some directories are unwatched)"
                } else {
                    ""
                }
            );
        }
    }

    /// When the next periodic sweep is due after one that just ended.
    pub fn next_sweep_in_ms(&self) -> u64 {
        if self.busy {
            self.sweep_every_busy_ms
        } else {
            self.sweep_every_ms
        }
    }

    /// Reads and handles every queued event. Returns true if walking work
    /// was queued.
    pub fn on_events(&mut self, ctx: &mut Ctx<'_>) -> bool {
        self.tree.now_secs = ctx.wall.secs;
        let mut queued = false;
        // A few buffers per turn at most, so a burst cannot hold the loop:
        // epoll (level-triggered) brings us back for the rest.
        let mut drained = false;
        for _ in 0..READS_PER_TURN {
            let Some(ino) = &self.tree.inotify else {
                return false;
            };
            let n = match ino.read(&mut self.tree.events) {
                Ok(0) => {
                    drained = true;
                    break;
                }
                Ok(n) => n,
                Err(e) => {
                    log::error!("{}: reading inotify events: {e}", self.tree.name);
                    drained = true;
                    break;
                }
            };
            let events = std::mem::take(&mut self.tree.events);
            for ev in Events::new(&events[..n]) {
                queued |= self.on_event(&ev, ctx);
            }
            // A read that did not fill half the buffer emptied the queue.
            let full = n > events.len() / 2;
            self.tree.events = events;
            if !full {
                drained = true;
                break;
            }
        }
        // The two halves of a directory rename may straddle two reads:
        // renamed-away directories are settled only once the queue is
        // empty.
        if drained {
            self.settle_moves();
        }
        queued |= self.rescan_stale();
        self.tree.raise_limit_alert(ctx);
        queued
    }

    /// Queues scans of the directories whose path was stale; true if any.
    fn rescan_stale(&mut self) -> bool {
        let t = &mut self.tree;
        if t.stale.is_empty() && !t.stale_overflow {
            return false;
        }
        if std::mem::take(&mut t.stale_overflow) {
            self.rescan = true;
        }
        while let Some(slot) = t.stale.pop() {
            if self.scans.contains(&slot) {
                continue;
            }
            if self.scans.len() == self.scans.capacity() {
                self.rescan = true;
            } else {
                self.scans.push_back(slot);
            }
        }
        true
    }

    fn on_event(&mut self, ev: &inotify::Event<'_>, ctx: &mut Ctx<'_>) -> bool {
        let t = &mut self.tree;
        t.counters.events += 1;
        if ev.is(inotify::IN_Q_OVERFLOW) {
            t.counters.overflows += 1;
            log::warn!(
                "{}: inotify queue overflowed; rescanning the whole tree",
                t.name
            );
            self.rescan = true;
            return true;
        }
        let Some(slot) = t.table.slot_of(ev.wd) else {
            return false; // a watch we already dropped
        };
        if ev.is(inotify::IN_IGNORED) {
            // The kernel removed the watch (directory deleted, unmounted).
            t.forget(slot);
            if slot == t.root_slot {
                t.root_slot = NO_SLOT;
                t.root_fd = None;
                t.root_error = Some(libc::ENOENT);
                log::error!(
                    "{}: root {} was removed; watching for it to return",
                    t.name,
                    t.root.display()
                );
            }
            return false;
        }
        if ev.is(inotify::IN_DELETE_SELF | inotify::IN_MOVE_SELF) {
            if slot == t.root_slot && ev.is(inotify::IN_MOVE_SELF) {
                log::error!("{}: root {} was moved away", t.name, t.root.display());
            }
            return false;
        }
        if ev.is(inotify::IN_ISDIR) {
            return self.on_dir_event(slot, ev);
        }
        if !ev.is(inotify::IN_CREATE | inotify::IN_MOVED_TO | inotify::IN_CLOSE_WRITE) {
            return false;
        }
        if !t.patterns.matches(ev.name) {
            return false;
        }
        let closed = ev.is(inotify::IN_CLOSE_WRITE);
        t.consider_in(slot, ev.name, closed, ctx);
        false
    }

    fn on_dir_event(&mut self, parent: Slot, ev: &inotify::Event<'_>) -> bool {
        let t = &mut self.tree;
        if ev.is(inotify::IN_MOVED_FROM) {
            if let Some(child) = t.table.child(parent, ev.name) {
                if t.moved_from.push((ev.cookie, child)).is_err() {
                    // Too many renames in one batch to pair up: drop this
                    // subtree now and let a rescan rebuild it.
                    t.drop_subtree(child);
                    self.rescan = true;
                }
            }
            return self.rescan;
        }
        if !ev.is(inotify::IN_CREATE | inotify::IN_MOVED_TO) {
            return false;
        }
        // A directory renamed inside the tree keeps its watch: update where
        // it is, and every path below it follows.
        if ev.is(inotify::IN_MOVED_TO) {
            if let Some(i) = t
                .moved_from
                .iter()
                .position(|m| m.0 == ev.cookie && ev.cookie != 0)
            {
                let (_, slot) = t.moved_from.swap_remove(i);
                if t.excluded_child(parent, ev.name) {
                    t.drop_subtree(slot);
                    return false;
                }
                if t.table.rename(slot, parent, ev.name).is_err() {
                    t.drop_subtree(slot);
                    self.rescan = true;
                    return true;
                }
                t.dir_cache = None;
                return false;
            }
        }
        if t.excluded_child(parent, ev.name) {
            return false;
        }
        // A new directory (or one moved in from outside): watch it first,
        // then scan it, so nothing created in it is missed either way.
        match t.add_watch(parent, ev.name) {
            Some(slot) => {
                if self.scans.len() == self.scans.capacity() {
                    self.rescan = true;
                } else {
                    self.scans.push_back(slot);
                }
            }
            None => {
                // Unwatched: only a full walk covers it.
                self.rescan = true;
            }
        }
        true
    }

    /// Renamed-away directories whose other half never came were moved out
    /// of the tree: stop watching them.
    fn settle_moves(&mut self) {
        let t = &mut self.tree;
        while let Some((_, slot)) = t.moved_from.pop() {
            t.drop_subtree(slot);
        }
    }

    /// Moves files waiting for `min_age` whose time has come; returns the
    /// next due time.
    pub fn retry_deferred(&mut self, ctx: &mut Ctx<'_>) -> Option<Instant> {
        let t = &mut self.tree;
        t.now_secs = ctx.wall.secs;
        let n = t.deferred.len();
        for _ in 0..n {
            let Some(d) = t.deferred.pop_front() else {
                break;
            };
            if d.due > ctx.now {
                t.deferred.push_back(d);
                continue;
            }
            t.consider_in(d.dir, &d.name, false, ctx);
        }
        t.deferred.iter().map(|d| d.due).min()
    }

    pub fn next_deferred(&self) -> Option<Instant> {
        self.tree.deferred.iter().map(|d| d.due).min()
    }

    /// `edgekeeper sweep`: one whole pass, no watches, lines to `out`.
    pub fn sweep_once(
        &mut self,
        dry_run: bool,
        out: &mut dyn io::Write,
        now: WallTime,
    ) -> io::Result<()> {
        if !dry_run {
            if let Err(e) = self.tree.target.open() {
                let msg = format!("target {}: {e}", self.tree.target.path.display());
                return Err(io::Error::new(e.kind(), msg));
            }
        }
        self.sweeper.start(&self.tree.root).map_err(|e| {
            io::Error::new(e.kind(), format!("root {}: {e}", self.tree.root.display()))
        })?;
        let t = &mut self.tree;
        t.dry_run = dry_run;
        t.now_secs = now.secs;
        t.sweep_stack.clear();
        t.sweep_stack.push(NO_SLOT);
        while self.sweeper.step(SLICE, &mut |v| t.visit_offline(v, out)) == Progress::Paused {}
        Ok(())
    }
}

impl Tree {
    /// True if directory `name` in `parent` must not be watched or swept.
    fn excluded_child(&mut self, parent: Slot, name: &[u8]) -> bool {
        let Some(len) = self.table.path(parent, &mut self.path[..PATH_MAX]) else {
            return true;
        };
        if len + 1 + name.len() > PATH_MAX {
            return true;
        }
        self.path[len] = b'/';
        self.path[len + 1..len + 1 + name.len()].copy_from_slice(name);
        let full = len + 1 + name.len();
        let path = std::mem::take(&mut self.path);
        let excluded = self.excluded_path(&path[..full], name);
        self.path = path;
        excluded
    }

    /// True if the directory at `path` (whose last component is `name`) is
    /// the target, inside it, or excluded by the rule.
    fn excluded_path(&self, path: &[u8], name: &[u8]) -> bool {
        let under = |p: &[u8], base: &[u8]| {
            p == base || (p.starts_with(base) && p.get(base.len()) == Some(&b'/'))
        };
        if under(path, &self.target_bytes) {
            return true;
        }
        if self.exclude_names.iter().any(|n| n.as_slice() == name) {
            return true;
        }
        let Some(rel) = path
            .strip_prefix(self.root_bytes.as_slice())
            .and_then(|r| r.strip_prefix(b"/"))
        else {
            return false;
        };
        self.exclude_paths.iter().any(|e| under(rel, e))
    }

    /// Adds a watch on directory `name` in `parent`; `None` if it could not
    /// be watched (limit reached, or gone).
    fn add_watch(&mut self, parent: Slot, name: &[u8]) -> Option<Slot> {
        let len = self.table.path(parent, &mut self.path[..PATH_MAX])?;
        if len + 1 + name.len() > PATH_MAX {
            return None;
        }
        self.path[len] = b'/';
        self.path[len + 1..len + 1 + name.len()].copy_from_slice(name);
        self.path[len + 1 + name.len()] = 0;
        self.watch_path(len + 1 + name.len(), parent, name)
    }

    /// Watches the directory whose NUL-terminated path is in `self.path`.
    fn watch_path(&mut self, len: usize, parent: Slot, name: &[u8]) -> Option<Slot> {
        let ino = self.inotify.as_ref()?;
        let cpath = CStr::from_bytes_with_nul(&self.path[..=len]).ok()?;
        // Adding a watch the directory already has returns its wd (and
        // refreshes its mask): the table then finds the slot it has.
        match ino.add_watch(cpath, mask_for(cpath, self.target.dev())) {
            Ok(wd) => match self.table.insert(wd, parent, name) {
                Ok(slot) => Some(slot),
                Err(Full::Slots | Full::Names) => {
                    let _ = ino.rm_watch(wd);
                    self.hit_limit(Limit::Table);
                    None
                }
            },
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                self.hit_limit(Limit::Kernel);
                None
            }
            Err(_) => None, // vanished or not a directory any more
        }
    }

    fn hit_limit(&mut self, limit: Limit) {
        self.unwatched_now += 1;
        self.unwatched = self.unwatched.max(self.unwatched_now);
        if self.limit.is_none() {
            self.counters.watch_limit_hits += 1;
            log::warn!(
                "{}: {}",
                self.name,
                limit_reason(limit, self.table.capacity())
            );
            self.limit_alert = Some(limit);
        }
        self.limit = Some(limit);
    }

    fn raise_limit_alert(&mut self, ctx: &mut Ctx<'_>) {
        let Some(limit) = self.limit_alert.take() else {
            return;
        };
        let reason = limit_reason(limit, self.table.capacity());
        ctx.raise(&Alert {
            level: AlertLevel::Warning,
            kind: "watch_limit",
            source: &self.name,
            message: &reason,
            value: Some(self.table.len() as f64),
        });
    }

    /// The slot is gone from the kernel: forget it here.
    fn forget(&mut self, slot: Slot) {
        self.table.remove(slot);
        if self.dir_cache.as_ref().is_some_and(|c| c.0 == slot) {
            self.dir_cache = None;
        }
    }

    /// Stops watching `slot` and everything below it.
    fn drop_subtree(&mut self, slot: Slot) {
        let ino = self.inotify.as_ref();
        let table = &mut self.table;
        let mut below: heapless::Vec<Slot, 256> = heapless::Vec::new();
        loop {
            below.clear();
            table.for_each_descendant(slot, |s| {
                let _ = below.push(s);
            });
            if below.is_empty() {
                break;
            }
            for &s in &below {
                if let (Some(wd), Some(ino)) = (table.wd_of(s), ino) {
                    let _ = ino.rm_watch(wd);
                }
                table.remove(s);
            }
        }
        if let (Some(wd), Some(ino)) = (table.wd_of(slot), ino) {
            let _ = ino.rm_watch(wd);
        }
        table.remove(slot);
        self.dir_cache = None;
    }

    /// A file event in watched directory `slot`: try to move the file.
    fn consider_in(&mut self, slot: Slot, name: &[u8], closed: bool, ctx: &mut Ctx<'_>) {
        let mut cname = [0u8; 256];
        if name.len() >= cname.len() {
            return;
        }
        cname[..name.len()].copy_from_slice(name);
        let Ok(cname) = CStr::from_bytes_with_nul(&cname[..=name.len()]) else {
            return;
        };
        if self.dir_cache.as_ref().is_none_or(|c| c.0 != slot) {
            let Some(len) = self.table.path(slot, &mut self.path[..PATH_MAX]) else {
                return;
            };
            let Some(root) = self.root_fd.as_ref() else {
                return;
            };
            // The directory's path below the root; a symlink swapped in for
            // any directory on the way is refused, never followed.
            let rel = self.path[..len]
                .strip_prefix(self.root_bytes.as_slice())
                .map(|r| r.strip_prefix(b"/").unwrap_or(r))
                .unwrap_or(&[]);
            match open_dir_beneath(root.as_fd(), rel) {
                Ok(fd) => self.dir_cache = Some((slot, fd)),
                Err(_) => {
                    // Gone, or only its path is stale (an ancestor was just
                    // renamed): a scan once the batch is handled tells.
                    self.mark_stale(slot);
                    return;
                }
            }
        }
        let Some((_, dir)) = self.dir_cache.take() else {
            return;
        };
        let outcome = self.move_file(dir.as_fd(), cname, closed);
        self.dir_cache = Some((slot, dir));
        self.account(outcome, slot, name, WalkKind::Scan, ctx);
    }

    fn mark_stale(&mut self, slot: Slot) {
        if slot == NO_SLOT || self.stale.contains(&slot) {
            return;
        }
        if self.stale.push(slot).is_err() {
            self.stale_overflow = true;
        }
    }

    fn move_file(&mut self, dir: BorrowedFd<'_>, name: &CStr, closed: bool) -> Outcome {
        let req = Request {
            dir,
            name,
            min_age_ms: self.min_age_ms,
            closed,
            now_secs: self.now_secs,
            dry_run: self.dry_run,
        };
        self.target.relocate(&req, &mut self.final_name)
    }

    /// Counts an outcome, logs it, defers a young file.
    fn account(
        &mut self,
        outcome: Outcome,
        slot: Slot,
        name: &[u8],
        kind: WalkKind,
        ctx: &mut Ctx<'_>,
    ) {
        let c = &mut self.counters;
        match outcome {
            Outcome::Renamed { collided } | Outcome::Copied { collided, .. } => {
                c.moved += 1;
                c.collisions += u64::from(collided);
                if let Outcome::Copied { bytes, .. } = outcome {
                    c.copied += 1;
                    c.bytes_copied += bytes;
                } else {
                    c.renamed += 1;
                }
                if kind == WalkKind::Sweep {
                    self.sweep_found_now += 1;
                    c.sweep_found += 1;
                }
                log::debug!(
                    "{}: moved {} as {}",
                    self.name,
                    Name(name),
                    Name(&self.final_name)
                );
            }
            Outcome::WouldMove => {}
            Outcome::Skipped(Skip::Gone) => c.vanished += 1,
            Outcome::Skipped(Skip::NotRegular) => c.not_regular += 1,
            Outcome::Skipped(Skip::WriterOpen) => c.writer_waits += 1,
            Outcome::Skipped(Skip::Young(ms)) => {
                c.young_waits += 1;
                if slot != NO_SLOT && self.deferred.len() < self.deferred.capacity() {
                    let mut n = heapless::Vec::new();
                    let _ = n.extend_from_slice(name);
                    self.deferred.push_back(Deferred {
                        dir: slot,
                        name: n,
                        due: ctx.now.after_millis(ms),
                    });
                }
            }
            Outcome::Failed { errno, step } => {
                c.failures += 1;
                if kind == WalkKind::Sweep {
                    self.sweep_failures_now += 1;
                }
                self.note_failure(errno, step, name, ctx);
            }
        }
    }

    /// Logs and alerts a failure once per cause (errno); the file stays at
    /// its source and the next sweep tries again.
    fn note_failure(&mut self, errno: i32, step: &str, name: &[u8], ctx: &mut Ctx<'_>) {
        use std::fmt::Write;
        let err = io::Error::from_raw_os_error(errno);
        self.last_failure.clear();
        let _ = write!(self.last_failure, "{step} {}: {err}", Name(name));
        if self.logged_errnos.contains(&errno) {
            return;
        }
        let _ = self.logged_errnos.push(errno);
        if step == "target" {
            log::warn!(
                "{}: cannot move {} (target {}: {err}); it stays where it is and is retried at each sweep (logged once per cause)",
                self.name,
                Name(name),
                self.target.path.display()
            );
        } else {
            log::warn!(
                "{}: cannot move {} ({step}: {err}); it stays where it is and is retried at each sweep (logged once per cause)",
                self.name,
                Name(name)
            );
        }
        let mut msg = heapless::String::<400>::new();
        let _ = write!(
            msg,
            "cannot move files into {}: {step}: {err}",
            self.target.path.display()
        );
        ctx.raise(&Alert {
            level: AlertLevel::Warning,
            kind: "relocate_failed",
            source: &self.name,
            message: &msg,
            value: None,
        });
    }

    /// A walker visit in the daemon.
    fn visit(&mut self, v: Visit<'_>, kind: WalkKind, ctx: &mut Ctx<'_>) -> Decision {
        match v {
            Visit::Dir {
                name, path, depth, ..
            } => {
                let name = name.to_bytes();
                if self.excluded_path(path, name) {
                    return Decision::Skip;
                }
                let stack = if kind == WalkKind::Sweep {
                    &self.sweep_stack
                } else {
                    &self.scan_stack
                };
                let parent = stack.get(depth as usize - 1).copied().unwrap_or(NO_SLOT);
                let slot = if parent == NO_SLOT {
                    self.unwatched_now += 1;
                    NO_SLOT
                } else {
                    let len = path.len();
                    if len > PATH_MAX {
                        NO_SLOT
                    } else {
                        self.path[..len].copy_from_slice(path);
                        self.path[len] = 0;
                        match self.watch_path(len, parent, name) {
                            Some(slot) => slot,
                            None => {
                                // The walk holds the directory open, but
                                // its path no longer leads there when an
                                // ancestor was renamed mid-walk: walk the
                                // parent again once the rename is known.
                                if self.limit.is_none() {
                                    self.mark_stale(parent);
                                }
                                NO_SLOT
                            }
                        }
                    }
                };
                let stack = if kind == WalkKind::Sweep {
                    &mut self.sweep_stack
                } else {
                    &mut self.scan_stack
                };
                stack.truncate(depth as usize);
                if stack.len() < stack.capacity() {
                    stack.push(slot);
                }
                Decision::Descend
            }
            Visit::Entry {
                dir,
                name,
                kind: entry_kind,
                depth,
                ..
            } => {
                let bytes = name.to_bytes();
                if !self.patterns.matches(bytes) {
                    return Decision::Descend;
                }
                if entry_kind != Kind::File {
                    self.counters.not_regular += 1;
                    return Decision::Descend;
                }
                let stack = if kind == WalkKind::Sweep {
                    &self.sweep_stack
                } else {
                    &self.scan_stack
                };
                let slot = stack.get(depth as usize - 1).copied().unwrap_or(NO_SLOT);
                let outcome = self.move_file(dir, name, false);
                if kind == WalkKind::Scan
                    && matches!(outcome, Outcome::Renamed { .. } | Outcome::Copied { .. })
                {
                    self.counters.scan_found += 1;
                }
                self.account(outcome, slot, bytes, kind, ctx);
                Decision::Descend
            }
            Visit::Left { .. } => Decision::Descend,
        }
    }

    /// A walker visit in `edgekeeper sweep`: moves (or would) and reports.
    fn visit_offline(&mut self, v: Visit<'_>, out: &mut dyn io::Write) -> Decision {
        match v {
            Visit::Dir { name, path, .. } => {
                if self.excluded_path(path, name.to_bytes()) {
                    Decision::Skip
                } else {
                    Decision::Descend
                }
            }
            Visit::Entry {
                dir,
                name,
                kind,
                path,
                ..
            } => {
                if kind != Kind::File || !self.patterns.matches(name.to_bytes()) {
                    return Decision::Descend;
                }
                let outcome = self.move_file(dir, name, false);
                let line = match outcome {
                    Outcome::Renamed { .. } | Outcome::Copied { .. } => {
                        self.counters.moved += 1;
                        "moved"
                    }
                    Outcome::WouldMove => {
                        self.counters.moved += 1;
                        "would move"
                    }
                    Outcome::Failed { .. } => {
                        self.counters.failures += 1;
                        "FAILED to move"
                    }
                    Outcome::Skipped(Skip::WriterOpen) => "skipped (open for writing)",
                    Outcome::Skipped(Skip::Young(_)) => "skipped (younger than min_age)",
                    Outcome::Skipped(_) => return Decision::Descend,
                };
                let _ = write!(
                    out,
                    "{line} {} -> {}/{}",
                    Name(path),
                    self.target.path.display(),
                    Name(&self.final_name)
                );
                if let Outcome::Failed { errno, step } = outcome {
                    let _ = write!(out, " ({step}: {})", io::Error::from_raw_os_error(errno));
                }
                let _ = writeln!(out);
                Decision::Descend
            }
            Visit::Left { .. } => Decision::Descend,
        }
    }
}

/// The watch mask for the directory at `path`: IN_CLOSE_WRITE too when it is
/// not on the target's file system, since files there are copied only once
/// their writer has closed them.
fn mask_for(path: &CStr, target_dev: Option<u64>) -> u32 {
    match (nix::sys::stat::stat(path), target_dev) {
        (Ok(st), Some(dev)) if crate::sys::clock::dev(&st) == dev => DIR_MASK,
        _ => DIR_MASK | inotify::IN_CLOSE_WRITE,
    }
}

/// Why the tree is not fully watched, with what to change.
pub fn limit_reason(limit: Limit, table: usize) -> String {
    match limit {
        Limit::Table => format!(
            "more directories than limits.max_watches allows ({table} for this rule): the rest is covered only by the periodic sweep; raise limits.max_watches"
        ),
        Limit::Kernel => "the kernel refused more inotify watches: the rest is covered only by the periodic sweep; raise the sysctl fs.inotify.max_user_watches".to_string(),
    }
}
