//! Scheduled jobs of the `storage` service: the cron entries it replaces.
//!
//! What it is: each configured job runs its command (an argv, no shell) at
//! a local time of day (`"02:00"`), a local time of week (`"Sun 03:00"`),
//! or every so long (`"6h"`, on the monotonic clock, the first run one
//! interval after start). The child gets a process group of its own; its
//! stdout and stderr are non-blocking pipes registered with the reactor,
//! split into lines in buffers made at start (a longer line is cut), and
//! each line goes to the field log. A timeout kills the whole group. The
//! exit is reaped by the daemon (SIGCHLD) and handed to
//! [`Jobs::on_child_exit`]: the outcome and duration are recorded, and a
//! failure (non-zero exit, a signal, a timeout, a command that cannot be
//! started) is logged and raised as a `job_failed` alert. A job never
//! overlaps itself: a run due while the previous one is still going is
//! skipped, logged and counted. With `catch_up`, a run missed while the
//! daemon was not running (the last run recorded in state.json is older
//! than the latest scheduled time) is made up once at start.
//!
//! Wall-clock schedules meet a monotonic reactor like this: the next run of
//! an `at` job is a wall time, computed by the pure [`next_run`] through
//! the C library's zone rules (DST included), and the one clock timer
//! sleeps towards it for at most [`CLOCK_CHECK_MS`] before looking at the
//! wall clock again, so a clock set by NTP on a board without a real-time
//! clock is noticed within a minute. A jump of more than [`JUMP_SECS`]
//! (the wall clock moved that much more or less than the monotonic one) is
//! a clock change, not elapsed time: the times passed over are not run
//! (they were "missed while off", which is `catch_up`'s business, so a
//! `catch_up` job is checked again against the corrected clock), and the
//! next runs are recomputed. [`Jobs::tick`] takes the wall time as an
//! argument: that is the seam tests drive.
//!
//! What it is not: cron. No minute/hour/month fields, no shell, no mail, no
//! environment of its own (a job inherits the daemon's), no runs queued up
//! behind a running one. It does not wait for the clock to be synchronised.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};

use crate::config::{Duration, Job, JobTime};
use crate::report::alerts::{Alert, AlertLevel, bounded};
use crate::services::{Counter, CounterKind, Ctx, Health, Report};
use crate::sys::clock::{Instant, WallTime};
use crate::sys::localtime;
use crate::sys::process::ChildExit;

/// Bytes of one output line kept; the rest of a longer line is dropped and
/// the line is logged cut, marked `…`.
pub const LINE: usize = 512;
/// Output lines logged per run; more are counted, and the count is logged
/// when the run ends (a chatty job cannot fill the field log).
pub const LINES_PER_RUN: u32 = 1000;
/// The clock timer never sleeps longer than this without reading the wall
/// clock again.
pub const CLOCK_CHECK_MS: u64 = 60_000;
/// A wall clock that moved this much more (or less) than the monotonic one
/// between two looks was set, not run.
pub const JUMP_SECS: i64 = 300;
/// Pipe reads per wake (4 KiB each): a job that writes without pause cannot
/// hold the loop.
const READS_PER_WAKE: usize = 16;
/// Pipe reads when the child has exited: more than a pipe holds.
const READS_AT_EXIT: usize = 64;
/// Bytes of a job's last output line kept for status.
const LAST_LINE: usize = 160;

/// Timer ids (before the caller's offset): the clock timer, then two per
/// job, its `every` timer and its timeout.
const CLOCK: u32 = 0;
fn every_timer(job: usize) -> u32 {
    1 + 2 * job as u32
}
fn timeout_timer(job: usize) -> u32 {
    2 + 2 * job as u32
}

const STDOUT: usize = 0;
const STDERR: usize = 1;

/// When a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// At a local time of day, or of one weekday.
    At(JobTime),
    /// Every so many milliseconds, on the monotonic clock.
    Every(u64),
}

impl Schedule {
    /// The schedule of a job; `None` for a job that has neither a valid
    /// `at` nor an `every` (validation refuses such a config).
    pub fn of(job: &Job) -> Option<Schedule> {
        match (&job.at, job.every) {
            (Some(at), _) => JobTime::parse(at).ok().map(Schedule::At),
            (None, Some(every)) => Some(Schedule::Every(every.as_millis().max(1))),
            (None, None) => None,
        }
    }
}

/// The first time strictly after `after` (seconds since the epoch) at which
/// `at` falls, in local time. Daily times step over days, weekly times to
/// the weekday; month and year ends and DST changes are the C library's
/// (`mktime` with `tm_isdst = -1`): a time that does not exist on the day
/// the clocks go forward is moved past the gap, a time that occurs twice
/// when they go back runs once. `None` if the C library cannot represent
/// the time (a 32-bit `time_t` after 2038).
pub fn next_run(at: JobTime, after: i64) -> Option<i64> {
    let today = localtime::local(after)?;
    let first = match at.weekday {
        None => 0,
        Some(w) => (i64::from(w) - i64::from(today.weekday)).rem_euclid(7),
    };
    let step = if at.weekday.is_some() { 7 } else { 1 };
    // Two candidates are enough in every real zone; a few more cover a zone
    // that skipped a whole day (Samoa, 2011-12-30).
    (0..4).map(|k| first + k * step).find_map(|days| {
        let t = localtime::from_local(
            today.year,
            today.month,
            i64::from(today.day) + days,
            u32::from(at.hour),
            u32::from(at.minute),
            0,
        )?;
        (t > after).then_some(t)
    })
}

/// Whether a run was due after `last_run` and by `now` (seconds since the
/// epoch): the `catch_up` question. A last run in the future (a clock set
/// back) has missed nothing.
pub fn missed_since(schedule: Schedule, last_run: i64, now: i64) -> bool {
    match schedule {
        Schedule::At(at) => next_run(at, last_run).is_some_and(|t| t <= now),
        Schedule::Every(ms) => {
            let due_ms = i128::from(last_run) * 1000 + i128::from(ms);
            due_ms <= i128::from(now) * 1000
        }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit status 0.
    Ok,
    /// A non-zero exit status.
    Failed,
    /// Killed by a signal (other than a timeout's).
    Signaled,
    /// Ran past its timeout and was killed.
    TimedOut,
    /// The command could not be started (not found, not executable).
    SpawnError,
}

/// The last finished run of a job: what status shows and state.json keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LastRun {
    /// When it started, in seconds since the epoch.
    pub started: i64,
    pub outcome: Outcome,
    /// The exit status, or 128 + the signal number (as a shell's `$?`);
    /// `None` when the command did not start.
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
}

/// Counters of one job, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub runs: u64,
    pub failures: u64,
    pub timeouts: u64,
    pub skipped_overlaps: u64,
    pub output_lines: u64,
}

/// One output stream of a running job.
struct Stream {
    pipe: Option<File>,
    lines: Lines,
}

/// Splits bytes into lines in a buffer of fixed capacity.
struct Lines {
    buf: Vec<u8>,
    /// The line being gathered outgrew the buffer; its rest is dropped.
    cut: bool,
}

impl Lines {
    fn with_capacity(bytes: usize) -> Lines {
        Lines {
            buf: Vec::with_capacity(bytes),
            cut: false,
        }
    }

    /// Feeds bytes; calls `line(text, cut)` for each line they complete.
    fn feed(&mut self, mut bytes: &[u8], line: &mut dyn FnMut(&[u8], bool)) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.append(&bytes[..nl]);
            self.emit(line);
            bytes = &bytes[nl + 1..];
        }
        self.append(bytes);
    }

    /// The stream ended: a last line without a newline is still a line.
    fn finish(&mut self, line: &mut dyn FnMut(&[u8], bool)) {
        if !self.buf.is_empty() || self.cut {
            self.emit(line);
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        let room = self.buf.capacity() - self.buf.len();
        if bytes.len() > room {
            self.cut = true;
        }
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn emit(&mut self, line: &mut dyn FnMut(&[u8], bool)) {
        let text = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
        line(text, self.cut);
        self.buf.clear();
        self.cut = false;
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.cut = false;
    }
}

/// Bytes shown as text, invalid UTF-8 as U+FFFD, without allocating.
struct Lossy<'a>(&'a [u8]);

impl std::fmt::Display for Lossy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            if !chunk.invalid().is_empty() {
                f.write_char('\u{FFFD}')?;
            }
        }
        Ok(())
    }
}

/// A run in progress.
struct Run {
    pid: Pid,
    started: Instant,
    started_wall: i64,
    timed_out: bool,
    /// Lines logged, and lines beyond [`LINES_PER_RUN`] not logged.
    logged: u32,
    unlogged: u64,
}

/// Why a run starts, for the log.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    Scheduled,
    CatchUp,
}

struct Entry {
    name: String,
    command: Vec<String>,
    schedule: Option<Schedule>,
    /// `"02:00"`, `"Sun 03:00"` or `"every 6h"`, for status.
    label: heapless::String<48>,
    timeout: Option<Duration>,
    catch_up: bool,
    /// `at` jobs: the next run, in seconds since the epoch.
    due: Option<i64>,
    /// `every` jobs: the next run on the monotonic clock.
    next_every: Option<Instant>,
    /// The next run as a wall time, for status (both kinds).
    next_wall: Option<i64>,
    catch_up_pending: bool,
    run: Option<Run>,
    streams: [Stream; 2],
    last: Option<LastRun>,
    last_stdout: heapless::String<LAST_LINE>,
    last_stderr: heapless::String<LAST_LINE>,
    counters: Counters,
}

/// The scheduled jobs of the storage service.
///
/// Timer ids `first_timer .. first_timer + max_timers()` and tokens
/// `first_token .. first_token + 2 × jobs` (local to the storage service)
/// belong to the jobs; the caller strips the offsets before calling
/// [`Jobs::on_timer`] and [`Jobs::on_ready`].
pub struct Jobs {
    entries: Vec<Entry>,
    first_timer: u32,
    first_token: u64,
    /// Wall minus monotonic milliseconds at the last look, to tell a clock
    /// that was set from time that passed.
    offset_ms: Option<i64>,
    clock_jumps: u64,
    message: String,
}

impl Jobs {
    pub fn new(jobs: &[Job]) -> Jobs {
        let entries = jobs
            .iter()
            .map(|j| {
                let schedule = Schedule::of(j);
                let mut label = heapless::String::new();
                match (&j.at, j.every) {
                    (Some(at), _) => label = bounded(at),
                    (None, Some(every)) => {
                        let _ = write!(label, "every {every}");
                    }
                    (None, None) => {}
                }
                Entry {
                    name: j.name.clone(),
                    command: j.command.clone(),
                    schedule,
                    label,
                    timeout: j.timeout,
                    catch_up: j.catch_up,
                    due: None,
                    next_every: None,
                    next_wall: None,
                    catch_up_pending: false,
                    run: None,
                    streams: [(); 2].map(|()| Stream {
                        pipe: None,
                        lines: Lines::with_capacity(LINE),
                    }),
                    last: None,
                    last_stdout: heapless::String::new(),
                    last_stderr: heapless::String::new(),
                    counters: Counters::default(),
                }
            })
            .collect();
        Jobs {
            entries,
            first_timer: 0,
            first_token: 0,
            offset_ms: None,
            clock_jumps: 0,
            message: String::with_capacity(256),
        }
    }

    /// How many timer ids the jobs may have queued at once.
    pub fn max_timers(&self) -> usize {
        1 + 2 * self.entries.len()
    }

    /// Tokens the jobs use from `first_token` on (stdout and stderr of each).
    pub fn max_tokens(&self) -> u64 {
        2 * self.entries.len() as u64
    }

    /// Computes the first runs and queues the timers; a `catch_up` job that
    /// missed a run is started from the loop's first turn. Call
    /// [`Jobs::restore_state`] before this.
    pub fn start(
        &mut self,
        ctx: &mut Ctx<'_>,
        first_timer: u32,
        first_token: u64,
    ) -> io::Result<()> {
        self.first_timer = first_timer;
        self.first_token = first_token;
        localtime::refresh();
        let wall = ctx.wall;
        self.offset_ms = Some(offset_ms(wall, ctx.now));
        for i in 0..self.entries.len() {
            let e = &mut self.entries[i];
            match e.schedule {
                None => {
                    log::error!(
                        "job {}: no valid schedule (at \"{}\"): never run",
                        e.name,
                        e.label
                    );
                    continue;
                }
                Some(Schedule::At(at)) => {
                    e.due = first_due(at, wall.secs, e.last.map(|l| l.started));
                    e.next_wall = e.due;
                    if e.due.is_none() {
                        log::error!("job {}: no next run of \"{}\" exists", e.name, e.label);
                    }
                }
                Some(Schedule::Every(ms)) => {
                    e.next_every = Some(ctx.now.after_millis(ms));
                    e.next_wall = Some(wall.secs + (ms / 1000) as i64);
                    let at = ctx.now.after_millis(ms);
                    self.queue(ctx, every_timer(i), at);
                }
            }
            let e = &mut self.entries[i];
            if let (true, Some(schedule), Some(last)) = (e.catch_up, e.schedule, e.last) {
                if missed_since(schedule, last.started, wall.secs) {
                    log::info!(
                        "job {}: last run {} missed a scheduled run: catching up once now",
                        e.name,
                        WallTime::from_secs(last.started).iso_secs()
                    );
                    e.catch_up_pending = true;
                }
            }
        }
        self.arm_clock(wall, ctx);
        Ok(())
    }

    /// A timer of the jobs is due (`id` without the caller's offset).
    pub fn on_timer(&mut self, id: u32, ctx: &mut Ctx<'_>) {
        if id == CLOCK {
            let wall = ctx.wall;
            self.tick(wall, ctx);
            return;
        }
        let i = ((id - 1) / 2) as usize;
        if i >= self.entries.len() {
            return;
        }
        if id == every_timer(i) {
            self.every_due(i, ctx);
        } else {
            self.time_out(i, ctx.now);
        }
    }

    /// The wall clock says `wall`: runs the `at` jobs (and catch-ups) that
    /// are due, notices a clock that was set, and queues the next look.
    /// The clock timer calls it with `ctx.wall`; tests call it with the
    /// wall time they want (keeping `ctx.now` in step, or not, to jump).
    pub fn tick(&mut self, wall: WallTime, ctx: &mut Ctx<'_>) {
        let offset = offset_ms(wall, ctx.now);
        let jumped = self
            .offset_ms
            .map(|prev| offset - prev)
            .filter(|moved| moved.abs() > JUMP_SECS * 1000);
        self.offset_ms = Some(offset);
        if let Some(moved) = jumped {
            self.clock_jumped(moved, wall);
        }
        for i in 0..self.entries.len() {
            if self.entries[i].catch_up_pending {
                self.entries[i].catch_up_pending = false;
                self.launch(i, Why::CatchUp, wall, ctx);
            }
            let e = &mut self.entries[i];
            let Some(Schedule::At(at)) = e.schedule else {
                continue;
            };
            if e.due.is_none() {
                e.due = first_due(at, wall.secs, e.last.map(|l| l.started));
            }
            if let Some(due) = e.due.filter(|&due| due <= wall.secs) {
                e.due = next_run(at, wall.secs.max(due));
                self.launch(i, Why::Scheduled, wall, ctx);
            }
            let e = &mut self.entries[i];
            e.next_wall = e.due;
        }
        self.arm_clock(wall, ctx);
    }

    /// The wall clock was set by `moved_ms`: times passed over are missed,
    /// not due; `catch_up` jobs are asked again with the corrected clock.
    fn clock_jumped(&mut self, moved_ms: i64, wall: WallTime) {
        self.clock_jumps += 1;
        localtime::refresh();
        log::warn!(
            "the wall clock was set {} by {} s (now {}): next job runs recomputed",
            if moved_ms > 0 { "forward" } else { "back" },
            moved_ms.abs() / 1000,
            wall.iso_secs()
        );
        for e in &mut self.entries {
            if matches!(e.schedule, Some(Schedule::At(_))) {
                e.due = None;
            }
            if let (true, Some(schedule), Some(last)) = (e.catch_up, e.schedule, e.last) {
                if e.run.is_none() && missed_since(schedule, last.started, wall.secs) {
                    log::info!(
                        "job {}: last run {} missed a scheduled run: catching up once now",
                        e.name,
                        WallTime::from_secs(last.started).iso_secs()
                    );
                    e.catch_up_pending = true;
                }
            }
        }
    }

    /// Queues the clock timer for the earliest `at` run, at most
    /// [`CLOCK_CHECK_MS`] away; not at all if no job needs the wall clock.
    fn arm_clock(&mut self, wall: WallTime, ctx: &mut Ctx<'_>) {
        let mut needed = false;
        let mut wait_ms = CLOCK_CHECK_MS;
        let wall_ms = wall.secs.saturating_mul(1000) + i64::from(wall.millis);
        for e in &self.entries {
            if e.catch_up_pending {
                wait_ms = 0;
            }
            match e.schedule {
                Some(Schedule::At(_)) => needed = true,
                // A clock change may make a catch-up due.
                Some(Schedule::Every(_)) if e.catch_up => needed = true,
                _ => {}
            }
            if let Some(due) = e.due {
                let ms = due.saturating_mul(1000).saturating_sub(wall_ms).max(0) as u64;
                wait_ms = wait_ms.min(ms);
            }
        }
        if needed || wait_ms == 0 {
            let at = ctx.now.after_millis(wait_ms);
            self.queue(ctx, CLOCK, at);
        }
    }

    /// The `every` timer of job `i` fired.
    fn every_due(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        let Some(Schedule::Every(ms)) = self.entries[i].schedule else {
            return;
        };
        let Some(next) = self.entries[i].next_every else {
            return;
        };
        if next <= ctx.now {
            let wall = ctx.wall;
            self.launch(i, Why::Scheduled, wall, ctx);
        }
        let e = &mut self.entries[i];
        let mut next = if next <= ctx.now {
            next.after_millis(ms)
        } else {
            next
        };
        if next <= ctx.now {
            // Far behind (a stopped loop): the next run an interval from now.
            next = ctx.now.after_millis(ms);
        }
        e.next_every = Some(next);
        e.next_wall = Some(ctx.wall.secs + (next.millis_since(ctx.now) / 1000) as i64);
        self.queue(ctx, every_timer(i), next);
    }

    /// Starts a run of job `i`, unless one is still going (then skipped).
    fn launch(&mut self, i: usize, why: Why, wall: WallTime, ctx: &mut Ctx<'_>) {
        let first_token = self.first_token;
        let e = &mut self.entries[i];
        if let Some(run) = &e.run {
            e.counters.skipped_overlaps += 1;
            log::warn!(
                "job {}: still running (pid {}, for {} s): this run is skipped",
                e.name,
                run.pid,
                ctx.now.millis_since(run.started) / 1000
            );
            return;
        }
        let Some((program, args)) = e.command.split_first() else {
            return;
        };
        e.counters.runs += 1;
        e.last_stdout.clear();
        e.last_stderr.clear();
        let spawned = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own: a timeout kills what the job started too.
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => {
                self.message.clear();
                let _ = write!(self.message, "cannot run {program}: {err}");
                let last = LastRun {
                    started: wall.secs,
                    outcome: Outcome::SpawnError,
                    exit_code: None,
                    duration_ms: 0,
                };
                self.finished(i, last, ctx);
                return;
            }
        };
        let pid = Pid::from_raw(child.id() as i32);
        let pipes = [
            child.stdout.take().map(OwnedFd::from),
            child.stderr.take().map(OwnedFd::from),
        ];
        // Reaped by the daemon through SIGCHLD; the handle is dropped
        // without waiting.
        drop(child);
        for (s, pipe) in pipes.into_iter().enumerate() {
            let stream = &mut e.streams[s];
            stream.lines.clear();
            stream.pipe = pipe.map(File::from);
            if let Some(pipe) = &stream.pipe {
                let registered = fcntl(pipe.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                    .map_err(io::Error::from)
                    .and_then(|_| {
                        ctx.register(pipe.as_fd(), first_token + 2 * i as u64 + s as u64)
                    });
                if let Err(err) = registered {
                    // Unread, the pipe would fill and stall the job: it is
                    // closed instead (a job that writes to it gets EPIPE).
                    log::warn!("job {}: cannot read its output ({err}): closed", e.name);
                    stream.pipe = None;
                }
            }
        }
        e.run = Some(Run {
            pid,
            started: ctx.now,
            started_wall: wall.secs,
            timed_out: false,
            logged: 0,
            unlogged: 0,
        });
        let catching_up = if why == Why::CatchUp {
            " (catch-up)"
        } else {
            ""
        };
        log::info!("job {}: started{catching_up}, pid {pid}", e.name);
        if let Some(t) = e.timeout {
            let at = ctx.now.after_millis(t.as_millis());
            self.queue(ctx, timeout_timer(i), at);
        }
    }

    /// The run of job `i` passed its timeout: kill its process group (the
    /// exit comes later, through [`Jobs::on_child_exit`]).
    fn time_out(&mut self, i: usize, now: Instant) {
        let e = &mut self.entries[i];
        let (Some(run), Some(timeout)) = (e.run.as_mut(), e.timeout) else {
            return;
        };
        if run.timed_out || now.millis_since(run.started) < timeout.as_millis() {
            return;
        }
        run.timed_out = true;
        log::warn!(
            "job {}: still running after its timeout of {timeout}: killing it (pid {}) and its process group",
            e.name,
            run.pid
        );
        let _ = kill(Pid::from_raw(-run.pid.as_raw()), Signal::SIGKILL);
    }

    /// An output pipe is readable (`local` without the caller's offset).
    pub fn on_ready(&mut self, local: u64, ctx: &mut Ctx<'_>) {
        let i = (local / 2) as usize;
        let s = (local % 2) as usize;
        if i >= self.entries.len() {
            return;
        }
        if self.pump(i, s, READS_PER_WAKE) {
            self.close(i, s, ctx);
        }
    }

    /// Reads what stream `s` of job `i` has (at most `reads` reads),
    /// logging whole lines. True when the stream ended (end of file or an
    /// error).
    fn pump(&mut self, i: usize, s: usize, reads: usize) -> bool {
        self.with_stream(i, s, |stream, line| {
            let mut scratch = [0u8; 4096];
            for _ in 0..reads {
                let Some(pipe) = stream.pipe.as_mut() else {
                    return true;
                };
                match pipe.read(&mut scratch) {
                    Ok(0) => {
                        stream.lines.finish(line);
                        return true;
                    }
                    Ok(n) => stream.lines.feed(&scratch[..n], line),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        stream.lines.finish(line);
                        return true;
                    }
                }
            }
            false
        })
    }

    /// Calls `f` with stream `s` of job `i` and what to do with each line
    /// of it.
    fn with_stream<R>(
        &mut self,
        i: usize,
        s: usize,
        f: impl FnOnce(&mut Stream, &mut dyn FnMut(&[u8], bool)) -> R,
    ) -> R {
        let Entry {
            name,
            streams,
            run,
            last_stdout,
            last_stderr,
            counters,
            ..
        } = &mut self.entries[i];
        let last = if s == STDOUT {
            last_stdout
        } else {
            last_stderr
        };
        let mut line = |text: &[u8], cut: bool| {
            counters.output_lines += 1;
            last.clear();
            let _ = write!(crate::services::Bounded(last), "{}", Lossy(text));
            let Some(run) = run.as_mut() else { return };
            if run.logged >= LINES_PER_RUN {
                run.unlogged += 1;
                return;
            }
            run.logged += 1;
            let mark = if cut { "…" } else { "" };
            if s == STDERR {
                log::warn!("job {name}: {}{mark}", Lossy(text));
            } else {
                log::info!("job {name}: {}{mark}", Lossy(text));
            }
        };
        f(&mut streams[s], &mut line)
    }

    /// Deregisters and closes stream `s` of job `i`.
    fn close(&mut self, i: usize, s: usize, ctx: &mut Ctx<'_>) {
        if let Some(pipe) = self.entries[i].streams[s].pipe.take() {
            let _ = ctx.deregister(pipe.as_fd());
        }
    }

    /// A child exited; true if it was a job's. Its remaining output is
    /// read (a grandchild that keeps the pipe open cannot make us wait),
    /// and the outcome recorded, logged and, on failure, alerted.
    pub fn on_child_exit(&mut self, pid: Pid, exit: ChildExit, ctx: &mut Ctx<'_>) -> bool {
        let Some(i) = self
            .entries
            .iter()
            .position(|e| e.run.as_ref().is_some_and(|r| r.pid == pid))
        else {
            return false;
        };
        for s in [STDOUT, STDERR] {
            if !self.pump(i, s, READS_AT_EXIT) {
                // Still open (a grandchild holds it): what is gathered of
                // a line is logged, the rest is not waited for.
                self.with_stream(i, s, |stream, line| stream.lines.finish(line));
            }
            self.close(i, s, ctx);
        }
        ctx.cancel(self.first_timer + timeout_timer(i));
        let e = &mut self.entries[i];
        let Some(run) = e.run.take() else {
            return true;
        };
        if run.unlogged > 0 {
            log::warn!(
                "job {}: {} more output line(s) not logged (at most {LINES_PER_RUN} per run)",
                e.name,
                run.unlogged
            );
        }
        let duration_ms = ctx.now.millis_since(run.started);
        let (outcome, exit_code) = match exit {
            _ if run.timed_out => (Outcome::TimedOut, Some(exit_code(exit))),
            ChildExit::Exited(0) => (Outcome::Ok, Some(0)),
            ChildExit::Exited(code) => (Outcome::Failed, Some(code)),
            ChildExit::Signaled(_) => (Outcome::Signaled, Some(exit_code(exit))),
        };
        self.message.clear();
        let _ = match exit {
            _ if run.timed_out => write!(
                self.message,
                "timed out after {} and was killed",
                e.timeout.unwrap_or_default()
            ),
            ChildExit::Exited(code) => write!(self.message, "exited with status {code}"),
            ChildExit::Signaled(sig) => write!(self.message, "killed by {sig}"),
        };
        let last = LastRun {
            started: run.started_wall,
            outcome,
            exit_code,
            duration_ms,
        };
        self.finished(i, last, ctx);
        true
    }

    /// Records a finished run (the message says how it ended), logs it,
    /// and raises `job_failed` unless it succeeded.
    fn finished(&mut self, i: usize, last: LastRun, ctx: &mut Ctx<'_>) {
        let e = &mut self.entries[i];
        e.last = Some(last);
        *ctx.state_changed = true;
        if last.outcome == Outcome::Ok {
            log::info!("job {}: done in {} ms", e.name, last.duration_ms);
            return;
        }
        e.counters.failures += 1;
        if last.outcome == Outcome::TimedOut {
            e.counters.timeouts += 1;
        }
        // The last stderr line usually says why.
        if !e.last_stderr.is_empty() {
            let _ = write!(self.message, ": {}", e.last_stderr);
        }
        log::warn!(
            "job {}: failed after {} ms: {}",
            e.name,
            last.duration_ms,
            self.message
        );
        ctx.raise(&Alert {
            level: AlertLevel::Warning,
            kind: "job_failed",
            source: &e.name,
            message: &self.message,
            value: last.exit_code.map(f64::from),
        });
    }

    /// Health and counters for the status snapshot: a job whose last run
    /// failed makes the service degraded until a run succeeds.
    pub fn report(&self, report: &mut Report) {
        let mut total = Counters::default();
        let mut running = 0;
        for e in &self.entries {
            total.runs += e.counters.runs;
            total.failures += e.counters.failures;
            total.timeouts += e.counters.timeouts;
            total.skipped_overlaps += e.counters.skipped_overlaps;
            running += u64::from(e.run.is_some());
            if let Some(last) = e.last.filter(|l| l.outcome != Outcome::Ok) {
                report.worsen(
                    Health::Degraded,
                    format_args!(
                        "job {}: last run {} failed ({})",
                        e.name,
                        WallTime::from_secs(last.started).iso_secs(),
                        outcome_text(last.outcome)
                    ),
                );
            }
        }
        report.counter("job_runs_total", "Scheduled job runs started.", total.runs);
        report.counter(
            "job_failures_total",
            "Job runs that failed: non-zero exit, signal, timeout or not started.",
            total.failures,
        );
        report.counter(
            "job_timeouts_total",
            "Job runs killed at their timeout.",
            total.timeouts,
        );
        report.counter(
            "job_overlaps_skipped_total",
            "Job runs skipped because the previous run was still going.",
            total.skipped_overlaps,
        );
        report.counter(
            "job_clock_jumps_total",
            "Times the wall clock was seen set, and job runs recomputed.",
            self.clock_jumps,
        );
        report.gauge("jobs_running", "Job runs in progress.", running);
        for e in &self.entries {
            let failed = e.last.is_some_and(|l| l.outcome != Outcome::Ok);
            report.labelled(
                Counter {
                    name: "job_last_failed",
                    help: "1 if the job's last run failed.",
                    kind: CounterKind::Gauge,
                    value: u64::from(failed),
                },
                "job",
                &e.name,
            );
        }
    }

    /// The daemon stops: running jobs get SIGTERM to their process group
    /// (systemd kills what is left of the service's cgroup). Their runs are
    /// not recorded, so a `catch_up` job runs again at the next start.
    pub fn stop(&mut self, ctx: &mut Ctx<'_>) {
        for i in 0..self.entries.len() {
            if let Some(run) = &self.entries[i].run {
                log::warn!(
                    "job {}: still running at stop: SIGTERM to its process group (pid {})",
                    self.entries[i].name,
                    run.pid
                );
                let _ = kill(Pid::from_raw(-run.pid.as_raw()), Signal::SIGTERM);
            }
            for s in [STDOUT, STDERR] {
                self.close(i, s, ctx);
            }
            ctx.cancel(self.first_timer + every_timer(i));
            ctx.cancel(self.first_timer + timeout_timer(i));
        }
        ctx.cancel(self.first_timer + CLOCK);
    }

    /// What state.json keeps: the last finished run of each job (a JSON
    /// array; serialise it with serde-json-core).
    pub fn save_state(&self) -> SavedJobs<'_> {
        SavedJobs(self)
    }

    /// Takes back what [`Jobs::save_state`] wrote before a restart; call it
    /// before [`Jobs::start`]. Jobs are matched by name; others are ignored.
    pub fn restore_state(&mut self, saved: &serde_json::Value) {
        match Vec::<SavedJob>::deserialize(saved) {
            Ok(saved) => {
                for s in saved {
                    if let Some(e) = self.entries.iter_mut().find(|e| e.name == s.name) {
                        e.last = Some(LastRun {
                            started: s.started,
                            outcome: s.outcome,
                            exit_code: s.exit_code,
                            duration_ms: s.duration_ms,
                        });
                    }
                }
            }
            Err(err) => log::warn!("jobs: saved state unreadable ({err}); starting without it"),
        }
    }

    /// The jobs for `services.storage.details` in status.json: a JSON array
    /// of one object per job (serialise it with serde-json-core).
    pub fn details(&self) -> Details<'_> {
        Details(self)
    }

    fn queue(&self, ctx: &mut Ctx<'_>, id: u32, at: Instant) {
        if ctx.schedule(at, self.first_timer + id).is_err() {
            log::error!("jobs: deadline queue full; timer {id} dropped");
        }
    }
}

/// The first run of `at` from `now` on (a run due this very second is due),
/// after start or a clock change. A clock set back less than a week does
/// not run again a time the last run already covered; a last run further
/// ahead than that says the clock is far off, and is not waited for.
fn first_due(at: JobTime, now: i64, last_run: Option<i64>) -> Option<i64> {
    const WEEK: i64 = 7 * 86_400;
    let from = match last_run {
        Some(last) if last >= now && last - now <= WEEK => last,
        _ => now - 1,
    };
    next_run(at, from)
}

/// Wall clock minus monotonic clock, in milliseconds.
fn offset_ms(wall: WallTime, now: Instant) -> i64 {
    let wall_ms = wall.secs.saturating_mul(1000) + i64::from(wall.millis);
    wall_ms - (now.as_nanos() / 1_000_000) as i64
}

/// A shell's `$?` for an exit.
fn exit_code(exit: ChildExit) -> i32 {
    match exit {
        ChildExit::Exited(code) => code,
        ChildExit::Signaled(sig) => 128 + sig as i32,
    }
}

fn outcome_text(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Failed => "non-zero exit status",
        Outcome::Signaled => "killed by a signal",
        Outcome::TimedOut => "timed out",
        Outcome::SpawnError => "could not be started",
    }
}

/// One job in state.json.
#[derive(Deserialize)]
struct SavedJob {
    name: String,
    started: i64,
    outcome: Outcome,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    duration_ms: u64,
}

#[derive(Serialize)]
struct SavedJobRef<'a> {
    name: &'a str,
    started: i64,
    outcome: Outcome,
    exit_code: Option<i32>,
    duration_ms: u64,
}

/// The jobs' piece of state.json, borrowed from the live jobs.
pub struct SavedJobs<'a>(&'a Jobs);

impl Serialize for SavedJobs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        for e in &self.0.entries {
            if let Some(last) = e.last {
                seq.serialize_element(&SavedJobRef {
                    name: &e.name,
                    started: last.started,
                    outcome: last.outcome,
                    exit_code: last.exit_code,
                    duration_ms: last.duration_ms,
                })?;
            }
        }
        seq.end()
    }
}

/// Seconds since the epoch shown as ISO 8601 UTC.
struct Iso(i64);

impl Serialize for Iso {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&WallTime::from_secs(self.0).iso_secs())
    }
}

#[derive(Serialize)]
struct JobView<'a> {
    name: &'a str,
    schedule: &'a str,
    catch_up: bool,
    timeout_ms: Option<u64>,
    next_run: Option<Iso>,
    running_pid: Option<i32>,
    running_since: Option<Iso>,
    last_run: Option<Iso>,
    last_outcome: Option<Outcome>,
    last_exit_code: Option<i32>,
    last_duration_ms: Option<u64>,
    last_stdout: &'a str,
    last_stderr: &'a str,
    runs: u64,
    failures: u64,
    timeouts: u64,
    skipped_overlaps: u64,
    output_lines: u64,
}

/// The jobs' part of status details, borrowed from the live jobs.
pub struct Details<'a>(&'a Jobs);

impl Serialize for Details<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        for e in &self.0.entries {
            seq.serialize_element(&JobView {
                name: &e.name,
                schedule: &e.label,
                catch_up: e.catch_up,
                timeout_ms: e.timeout.map(Duration::as_millis),
                next_run: e.next_wall.map(Iso),
                running_pid: e.run.as_ref().map(|r| r.pid.as_raw()),
                running_since: e.run.as_ref().map(|r| Iso(r.started_wall)),
                last_run: e.last.map(|l| Iso(l.started)),
                last_outcome: e.last.map(|l| l.outcome),
                last_exit_code: e.last.and_then(|l| l.exit_code),
                last_duration_ms: e.last.map(|l| l.duration_ms),
                last_stdout: &e.last_stdout,
                last_stderr: &e.last_stderr,
                runs: e.counters.runs,
                failures: e.counters.failures,
                timeouts: e.counters.timeouts,
                skipped_overlaps: e.counters.skipped_overlaps,
                output_lines: e.counters.output_lines,
            })?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::reactor::{Reactor, TimerId, Wake};
    use crate::report::alerts::Alerts;
    use crate::services::TOKEN_OWNER_SHIFT;
    use crate::sys::localtime::{from_local, local};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

    const OWNER: u16 = 1;
    /// The offsets the storage service gives the jobs.
    const FIRST_TIMER: u32 = 1000;
    const FIRST_TOKEN: u64 = 1 << 32;

    fn job(name: &str, at: Option<&str>, every_ms: Option<u64>, command: &[&str]) -> Job {
        Job {
            name: name.to_string(),
            at: at.map(str::to_string),
            every: every_ms.map(Duration::from_millis),
            command: command.iter().map(|s| s.to_string()).collect(),
            timeout: None,
            catch_up: false,
        }
    }

    fn time(text: &str) -> JobTime {
        JobTime::parse(text).unwrap()
    }

    /// A local time on a day without DST changes anywhere (mid-January).
    fn jan(day: i64, hour: u32, minute: u32, second: u32) -> i64 {
        from_local(2026, 1, day, hour, minute, second).unwrap()
    }

    /// A reactor, alerts and the loop around the jobs, on real clocks. It
    /// reaps only the jobs' own children (other tests run in this process)
    /// and leaves the clock timer to the test, which calls `tick` with the
    /// wall time it wants.
    struct Rig {
        reactor: Reactor,
        alerts: Alerts,
        state_changed: bool,
        /// (job, pid) in the order runs were seen to start.
        started: Vec<(usize, Pid)>,
        exits: Vec<(Pid, ChildExit)>,
    }

    impl Rig {
        fn new() -> Rig {
            Rig {
                reactor: Reactor::new(&[], 64, 16).unwrap(),
                alerts: Alerts::new(&config::Alerts::default()),
                state_changed: false,
                started: Vec::new(),
                exits: Vec::new(),
            }
        }

        fn with<R>(
            &mut self,
            now: Instant,
            wall: WallTime,
            f: impl FnOnce(&mut Ctx<'_>) -> R,
        ) -> R {
            let mut ctx = Ctx {
                reactor: &mut self.reactor,
                alerts: &mut self.alerts,
                now,
                wall,
                state_changed: &mut self.state_changed,
                owner: OWNER,
            };
            f(&mut ctx)
        }

        fn start(&mut self, jobs: &mut Jobs, now: Instant, wall: i64) {
            self.with(now, WallTime::from_secs(wall), |ctx| {
                jobs.start(ctx, FIRST_TIMER, FIRST_TOKEN).unwrap()
            });
        }

        fn tick(&mut self, jobs: &mut Jobs, now: Instant, wall: i64) {
            self.with(now, WallTime::from_secs(wall), |ctx| {
                jobs.tick(WallTime::from_secs(wall), ctx)
            });
            self.note_runs(jobs);
        }

        /// Runs the loop until `done` or `ms` pass: pipes, the jobs' `every`
        /// and timeout timers, and exits of their children go to `jobs`.
        fn drive(&mut self, jobs: &mut Jobs, ms: u64, done: impl Fn(&Jobs) -> bool) {
            let begin = Instant::now();
            loop {
                self.note_runs(jobs);
                if done(jobs) || Instant::now().millis_since(begin) > ms {
                    return;
                }
                let wakes = self.reactor.poll(Some(10)).unwrap().to_vec();
                for wake in wakes {
                    let (now, wall) = (Instant::now(), WallTime::now());
                    self.with(now, wall, |ctx| match wake {
                        Wake::Ready(token) => {
                            assert_eq!(token.0 >> TOKEN_OWNER_SHIFT, u64::from(OWNER));
                            let local = token.0 & ((1 << TOKEN_OWNER_SHIFT) - 1);
                            jobs.on_ready(local - FIRST_TOKEN, ctx);
                        }
                        Wake::Deadline(TimerId { id, .. }) if id != FIRST_TIMER + CLOCK => {
                            jobs.on_timer(id - FIRST_TIMER, ctx)
                        }
                        _ => {}
                    });
                }
                self.note_runs(jobs);
                self.reap(jobs);
            }
        }

        /// Records runs that started, checking that a job's new run never
        /// starts before its previous child was reaped.
        fn note_runs(&mut self, jobs: &Jobs) {
            for (i, e) in jobs.entries.iter().enumerate() {
                let Some(run) = &e.run else { continue };
                if self.started.contains(&(i, run.pid)) {
                    continue;
                }
                for &(j, earlier) in &self.started {
                    assert!(
                        j != i || self.exits.iter().any(|x| x.0 == earlier),
                        "job {i}: pid {} started while pid {earlier} was alive",
                        run.pid
                    );
                }
                self.started.push((i, run.pid));
            }
        }

        fn reap(&mut self, jobs: &mut Jobs) {
            let pids: Vec<Pid> = jobs
                .entries
                .iter()
                .filter_map(|e| e.run.as_ref().map(|r| r.pid))
                .collect();
            for pid in pids {
                let exit = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => ChildExit::Exited(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => ChildExit::Signaled(sig),
                    _ => continue,
                };
                self.exits.push((pid, exit));
                let claimed = self.with(Instant::now(), WallTime::now(), |ctx| {
                    jobs.on_child_exit(pid, exit, ctx)
                });
                assert!(claimed, "pid {pid} is a job's");
            }
        }

        /// Stops the jobs and waits for what is left of their children.
        fn finish(&mut self, jobs: &mut Jobs) {
            let pids: Vec<Pid> = jobs
                .entries
                .iter()
                .filter_map(|e| e.run.as_ref().map(|r| r.pid))
                .collect();
            self.with(Instant::now(), WallTime::now(), |ctx| jobs.stop(ctx));
            for pid in pids {
                let _ = waitpid(pid, None);
            }
        }

        fn job_failed(&self, source: &str) -> Option<(String, Option<f64>)> {
            self.alerts
                .recent()
                .find(|a| a.kind == "job_failed" && a.source == source)
                .map(|a| (a.message.to_string(), a.value))
        }
    }

    /// Starts `j` as an `at` job at 12:00 on 2026-01-14, lets the clock
    /// reach 12:00 and drives the loop until the run ended.
    fn run_once(rig: &mut Rig, mut j: Job) -> Jobs {
        j.at = Some("12:00".to_string());
        j.every = None;
        let mut jobs = Jobs::new(&[j]);
        let noon = jan(14, 12, 0, 0);
        rig.start(&mut jobs, Instant::now(), noon - 1);
        rig.tick(&mut jobs, Instant::now(), noon);
        assert_eq!(jobs.entries[0].counters.runs, 1, "the run started at 12:00");
        rig.drive(&mut jobs, 10_000, |j| j.entries[0].last.is_some());
        assert!(jobs.entries[0].last.is_some(), "the run ended");
        jobs
    }

    #[test]
    fn next_run_daily_steps_over_days_months_and_years() {
        localtime::refresh();
        let two = time("02:00");
        // Before the time on the same day, at it, just after it.
        assert_eq!(next_run(two, jan(14, 1, 59, 59)), Some(jan(14, 2, 0, 0)));
        assert_eq!(next_run(two, jan(14, 2, 0, 0)), Some(jan(15, 2, 0, 0)));
        assert_eq!(next_run(two, jan(14, 2, 0, 1)), Some(jan(15, 2, 0, 0)));
        // Month end, year end, a leap day.
        let jan31 = from_local(2026, 1, 31, 12, 0, 0).unwrap();
        assert_eq!(next_run(two, jan31), from_local(2026, 2, 1, 2, 0, 0));
        let dec31 = from_local(2026, 12, 31, 23, 59, 0).unwrap();
        assert_eq!(
            next_run(time("00:00"), dec31),
            from_local(2027, 1, 1, 0, 0, 0)
        );
        let feb28 = from_local(2028, 2, 28, 12, 0, 0).unwrap();
        assert_eq!(next_run(two, feb28), from_local(2028, 2, 29, 2, 0, 0));
        // Read back through localtime_r: it is 02:00 local on 1 February.
        let t = local(next_run(two, jan31).unwrap()).unwrap();
        assert_eq!(
            (t.month, t.day, t.hour, t.minute, t.second),
            (2, 1, 2, 0, 0)
        );
        let late = next_run(time("23:59"), jan(14, 23, 59, 30)).unwrap();
        assert_eq!(late, jan(15, 23, 59, 0));
    }

    #[test]
    fn next_run_weekly_finds_the_weekday() {
        // 2026-03-01 is a Sunday.
        let sun = |d: i64, h: u32, m: u32| from_local(2026, 3, d, h, m, 0).unwrap();
        assert_eq!(local(sun(1, 12, 0)).unwrap().weekday, 0);
        let sun3 = time("Sun 03:00");
        assert_eq!(next_run(sun3, sun(1, 2, 0)), Some(sun(1, 3, 0)));
        assert_eq!(next_run(sun3, sun(1, 3, 0)), Some(sun(8, 3, 0)));
        // From Saturday night across the month end into Sunday 1 March.
        let sat = from_local(2026, 2, 28, 23, 0, 0).unwrap();
        assert_eq!(next_run(sun3, sat), Some(sun(1, 3, 0)));
        // Monday after Sunday 31 May is 1 June.
        let may31 = from_local(2026, 5, 31, 12, 0, 0).unwrap();
        let mon = next_run(time("Mon 00:00"), may31).unwrap();
        assert_eq!(Some(mon), from_local(2026, 6, 1, 0, 0, 0));
        assert_eq!(local(mon).unwrap().weekday, 1);
        // Saturday at the very time: a week later, across the year end.
        let sat_dec = from_local(2026, 12, 26, 23, 59, 0).unwrap();
        assert_eq!(
            next_run(time("Sat 23:59"), sat_dec),
            from_local(2027, 1, 2, 23, 59, 0)
        );
        // 2026-01-14 is a Wednesday: its own time that day, Thursday's the next.
        assert_eq!(
            next_run(time("Wed 02:00"), jan(14, 1, 0, 0)),
            Some(jan(14, 2, 0, 0))
        );
        assert_eq!(
            next_run(time("Thu 02:00"), jan(14, 1, 0, 0)),
            Some(jan(15, 2, 0, 0))
        );
        assert_eq!(
            next_run(time("Tue 02:00"), jan(14, 1, 0, 0)),
            Some(jan(20, 2, 0, 0))
        );
    }

    #[test]
    fn missed_since_asks_whether_a_run_fell_between() {
        let two = Schedule::At(time("02:00"));
        assert!(missed_since(two, jan(11, 2, 0, 0), jan(14, 10, 0, 0)));
        assert!(missed_since(two, jan(13, 2, 0, 0), jan(14, 2, 0, 0)));
        assert!(!missed_since(two, jan(14, 2, 0, 0), jan(14, 10, 0, 0)));
        assert!(!missed_since(two, jan(13, 12, 0, 0), jan(14, 1, 59, 59)));
        // A last run "in the future" (the clock was set back) missed nothing.
        assert!(!missed_since(two, jan(20, 2, 0, 0), jan(14, 10, 0, 0)));
        // After start or a clock change: a clock set back a little does not
        // repeat the run it already made; a last run far ahead is ignored.
        let at = time("02:00");
        assert_eq!(
            first_due(at, jan(14, 1, 0, 0), None),
            Some(jan(14, 2, 0, 0))
        );
        assert_eq!(
            first_due(at, jan(14, 2, 0, 0), None),
            Some(jan(14, 2, 0, 0))
        );
        let ran = Some(jan(14, 2, 0, 0));
        assert_eq!(first_due(at, jan(14, 1, 0, 0), ran), Some(jan(15, 2, 0, 0)));
        let far = Some(jan(30, 2, 0, 0));
        assert_eq!(first_due(at, jan(14, 1, 0, 0), far), Some(jan(14, 2, 0, 0)));
        let hourly = Schedule::Every(3_600_000);
        assert!(missed_since(hourly, 1_000_000, 1_003_600));
        assert!(!missed_since(hourly, 1_000_000, 1_003_599));
    }

    #[test]
    fn a_job_runs_at_its_time_and_not_before() {
        let mut rig = Rig::new();
        let mut jobs = Jobs::new(&[
            job("daily", Some("02:00"), None, &["/bin/true"]),
            job("weekly", Some("Wed 02:00"), None, &["/bin/true"]),
            job("tomorrow", Some("Thu 02:00"), None, &["/bin/true"]),
        ]);
        let t0 = Instant::now();
        let wall = jan(14, 1, 59, 0); // a Wednesday
        rig.start(&mut jobs, t0, wall);
        assert_eq!(jobs.entries[0].due, Some(jan(14, 2, 0, 0)));
        assert!(rig.reactor.is_scheduled(TimerId {
            owner: OWNER,
            id: FIRST_TIMER + CLOCK
        }));
        // 01:59:59: not yet.
        rig.tick(&mut jobs, t0.after_millis(59_000), wall + 59);
        assert!(jobs.entries.iter().all(|e| e.run.is_none()));
        assert_eq!(jobs.entries[0].counters.runs, 0);
        // 02:00:00: the daily and Wednesday jobs run, Thursday's does not.
        rig.tick(&mut jobs, t0.after_millis(60_000), wall + 60);
        let runs: Vec<u64> = jobs.entries.iter().map(|e| e.counters.runs).collect();
        assert_eq!(runs, [1, 1, 0]);
        assert_eq!(jobs.entries[0].due, Some(jan(15, 2, 0, 0)));
        assert_eq!(jobs.entries[1].due, Some(jan(21, 2, 0, 0)));
        assert_eq!(jobs.entries[2].due, Some(jan(15, 2, 0, 0)));
        // A second later nothing runs again.
        rig.tick(&mut jobs, t0.after_millis(61_000), wall + 61);
        assert_eq!(jobs.entries[0].counters.runs, 1);
        rig.drive(&mut jobs, 5_000, |j| {
            j.entries.iter().all(|e| e.run.is_none())
        });
        let last = jobs.entries[0].last.unwrap();
        assert_eq!(last.outcome, Outcome::Ok);
        assert_eq!(last.started, jan(14, 2, 0, 0));
        assert!(rig.state_changed, "the last run goes to state.json");
        assert_eq!(jobs.entries[0].counters.failures, 0);
        rig.finish(&mut jobs);
    }

    #[test]
    fn output_lines_of_stdout_and_stderr_are_captured() {
        let mut rig = Rig::new();
        let jobs = run_once(
            &mut rig,
            job(
                "talker",
                None,
                None,
                &["/bin/sh", "-c", "echo hi; echo err >&2; printf tail"],
            ),
        );
        let e = &jobs.entries[0];
        assert_eq!(e.last.unwrap().outcome, Outcome::Ok);
        assert_eq!(e.counters.output_lines, 3);
        assert_eq!(
            e.last_stdout.as_str(),
            "tail",
            "a last line without a newline"
        );
        assert_eq!(e.last_stderr.as_str(), "err");
        assert!(e.streams.iter().all(|s| s.pipe.is_none()), "pipes closed");
        assert!(rig.job_failed("talker").is_none());
    }

    #[test]
    fn long_lines_are_cut_not_grown() {
        let mut lines = Lines::with_capacity(8);
        let mut got: Vec<(String, bool)> = Vec::new();
        let mut line = |t: &[u8], cut: bool| got.push((String::from_utf8_lossy(t).into(), cut));
        lines.feed(b"abc\r\n0123", &mut line);
        lines.feed(b"456789abcdef", &mut line);
        lines.feed(b"ghij\nxy", &mut line);
        lines.finish(&mut line);
        assert_eq!(
            got,
            [
                ("abc".to_string(), false),
                ("01234567".to_string(), true),
                ("xy".to_string(), false)
            ]
        );
        assert_eq!(lines.buf.capacity(), 8);
    }

    #[test]
    fn a_timeout_kills_the_job_and_its_process_group() {
        let mut rig = Rig::new();
        let mut j = job(
            "slow",
            None,
            None,
            &["/bin/sh", "-c", "sleep 5 & echo $!; wait"],
        );
        j.timeout = Some(Duration::from_millis(200));
        let begin = Instant::now();
        let jobs = run_once(&mut rig, j);
        assert!(
            Instant::now().millis_since(begin) < 3_000,
            "killed at its timeout, not after sleeping"
        );
        let e = &jobs.entries[0];
        let last = e.last.unwrap();
        assert_eq!(last.outcome, Outcome::TimedOut);
        assert_eq!(last.exit_code, Some(128 + 9));
        assert!(last.duration_ms >= 200, "{last:?}");
        assert_eq!((e.counters.timeouts, e.counters.failures), (1, 1));
        assert_eq!(rig.exits.len(), 1);
        assert_eq!(rig.exits[0].1, ChildExit::Signaled(Signal::SIGKILL));
        let (message, value) = rig.job_failed("slow").expect("job_failed raised");
        assert!(message.contains("timed out"), "{message}");
        assert_eq!(value, Some(137.0));
        // The shell's own child (its pid was the first line) died with it:
        // gone, or a zombie waiting for whoever adopted it.
        let grandchild: i32 = e.last_stdout.parse().unwrap();
        let mut alive = true;
        for _ in 0..100 {
            alive = std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim().starts_with('Z'));
            if !alive {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!alive, "grandchild {grandchild} was killed with the group");
    }

    #[test]
    fn a_job_does_not_overlap_itself() {
        let mut rig = Rig::new();
        let mut jobs = Jobs::new(&[job("busy", None, Some(100), &["/bin/sleep", "1"])]);
        rig.start(&mut jobs, Instant::now(), WallTime::now().secs);
        rig.drive(&mut jobs, 6_000, |j| j.entries[0].counters.runs >= 2);
        let c = jobs.entries[0].counters;
        assert_eq!(c.runs, 2, "{c:?}");
        // Due every 100 ms while each run takes a second.
        assert!(c.skipped_overlaps >= 5, "{c:?}");
        assert_eq!(rig.started.len(), 2);
        assert_eq!(rig.exits.len(), 1, "the first run ended before the second");
        assert_eq!(rig.exits[0], (rig.started[0].1, ChildExit::Exited(0)));
        rig.finish(&mut jobs);
    }

    #[test]
    fn failures_raise_job_failed() {
        let mut rig = Rig::new();
        let jobs = run_once(&mut rig, job("false", None, None, &["/bin/false"]));
        let last = jobs.entries[0].last.unwrap();
        assert_eq!((last.outcome, last.exit_code), (Outcome::Failed, Some(1)));
        assert_eq!(jobs.entries[0].counters.failures, 1);
        let (message, value) = rig.job_failed("false").expect("raised for /bin/false");
        assert!(message.contains("exited with status 1"), "{message}");
        assert_eq!(value, Some(1.0));

        let jobs = run_once(
            &mut rig,
            job("missing", None, None, &["/nonexistent/edgekeeper-job"]),
        );
        let e = &jobs.entries[0];
        let last = e.last.unwrap();
        assert_eq!((last.outcome, last.exit_code), (Outcome::SpawnError, None));
        assert_eq!((e.counters.runs, e.counters.failures), (1, 1));
        assert!(e.run.is_none());
        let (message, _) = rig
            .job_failed("missing")
            .expect("raised for a missing command");
        assert!(message.contains("/nonexistent/edgekeeper-job"), "{message}");

        let jobs = run_once(
            &mut rig,
            job(
                "signal",
                None,
                None,
                &["/bin/sh", "-c", "echo no disk >&2; kill -TERM $$"],
            ),
        );
        let last = jobs.entries[0].last.unwrap();
        assert_eq!(
            (last.outcome, last.exit_code),
            (Outcome::Signaled, Some(143))
        );
        let (message, _) = rig.job_failed("signal").expect("raised for a signal");
        assert!(
            message.contains("SIGTERM") && message.contains("no disk"),
            "{message}"
        );

        let mut report = Report::default();
        jobs.report(&mut report);
        assert_eq!(report.health, Health::Degraded);
        assert!(report.reason.contains("job signal"), "{}", report.reason);
    }

    /// A `catch_up` job at 02:00 that last ran at `last` (if ever), started
    /// at 10:00 on 2026-01-14: how many runs the first turn starts.
    fn catch_up_runs(catch_up: bool, last: Option<i64>) -> u64 {
        let mut rig = Rig::new();
        let mut j = job("backup", Some("02:00"), None, &["/bin/true"]);
        j.catch_up = catch_up;
        let mut jobs = Jobs::new(&[j]);
        if let Some(last) = last {
            let saved = serde_json::json!([
                {"name": "backup", "started": last, "outcome": "ok", "exit_code": 0, "duration_ms": 5},
                {"name": "gone", "started": last, "outcome": "ok"},
            ]);
            jobs.restore_state(&saved);
            assert_eq!(jobs.entries[0].last.map(|l| l.started), Some(last));
        }
        let t0 = Instant::now();
        let ten = jan(14, 10, 0, 0);
        rig.start(&mut jobs, t0, ten);
        rig.tick(&mut jobs, t0, ten);
        rig.tick(&mut jobs, t0.after_millis(1000), ten + 1);
        let runs = jobs.entries[0].counters.runs;
        rig.drive(&mut jobs, 5_000, |j| j.entries[0].run.is_none());
        if runs > 0 {
            assert_eq!(jobs.entries[0].last.unwrap().started, ten);
        }
        rig.tick(&mut jobs, t0.after_millis(2000), ten + 2);
        assert_eq!(jobs.entries[0].counters.runs, runs, "once, not again");
        rig.finish(&mut jobs);
        runs
    }

    #[test]
    fn catch_up_runs_once_at_start_when_a_run_was_missed() {
        // Three runs missed: one catch-up run.
        assert_eq!(catch_up_runs(true, Some(jan(11, 2, 0, 0))), 1);
        // Today's 02:00 ran: nothing missed.
        assert_eq!(catch_up_runs(true, Some(jan(14, 2, 0, 5))), 0);
        // Never ran (first start): no run.
        assert_eq!(catch_up_runs(true, None), 0);
        // Missed, but catch_up is off.
        assert_eq!(catch_up_runs(false, Some(jan(11, 2, 0, 0))), 0);
    }

    #[test]
    fn a_clock_set_forward_skips_what_it_passed_unless_catch_up() {
        let mut rig = Rig::new();
        let mut caught = job("caught", Some("02:00"), None, &["/bin/true"]);
        caught.catch_up = true;
        let mut jobs = Jobs::new(&[job("plain", Some("02:00"), None, &["/bin/true"]), caught]);
        let saved = serde_json::json!([
            {"name": "plain", "started": jan(13, 2, 0, 0), "outcome": "ok"},
            {"name": "caught", "started": jan(13, 2, 0, 0), "outcome": "ok"},
        ]);
        jobs.restore_state(&saved);
        // The board booted with a stale clock: 01:00 on the 14th.
        let t0 = Instant::now();
        rig.start(&mut jobs, t0, jan(14, 1, 0, 0));
        rig.tick(&mut jobs, t0.after_millis(30_000), jan(14, 1, 0, 30));
        assert_eq!(
            jobs.entries[0].counters.runs + jobs.entries[1].counters.runs,
            0
        );
        // NTP sets it to noon on the 17th, thirty seconds later.
        rig.tick(&mut jobs, t0.after_millis(60_000), jan(17, 12, 0, 0));
        assert_eq!(jobs.clock_jumps, 1);
        assert_eq!(jobs.entries[0].counters.runs, 0, "passed over, not run");
        assert_eq!(jobs.entries[1].counters.runs, 1, "caught up once");
        assert_eq!(jobs.entries[0].due, Some(jan(18, 2, 0, 0)));
        assert_eq!(jobs.entries[1].due, Some(jan(18, 2, 0, 0)));
        rig.drive(&mut jobs, 5_000, |j| j.entries[1].run.is_none());
        rig.tick(&mut jobs, t0.after_millis(61_000), jan(17, 12, 0, 1));
        assert_eq!(jobs.entries[1].counters.runs, 1);
        // Set back an hour after 02:00 ran: 02:00 does not run twice.
        rig.tick(&mut jobs, t0.after_millis(62_000), jan(18, 2, 0, 0));
        assert_eq!(jobs.entries[0].counters.runs, 1);
        rig.drive(&mut jobs, 5_000, |j| j.entries[0].run.is_none());
        rig.tick(&mut jobs, t0.after_millis(63_000), jan(18, 1, 0, 0));
        assert_eq!(jobs.clock_jumps, 3);
        assert_eq!(jobs.entries[0].due, Some(jan(19, 2, 0, 0)));
        rig.finish(&mut jobs);
    }

    #[test]
    fn state_and_details_serialise_with_serde_json_core() {
        let mut rig = Rig::new();
        let jobs = run_once(&mut rig, job("echo", None, None, &["/bin/echo", "done"]));
        let mut buf = [0u8; 2048];
        let n = serde_json_core::to_slice(&jobs.save_state(), &mut buf).unwrap();
        let saved: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(saved[0]["name"], "echo");
        assert_eq!(saved[0]["started"], jan(14, 12, 0, 0));
        assert_eq!(saved[0]["outcome"], "ok");
        let mut again = Jobs::new(&[job("echo", Some("12:00"), None, &["/bin/echo"])]);
        again.restore_state(&saved);
        assert_eq!(again.entries[0].last, jobs.entries[0].last);

        let n = serde_json_core::to_slice(&jobs.details(), &mut buf).unwrap();
        let details: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
        let d = &details[0];
        assert_eq!(d["name"], "echo");
        assert_eq!(d["schedule"], "12:00");
        let next = WallTime::from_secs(jan(15, 12, 0, 0))
            .iso_secs()
            .to_string();
        assert_eq!(d["next_run"], next.as_str());
        let last = WallTime::from_secs(jan(14, 12, 0, 0))
            .iso_secs()
            .to_string();
        assert_eq!(d["last_run"], last.as_str());
        assert_eq!(d["last_outcome"], "ok");
        assert_eq!(d["last_exit_code"], 0);
        assert_eq!(d["last_stdout"], "done");
        assert_eq!(d["running_pid"], serde_json::Value::Null);
        assert_eq!(d["runs"], 1);
        assert_eq!(d["skipped_overlaps"], 0);
    }

    /// Child-process half of the DST test: runs only when that test starts
    /// this binary with a European zone in `TZ`.
    #[test]
    #[ignore = "run by next_run_across_dst_changes in a child process"]
    fn dst_helper() {
        if std::env::var_os("EDGEKEEPER_DST_HELPER").is_none() {
            return;
        }
        localtime::refresh();
        const HOUR: i64 = 3600;
        // 2026-03-29 02:00 CET the clocks go to 03:00 CEST: 03:00 daily is
        // 23 hours after the day before's.
        let sat = 1_774_663_200; // 2026-03-28T02:00:00Z = 03:00 CET
        let sun = next_run(time("03:00"), sat).unwrap();
        assert_eq!(sun - sat, 23 * HOUR);
        assert!(local(sun).unwrap().dst);
        // 02:30 does not exist that day: it runs once, past the gap, and
        // at 02:30 CEST the day after.
        let gap = next_run(time("02:30"), sat).unwrap();
        let g = local(gap).unwrap();
        assert_eq!((g.month, g.day), (3, 29), "{g:?}");
        let after = local(next_run(time("02:30"), gap).unwrap()).unwrap();
        assert_eq!((after.day, after.hour, after.minute), (30, 2, 30));
        // 2026-10-25 03:00 CEST the clocks go back to 02:00 CET: 03:00 is
        // 25 hours after the day before's, and 02:30 (twice) runs once.
        let oct24 = 1_792_803_600; // 2026-10-24T01:00:00Z = 03:00 CEST
        let oct25 = next_run(time("03:00"), oct24).unwrap();
        assert_eq!(oct25 - oct24, 25 * HOUR);
        let first = next_run(time("02:30"), oct24).unwrap();
        let second = next_run(time("02:30"), first).unwrap();
        assert_eq!(local(first).unwrap().day, 25);
        assert_eq!(local(second).unwrap().day, 26);
        // Weekly across the change: Sunday 12:00 CET to Sunday 12:00 CEST
        // is a week less an hour.
        let sun_noon = 1_774_177_200; // 2026-03-22T11:00:00Z = 12:00 CET
        let next_sun = next_run(time("Sun 12:00"), sun_noon).unwrap();
        assert_eq!(next_sun - sun_noon, 7 * 24 * HOUR - HOUR);
        assert_eq!(local(next_sun).unwrap().hour, 12);
        println!("dst_helper checked");
    }

    #[test]
    fn next_run_across_dst_changes() {
        let exe = std::env::current_exe().unwrap();
        // A POSIX zone string: the EU rules, without tzdata.
        let out = Command::new(exe)
            .args([
                "services::storage::jobs::tests::dst_helper",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
            .env("EDGEKEEPER_DST_HELPER", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("dst_helper checked"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
