//! The optional external analyzer of one capture: a program run per frame.
//!
//! What it is: a bounded queue of analysed frames waiting for the program
//! (newest first under backlog; when full the oldest waiting frame is
//! skipped and counted), at most `max_parallel` children at once, each run
//! without a shell with `{path}` replaced by the frame's path, its stdout
//! read through a non-blocking pipe registered with the reactor into a
//! buffer made at start, killed after `timeout`, reaped from the loop
//! (SIGCHLD). What it ends with is handed back as [`Finished`]: the frame
//! and either the program's JSON object or why there is none.
//! What it is not: the sidecar writer; the capture merges the result.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{ChildStdout, Command, Stdio};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::capture::Analysis;
use crate::config::Analyzer as AnalyzerConfig;
use crate::sys::clock::Instant;
use crate::sys::process::ChildExit;

/// Frames that may wait for the analyzer.
pub const QUEUE: usize = 64;
/// Bytes of analyzer output kept; more is read and dropped.
pub const OUTPUT: usize = 64 * 1024;

/// A frame that went through the built-in analysis and waits for the
/// external one.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub name: heapless::Vec<u8, 256>,
    pub analysis: Analysis,
}

struct Running {
    pid: Pid,
    stdout: Option<ChildStdout>,
    out: Vec<u8>,
    truncated: bool,
    deadline: Instant,
    timed_out: bool,
    frame: Waiting,
}

/// What a finished run produced.
pub enum Verdict<'a> {
    /// The program printed a JSON object (validated).
    Object(&'a [u8]),
    /// No usable result; the reason goes into the sidecar.
    Failed(&'a str),
}

pub struct Finished<'a> {
    pub frame: &'a Waiting,
    pub verdict: Verdict<'a>,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Counters {
    pub runs: u64,
    pub failures: u64,
    pub timeouts: u64,
    pub skipped: u64,
}

pub struct Analyzer {
    command: Vec<String>,
    timeout_ms: u64,
    max_parallel: usize,
    waiting: VecDeque<Waiting>,
    running: Vec<Option<Running>>,
    message: String,
    pub counters: Counters,
}

impl Analyzer {
    pub fn new(cfg: &AnalyzerConfig) -> Analyzer {
        let max_parallel = cfg.max_parallel.max(1) as usize;
        Analyzer {
            command: cfg.command.clone(),
            timeout_ms: cfg.timeout.as_millis(),
            max_parallel,
            waiting: VecDeque::with_capacity(QUEUE),
            running: (0..max_parallel).map(|_| None).collect(),
            message: String::with_capacity(256),
            counters: Counters::default(),
        }
    }

    pub fn slots(&self) -> usize {
        self.max_parallel
    }

    pub fn busy(&self) -> usize {
        self.running.iter().filter(|r| r.is_some()).count()
    }

    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Queues a frame; returns the frame skipped to make room, if any.
    pub fn enqueue(&mut self, frame: Waiting) -> Option<Waiting> {
        let skipped = if self.waiting.len() == QUEUE {
            self.counters.skipped += 1;
            self.waiting.pop_front()
        } else {
            None
        };
        self.waiting.push_back(frame);
        skipped
    }

    /// Starts runs while there are free slots and waiting frames; calls
    /// `started(slot, stdout fd, deadline)` for each so the caller registers
    /// the pipe and the timeout. A frame whose program cannot even start is
    /// returned through `failed`.
    pub fn start_runs(
        &mut self,
        dir: &[u8],
        now: Instant,
        started: &mut dyn FnMut(usize, BorrowedFd<'_>, Instant),
        failed: &mut dyn FnMut(Finished<'_>),
    ) {
        while let Some(slot) = self.running.iter().position(Option::is_none) {
            // Newest first: under backlog the freshest frame matters most.
            let Some(frame) = self.waiting.pop_back() else {
                return;
            };
            let mut path = Vec::with_capacity(dir.len() + 1 + frame.name.len());
            path.extend_from_slice(dir);
            path.push(b'/');
            path.extend_from_slice(&frame.name);
            let path = std::ffi::OsStr::from_bytes(&path);
            let mut cmd = Command::new(&self.command[0]);
            for arg in &self.command[1..] {
                match arg.split_once("{path}") {
                    Some((a, b)) => {
                        let mut s = std::ffi::OsString::from(a);
                        s.push(path);
                        s.push(b);
                        cmd.arg(s);
                    }
                    None => {
                        cmd.arg(arg);
                    }
                }
            }
            // A process group of its own, so a timeout kills whatever the
            // analyzer started as well.
            let spawned = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn();
            self.counters.runs += 1;
            match spawned {
                Ok(mut child) => {
                    let stdout = child.stdout.take();
                    if let Some(out) = &stdout {
                        let _ = fcntl(out.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
                    }
                    let deadline = now.after_millis(self.timeout_ms);
                    let pid = Pid::from_raw(child.id() as i32);
                    // The child is reaped by the daemon through SIGCHLD; the
                    // handle is dropped without waiting.
                    drop(child);
                    let run = Running {
                        pid,
                        stdout,
                        out: Vec::with_capacity(OUTPUT),
                        truncated: false,
                        deadline,
                        timed_out: false,
                        frame,
                    };
                    if let Some(fd) = run.stdout.as_ref().map(|s| s.as_fd()) {
                        started(slot, fd, deadline);
                    }
                    self.running[slot] = Some(run);
                }
                Err(e) => {
                    self.counters.failures += 1;
                    self.message.clear();
                    use std::fmt::Write;
                    let _ = write!(self.message, "cannot run {}: {e}", self.command[0]);
                    failed(Finished {
                        frame: &frame,
                        verdict: Verdict::Failed(&self.message),
                    });
                }
            }
        }
    }

    /// The pipe of `slot` is readable: keep what fits, drop the rest.
    /// Returns true at end of file (the caller deregisters the pipe).
    pub fn read_output(&mut self, slot: usize) -> bool {
        let Some(Some(run)) = self.running.get_mut(slot) else {
            return true;
        };
        read_pipe(run)
    }

    /// The pipe of `slot`, for deregistering.
    pub fn pipe(&self, slot: usize) -> Option<BorrowedFd<'_>> {
        self.running
            .get(slot)?
            .as_ref()?
            .stdout
            .as_ref()
            .map(|s| s.as_fd())
    }

    /// The run in `slot` passed its deadline: kill it (its exit comes later).
    pub fn time_out(&mut self, slot: usize, now: Instant) {
        if let Some(Some(run)) = self.running.get_mut(slot) {
            if run.deadline <= now && !run.timed_out {
                run.timed_out = true;
                // The whole group: the analyzer and anything it started.
                let _ = kill(Pid::from_raw(-run.pid.as_raw()), Signal::SIGKILL);
            }
        }
    }

    /// The slot running `pid`, if it is one of ours.
    pub fn slot_of(&self, pid: Pid) -> Option<usize> {
        self.running
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.pid == pid))
    }

    /// A child of ours exited: read what is left of its output and hand
    /// the result to `done`. The slot is free afterwards.
    pub fn finish(&mut self, slot: usize, exit: ChildExit, done: &mut dyn FnMut(Finished<'_>)) {
        let Some(mut run) = self.running.get_mut(slot).and_then(Option::take) else {
            return;
        };
        // What the pipe holds now; a grandchild keeping it open cannot
        // make us wait.
        read_pipe(&mut run);
        self.message.clear();
        use std::fmt::Write;
        let verdict = if run.timed_out {
            self.counters.timeouts += 1;
            self.counters.failures += 1;
            let _ = write!(
                self.message,
                "timed out after {} ms and was killed",
                self.timeout_ms
            );
            Verdict::Failed(&self.message)
        } else if exit != ChildExit::Exited(0) {
            self.counters.failures += 1;
            match exit {
                ChildExit::Exited(code) => {
                    let _ = write!(self.message, "exited with status {code}");
                }
                ChildExit::Signaled(sig) => {
                    let _ = write!(self.message, "killed by {sig}");
                }
            }
            Verdict::Failed(&self.message)
        } else if run.truncated {
            self.counters.failures += 1;
            let _ = write!(self.message, "output larger than {OUTPUT} bytes");
            Verdict::Failed(&self.message)
        } else {
            let text = trim(&run.out);
            match serde_json::from_slice::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(_)) => Verdict::Object(text),
                _ => {
                    self.counters.failures += 1;
                    let _ = write!(self.message, "output is not a JSON object");
                    Verdict::Failed(&self.message)
                }
            }
        };
        done(Finished {
            frame: &run.frame,
            verdict,
        });
    }

    /// Earliest deadline of a running child, with its slot.
    pub fn next_deadline(&self) -> impl Iterator<Item = (usize, Instant)> + '_ {
        self.running
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().filter(|r| !r.timed_out).map(|r| (i, r.deadline)))
    }
}

/// Reads what the pipe has; true at end of file (or on an error).
fn read_pipe(run: &mut Running) -> bool {
    let Some(stdout) = run.stdout.as_mut() else {
        return true;
    };
    let mut scratch = [0u8; 4096];
    loop {
        match stdout.read(&mut scratch) {
            Ok(0) => {
                run.stdout = None;
                return true;
            }
            Ok(n) => {
                let room = run.out.capacity() - run.out.len();
                if n > room {
                    run.truncated = true;
                }
                run.out.extend_from_slice(&scratch[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                run.stdout = None;
                return true;
            }
        }
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |p| p + 1);
    &bytes[start..end]
}
