//! The `relocate` service: files matching a pattern that appear anywhere
//! under a tree are moved into one target directory, at once, with nothing
//! lost and nothing missed.
//!
//! What it is: the Service glue around one [`Rule`] per `relocate` block:
//! start-up (targets made, crash leftovers cleaned, roots watched, a full
//! scan before READY=1), the inotify fd of each rule, and three timers per
//! rule: the periodic sweep (`sweep_every`, or `sweep_every_busy` after a
//! sweep that found more than `busy_threshold` files the events missed),
//! the next walking slice, and files waiting for `min_age`. It reports
//! counters and health, and runs `edgekeeper sweep`.
//! What it is not: the mechanics of watching (`rule.rs`) or of moving one
//! file (`mover.rs`).

pub mod mover;
pub mod rule;

use std::io;

use serde::Serialize;
use serde::ser::{SerializeSeq, SerializeStruct};

use crate::config::{Config, RelocateRule};
use crate::services::{Ctx, Health, Report, Service, SweepTotals};
use crate::sys::clock::WallTime;

use rule::{Counters, Rule, limit_reason};

const SWEEP: u32 = 0;
const WALK: u32 = 1;
const DEFERRED: u32 = 2;
const TIMERS_PER_RULE: u32 = 4;

pub struct Relocate {
    config: Vec<RelocateRule>,
    max_watches: usize,
    rules: Vec<Rule>,
}

impl Relocate {
    pub fn new(config: &Config) -> Relocate {
        let max_watches = config.limits.max_watches as usize;
        Relocate {
            config: config.relocate.clone(),
            max_watches,
            rules: build_rules(&config.relocate, max_watches),
        }
    }

    fn timer(i: usize, kind: u32) -> u32 {
        i as u32 * TIMERS_PER_RULE + kind
    }

    /// Makes rule `i` ready: target, root watch, inotify fd registered,
    /// first sweep started.
    fn setup(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let rule = &mut self.rules[i];
        if let Err(e) = rule.setup() {
            log::error!("{}: {e}", rule.tree.name);
            rule.tree
                .root_error
                .get_or_insert(e.raw_os_error().unwrap_or(libc::EIO));
        }
        if let Some(fd) = rule.inotify_fd() {
            if let Err(e) = ctx.register(fd, i as u64) {
                log::error!("{}: cannot register its inotify fd: {e}", rule.tree.name);
            }
        }
        rule.begin_sweep();
    }

    fn walk(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let rule = &mut self.rules[i];
        let was_sweeping = rule.sweeping;
        let more = rule.walk_slice(ctx);
        if was_sweeping && !rule.sweeping {
            let next = ctx.now.after_millis(rule.next_sweep_in_ms());
            let _ = ctx.schedule(next, Self::timer(i, SWEEP));
        }
        if more {
            let _ = ctx.schedule(ctx.now, Self::timer(i, WALK));
        }
        self.schedule_deferred(i, ctx);
    }

    fn schedule_deferred(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        match self.rules[i].next_deferred() {
            Some(at) => {
                let _ = ctx.schedule(at, Self::timer(i, DEFERRED));
            }
            None => ctx.cancel(Self::timer(i, DEFERRED)),
        }
    }

    fn totals(&self) -> Counters {
        let mut t = Counters::default();
        for r in &self.rules {
            let c = &r.tree.counters;
            t.events += c.events;
            t.moved += c.moved;
            t.renamed += c.renamed;
            t.copied += c.copied;
            t.bytes_copied += c.bytes_copied;
            t.collisions += c.collisions;
            t.failures += c.failures;
            t.overflows += c.overflows;
            t.sweeps += c.sweeps;
            t.sweep_found += c.sweep_found;
            t.scans += c.scans;
            t.scan_found += c.scan_found;
            t.writer_waits += c.writer_waits;
            t.young_waits += c.young_waits;
            t.not_regular += c.not_regular;
            t.vanished += c.vanished;
            t.watch_limit_hits += c.watch_limit_hits;
            t.partials_cleaned += c.partials_cleaned;
        }
        t
    }
}

fn build_rules(config: &[RelocateRule], max_watches: usize) -> Vec<Rule> {
    // limits.max_watches is shared evenly between the rules.
    let per_rule = (max_watches / config.len().max(1)).max(1);
    config.iter().map(|c| Rule::new(c, per_rule)).collect()
}

impl Service for Relocate {
    fn name(&self) -> &'static str {
        "relocate"
    }

    fn max_timers(&self) -> usize {
        self.rules.len() * TIMERS_PER_RULE as usize
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> io::Result<()> {
        // A broken read lease is signalled with SIGIO; blocked, it can never
        // kill the daemon (the lease state is polled instead).
        crate::sys::process::block_signals(&[nix::sys::signal::Signal::SIGIO])?;
        for i in 0..self.rules.len() {
            self.setup(i, ctx);
            // The start-up scan runs to the end before READY=1, so every
            // file present at start is moved and every directory watched.
            let rule = &mut self.rules[i];
            while rule.walk_slice(ctx) {}
            // Events that arrived during the scan.
            if rule.on_events(ctx) {
                while rule.walk_slice(ctx) {}
            }
            let next = ctx.now.after_millis(rule.next_sweep_in_ms());
            let _ = ctx.schedule(next, Self::timer(i, SWEEP));
            log::info!(
                "{}: watching {} directories under {}, moving {} into {}",
                rule.tree.name,
                rule.watches(),
                rule.tree.root.display(),
                self.config[i].patterns.join(" "),
                rule.tree.target.path.display()
            );
            self.schedule_deferred(i, ctx);
        }
        Ok(())
    }

    fn on_ready(&mut self, local: u64, ctx: &mut Ctx<'_>) {
        let i = local as usize;
        let Some(rule) = self.rules.get_mut(i) else {
            return;
        };
        if rule.on_events(ctx) {
            let _ = ctx.schedule(ctx.now, Self::timer(i, WALK));
        }
        self.schedule_deferred(i, ctx);
    }

    fn on_timer(&mut self, id: u32, ctx: &mut Ctx<'_>) {
        let i = (id / TIMERS_PER_RULE) as usize;
        if i >= self.rules.len() {
            return;
        }
        match id % TIMERS_PER_RULE {
            SWEEP => {
                let rule = &mut self.rules[i];
                let had_fd = rule.inotify_fd().is_some();
                rule.begin_sweep();
                if !had_fd {
                    self.setup(i, ctx);
                }
                let rule = &self.rules[i];
                if rule.sweeping {
                    self.walk(i, ctx);
                } else {
                    // The root is still missing: look again later.
                    let next = ctx.now.after_millis(rule.next_sweep_in_ms());
                    let _ = ctx.schedule(next, Self::timer(i, SWEEP));
                }
            }
            WALK => self.walk(i, ctx),
            DEFERRED => {
                self.rules[i].retry_deferred(ctx);
                self.schedule_deferred(i, ctx);
            }
            _ => {}
        }
    }

    fn reload(&mut self, config: &Config, ctx: &mut Ctx<'_>) {
        if config.relocate == self.config && config.limits.max_watches as usize == self.max_watches
        {
            return;
        }
        log::info!("relocate rules changed: rebuilding watches");
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(fd) = rule.inotify_fd() {
                let _ = ctx.deregister(fd);
            }
            for kind in [SWEEP, WALK, DEFERRED] {
                ctx.cancel(Self::timer(i, kind));
            }
        }
        self.config = config.relocate.clone();
        self.max_watches = config.limits.max_watches as usize;
        self.rules = build_rules(&self.config, self.max_watches);
        for i in 0..self.rules.len() {
            self.setup(i, ctx);
            let _ = ctx.schedule(ctx.now, Self::timer(i, WALK));
        }
    }

    fn report(&self, report: &mut Report) {
        let t = self.totals();
        report.counter(
            "files_moved_total",
            "Files moved into their target.",
            t.moved,
        );
        report.counter(
            "files_renamed_total",
            "Files moved by a rename on one file system.",
            t.renamed,
        );
        report.counter(
            "files_copied_total",
            "Files copied across file systems, then unlinked.",
            t.copied,
        );
        report.counter(
            "bytes_copied_total",
            "Bytes copied across file systems.",
            t.bytes_copied,
        );
        report.counter(
            "collisions_total",
            "Files that got a numbered suffix because their name was taken.",
            t.collisions,
        );
        report.counter(
            "move_failures_total",
            "Moves that failed; the files stay at their source and are retried.",
            t.failures,
        );
        report.counter("events_total", "inotify events handled.", t.events);
        report.counter(
            "overflows_total",
            "inotify queue overflows (each followed by a full rescan).",
            t.overflows,
        );
        report.counter("sweeps_total", "Full sweeps of the trees.", t.sweeps);
        report.counter(
            "sweep_found_total",
            "Files moved by sweeps because no event had delivered them.",
            t.sweep_found,
        );
        report.counter(
            "directory_scans_total",
            "Scans of new directories right after their watch was added.",
            t.scans,
        );
        report.counter(
            "scan_found_total",
            "Files found by scans of new directories.",
            t.scan_found,
        );
        report.counter(
            "writer_waits_total",
            "Times a file was left because a writer had it open (across file systems).",
            t.writer_waits,
        );
        report.counter(
            "min_age_waits_total",
            "Times a file was left for later: younger than min_age, or created less than a second ago and not yet closed (across file systems).",
            t.young_waits,
        );
        report.counter(
            "not_regular_total",
            "Matching names that were not regular files (never followed or moved).",
            t.not_regular,
        );
        report.counter(
            "vanished_total",
            "Files gone before they could be moved.",
            t.vanished,
        );
        report.counter(
            "watch_limit_hits_total",
            "Times the watch limit left directories unwatched.",
            t.watch_limit_hits,
        );
        report.counter(
            "partials_cleaned_total",
            "Partial copies left by a crash, removed at start.",
            t.partials_cleaned,
        );
        let unwatched: u64 = self.rules.iter().map(|r| r.tree.unwatched).sum();
        report.gauge(
            "unwatched_directories",
            "Directories covered only by the periodic sweep.",
            unwatched,
        );
        report.watches = self.rules.iter().map(|r| r.watches() as u64).sum();
        for r in &self.rules {
            let t = &r.tree;
            if let Some(errno) = t.root_error {
                report.worsen(
                    Health::Unhealthy,
                    format_args!(
                        "{}: root {}: {}",
                        t.name,
                        t.root.display(),
                        io::Error::from_raw_os_error(errno)
                    ),
                );
            }
            if let Some(errno) = t.target_error {
                report.worsen(
                    Health::Unhealthy,
                    format_args!(
                        "{}: target {}: {}",
                        t.name,
                        t.target.path.display(),
                        io::Error::from_raw_os_error(errno)
                    ),
                );
            }
            if let Some(limit) = t.limit {
                report.worsen(
                    Health::Degraded,
                    format_args!(
                        "{}: {} directories unwatched: {}",
                        t.name,
                        t.unwatched,
                        limit_reason(limit, 0)
                    ),
                );
            }
            if t.sweep_failures > 0 {
                report.worsen(
                    Health::Degraded,
                    format_args!(
                        "{}: {} file(s) could not be moved in the last sweep ({})",
                        t.name, t.sweep_failures, t.last_failure
                    ),
                );
            }
        }
    }

    fn details(&self, out: &mut [u8]) -> serde_json_core::ser::Result<usize> {
        serde_json_core::to_slice(&RulesDoc(&self.rules), out)
    }

    fn sweep(&mut self, dry_run: bool, out: &mut dyn io::Write) -> io::Result<SweepTotals> {
        crate::sys::process::block_signals(&[nix::sys::signal::Signal::SIGIO])?;
        let mut totals = SweepTotals::default();
        for rule in &mut self.rules {
            rule.sweep_once(dry_run, out, WallTime::now())?;
            totals.acted += rule.tree.counters.moved;
            totals.failed += rule.tree.counters.failures;
        }
        Ok(totals)
    }
}

struct RulesDoc<'a>(&'a [Rule]);

impl Serialize for RulesDoc<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for r in self.0 {
            seq.serialize_element(&RuleDoc(r))?;
        }
        seq.end()
    }
}

struct RuleDoc<'a>(&'a Rule);

impl Serialize for RuleDoc<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let t = &r.tree;
        let mut at = heapless::String::<32>::new();
        if let Some((when, _)) = r.last_sweep {
            let _ = core::fmt::Write::write_fmt(&mut at, format_args!("{}", when.iso_secs()));
        }
        let mut st = s.serialize_struct("Rule", 12)?;
        st.serialize_field("name", t.name.as_str())?;
        st.serialize_field("root", t.root.to_str().unwrap_or("?"))?;
        st.serialize_field("target", t.target.path.to_str().unwrap_or("?"))?;
        st.serialize_field("watches", &r.watches())?;
        st.serialize_field("unwatched_directories", &t.unwatched)?;
        st.serialize_field("sweeping", &r.sweeping)?;
        st.serialize_field("busy", &r.busy)?;
        st.serialize_field("last_sweep_at", &(!at.is_empty()).then_some(at.as_str()))?;
        st.serialize_field("last_sweep_found", &r.last_sweep.map(|l| l.1))?;
        st.serialize_field(
            "last_failure",
            &(!t.last_failure.is_empty()).then_some(t.last_failure.as_str()),
        )?;
        st.serialize_field("counters", &t.counters)?;
        st.end()
    }
}
