//! The `frames` service: camera frames renamed into capture directories are
//! checked and described in JSON sidecars; stalls, freezes, drops, dark and
//! corrupt frames raise alerts.
//!
//! What it is: the Service glue around one [`Capture`] per `frames` block:
//! start-up (each directory watched, the catch-up pass before READY=1), the
//! inotify fd of each capture and the stdout pipes of analyzer children as
//! reactor tokens, and per capture a stall timer, a retry timer for a
//! missing directory and one timeout per analyzer slot. Counters, health,
//! per-camera frames per second and details for status and metrics.
//! What it is not: the analysis of a frame (`capture.rs`), the JPEG scanner
//! (`jpeg.rs`) or the external analyzer (`analyzer.rs`).

pub mod analyzer;
pub mod capture;
pub mod jpeg;
pub mod writer;

use std::fmt::Write as _;
use std::io;

use nix::unistd::Pid;
use serde::Serialize;
use serde::ser::{SerializeSeq, SerializeStruct};

use crate::config::{Config, FrameRule};
use crate::services::{Ctx, Health, Report, Service};
use crate::sys::process::ChildExit;

use capture::{Capture, Counters, Scratch};

const STALL: u32 = 0;
const RETRY: u32 = 1;
/// Timer ids `TIMEOUT + slot` are the analyzer slots' timeouts.
const TIMEOUT: u32 = 16;
const TIMERS_PER_CAPTURE: u32 = 64;
/// Token bit that marks an analyzer's stdout pipe.
const PIPE: u64 = 1 << 40;
/// A missing capture directory is looked for this often.
const RETRY_MS: u64 = 5_000;

pub struct Frames {
    config: Vec<FrameRule>,
    captures: Vec<Capture>,
    scratch: Scratch,
}

impl Frames {
    pub fn new(config: &Config) -> Frames {
        Frames {
            config: config.frames.clone(),
            captures: config.frames.iter().map(Capture::new).collect(),
            scratch: Scratch::new(),
        }
    }

    fn timer(c: usize, kind: u32) -> u32 {
        c as u32 * TIMERS_PER_CAPTURE + kind
    }

    /// Opens capture `c` and registers its fd; true if it is watched now.
    fn open(&mut self, c: usize, ctx: &mut Ctx<'_>) -> bool {
        let cap = &mut self.captures[c];
        if !cap.open() {
            let _ = ctx.schedule(ctx.now.after_millis(RETRY_MS), Self::timer(c, RETRY));
            return false;
        }
        if let Some(fd) = cap.inotify_fd() {
            if let Err(e) = ctx.register(fd, c as u64) {
                log::error!("{}: cannot register its inotify fd: {e}", cap.name);
            }
        }
        if let Err(e) = cap.catch_up(&mut self.scratch, ctx) {
            log::warn!("{}: catch-up: {e}", cap.name);
        }
        true
    }

    /// Makes sure a stall check is queued. It is not moved at every frame
    /// (that would re-arm the timerfd 120 times a second for four cameras):
    /// when it fires early, `stall_check` queues it again from the last
    /// arrival.
    fn arm_stall(&mut self, c: usize, ctx: &mut Ctx<'_>) {
        let cap = &self.captures[c];
        if cap.stall_after_ms() == 0 || cap.stalled || ctx.is_scheduled(Self::timer(c, STALL)) {
            return;
        }
        let from = cap.last_arrival.unwrap_or(ctx.now);
        let _ = ctx.schedule(
            from.after_millis(cap.stall_after_ms()),
            Self::timer(c, STALL),
        );
    }

    /// Starts analyzer runs for waiting frames and registers their pipes and
    /// timeouts.
    fn run_analyzer(&mut self, c: usize, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        self.captures[c].run_analyzer(now, &mut self.scratch, &mut |slot, fd, deadline| {
            let _ = ctx.register(fd, PIPE | ((c as u64) << 16) | slot as u64);
            let _ = ctx.schedule(deadline, Self::timer(c, TIMEOUT + slot as u32));
        });
    }

    fn totals(&self) -> (Counters, analyzer::Counters) {
        let mut t = Counters::default();
        let mut a = analyzer::Counters::default();
        for cap in &self.captures {
            let c = &cap.counters;
            t.analysed += c.analysed;
            t.invalid += c.invalid;
            t.dark += c.dark;
            t.dropped += c.dropped;
            t.gaps += c.gaps;
            t.resets += c.resets;
            t.stalls += c.stalls;
            t.freezes += c.freezes;
            t.sidecars += c.sidecars;
            t.stale_sidecars += c.stale_sidecars;
            t.already_analysed += c.already_analysed;
            t.read_errors += c.read_errors;
            t.vanished += c.vanished;
            t.catch_up += c.catch_up;
            t.skipped += c.skipped;
            t.sidecar_failures += c.sidecar_failures;
            if let Some(an) = &cap.analyzer {
                a.runs += an.counters.runs;
                a.failures += an.counters.failures;
                a.timeouts += an.counters.timeouts;
                a.skipped += an.counters.skipped;
            }
        }
        (t, a)
    }
}

impl Service for Frames {
    fn name(&self) -> &'static str {
        "frames"
    }

    fn max_timers(&self) -> usize {
        self.captures
            .iter()
            .map(|c| 2 + c.analyzer.as_ref().map_or(0, |a| a.slots()))
            .sum()
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> io::Result<()> {
        for c in 0..self.captures.len() {
            self.open(c, ctx);
            self.run_analyzer(c, ctx);
            self.arm_stall(c, ctx);
            let cap = &self.captures[c];
            log::info!(
                "{}: watching {} for frames{}",
                cap.name,
                cap.dir_path.display(),
                if cap.analyzer.is_some() {
                    ", with an external analyzer"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    fn on_ready(&mut self, local: u64, ctx: &mut Ctx<'_>) {
        if local & PIPE != 0 {
            let c = ((local >> 16) & 0xFFFF) as usize;
            let slot = (local & 0xFFFF) as usize;
            if let Some(analyzer) = self
                .captures
                .get_mut(c)
                .and_then(|cap| cap.analyzer.as_mut())
            {
                if analyzer.read_output(slot) {
                    if let Some(fd) = analyzer.pipe(slot) {
                        let _ = ctx.deregister(fd);
                    }
                }
            }
            return;
        }
        let c = local as usize;
        let Some(cap) = self.captures.get_mut(c) else {
            return;
        };
        let lost = cap.on_events(&mut self.scratch, ctx);
        if lost {
            let _ = ctx.schedule(ctx.now.after_millis(RETRY_MS), Self::timer(c, RETRY));
        }
        self.run_analyzer(c, ctx);
        self.arm_stall(c, ctx);
    }

    fn on_timer(&mut self, id: u32, ctx: &mut Ctx<'_>) {
        let c = (id / TIMERS_PER_CAPTURE) as usize;
        let kind = id % TIMERS_PER_CAPTURE;
        if c >= self.captures.len() {
            return;
        }
        match kind {
            STALL => {
                if let Some(next) = self.captures[c].stall_check(ctx) {
                    let _ = ctx.schedule(next, Self::timer(c, STALL));
                }
            }
            RETRY if self.captures[c].inotify_fd().is_none() && self.open(c, ctx) => {
                self.run_analyzer(c, ctx);
            }
            k if k >= TIMEOUT => {
                if let Some(a) = self.captures[c].analyzer.as_mut() {
                    a.time_out((k - TIMEOUT) as usize, ctx.now);
                }
            }
            _ => {}
        }
    }

    fn on_child_exit(&mut self, pid: Pid, exit: ChildExit, ctx: &mut Ctx<'_>) -> bool {
        for c in 0..self.captures.len() {
            let Some(analyzer) = self.captures[c].analyzer.as_mut() else {
                continue;
            };
            let Some(slot) = analyzer.slot_of(pid) else {
                continue;
            };
            if let Some(fd) = analyzer.pipe(slot) {
                let _ = ctx.deregister(fd);
            }
            ctx.cancel(Self::timer(c, TIMEOUT + slot as u32));
            // The capture writes the sidecar, so the result is taken out of
            // the analyzer first (the analyzer path may allocate).
            let mut done = None;
            analyzer.finish(slot, exit, &mut |f| {
                let verdict = match f.verdict {
                    analyzer::Verdict::Object(raw) => Ok(raw.to_vec()),
                    analyzer::Verdict::Failed(why) => Err(why.to_string()),
                };
                done = Some((f.frame.clone(), verdict));
            });
            if let Some((frame, verdict)) = done {
                let verdict = match &verdict {
                    Ok(raw) => analyzer::Verdict::Object(raw),
                    Err(why) => analyzer::Verdict::Failed(why),
                };
                self.captures[c].analyzer_done(
                    analyzer::Finished {
                        frame: &frame,
                        verdict,
                    },
                    &mut self.scratch,
                );
            }
            self.run_analyzer(c, ctx);
            return true;
        }
        false
    }

    fn reload(&mut self, config: &Config, ctx: &mut Ctx<'_>) {
        if config.frames == self.config {
            return;
        }
        // The same capture directories in the same order: adopt the new
        // limits live, keeping watches, stream state and running analyzers.
        let same_dirs = config.frames.len() == self.config.len()
            && config
                .frames
                .iter()
                .zip(&self.config)
                .all(|(a, b)| a.name == b.name && a.dir == b.dir);
        if same_dirs {
            for (cap, cfg) in self.captures.iter_mut().zip(&config.frames) {
                cap.adopt(cfg);
            }
            self.config = config.frames.clone();
            for c in 0..self.captures.len() {
                ctx.cancel(Self::timer(c, STALL));
                self.arm_stall(c, ctx);
            }
            log::info!("frames: new limits adopted");
            return;
        }
        log::info!("frames: capture directories changed: rewatching");
        for (c, cap) in self.captures.iter().enumerate() {
            if let Some(fd) = cap.inotify_fd() {
                let _ = ctx.deregister(fd);
            }
            ctx.cancel(Self::timer(c, STALL));
            ctx.cancel(Self::timer(c, RETRY));
        }
        self.config = config.frames.clone();
        self.captures = self.config.iter().map(Capture::new).collect();
        for c in 0..self.captures.len() {
            self.open(c, ctx);
            self.arm_stall(c, ctx);
        }
    }

    fn report(&self, report: &mut Report) {
        let (t, a) = self.totals();
        report.counter("frames_analysed_total", "Frames analysed.", t.analysed);
        report.counter(
            "frames_invalid_total",
            "Frames that are not whole JPEGs (truncated, corrupt).",
            t.invalid,
        );
        report.counter(
            "frames_dark_total",
            "Frames far smaller than the recent median (black or blank).",
            t.dark,
        );
        report.counter(
            "frames_dropped_total",
            "Frames missing from the sequence.",
            t.dropped,
        );
        report.counter("sequence_gaps_total", "Gaps in the sequence.", t.gaps);
        report.counter(
            "sequence_resets_total",
            "Sequences that went backwards (capture restarts).",
            t.resets,
        );
        report.counter(
            "stalls_total",
            "Times no frame came for stall_after.",
            t.stalls,
        );
        report.counter(
            "freezes_total",
            "Runs of freeze_after identical frames.",
            t.freezes,
        );
        report.counter("sidecars_written_total", "Sidecars written.", t.sidecars);
        report.counter(
            "sidecar_failures_total",
            "Sidecars that could not be written.",
            t.sidecar_failures,
        );
        report.counter(
            "stale_sidecars_total",
            "Frames analysed again because their sidecar was older.",
            t.stale_sidecars,
        );
        report.counter(
            "already_analysed_total",
            "Frame events skipped because a current sidecar exists.",
            t.already_analysed,
        );
        report.counter(
            "read_errors_total",
            "Frames that could not be read (error sidecar written).",
            t.read_errors,
        );
        report.counter(
            "vanished_total",
            "Frames deleted before they could be analysed.",
            t.vanished,
        );
        report.counter(
            "catch_up_total",
            "Frames analysed by catch-up passes.",
            t.catch_up,
        );
        report.counter(
            "skipped_total",
            "Frames without a sidecar left alone by catch-up (older than the newest catch_up, or lost to a queue overflow).",
            t.skipped,
        );
        report.counter("analyzer_runs_total", "External analyzer runs.", a.runs);
        report.counter(
            "analyzer_failures_total",
            "External analyzer runs without a usable result.",
            a.failures,
        );
        report.counter(
            "analyzer_timeouts_total",
            "External analyzer runs killed at their timeout.",
            a.timeouts,
        );
        report.counter(
            "analyzer_skipped_total",
            "Frames skipped by a full analyzer queue (oldest first).",
            a.skipped,
        );
        report.watches = self
            .captures
            .iter()
            .filter(|c| c.inotify_fd().is_some())
            .count() as u64;
        for cap in &self.captures {
            if let Some(errno) = cap.dir_error {
                report.worsen(
                    Health::Unhealthy,
                    format_args!(
                        "{}: {}: {}",
                        cap.name,
                        cap.dir_path.display(),
                        io::Error::from_raw_os_error(errno)
                    ),
                );
            }
            if cap.stalled {
                report.worsen(
                    Health::Degraded,
                    format_args!("{}: frames stalled", cap.name),
                );
            }
            if cap.frozen {
                report.worsen(Health::Degraded, format_args!("{}: image frozen", cap.name));
            }
        }
    }

    fn details(&self, out: &mut [u8]) -> serde_json_core::ser::Result<usize> {
        serde_json_core::to_slice(
            &CapturesDoc(&self.captures, crate::sys::clock::Instant::now()),
            out,
        )
    }

    fn metrics(&self, out: &mut String) {
        let now = crate::sys::clock::Instant::now();
        let _ = writeln!(
            out,
            "# HELP edgekeeper_frames_fps Frames per second arriving in a capture directory.\n# TYPE edgekeeper_frames_fps gauge"
        );
        for cap in &self.captures {
            let _ = writeln!(
                out,
                "edgekeeper_frames_fps{{capture=\"{}\"}} {:.2}",
                cap.name,
                cap.fps(now)
            );
        }
        let _ = writeln!(
            out,
            "# HELP edgekeeper_frames_capture_analysed_total Frames analysed per capture.\n# TYPE edgekeeper_frames_capture_analysed_total counter"
        );
        for cap in &self.captures {
            let _ = writeln!(
                out,
                "edgekeeper_frames_capture_analysed_total{{capture=\"{}\"}} {}",
                cap.name, cap.counters.analysed
            );
        }
        let _ = writeln!(
            out,
            "# HELP edgekeeper_frames_stalled 1 while a capture has had no frame for stall_after.\n# TYPE edgekeeper_frames_stalled gauge"
        );
        for cap in &self.captures {
            let _ = writeln!(
                out,
                "edgekeeper_frames_stalled{{capture=\"{}\"}} {}",
                cap.name,
                u8::from(cap.stalled)
            );
        }
    }
}

struct CapturesDoc<'a>(&'a [Capture], crate::sys::clock::Instant);

impl Serialize for CapturesDoc<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for cap in self.0 {
            seq.serialize_element(&CaptureDoc(cap, self.1))?;
        }
        seq.end()
    }
}

struct CaptureDoc<'a>(&'a Capture, crate::sys::clock::Instant);

impl Serialize for CaptureDoc<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let mut last = heapless::String::<256>::new();
        for chunk in c.last_frame.utf8_chunks() {
            let _ = last.push_str(chunk.valid());
        }
        let mut st = s.serialize_struct("Capture", 10)?;
        st.serialize_field("name", c.name.as_str())?;
        st.serialize_field("dir", c.dir_path.to_str().unwrap_or("?"))?;
        st.serialize_field("fps", &((c.fps(self.1) * 100.0).round() / 100.0))?;
        st.serialize_field("last_frame", &(!last.is_empty()).then_some(last.as_str()))?;
        st.serialize_field("last_seq", &c.last_seq())?;
        st.serialize_field("stalled", &c.stalled)?;
        st.serialize_field("frozen", &c.frozen)?;
        st.serialize_field("analyzer_running", &c.analyzer.as_ref().map(|a| a.busy()))?;
        st.serialize_field("analyzer_queued", &c.analyzer.as_ref().map(|a| a.queued()))?;
        st.serialize_field("counters", &c.counters)?;
        st.end()
    }
}
