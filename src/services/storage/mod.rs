//! The `storage` service: disk thresholds, retention, emergency cleanup,
//! orphans, log rotation and scheduled jobs, for a device whose SD card
//! must neither fill up nor wear out.
//!
//! What it is: the Service glue. Every `check_every` the watched mounts
//! are measured (`mounts.rs`), and a mount at `emergency.at_used` starts an
//! emergency; retention and orphan passes are queued (held while the
//! clock is unsynchronised, with `wait_for_clock_sync`), quota mounts are
//! walked, and a rotation pass begins. Passes (`tree.rs`) run one at a
//! time in slices on the WALK timer, emergencies first, so the loop is
//! never held for long; deletions per slice are capped, with a short pause
//! after a capped slice so an SD card is not flooded. Jobs (`jobs.rs`) run
//! on their own timers. The same passes run to their end, printing each
//! action, for `edgekeeper sweep`, `edgekeeper emergency` and `edgekeeper
//! storage` (see [`sweep`], [`emergency`], [`analyse`]).
//! What it is not: the walking, deleting, rotating or job running
//! themselves, which live beside this file.

mod docs;
pub mod jobs;
pub mod mounts;
pub mod rotate;
pub mod tree;

use std::io;

use nix::unistd::Pid;
use serde::Serialize;

use crate::config::{Config, EntryKind, RetentionRule, Storage as StorageConfig};
use crate::report::alerts::{Alert, AlertLevel};
use crate::services::{Bounded, Counter, CounterKind, Ctx, Health, Report, Service, SweepTotals};
use crate::sys::clock::{Instant, WallTime};
use crate::sys::mounts::{Usage, clock_synchronised};
use crate::sys::pattern::Patterns;
use crate::sys::process::ChildExit;

use mounts::{Bytes, Level, Watched, after_freeing, bytes_over};
use tree::{Action, Goal, KEY_MIN, Key, Pass, Scope, Slice, Tally};

/// Timer ids of the storage service; the jobs own `JOBS_TIMER..`.
const CHECK: u32 = 0;
const WALK: u32 = 1;
const ROTATE: u32 = 2;
const CLOCK: u32 = 3;
pub const JOBS_TIMER: u32 = 1000;
/// Local tokens from here on belong to the jobs.
pub const JOBS_TOKEN: u64 = 1 << 32;

/// Bytes copied or compressed per rotation step.
const ROTATE_STEP_BYTES: usize = 256 * 1024;
/// How long one slice of a pass may run.
const SLICE_MS: u64 = 20;
/// Deletions per slice of a retention or orphan pass, then a pause of
/// `CAPPED_PAUSE_MS`: at most ~6,000 unlinks a second, so a big expiry
/// does not starve the camera's writes on the same SD card.
const DELETIONS_PER_SLICE: u64 = 128;
const CAPPED_PAUSE_MS: u64 = 20;
/// Deletions between two measurements during an emergency.
const EMERGENCY_DELETIONS: u64 = 16;
/// Entries an emergency plan chooses at most per batch.
const EMERGENCY_BATCH: usize = 4096;
/// How often a held retention looks at the clock again.
const CLOCK_RECHECK_MS: u64 = 10_000;
/// An mtime further ahead than this is in the future (clock skew).
const FUTURE_SLACK_NS: i64 = 60_000_000_000;
/// Queued passes at most (a few per rule; more are merged or dropped).
const QUEUE: usize = 64;

/// Work a pass can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// Measure what the files below quota mount `m` take.
    Quota(usize),
    Retention(usize),
    Orphans(usize),
}

/// A retention rule with what it has done.
pub struct Rule {
    pub cfg: RetentionRule,
    patterns: Patterns,
    /// The watched mount it is on.
    pub mount: Option<usize>,
    /// The last complete retention pass (what remains after it).
    pub last: Option<(WallTime, Tally)>,
    pub totals: RuleTotals,
    pub root_error: Option<i32>,
    /// When its next retention pass is due (`None`: at the next check).
    next_pass: Option<Instant>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RuleTotals {
    pub deleted: u64,
    pub bytes_freed: u64,
    pub failed: u64,
    pub emergency_deleted: u64,
    pub emergency_bytes_freed: u64,
    pub future: u64,
    pub not_regular: u64,
    pub vanished: u64,
}

impl Rule {
    fn new(cfg: &RetentionRule) -> Rule {
        Rule {
            patterns: Patterns::new(&cfg.patterns),
            cfg: cfg.clone(),
            mount: None,
            last: None,
            totals: RuleTotals::default(),
            root_error: None,
            next_pass: None,
        }
    }

    /// How long after one retention pass the next is due: every check, but
    /// no more often than 1/24 of `max_age` (capped at an hour), so a tree
    /// of 220,000 frames kept for a day is walked hourly rather than every
    /// five minutes. An entry outlives its age by at most that (4 %, or an
    /// hour); emergencies do not wait for it.
    fn pass_interval_ms(&self, check_every_ms: u64) -> u64 {
        let age = self.cfg.max_age.map_or(0, |a| a.as_millis());
        (age / 24).min(3_600_000).max(check_every_ms)
    }

    fn scope(&self) -> Scope<'_> {
        Scope {
            root: &self.cfg.root,
            patterns: &self.patterns,
            kind: self.cfg.kind,
            depth: self.cfg.depth,
        }
    }
}

/// An orphan rule at run time.
struct OrphanRule {
    cfg: crate::config::OrphanRule,
    patterns: Patterns,
    deleted: u64,
    failed: u64,
    error: Option<i32>,
}

impl OrphanRule {
    fn scope(&self) -> Scope<'_> {
        Scope {
            root: &self.cfg.dir,
            patterns: &self.patterns,
            kind: EntryKind::File,
            depth: Some(1),
        }
    }
}

/// Where an emergency is with the rule it is on.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// About to plan the next batch of the rule.
    Idle,
    Planning,
    /// Deleting a batch; `seen` is the pass tally (bytes freed, deleted,
    /// failed) already accounted.
    Purging {
        batch: tree::Batch,
        seen: (u64, u64, u64),
    },
}

/// An emergency under way on one mount.
struct EmergencyRun {
    mount: usize,
    /// Rules on the mount, lowest priority first.
    order: Vec<usize>,
    pos: usize,
    after: Key,
    phase: Phase,
    /// Usage when it began, and bytes freed since.
    start: Usage,
    freed: u64,
    deleted: u64,
    failed: u64,
    dry_run: bool,
}

impl EmergencyRun {
    fn next_rule(&mut self) {
        self.pos += 1;
        self.after = KEY_MIN;
        self.phase = Phase::Idle;
    }
}

/// How the last emergency ended.
#[derive(Clone, Copy, Debug)]
pub struct EmergencyOutcome {
    pub at: WallTime,
    pub mount: usize,
    pub from_percent: u8,
    pub to_percent: u8,
    pub deleted: u64,
    pub bytes_freed: u64,
    pub failed: u64,
    /// The mount reached `until_used`.
    pub reached: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    passes: u64,
    deleted: u64,
    bytes_freed: u64,
    failed: u64,
    orphans_deleted: u64,
    orphan_failures: u64,
    emergencies: u64,
    emergency_deleted: u64,
    emergency_bytes_freed: u64,
    emergencies_short: u64,
    clock_holds: u64,
    longest_slice_us: u64,
    last_check_us: u64,
    checks: u64,
}

pub struct Storage {
    config: StorageConfig,
    mounts: Vec<Watched>,
    rules: Vec<Rule>,
    orphans: Vec<OrphanRule>,
    pass: Pass,
    queue: heapless::Deque<Work, QUEUE>,
    current: Option<Work>,
    emergency: Option<EmergencyRun>,
    last_emergency: Option<EmergencyOutcome>,
    rotation: rotate::Rotation,
    jobs: jobs::Jobs,
    clock_held: bool,
    boot: u64,
    totals: Totals,
    /// Saved SD day counters, by mount path, applied once resolved.
    saved_sd: Vec<(String, mounts::SdDay)>,
    /// When the last short emergency was alerted (its `at`).
    outcome_raised: Option<i64>,
    /// No patterns: every name (quota walks).
    every_name: Patterns,
    /// The one-shot commands' `--dry-run`: passes report, delete nothing.
    dry_run: bool,
    /// Quota mounts whose walk just ended, to be checked.
    measured: heapless::Vec<usize, 16>,
    /// Storage for an emergency's rule order, kept between runs.
    order_buf: Vec<usize>,
}

impl Storage {
    pub fn new(config: &StorageConfig) -> Storage {
        let max_keep = config
            .retention
            .iter()
            .map(|r| r.emergency_keep as usize)
            .max()
            .unwrap_or(0);
        Storage {
            mounts: config.mounts.iter().map(Watched::new).collect(),
            rules: config.retention.iter().map(Rule::new).collect(),
            orphans: config
                .orphans
                .iter()
                .map(|o| OrphanRule {
                    patterns: Patterns::new(&o.patterns),
                    cfg: o.clone(),
                    deleted: 0,
                    failed: 0,
                    error: None,
                })
                .collect(),
            pass: Pass::new(max_keep, EMERGENCY_BATCH),
            queue: heapless::Deque::new(),
            current: None,
            emergency: None,
            last_emergency: None,
            rotation: rotate::Rotation::new(&config.rotate),
            jobs: jobs::Jobs::new(&config.jobs),
            clock_held: false,
            boot: 0,
            totals: Totals::default(),
            saved_sd: Vec::new(),
            outcome_raised: None,
            every_name: Patterns::new::<&str>(&[]),
            dry_run: false,
            measured: heapless::Vec::new(),
            order_buf: Vec::with_capacity(config.retention.len()),
            config: config.clone(),
        }
    }

    /// Resolves mounts and which mount each rule is on (start, reload,
    /// and the one-shot commands).
    fn resolve(&mut self) {
        self.mounts = mounts::resolve_all(&self.config.mounts);
        for m in &mut self.mounts {
            let key = m.path().to_string_lossy();
            if let Some((_, day)) = self.saved_sd.iter().find(|(p, _)| *p == key) {
                m.sd_day = *day;
            }
        }
        for r in &mut self.rules {
            r.mount = mounts::mount_for(&self.mounts, &r.cfg.root);
        }
        self.boot = mounts::boot_id();
    }

    fn enqueue(&mut self, w: Work) {
        if self.current == Some(w) || self.queue.iter().any(|q| *q == w) {
            return;
        }
        let _ = self.queue.push_back(w);
    }

    /// The periodic check.
    fn check(&mut self, ctx: &mut Ctx<'_>) {
        let started = Instant::now();
        self.totals.checks += 1;
        for i in 0..self.mounts.len() {
            if self.mounts[i].quota().is_some() {
                // Checked once its walk says what the files take.
                self.enqueue(Work::Quota(i));
                continue;
            }
            if let Some(percent) = self.mounts[i].check(ctx, self.boot) {
                self.consider_emergency(i, percent, ctx);
            }
        }
        self.totals.last_check_us = Instant::now()
            .as_micros()
            .saturating_sub(started.as_micros());
        self.queue_retention(ctx);
        self.rotation.begin(ctx.wall);
        let _ = ctx.schedule(ctx.now, ROTATE);
        self.kick(ctx);
    }

    /// Queues retention and orphan passes, unless the clock is not to be
    /// trusted yet.
    fn queue_retention(&mut self, ctx: &mut Ctx<'_>) {
        if self.config.wait_for_clock_sync && !clock_synchronised() {
            if !self.clock_held {
                self.clock_held = true;
                self.totals.clock_holds += 1;
                log::warn!(
                    "the system clock is not synchronised: retention and orphan cleanup wait for it (wait_for_clock_sync)"
                );
            }
            let _ = ctx.schedule(ctx.now.after_millis(CLOCK_RECHECK_MS), CLOCK);
            return;
        }
        if std::mem::take(&mut self.clock_held) {
            log::info!("the clock is synchronised: retention resumes");
        }
        for i in 0..self.rules.len() {
            let r = &self.rules[i];
            if r.cfg.max_age.is_some() && r.next_pass.is_none_or(|at| ctx.now >= at) {
                self.enqueue(Work::Retention(i));
            }
        }
        for i in 0..self.orphans.len() {
            self.enqueue(Work::Orphans(i));
        }
    }

    fn consider_emergency(&mut self, mount: usize, percent: u8, ctx: &mut Ctx<'_>) {
        if percent < self.config.emergency.at_used || self.emergency.is_some() {
            return;
        }
        let Some(usage) = self.mounts[mount].usage else {
            return;
        };
        log::warn!(
            "{} is {percent} % used (emergency at {} %): deleting oldest first until {} %",
            self.mounts[mount].path().display(),
            self.config.emergency.at_used,
            self.config.emergency.until_used
        );
        let mut msg = heapless::String::<256>::new();
        let _ = core::fmt::Write::write_fmt(
            &mut Bounded(&mut msg),
            format_args!(
                "{} is {percent} % used: emergency cleanup down to {} %",
                self.mounts[mount].path().display(),
                self.config.emergency.until_used
            ),
        );
        let source = self.mounts[mount].path().to_string_lossy();
        ctx.raise(&Alert {
            level: AlertLevel::Warning,
            kind: "disk_emergency",
            source: &source,
            message: &msg,
            value: Some(f64::from(percent)),
        });
        self.begin_emergency(mount, usage, false, ctx.wall);
    }

    fn begin_emergency(&mut self, mount: usize, start: Usage, dry_run: bool, now: WallTime) {
        // The order buffer is made once (with room for every rule) and
        // handed from run to run: an emergency allocates nothing.
        let mut order = std::mem::take(&mut self.order_buf);
        order.clear();
        order.extend((0..self.rules.len()).filter(|&r| self.rules[r].mount == Some(mount)));
        order.sort_unstable_by_key(|&r| (self.rules[r].cfg.priority, r));
        self.totals.emergencies += 1;
        // A pass under way gives way to the emergency and is queued again.
        if let Some(w) = self.current.take() {
            self.pass.abort();
            let _ = self.queue.push_front(w);
        }
        self.emergency = Some(EmergencyRun {
            mount,
            order,
            pos: 0,
            after: KEY_MIN,
            phase: Phase::Idle,
            start,
            freed: 0,
            deleted: 0,
            failed: 0,
            dry_run,
        });
        let _ = now;
    }

    /// Schedules the next slice now if there is work and none is queued.
    fn kick(&mut self, ctx: &mut Ctx<'_>) {
        let busy = self.emergency.is_some() || self.current.is_some() || !self.queue.is_empty();
        if busy && !ctx.is_scheduled(WALK) {
            let _ = ctx.schedule(ctx.now, WALK);
        }
    }

    /// One slice of whatever pass is under way. Returns when to come back
    /// (`None`: nothing left).
    fn slice(&mut self, deadline: Instant, out: &mut dyn FnMut(&str, &Action<'_>)) -> Option<u64> {
        if self.emergency.is_some() {
            return self.emergency_slice(deadline, out);
        }
        loop {
            if self.current.is_none() {
                let w = self.queue.pop_front()?;
                if !self.begin_work(w) {
                    continue;
                }
                self.current = Some(w);
            }
            let w = self.current?;
            let (scope, name) = scope_of(
                w,
                &self.rules,
                &self.orphans,
                &self.mounts,
                &self.every_name,
            );
            let end = self
                .pass
                .slice(&scope, deadline, DELETIONS_PER_SLICE, &mut |a| out(name, a));
            match end {
                Slice::Done => {
                    self.current = None;
                    self.finish_work(w);
                    if Instant::now() >= deadline {
                        return Some(0);
                    }
                }
                Slice::Paused => return Some(0),
                Slice::Capped => return Some(CAPPED_PAUSE_MS),
            }
        }
    }

    /// Starts the pass for `w`; false if it cannot run now.
    fn begin_work(&mut self, w: Work) -> bool {
        let now = WallTime::now();
        let now_ns = wall_ns(now);
        let result = match w {
            Work::Retention(i) => {
                let Some(max_age) = self.rules[i].cfg.max_age else {
                    return false;
                };
                let goal = Goal::Expire {
                    cutoff_ns: now_ns - ms_to_ns(max_age.as_millis()),
                    future_ns: now_ns + FUTURE_SLACK_NS,
                };
                let scope = self.rules[i].scope();
                self.pass.begin(&scope, goal, 0, self.dry_run)
            }
            Work::Orphans(i) => {
                let o = &self.orphans[i];
                let cutoff = now_ns - ms_to_ns(o.cfg.min_age.as_millis());
                let scope = o.scope();
                self.pass.begin_orphans(
                    &scope,
                    cutoff,
                    &o.cfg.companion_dir,
                    o.cfg.companion_ext.as_bytes(),
                    self.dry_run,
                )
            }
            Work::Quota(_) => {
                let (scope, _) = scope_of(
                    w,
                    &self.rules,
                    &self.orphans,
                    &self.mounts,
                    &self.every_name,
                );
                self.pass
                    .begin(&scope, Goal::Analyse { cutoff_ns: None }, 0, false)
            }
        };
        let errno = result
            .as_ref()
            .err()
            .map(|e| e.raw_os_error().unwrap_or(libc::EIO));
        match w {
            Work::Retention(i) => {
                let r = &mut self.rules[i];
                if errno.is_some() && r.root_error != errno {
                    log::warn!(
                        "{}: root {}: {}",
                        r.cfg.name,
                        r.cfg.root.display(),
                        nix::errno::Errno::from_raw(errno.unwrap_or(libc::EIO)).desc()
                    );
                }
                r.root_error = errno;
            }
            Work::Orphans(i) => {
                let o = &mut self.orphans[i];
                if errno.is_some() && o.error != errno {
                    log::warn!(
                        "orphans in {}: {} (or its companion directory {}): {}; nothing is deleted until both are there",
                        o.cfg.dir.display(),
                        o.cfg.dir.display(),
                        o.cfg.companion_dir.display(),
                        nix::errno::Errno::from_raw(errno.unwrap_or(libc::EIO)).desc()
                    );
                }
                o.error = errno;
            }
            Work::Quota(m) => {
                if errno.is_some() {
                    self.mounts[m].error = errno;
                }
            }
        }
        result.is_ok()
    }

    fn finish_work(&mut self, w: Work) {
        let t = self.pass.tally;
        match w {
            Work::Retention(i) => {
                self.totals.passes += 1;
                self.totals.deleted += t.deleted;
                self.totals.bytes_freed += t.bytes_freed;
                self.totals.failed += t.failed;
                let r = &mut self.rules[i];
                r.totals.deleted += t.deleted;
                r.totals.bytes_freed += t.bytes_freed;
                r.totals.failed += t.failed;
                r.totals.future += t.future;
                r.totals.not_regular += t.not_regular;
                r.totals.vanished += t.vanished;
                r.last = Some((WallTime::now(), t));
                // A little early, so the check that comes at the interval
                // finds it due.
                let interval = r.pass_interval_ms(self.config.check_every.as_millis());
                r.next_pass = Some(Instant::now().after_millis(interval.saturating_sub(500)));
                if t.deleted > 0 || t.failed > 0 {
                    log::info!(
                        "{}: {} expired entr{} deleted ({}), {} kept{}",
                        r.cfg.name,
                        t.deleted,
                        if t.deleted == 1 { "y" } else { "ies" },
                        Bytes(t.bytes_freed),
                        t.entries,
                        if t.failed > 0 {
                            " - some could not be deleted and stay"
                        } else {
                            ""
                        }
                    );
                }
            }
            Work::Orphans(i) => {
                let o = &mut self.orphans[i];
                o.deleted += t.deleted;
                o.failed += t.failed;
                self.totals.orphans_deleted += t.deleted;
                self.totals.orphan_failures += t.failed;
                if t.deleted > 0 {
                    log::info!(
                        "{} orphaned metadata file(s) deleted in {}",
                        t.deleted,
                        o.cfg.dir.display()
                    );
                }
            }
            Work::Quota(m) => {
                self.mounts[m].quota_used = Some(t.bytes);
                let _ = self.measured.push(m);
            }
        }
    }

    /// The usage an emergency goes by: measured now, but never more than
    /// what it began with less what it freed (a file system may show freed
    /// blocks only after its journal commits; a dry run frees nothing).
    fn emergency_usage(&self, e: &EmergencyRun) -> Usage {
        let projected = after_freeing(e.start, e.freed);
        if e.dry_run {
            return projected;
        }
        let m = &self.mounts[e.mount];
        let measured = match m.quota() {
            Some(q) => m.measure().map(|u| {
                mounts::quota_usage(
                    q,
                    m.quota_used.unwrap_or(0).saturating_sub(e.freed),
                    u.avail,
                )
            }),
            None => Usage::of(m.path()),
        };
        match measured {
            Ok(u) if u.used < projected.used => u,
            _ => projected,
        }
    }

    fn emergency_slice(
        &mut self,
        deadline: Instant,
        out: &mut dyn FnMut(&str, &Action<'_>),
    ) -> Option<u64> {
        let until = self.config.emergency.until_used;
        loop {
            let usage = self.emergency_usage(self.emergency.as_ref()?);
            if usage.used_percent() <= until {
                self.pass.abort();
                self.end_emergency(usage, true);
                return Some(0);
            }
            let e = self.emergency.as_mut()?;
            let Some(&rule) = e.order.get(e.pos) else {
                self.end_emergency(usage, false);
                return Some(0);
            };
            let r = &mut self.rules[rule];
            match e.phase {
                Phase::Idle => {
                    let keep = r.cfg.emergency_keep as usize;
                    let goal = Goal::Plan { after: e.after };
                    match self.pass.begin(&r.scope(), goal, keep, e.dry_run) {
                        Ok(()) => e.phase = Phase::Planning,
                        Err(_) => e.next_rule(),
                    }
                }
                Phase::Planning => {
                    let end = self.pass.slice(&r.scope(), deadline, u64::MAX, &mut |_| {});
                    if end == Slice::Done {
                        match self.pass.plan(bytes_over(usage, until)) {
                            Some(batch) => {
                                let goal = Goal::Purge {
                                    after: e.after,
                                    upto: batch.upto,
                                };
                                match self.pass.begin(&r.scope(), goal, 0, e.dry_run) {
                                    Ok(()) => {
                                        e.phase = Phase::Purging {
                                            batch,
                                            seen: (0, 0, 0),
                                        }
                                    }
                                    Err(_) => e.next_rule(),
                                }
                            }
                            None => e.next_rule(),
                        }
                    }
                }
                Phase::Purging { batch, seen } => {
                    let name = r.cfg.name.as_str();
                    let end =
                        self.pass
                            .slice(&r.scope(), deadline, EMERGENCY_DELETIONS, &mut |a| {
                                out(name, a)
                            });
                    let t = self.pass.tally;
                    let (freed, deleted, failed) = (
                        t.bytes_freed - seen.0,
                        t.deleted - seen.1,
                        t.failed - seen.2,
                    );
                    e.freed += freed;
                    e.deleted += deleted;
                    e.failed += failed;
                    r.totals.emergency_deleted += deleted;
                    r.totals.emergency_bytes_freed += freed;
                    r.totals.failed += failed;
                    self.totals.emergency_deleted += deleted;
                    self.totals.emergency_bytes_freed += freed;
                    e.phase = Phase::Purging {
                        batch,
                        seen: (t.bytes_freed, t.deleted, t.failed),
                    };
                    if end == Slice::Done {
                        e.after = batch.upto;
                        e.phase = Phase::Idle;
                        if !batch.more {
                            e.next_rule();
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Some(0);
            }
        }
    }

    fn end_emergency(&mut self, usage: Usage, reached: bool) {
        let Some(mut e) = self.emergency.take() else {
            return;
        };
        self.order_buf = std::mem::take(&mut e.order);
        let m = &self.mounts[e.mount];
        let outcome = EmergencyOutcome {
            at: WallTime::now(),
            mount: e.mount,
            from_percent: e.start.used_percent(),
            to_percent: usage.used_percent(),
            deleted: e.deleted,
            bytes_freed: e.freed,
            failed: e.failed,
            reached,
        };
        self.last_emergency = Some(outcome);
        if !reached {
            self.totals.emergencies_short += 1;
        }
        let verb = if e.dry_run { "would delete" } else { "deleted" };
        if reached {
            log::warn!(
                "emergency on {}: {verb} {} entries ({}); {} % -> {} %",
                m.path().display(),
                e.deleted,
                Bytes(e.freed),
                outcome.from_percent,
                outcome.to_percent
            );
        } else {
            log::error!(
                "emergency on {}: {verb} {} entries ({}) and nothing deletable is left, still {} % used (until_used {} %)",
                m.path().display(),
                e.deleted,
                Bytes(e.freed),
                outcome.to_percent,
                self.config.emergency.until_used
            );
        }
    }

    /// Raises what the end of an emergency means (from the loop, where a
    /// Ctx is at hand).
    fn raise_emergency_outcome(&mut self, ctx: &mut Ctx<'_>) {
        let Some(o) = self.last_emergency else { return };
        if o.reached || self.outcome_raised == Some(o.at.secs) {
            return;
        }
        self.outcome_raised = Some(o.at.secs);
        let m = &self.mounts[o.mount];
        let mut msg = heapless::String::<256>::new();
        let _ = core::fmt::Write::write_fmt(
            &mut Bounded(&mut msg),
            format_args!(
                "emergency cleanup of {} deleted {} entries ({}) but nothing deletable is left: still {} % used, above until_used {} %",
                m.path().display(),
                o.deleted,
                Bytes(o.bytes_freed),
                o.to_percent,
                self.config.emergency.until_used
            ),
        );
        let source = m.path().to_string_lossy();
        ctx.raise(&Alert {
            level: AlertLevel::Critical,
            kind: "disk_emergency",
            source: &source,
            message: &msg,
            value: Some(f64::from(o.to_percent)),
        });
    }

    fn walk(&mut self, ctx: &mut Ctx<'_>) {
        let started = Instant::now();
        let deadline = started.after_millis(SLICE_MS);
        let next = self.slice(deadline, &mut |rule, a| log_action(rule, a));
        let took = Instant::now()
            .as_micros()
            .saturating_sub(started.as_micros());
        self.totals.longest_slice_us = self.totals.longest_slice_us.max(took);
        self.raise_emergency_outcome(ctx);
        // Quota mounts just measured: their check, and maybe an emergency.
        while let Some(m) = self.measured.pop() {
            if let Some(percent) = self.mounts[m].check(ctx, self.boot) {
                self.consider_emergency(m, percent, ctx);
            }
        }
        let next = if self.emergency.is_some() {
            Some(0)
        } else {
            next
        };
        if let Some(pause) = next {
            let _ = ctx.schedule(ctx.now.after_millis(pause), WALK);
        }
    }
}

/// Where the pass for `w` walks, and the name its actions go under.
fn scope_of<'a>(
    w: Work,
    rules: &'a [Rule],
    orphans: &'a [OrphanRule],
    mounts: &'a [Watched],
    every_name: &'a Patterns,
) -> (Scope<'a>, &'a str) {
    match w {
        Work::Retention(i) => (rules[i].scope(), rules[i].cfg.name.as_str()),
        Work::Orphans(i) => (orphans[i].scope(), "orphans"),
        Work::Quota(m) => (
            Scope {
                root: mounts[m].path(),
                patterns: every_name,
                kind: EntryKind::File,
                depth: None,
            },
            "quota",
        ),
    }
}

/// In the daemon, each action goes to the field log at debug level (a
/// pass's summary is logged at info); failures at warning.
fn log_action(rule: &str, a: &Action<'_>) {
    match a.error {
        None => log::debug!(
            "{rule}: deleted {}{} ({})",
            Name(a.path),
            if a.dir { "/" } else { "" },
            Bytes(a.bytes)
        ),
        Some(e) => log::warn!(
            "{rule}: cannot delete {}: {}; it stays",
            Name(a.path),
            e.desc()
        ),
    }
}

/// A path of bytes, shown with invalid UTF-8 replaced.
pub struct Name<'a>(pub &'a [u8]);

impl core::fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The common case, a plain UTF-8 name, in one write.
        if let Ok(plain) = core::str::from_utf8(self.0) {
            if !plain.contains('\n') {
                return f.write_str(plain);
            }
        }
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '\n' {
                    f.write_str("\\n")?;
                } else {
                    core::fmt::Write::write_char(f, c)?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

fn wall_ns(w: WallTime) -> i64 {
    w.secs.saturating_mul(1_000_000_000) + i64::from(w.millis) * 1_000_000
}

fn ms_to_ns(ms: u64) -> i64 {
    (ms as i64).saturating_mul(1_000_000)
}

impl Service for Storage {
    fn name(&self) -> &'static str {
        "storage"
    }

    fn max_timers(&self) -> usize {
        8 + self.jobs.max_timers()
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> io::Result<()> {
        self.resolve();
        for m in &self.mounts {
            let dev = m.device.as_ref();
            log::info!(
                "watching {} ({}{}; warns at {} %, critical at {} %{})",
                m.path().display(),
                dev.map_or("no block device", |d| d.name.as_str()),
                if m.is_sd() { ", an SD card" } else { "" },
                m.warn,
                m.critical,
                m.quota()
                    .map_or(String::new(), |q| format!(", quota {}", Bytes(q)))
            );
        }
        for r in &self.rules {
            if r.mount.is_none() && !self.mounts.is_empty() {
                log::info!(
                    "retention rule {}: {} is on none of the watched mounts; emergency cleanup never touches it",
                    r.cfg.name,
                    r.cfg.root.display()
                );
            }
        }
        self.jobs.start(ctx, JOBS_TIMER, JOBS_TOKEN)?;
        // The first check at once: thresholds and retention from the start.
        let _ = ctx.schedule(ctx.now, CHECK);
        Ok(())
    }

    fn on_ready(&mut self, local: u64, ctx: &mut Ctx<'_>) {
        if local >= JOBS_TOKEN {
            self.jobs.on_ready(local - JOBS_TOKEN, ctx);
        }
    }

    fn on_timer(&mut self, id: u32, ctx: &mut Ctx<'_>) {
        match id {
            CHECK => {
                let every = self.config.check_every.as_millis();
                let _ = ctx.schedule(ctx.now.after_millis(every), CHECK);
                self.check(ctx);
            }
            WALK => self.walk(ctx),
            ROTATE if self.rotation.step(ROTATE_STEP_BYTES, ctx.wall) => {
                let _ = ctx.schedule(ctx.now, ROTATE);
            }
            CLOCK => {
                self.queue_retention(ctx);
                self.kick(ctx);
            }
            id if id >= JOBS_TIMER => self.jobs.on_timer(id - JOBS_TIMER, ctx),
            _ => {}
        }
    }

    fn on_child_exit(&mut self, pid: Pid, exit: ChildExit, ctx: &mut Ctx<'_>) -> bool {
        self.jobs.on_child_exit(pid, exit, ctx)
    }

    fn reload(&mut self, config: &Config, ctx: &mut Ctx<'_>) {
        let Some(new) = &config.storage else { return };
        if *new == self.config {
            return;
        }
        log::info!("storage config changed: adopting it");
        self.pass.abort();
        self.rotation.abort();
        self.queue.clear();
        self.current = None;
        self.emergency = None;
        let saved_sd: Vec<_> = self
            .mounts
            .iter()
            .map(|m| (m.path().to_string_lossy().into_owned(), m.sd_day))
            .collect();
        let jobs_same = new.jobs == self.config.jobs;
        let mut next = Storage::new(new);
        if jobs_same {
            std::mem::swap(&mut next.jobs, &mut self.jobs);
        } else {
            self.jobs.stop(ctx);
            for id in 0..self.jobs.max_timers() as u32 {
                ctx.cancel(JOBS_TIMER + id);
            }
        }
        next.totals = self.totals;
        next.last_emergency = None;
        next.saved_sd = saved_sd;
        *self = next;
        self.resolve();
        if !jobs_same {
            if let Err(e) = self.jobs.start(ctx, JOBS_TIMER, JOBS_TOKEN) {
                log::error!("jobs: {e}");
            }
        }
        ctx.cancel(WALK);
        let _ = ctx.schedule(ctx.now, CHECK);
    }

    fn report(&self, report: &mut Report) {
        let t = &self.totals;
        report.counter(
            "checks_total",
            "Mount checks (every check_every).",
            t.checks,
        );
        report.counter(
            "retention_passes_total",
            "Retention passes completed.",
            t.passes,
        );
        report.counter(
            "files_deleted_total",
            "Entries deleted by retention for being older than max_age.",
            t.deleted,
        );
        report.counter(
            "bytes_freed_total",
            "Bytes freed by retention.",
            t.bytes_freed,
        );
        report.counter(
            "delete_failures_total",
            "Deletions that failed; those entries stay and are retried next pass.",
            t.failed + t.orphan_failures,
        );
        report.counter(
            "orphans_deleted_total",
            "Metadata files deleted because their companion was gone.",
            t.orphans_deleted,
        );
        report.counter(
            "emergencies_total",
            "Emergency cleanups started (a mount at emergency.at_used).",
            t.emergencies,
        );
        report.counter(
            "emergency_files_deleted_total",
            "Entries deleted by emergency cleanups, oldest first.",
            t.emergency_deleted,
        );
        report.counter(
            "emergency_bytes_freed_total",
            "Bytes freed by emergency cleanups.",
            t.emergency_bytes_freed,
        );
        report.counter(
            "emergencies_short_total",
            "Emergencies that ran out of deletable entries above until_used.",
            t.emergencies_short,
        );
        report.counter(
            "clock_holds_total",
            "Times retention waited for the clock to be synchronised.",
            t.clock_holds,
        );
        let future: u64 = self.rules.iter().map(|r| r.totals.future).sum();
        report.counter(
            "future_mtime_total",
            "Entries seen with an mtime in the future (never deleted by age).",
            future,
        );
        let not_regular: u64 = self.rules.iter().map(|r| r.totals.not_regular).sum();
        report.counter(
            "not_regular_total",
            "Matching names that were symbolic links or other non-files (never followed or deleted).",
            not_regular,
        );
        report.gauge(
            "longest_slice_microseconds",
            "The longest the loop was held by one slice of a storage pass.",
            t.longest_slice_us,
        );
        report.gauge(
            "last_check_microseconds",
            "How long the last check of every watched mount took.",
            t.last_check_us,
        );
        report.gauge(
            "emergency_running",
            "1 while an emergency cleanup is under way.",
            u64::from(self.emergency.is_some()),
        );
        report.gauge(
            "retention_held",
            "1 while retention waits for the clock to be synchronised.",
            u64::from(self.clock_held),
        );
        for m in &self.mounts {
            let path = m.path().to_string_lossy();
            if let Some(u) = m.usage {
                let g = |name, help, value| Counter {
                    name,
                    help,
                    kind: CounterKind::Gauge,
                    value,
                };
                report.labelled(
                    g(
                        "mount_used_percent",
                        "Used % of a watched mount, as df shows it.",
                        u64::from(m.percent),
                    ),
                    "mount",
                    &path,
                );
                report.labelled(
                    g(
                        "mount_size_bytes",
                        "Size of a watched mount (its quota, if it has one).",
                        u.total,
                    ),
                    "mount",
                    &path,
                );
                report.labelled(
                    g("mount_used_bytes", "Bytes used on a watched mount.", u.used),
                    "mount",
                    &path,
                );
                report.labelled(
                    g(
                        "mount_free_bytes",
                        "Bytes free for unprivileged users on a watched mount.",
                        u.avail,
                    ),
                    "mount",
                    &path,
                );
            }
            if let Some(w) = m.written_since_boot {
                report.labelled(
                    Counter {
                        name: "device_written_bytes_total",
                        help: "Bytes written to the disk under a watched mount since boot.",
                        kind: CounterKind::Counter,
                        value: w,
                    },
                    "mount",
                    &path,
                );
                report.labelled(
                    Counter {
                        name: "device_written_today_bytes",
                        help: "Bytes written to the disk under a watched mount today (local date).",
                        kind: CounterKind::Gauge,
                        value: m.sd_day.bytes,
                    },
                    "mount",
                    &path,
                );
            }
            match (m.error, m.level) {
                (Some(errno), _) => report.worsen(
                    Health::Unhealthy,
                    format_args!(
                        "mount {}: {}",
                        path,
                        nix::errno::Errno::from_raw(errno).desc()
                    ),
                ),
                (None, Level::Critical) => report.worsen(
                    Health::Degraded,
                    format_args!(
                        "{} is {} % used (critical at {} %)",
                        path, m.percent, m.critical
                    ),
                ),
                _ => {}
            }
        }
        for r in &self.rules {
            if let Some((_, t)) = r.last {
                report.labelled(
                    Counter {
                        name: "rule_entries",
                        help: "Entries a retention rule keeps, after its last pass.",
                        kind: CounterKind::Gauge,
                        value: t.entries,
                    },
                    "rule",
                    &r.cfg.name,
                );
                report.labelled(
                    Counter {
                        name: "rule_bytes",
                        help: "Bytes a retention rule keeps, after its last pass.",
                        kind: CounterKind::Gauge,
                        value: t.bytes,
                    },
                    "rule",
                    &r.cfg.name,
                );
                if t.failed > 0 {
                    report.worsen(
                        Health::Degraded,
                        format_args!(
                            "{}: {} entr(ies) could not be deleted in the last pass",
                            r.cfg.name, t.failed
                        ),
                    );
                }
            }
            if let Some(errno) = r.root_error {
                report.worsen(
                    Health::Degraded,
                    format_args!(
                        "{}: root {}: {}",
                        r.cfg.name,
                        r.cfg.root.display(),
                        nix::errno::Errno::from_raw(errno).desc()
                    ),
                );
            }
        }
        for o in &self.orphans {
            if let Some(errno) = o.error {
                report.worsen(
                    Health::Degraded,
                    format_args!(
                        "orphans in {} (companions in {}): {}",
                        o.cfg.dir.display(),
                        o.cfg.companion_dir.display(),
                        nix::errno::Errno::from_raw(errno).desc()
                    ),
                );
            }
        }
        if let Some(o) = self.last_emergency.filter(|o| !o.reached) {
            report.worsen(
                Health::Degraded,
                format_args!(
                    "the last emergency on {} found nothing more to delete at {} %",
                    self.mounts[o.mount].path().display(),
                    o.to_percent
                ),
            );
        }
        if self.clock_held {
            report.worsen(
                Health::Degraded,
                format_args!(
                    "retention waits for the clock to be synchronised (wait_for_clock_sync)"
                ),
            );
        }
        self.rotation.report(report);
        self.jobs.report(report);
    }

    fn details(&self, out: &mut [u8]) -> serde_json_core::ser::Result<usize> {
        serde_json_core::to_slice(&docs::Details(self), out)
    }

    fn save_state(&self, out: &mut [u8]) -> serde_json_core::ser::Result<usize> {
        serde_json_core::to_slice(&docs::Saved(self), out)
    }

    fn restore_state(&mut self, saved: &serde_json::Value) {
        if let Some(v) = saved.get("jobs") {
            self.jobs.restore_state(v);
        }
        if let Some(list) = saved.get("sd").and_then(|v| v.as_array()) {
            for item in list {
                let path = item.get("path").and_then(|p| p.as_str());
                let day = item
                    .get("day")
                    .cloned()
                    .map(serde_json::from_value::<mounts::SdDay>);
                if let (Some(path), Some(Ok(day))) = (path, day) {
                    self.saved_sd.push((path.to_string(), day));
                }
            }
        }
    }

    fn stop(&mut self, ctx: &mut Ctx<'_>) {
        self.jobs.stop(ctx);
        self.pass.abort();
        // A copy in progress is dropped with its temporary; the log keeps
        // every line (it is truncated only once its copy is in place).
        self.rotation.abort();
    }

    fn sweep(&mut self, dry_run: bool, out: &mut dyn io::Write) -> io::Result<SweepTotals> {
        self.resolve();
        if self.config.wait_for_clock_sync && !clock_synchronised() {
            writeln!(
                out,
                "retention held: the system clock is not synchronised (wait_for_clock_sync)"
            )?;
            return Ok(SweepTotals::default());
        }
        let mut totals = SweepTotals::default();
        for i in 0..self.rules.len() {
            if self.rules[i].cfg.max_age.is_some() {
                let _ = self.queue.push_back(Work::Retention(i));
            }
        }
        for i in 0..self.orphans.len() {
            let _ = self.queue.push_back(Work::Orphans(i));
        }
        self.drain(dry_run, out, &mut totals)?;
        Ok(totals)
    }
}

impl Storage {
    /// Runs queued passes (or the emergency) to their end, printing each
    /// action: the one-shot commands.
    fn drain(
        &mut self,
        dry_run: bool,
        out: &mut dyn io::Write,
        totals: &mut SweepTotals,
    ) -> io::Result<()> {
        let verb = if dry_run { "would delete" } else { "deleted" };
        let mut err = None;
        let now_ns = wall_ns(WallTime::now());
        let mut line = Line::new();
        let mut print = |rule: &str, a: &Action<'_>| {
            let r = match a.error {
                None => {
                    totals.acted += 1;
                    line.clear();
                    action_line(&mut line, verb, rule, a, now_ns);
                    out.write_all(line.bytes())
                }
                Some(e) => {
                    totals.failed += 1;
                    writeln!(
                        out,
                        "FAILED to delete {} ({rule}): {}",
                        Name(a.path),
                        e.desc()
                    )
                }
            };
            if let Err(e) = r {
                err.get_or_insert(e);
            }
        };
        // Dry runs must not delete: the passes are begun with it.
        self.dry_run = dry_run;
        while self
            .slice(Instant::now().after_millis(1000), &mut print)
            .is_some()
        {}
        self.dry_run = false;
        if let Some(e) = err {
            return Err(e);
        }
        Ok(())
    }
}

impl Storage {
    /// `edgekeeper emergency`: the emergency pass on every watched mount
    /// above `until_used`, whatever `at_used` says.
    pub fn emergency_once(
        &mut self,
        dry_run: bool,
        out: &mut dyn io::Write,
    ) -> io::Result<SweepTotals> {
        self.resolve();
        let until = self.config.emergency.until_used;
        let mut totals = SweepTotals::default();
        for i in 0..self.mounts.len() {
            if self.mounts[i].quota().is_some() {
                self.measure_quota(i)?;
            }
            let usage = match self.mounts[i].measure() {
                Ok(u) => u,
                Err(e) => {
                    writeln!(out, "{}: {e}", self.mounts[i].path().display())?;
                    totals.failed += 1;
                    continue;
                }
            };
            let percent = usage.used_percent();
            let path = self.mounts[i].path().display().to_string();
            if percent <= until {
                writeln!(
                    out,
                    "{path}: {percent} % used, at or below until_used {until} %: nothing to do"
                )?;
                continue;
            }
            if !self.rules.iter().any(|r| r.mount == Some(i)) {
                writeln!(
                    out,
                    "{path}: {percent} % used, but no retention rule is on it: nothing to delete"
                )?;
                continue;
            }
            writeln!(
                out,
                "{path}: {percent} % used: deleting oldest first, by priority, down to {until} %"
            )?;
            self.begin_emergency(i, usage, dry_run, WallTime::now());
            self.drain(dry_run, out, &mut totals)?;
            if let Some(o) = self.last_emergency {
                let verb = if dry_run { "would free" } else { "freed" };
                writeln!(
                    out,
                    "{path}: {verb} {} in {} entries: {} % -> {} %{}",
                    Bytes(o.bytes_freed),
                    o.deleted,
                    o.from_percent,
                    o.to_percent,
                    if o.reached {
                        String::new()
                    } else {
                        format!(
                            " - nothing deletable is left above {until} % (emergency_keep holds the newest)"
                        )
                    }
                )?;
            }
        }
        Ok(totals)
    }

    /// Walks a quota mount to know what its files take (one-shot commands).
    fn measure_quota(&mut self, m: usize) -> io::Result<()> {
        let (scope, _) = scope_of(
            Work::Quota(m),
            &self.rules,
            &self.orphans,
            &self.mounts,
            &self.every_name,
        );
        self.pass
            .begin(&scope, Goal::Analyse { cutoff_ns: None }, 0, false)?;
        self.pass.run_to_end(&scope);
        self.mounts[m].quota_used = Some(self.pass.tally.bytes);
        Ok(())
    }

    /// `edgekeeper storage`: per mount and per retention rule.
    pub fn analyse(&mut self, out: &mut dyn io::Write) -> io::Result<()> {
        self.resolve();
        writeln!(
            out,
            "{:<28} {:<12} {:>3} {:>10} {:>10} {:>10} {:>5}  thresholds",
            "mount", "device", "sd", "size", "used", "free", "use%"
        )?;
        for i in 0..self.mounts.len() {
            if self.mounts[i].quota().is_some() {
                self.measure_quota(i)?;
            }
            let m = &self.mounts[i];
            let dev = m.device.as_ref().map_or("-", |d| d.name.as_str());
            match m.measure() {
                Ok(u) => writeln!(
                    out,
                    "{:<28} {:<12} {:>3} {:>10} {:>10} {:>10} {:>4}%  warn {} % critical {} %{}",
                    m.path().display(),
                    dev,
                    if m.is_sd() { "yes" } else { "no" },
                    Bytes(u.total).to_string(),
                    Bytes(u.used).to_string(),
                    Bytes(u.avail).to_string(),
                    u.used_percent(),
                    m.warn,
                    m.critical,
                    if m.quota().is_some() { " (quota)" } else { "" }
                )?,
                Err(e) => writeln!(out, "{:<28} {e}", m.path().display())?,
            }
        }
        writeln!(out)?;
        writeln!(
            out,
            "{:<16} {:>9} {:>10} {:>9} {:>18} {:>18}  root",
            "rule", "entries", "bytes", "expired", "oldest", "newest"
        )?;
        let now_ns = wall_ns(WallTime::now());
        for i in 0..self.rules.len() {
            let r = &self.rules[i];
            let cutoff_ns = r.cfg.max_age.map(|a| now_ns - ms_to_ns(a.as_millis()));
            let scope = r.scope();
            if let Err(e) = self
                .pass
                .begin(&scope, Goal::Analyse { cutoff_ns }, 0, true)
            {
                writeln!(out, "{:<16} {}: {e}", r.cfg.name, r.cfg.root.display())?;
                continue;
            }
            self.pass.run_to_end(&scope);
            let t = self.pass.tally;
            let when = |ns: Option<i64>| {
                ns.map_or("-".to_string(), |ns| {
                    WallTime::from_secs(ns.div_euclid(1_000_000_000))
                        .iso_secs()
                        .to_string()
                })
            };
            writeln!(
                out,
                "{:<16} {:>9} {:>10} {:>9} {:>18} {:>18}  {}",
                r.cfg.name,
                t.entries,
                Bytes(t.bytes).to_string(),
                if cutoff_ns.is_some() {
                    t.expired.to_string()
                } else {
                    "-".into()
                },
                when(t.oldest_ns),
                when(t.newest_ns),
                r.cfg.root.display()
            )?;
        }
        Ok(())
    }
}

/// A sweep line, put together in a fixed buffer: in a size-optimised
/// build `Vec::extend_from_slice` stays out of line, and with one line per
/// deleted file it was a sixth of a retention pass's instructions. Long
/// enough for the longest path with every byte escaped (`\xff`); anything
/// past the end is cut off rather than allocated for, and `end_line` keeps
/// the newline even then, so the next line does not run on.
struct Line {
    buf: [u8; LINE_BUF],
    len: usize,
}

const LINE_BUF: usize = 4 * 4096 + 512;

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; LINE_BUF],
            len: 0,
        }
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    #[inline(always)]
    fn put(&mut self, b: &[u8]) {
        let end = (self.len + b.len()).min(LINE_BUF);
        let n = end - self.len;
        self.buf[self.len..end].copy_from_slice(&b[..n]);
        self.len = end;
    }

    fn end_line(&mut self) {
        if self.len == LINE_BUF {
            self.buf[LINE_BUF - 1] = b'\n';
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.put(s.as_bytes());
        Ok(())
    }
}

/// `deleted /path (rule, 2d 0h old, 4.1 KB)`: what `Age`, `Bytes` and
/// `Name` print, put together by hand, because `sweep` prints one per
/// deleted file and core::fmt showed as a quarter of its user time over
/// 110,000 deletions.
fn action_line(line: &mut Line, verb: &str, rule: &str, a: &Action<'_>, now_ns: i64) {
    use core::fmt::Write as _;
    line.put(verb.as_bytes());
    line.put(b" ");
    // Plain ASCII without a newline (what the field's names are) goes as
    // it is, checked in one pass; anything else as `Name` prints it.
    if a.path.is_ascii() && !a.path.contains(&b'\n') {
        line.put(a.path);
    } else {
        let _ = write!(line, "{}", Name(a.path));
    }
    if a.dir {
        line.put(b"/");
    }
    line.put(b" (");
    line.put(rule.as_bytes());
    line.put(b", ");
    let secs = (now_ns - a.mtime_ns) / 1_000_000_000;
    if secs < 0 {
        let _ = write!(line, "{}", Age(a.mtime_ns));
    } else {
        let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
        let mut num = |n: i64, unit: &[u8]| {
            push_u64(line, n as u64);
            line.put(unit);
        };
        match (d, h) {
            (0, 0) if m == 0 => num(secs, b"s"),
            (0, 0) => num(m, b"m"),
            (0, _) => {
                num(h, b"h ");
                num(m, b"m");
            }
            _ => {
                num(d, b"d ");
                num(h, b"h");
            }
        }
        line.put(b" old");
    }
    line.put(b", ");
    let (tenths, unit) = mounts::tenths(a.bytes);
    if unit == 0 {
        push_u64(line, a.bytes);
    } else {
        push_u64(line, tenths / 10);
        line.put(b".");
        push_u64(line, tenths % 10);
    }
    line.put(b" ");
    line.put(mounts::UNITS[unit].as_bytes());
    line.put(b")\n");
    line.end_line();
}

fn push_u64(line: &mut Line, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    line.put(&digits[i..]);
}

/// How old something with this mtime is, for people: `3d 2h old`.
pub struct Age(pub i64);

impl core::fmt::Display for Age {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let now = wall_ns(WallTime::now());
        let secs = (now - self.0) / 1_000_000_000;
        if secs < 0 {
            return write!(f, "{}s in the future", -secs);
        }
        let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
        match (d, h) {
            (0, 0) if m == 0 => write!(f, "{secs}s old"),
            (0, 0) => write!(f, "{m}m old"),
            (0, _) => write!(f, "{h}h {m}m old"),
            _ => write!(f, "{d}d {h}h old"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_made_action_line_says_what_the_formatters_say() {
        let now = wall_ns(WallTime::now());
        for (age_s, bytes, path, dir) in [
            (2 * 86_400 + 3600 * 5, 4096u64, &b"/a/b.jpg"[..], false),
            (3 * 3600 + 60 * 7, 12_345_678, b"/TMPPOINTING_1", true),
            (59, 0, b"/x \xff\n.jpg", false),
            (600, 999, b"/y.jpg", false),
        ] {
            let a = Action {
                path,
                dir,
                bytes,
                mtime_ns: now - age_s * 1_000_000_000,
                error: None,
            };
            let mut line = Line::new();
            action_line(&mut line, "deleted", "live", &a, now);
            let expect = format!(
                "deleted {}{} (live, {}, {})\n",
                Name(path),
                if dir { "/" } else { "" },
                Age(a.mtime_ns),
                Bytes(bytes)
            );
            assert_eq!(String::from_utf8(line.bytes().to_vec()).unwrap(), expect);
        }
        // A path too long even for the buffer is cut, but ends its line.
        let path = vec![0xffu8; LINE_BUF];
        let a = Action {
            path: &path,
            dir: false,
            bytes: 1,
            mtime_ns: now,
            error: None,
        };
        let mut line = Line::new();
        action_line(&mut line, "deleted", "live", &a, now);
        assert_eq!(line.bytes().len(), LINE_BUF);
        assert!(line.bytes().starts_with(b"deleted \\xff\\xff"));
        assert_eq!(line.bytes().iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.bytes().last(), Some(&b'\n'));
    }

    #[test]
    fn retention_passes_come_every_check_but_at_most_every_24th_of_max_age() {
        let rule = |age: &str| {
            let cfg: RetentionRule = serde_json::from_str(&format!(
                r#"{{"name": "r", "root": "/x", "match": ["*"], "max_age": "{age}"}}"#
            ))
            .unwrap();
            Rule::new(&cfg)
        };
        let five_min = 300_000;
        assert_eq!(rule("24h").pass_interval_ms(five_min), 3_600_000);
        assert_eq!(
            rule("7d").pass_interval_ms(five_min),
            3_600_000,
            "an hour at most"
        );
        assert_eq!(rule("12h").pass_interval_ms(five_min), 1_800_000);
        assert_eq!(
            rule("1h").pass_interval_ms(five_min),
            five_min,
            "never below check_every"
        );
    }
}
