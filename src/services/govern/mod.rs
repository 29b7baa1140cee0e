//! `govern`: finds processes such as ffmpeg that were started outside any
//! job system and holds them in cgroup v2 groups with CPU and memory limits.
//!
//! What it is: discovery by a /proc scan every `scan_every` (by `comm`, and
//! by argv[0]'s basename for names longer than a `comm`'s 15 bytes) plus,
//! where the kernel and privileges allow, the netlink proc connector (exec,
//! rename and exit within milliseconds; the scan stays as reconciliation);
//! the filters (`min_runtime`, re-checked by a timer when a young process
//! comes of age; `blocked_uids`; `allowed_users`; `blocked_dirs`); one
//! group per governed process, `<comm>-<pid>` under `cgroup_root`, with
//! its limits written *before* the process is moved in; retries with
//! backoff up to `max_attempts`; removal of a group once its process
//! exited; the tracked table and counters in state.json, so that after a
//! restart a living process is recognised by (pid, start time) and not
//! attached twice. Stopping leaves every process running in its group.
//! What it is not: a process supervisor. It never starts, stops or signals
//! a governed process, and a process it does not own stays where it is.
//!
//! Steady state allocates nothing: /proc is read with `getdents64` and
//! `openat` into fixed buffers, paths and values are built on the stack,
//! and the table is made at start for `limits.max_tracked_processes`.

mod docs;
mod groups;
mod host;
mod table;
mod targets;

use std::fmt::Write as _;
use std::io;

use self::groups::{Cgroups, write_limits};
use self::table::{Counters, Phase, Saved, Table, Tracked};
use self::targets::{Filter, Match, Targets};
use super::{Bounded, Ctx, Report, Service};
use crate::config::{self, Config};
use crate::report::alerts::{Alert, AlertLevel};
use crate::sys::cgroup::FsKind;
use crate::sys::clock::Instant;
use crate::sys::proc_connector::{ProcConnector, ProcEvent, events};
use crate::sys::procfs::{self, ProcFs};

pub use self::groups::memory_note;
pub use self::host::{DemoCgroups, demo_cgroup_root, demo_config, host_notes};

/// Timers.
const SCAN: u32 = 1;
const SCAN_MORE: u32 = 2;
const DUE: u32 = 3;
/// The proc connector's token.
const CONNECTOR: u64 = 1;

/// PIDs looked at per loop turn; a bigger /proc is scanned in slices.
const SCAN_BUDGET: usize = 4096;
/// Datagrams read from the connector per loop turn.
const EVENTS_PER_TURN: usize = 256;
/// How long start-up waits for the kernel to confirm the subscription.
const ACK_WAIT_MS: u64 = 250;
/// Scan or attach failures in a row that make the service degraded.
const FAILURES_FOR_DEGRADED: u32 = 3;
/// Retry backoff: 1 s, 2 s, 4 s, … at most this.
const MAX_BACKOFF_MS: u64 = 300_000;
const FIRST_BACKOFF_MS: u64 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    Paused,
    Done,
}

#[derive(Default)]
struct ScanState {
    active: bool,
    generation: u32,
    started: Option<Instant>,
    pids: u64,
    last_us: u64,
    failures_in_row: u32,
    last_error: table::Note,
}

pub struct Govern {
    config: config::Govern,
    targets: Targets,
    table: Table,
    cgroups: Cgroups,
    proc: Option<ProcFs>,
    connector: Option<ProcConnector>,
    /// Why discovery is by scanning only (empty while the connector runs).
    scan_only: table::Note,
    ticks: u64,
    boot_secs: i64,
    scan: ScanState,
    latency_last_us: u64,
    latency_max_us: u64,
    counters: Counters,
    attach_failures_in_row: u32,
    last_attach_error: table::Note,
    /// A process was turned away because the table was full, and nothing
    /// has left it since.
    turned_away: bool,
    restored: Saved,
    root_text: String,
}

impl Govern {
    /// Takes the config in; nothing is read or opened until `start`.
    pub fn new(g: &config::Govern, limits: &config::Limits) -> Govern {
        Govern {
            config: g.clone(),
            targets: Targets::default(),
            table: Table::with_capacity(limits.max_tracked_processes as usize),
            cgroups: Cgroups::new(&g.cgroup_root),
            proc: None,
            connector: None,
            scan_only: table::Note::new(),
            ticks: 100,
            boot_secs: 0,
            scan: ScanState::default(),
            latency_last_us: 0,
            latency_max_us: 0,
            counters: Counters::default(),
            attach_failures_in_row: 0,
            last_attach_error: table::Note::new(),
            turned_away: false,
            restored: Saved::default(),
            root_text: g.cgroup_root.to_string_lossy().into_owned(),
        }
    }

    fn open_connector(&mut self, ctx: &mut Ctx<'_>) {
        self.scan_only.clear();
        match ProcConnector::open(std::time::Duration::from_millis(ACK_WAIT_MS)) {
            Ok(c) => match ctx.register(std::os::fd::AsFd::as_fd(&c), CONNECTOR) {
                Ok(()) => {
                    log::info!(
                        "discovery: proc connector (exec and exit within milliseconds), with a /proc scan every {}",
                        self.config.scan_every
                    );
                    self.connector = Some(c);
                }
                Err(e) => {
                    let _ = write!(
                        Bounded(&mut self.scan_only),
                        "registering the proc connector: {e}"
                    );
                }
            },
            Err(e) => {
                let _ = write!(
                    Bounded(&mut self.scan_only),
                    "proc connector unavailable: {e}"
                );
                // Falling back is normal (no CAP_NET_ADMIN, a container,
                // qemu-user): said in status, not warned about.
                log::info!(
                    "discovery: /proc scan every {} ({})",
                    self.config.scan_every,
                    self.scan_only
                );
            }
        }
    }

    /// Milliseconds since boot at which a process with this start started.
    fn started_ms(&self, start_ticks: u64) -> u64 {
        start_ticks.saturating_mul(1000) / self.ticks.max(1)
    }

    /// Whether (pid, start) is still a living process.
    fn alive(&self, pid: i32, start_ticks: u64) -> bool {
        let Some(proc) = &self.proc else { return false };
        let mut buf = [0u8; 1024];
        match proc.stat(pid, &mut buf) {
            Ok(s) => s.start_ticks == start_ticks && !s.has_exited(),
            Err(_) => false,
        }
    }

    fn rss_of(&self, pid: i32) -> Option<u64> {
        let mut buf = [0u8; 4096];
        self.proc.as_ref()?.status(pid, &mut buf).ok()?.rss_bytes
    }

    /// Looks at PID `pid`: found by the scan, or named by the connector
    /// (`event_ns`: the kernel's time of the event).
    fn examine(&mut self, pid: i32, event_ns: Option<u64>, ctx: &mut Ctx<'_>) {
        let Some(proc) = &self.proc else { return };
        // Most processes are not targets: one small read tells.
        let mut name = [0u8; 32];
        let Ok(comm) = proc.comm(pid, &mut name) else {
            return;
        };
        let found = self.targets.by_comm(comm);
        if found == Match::No {
            return;
        }
        let mut buf = [0u8; 1024];
        let Ok(stat) = proc.stat(pid, &mut buf) else {
            return;
        };
        if stat.is_kernel_thread() || self.targets.by_comm(stat.comm) != found {
            return; // renamed between the two reads: its next event or scan tells
        }
        let (start, exited) = (stat.start_ticks, stat.has_exited());
        let mut comm = [0u8; 16];
        let len = stat.comm.len().min(16);
        comm[..len].copy_from_slice(&stat.comm[..len]);
        let comm = &comm[..len];
        if let Some(i) = self.table.find(pid) {
            if self.table.get(i).is(pid, start) {
                if !exited {
                    self.table.get_mut(i).seen = self.scan.generation;
                }
                return;
            }
            // The PID now names another process: the tracked one is gone.
            self.counters.pid_reuses += 1;
            log::info!(
                "pid {pid} was reused: the {} tracked under it has exited",
                self.table.get(i).comm
            );
            self.exited(i, ctx);
        }
        if exited {
            return;
        }
        let target = match found {
            Match::Comm(t) => t,
            Match::NeedsArgv0 => {
                let mut cmd = [0u8; 4096];
                let Some(Ok(argv0)) = self.proc.as_ref().map(|p| p.argv0(pid, &mut cmd)) else {
                    return;
                };
                match self.targets.by_argv0(comm, argv0) {
                    Some(t) => t,
                    None => return,
                }
            }
            Match::No => return,
        };
        if let Some(ns) = event_ns {
            let us = Instant::now().as_nanos().saturating_sub(ns) / 1000;
            self.latency_last_us = us;
            self.latency_max_us = self.latency_max_us.max(us);
        }
        self.discover(pid, start, comm, target, ctx);
    }

    /// A process of a target, seen for the first time.
    fn discover(&mut self, pid: i32, start: u64, comm: &[u8], target: usize, ctx: &mut Ctx<'_>) {
        let mut t = Tracked::new(pid, start, comm, target);
        t.seen = self.scan.generation;
        t.started_at = self.boot_secs + (self.started_ms(start) / 1000) as i64;
        t.since = ctx.wall.secs;
        let Ok(i) = self.table.push(t) else {
            self.counters.table_full += 1;
            if !self.turned_away {
                log::warn!(
                    "{} {pid} is not governed: already tracking {} processes, the most limits.max_tracked_processes allows",
                    table::utf8_prefix::<16>(comm),
                    self.table.capacity()
                );
            }
            self.turned_away = true;
            return;
        };
        self.counters.discovered += 1;
        self.decide(i, true, ctx);
    }

    /// Age first, then the filters, then the attach. Returns whether the
    /// entry is still in the table.
    fn decide(&mut self, i: usize, first: bool, ctx: &mut Ctx<'_>) -> bool {
        let e = self.table.get(i);
        let (pid, start) = (e.pid, e.start_ticks);
        let Some(t) = e.target.and_then(|t| self.targets.list.get(t)) else {
            self.table.remove(i);
            return false;
        };
        let age = procfs::since_boot_ms().saturating_sub(self.started_ms(start));
        if age < t.min_runtime_ms {
            let due = ctx.now.after_millis(t.min_runtime_ms - age);
            let e = self.table.get_mut(i);
            e.phase = Phase::Young;
            e.due = due;
            if first {
                self.counters.held_young += 1;
                log::debug!(
                    "{} {pid} is {age} ms old; looked at again at its min_runtime",
                    e.comm
                );
            }
            return true;
        }
        let Some(proc) = &self.proc else { return true };
        let mut buf = [0u8; 4096];
        let status = match proc.status(pid, &mut buf) {
            Ok(s) => s,
            Err(_) => return !self.exited(i, ctx),
        };
        let mut cwd_buf = [0u8; 4096];
        let cwd = if t.needs_cwd() {
            proc.cwd(pid, &mut cwd_buf).ok()
        } else {
            None
        };
        if let Err(filter) = t.admits(&status, cwd) {
            match filter {
                Filter::BlockedUid(_) => self.counters.filtered_uid += 1,
                Filter::NotAllowed(_) => self.counters.filtered_user += 1,
                Filter::BlockedDir | Filter::CwdUnknown => self.counters.filtered_dir += 1,
            }
            let e = self.table.get_mut(i);
            e.phase = Phase::Ignored(filter);
            match filter {
                Filter::BlockedUid(uid) => e.note(format_args!("uid {uid} is in blocked_uids")),
                Filter::NotAllowed(uid) => {
                    e.note(format_args!("uid {uid} is not one of allowed_users"))
                }
                Filter::BlockedDir => e.note(format_args!(
                    "its working directory {} is under blocked_dirs",
                    table::utf8_prefix::<128>(cwd.unwrap_or_default())
                )),
                Filter::CwdUnknown => e.note(format_args!(
                    "its working directory cannot be read, so blocked_dirs cannot be checked"
                )),
            }
            log::info!("not governing {} {pid}: {}", e.comm, e.note);
            return true;
        }
        self.attach(i, status.rss_bytes, ctx)
    }

    /// Makes the group, writes the limits, then moves the process in.
    /// Returns whether the entry is still in the table.
    fn attach(&mut self, i: usize, rss: Option<u64>, ctx: &mut Ctx<'_>) -> bool {
        if !self.cgroups.ensure() {
            let e = self.table.get_mut(i);
            e.phase = Phase::Waiting;
            e.note(format_args!("{}", self.cgroups.error));
            return true;
        }
        let e = self.table.get_mut(i);
        let pid = e.pid;
        let Some(limits) = e
            .target
            .and_then(|t| self.targets.list.get(t))
            .map(|t| t.limits)
        else {
            self.table.remove(i);
            return false;
        };
        if e.group.is_empty() {
            let _ = write!(e.group, "{}-{pid}", e.comm);
        }
        let group = e.group.clone();
        let enabled = self.cgroups.enabled;
        let Some(root) = self.cgroups.root() else {
            return true;
        };
        let outcome = (|| -> Result<_, groups::Failed> {
            let created = root
                .make_group(group.as_bytes())
                .map_err(|error| groups::Failed {
                    file: "its group directory",
                    error,
                })?;
            let mut buf = [0u8; 4096];
            let recognised =
                !created && root.holds(group.as_bytes(), pid, &mut buf).unwrap_or(false);
            let (applied, refused) = write_limits(root, group.as_bytes(), enabled, &limits, rss)?;
            root.move_process(group.as_bytes(), pid)
                .map_err(|error| groups::Failed {
                    file: "cgroup.procs",
                    error,
                })?;
            Ok((recognised, applied, refused))
        })();
        match outcome {
            Ok((recognised, applied, refused)) => {
                let e = self.table.get_mut(i);
                e.phase = Phase::Governed;
                e.since = ctx.wall.secs;
                e.applied = applied;
                e.attempts = 0;
                e.note.clear();
                if let Some(r) = refused {
                    self.counters.memory_refused += 1;
                    e.refused(r.limit, r.rss);
                }
                let e = self.table.get(i);
                if recognised {
                    self.counters.recognised += 1;
                    log::info!(
                        "{} {pid} is already in its group {}; limits rewritten",
                        e.comm,
                        e.group
                    );
                } else {
                    self.counters.attached += 1;
                    if let Some(t) = e.target.and_then(|t| self.targets.list.get_mut(t)) {
                        t.attached_total += 1;
                    }
                    log::info!(
                        "governing {} {pid} in {}: {}",
                        e.comm,
                        e.group,
                        docs::AppliedText(&e.applied)
                    );
                }
                self.attach_failures_in_row = 0;
                *ctx.state_changed = true;
                true
            }
            Err(f) if f.error.raw_os_error() == Some(libc::ESRCH) => !self.exited(i, ctx),
            Err(f)
                if f.file == "its group directory"
                    && f.error.raw_os_error() == Some(libc::ENOENT) =>
            {
                // mkdirat in a removed root: the root itself is gone.
                self.cgroups.lost(&f.error);
                let e = self.table.get_mut(i);
                e.phase = Phase::Waiting;
                e.note(format_args!("{}", self.cgroups.error));
                true
            }
            Err(f) => {
                self.counters.attach_failures += 1;
                self.attach_failures_in_row += 1;
                let max = self.config.max_attempts;
                let e = self.table.get_mut(i);
                e.attempts += 1;
                let group = e.group.clone();
                e.note(format_args!("writing {} of {group}: {}", f.file, f.error));
                self.last_attach_error = e.note.clone();
                if e.attempts >= max {
                    e.phase = Phase::GaveUp;
                    self.counters.gave_up += 1;
                    log::error!(
                        "gave up governing {} {pid} after {max} attempts: {}",
                        e.comm,
                        e.note
                    );
                    let mut message = heapless::String::<256>::new();
                    let _ = write!(
                        Bounded(&mut message),
                        "{} {pid} could not be put into a cgroup after {max} attempts: {}",
                        e.comm,
                        e.note
                    );
                    ctx.raise(&Alert {
                        level: AlertLevel::Warning,
                        kind: "govern_attach_failed",
                        source: &group,
                        message: &message,
                        value: Some(f64::from(max)),
                    });
                    if let Some(root) = self.cgroups.root() {
                        let _ = root.remove_group(group.as_bytes());
                    }
                    self.table.get_mut(i).group.clear();
                    *ctx.state_changed = true;
                } else {
                    let wait = (FIRST_BACKOFF_MS << (e.attempts - 1).min(20)).min(MAX_BACKOFF_MS);
                    e.phase = Phase::Retrying;
                    e.due = ctx.now.after_millis(wait);
                    log::warn!(
                        "attaching {} {pid} failed (attempt {} of {max}): {}; trying again in {} s",
                        e.comm,
                        e.attempts,
                        e.note,
                        wait / 1000
                    );
                }
                true
            }
        }
    }

    /// Tracked process `i` has exited: its group is removed (or kept as
    /// lingering while something still runs in it) and it is forgotten.
    /// Returns whether it left the table.
    fn exited(&mut self, i: usize, ctx: &mut Ctx<'_>) -> bool {
        let e = self.table.get(i);
        let was = e.phase;
        if was == Phase::Governed {
            self.counters.exited += 1;
            if let Some(t) = e.target.and_then(|t| self.targets.list.get_mut(t)) {
                t.exited_total += 1;
            }
            log::info!("{} {} exited", e.comm, e.pid);
        }
        if was.is_saved() {
            *ctx.state_changed = true;
        }
        if !e.group.is_empty() {
            let result = match self.cgroups.root() {
                Some(root) => root.remove_group(e.group.as_bytes()),
                None => Err(io::Error::from_raw_os_error(libc::ENODEV)),
            };
            match result {
                Ok(()) => {
                    self.counters.groups_removed += 1;
                    log::info!("removed group {}", e.group);
                }
                Err(err) => {
                    let busy = matches!(err.raw_os_error(), Some(libc::EBUSY | libc::ENOTEMPTY));
                    let e = self.table.get_mut(i);
                    if e.phase != Phase::Lingering {
                        if !busy {
                            self.counters.group_remove_failures += 1;
                        }
                        e.phase = Phase::Lingering;
                        if busy {
                            e.note(format_args!(
                                "exited; its group still holds processes it left behind, and is removed once empty"
                            ));
                        } else {
                            e.note(format_args!("exited; removing its group failed: {err}"));
                        }
                        log::info!("{} {}: {}", e.comm, e.pid, e.note);
                        *ctx.state_changed = true;
                    }
                    return false;
                }
            }
        }
        self.table.remove(i);
        self.turned_away = false;
        true
    }

    /// One slice of the /proc scan.
    fn scan_step(&mut self, ctx: &mut Ctx<'_>) -> Progress {
        if !self.scan.active {
            let rewound = match self.proc.as_mut() {
                Some(p) => p.rewind(),
                None => return Progress::Done,
            };
            if let Err(e) = rewound {
                self.scan_failed(&e);
                return Progress::Done;
            }
            self.scan.active = true;
            self.scan.generation = self.scan.generation.wrapping_add(1);
            self.scan.started = Some(Instant::now());
            self.scan.pids = 0;
            self.attach_waiting(ctx);
        }
        for _ in 0..SCAN_BUDGET {
            let next = match self.proc.as_mut() {
                Some(p) => p.next_pid(),
                None => return Progress::Done,
            };
            match next {
                Ok(Some(pid)) => {
                    self.scan.pids += 1;
                    self.examine(pid, None, ctx);
                }
                Ok(None) => {
                    self.reconcile(ctx);
                    self.scan.active = false;
                    let us = self.scan.started.map_or(0, |s| {
                        Instant::now().as_nanos().saturating_sub(s.as_nanos()) / 1000
                    });
                    self.scan.last_us = us;
                    self.scan.failures_in_row = 0;
                    self.counters.scans += 1;
                    self.counters.scan_time_us += us;
                    return Progress::Done;
                }
                Err(e) => {
                    self.scan.active = false;
                    self.scan_failed(&e);
                    return Progress::Done;
                }
            }
        }
        Progress::Paused
    }

    fn scan_failed(&mut self, e: &io::Error) {
        self.counters.scan_failures += 1;
        self.scan.failures_in_row += 1;
        self.scan.last_error.clear();
        let _ = write!(Bounded(&mut self.scan.last_error), "/proc: {e}");
        log::warn!("scanning {}", self.scan.last_error);
    }

    /// The end of a scan: tracked processes it did not see (renamed, or
    /// gone) are checked one by one; lingering groups are tried again.
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) {
        if self.table.is_empty() {
            return;
        }
        self.regroup_lost(ctx);
        let generation = self.scan.generation;
        let mut i = 0;
        while i < self.table.len() {
            let e = self.table.get(i);
            let keep = if e.phase == Phase::Lingering {
                !self.exited(i, ctx)
            } else if e.seen == generation {
                true
            } else if self.alive(e.pid, e.start_ticks) {
                self.table.get_mut(i).seen = generation;
                true
            } else {
                !self.exited(i, ctx)
            };
            if keep {
                i += 1;
            }
        }
    }

    /// Governed processes whose group is gone (the root removed, or the
    /// group itself) go back to waiting, and are attached again as soon as
    /// the root is usable: a process never stays ungoverned because its
    /// group vanished under a quiet daemon.
    fn regroup_lost(&mut self, ctx: &mut Ctx<'_>) {
        let root_gone = self.cgroups.root().is_some_and(|r| r.is_gone());
        if root_gone {
            let e = io::Error::from_raw_os_error(libc::ENOENT);
            self.cgroups.lost(&e);
        }
        let mut lost = 0;
        for e in self.table.iter_mut() {
            if e.phase != Phase::Governed {
                continue;
            }
            let gone = root_gone
                || self
                    .cgroups
                    .root()
                    .is_some_and(|r| !r.has_group(e.group.as_bytes()));
            if gone {
                e.phase = Phase::Waiting;
                e.note(format_args!(
                    "its group is gone; grouped again once cgroup_root is usable"
                ));
                lost += 1;
            }
        }
        if lost > 0 {
            log::warn!("{lost} governed process(es) lost their group; attaching them again");
            *ctx.state_changed = true;
            self.attach_waiting(ctx);
        }
    }

    /// Processes that waited for `cgroup_root` get their attach now.
    fn attach_waiting(&mut self, ctx: &mut Ctx<'_>) {
        if self.table.count(Phase::Waiting) == 0 || !self.cgroups.ensure() {
            return;
        }
        let mut i = 0;
        while i < self.table.len() {
            let e = self.table.get(i);
            let keep = if e.phase == Phase::Waiting {
                if self.alive(e.pid, e.start_ticks) {
                    let rss = self.rss_of(e.pid);
                    self.attach(i, rss, ctx)
                } else {
                    !self.exited(i, ctx)
                }
            } else {
                true
            };
            if keep {
                i += 1;
            }
        }
    }

    /// Young processes that came of age and retries that are due.
    fn on_due(&mut self, ctx: &mut Ctx<'_>) {
        let mut i = 0;
        while i < self.table.len() {
            let e = self.table.get(i);
            let due = matches!(e.phase, Phase::Young | Phase::Retrying) && e.due <= ctx.now;
            let keep = if !due {
                true
            } else if !self.alive(e.pid, e.start_ticks) {
                !self.exited(i, ctx)
            } else if e.phase == Phase::Young {
                self.decide(i, false, ctx)
            } else {
                let rss = self.rss_of(e.pid);
                self.attach(i, rss, ctx)
            };
            if keep {
                i += 1;
            }
        }
    }

    fn schedule(&self, ctx: &mut Ctx<'_>, at: Instant, id: u32) {
        if ctx.schedule(at, id).is_err() {
            log::error!("deadline queue full; govern timer {id} dropped");
        }
    }

    fn schedule_due(&self, ctx: &mut Ctx<'_>) {
        match self.table.next_due() {
            Some(at) => self.schedule(ctx, at, DUE),
            None => ctx.cancel(DUE),
        }
    }

    fn on_connector(&mut self, ctx: &mut Ctx<'_>) {
        for _ in 0..EVENTS_PER_TURN {
            let mut buf = [0u8; 2048];
            let received = match &self.connector {
                Some(c) => c.recv(&mut buf),
                None => return,
            };
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.counters.connector_overflows += 1;
                    log::warn!(
                        "proc connector queue overflowed and events were lost; scanning /proc now"
                    );
                    if !self.scan.active {
                        self.schedule(ctx, ctx.now, SCAN);
                    }
                    continue;
                }
                Err(e) => {
                    log::warn!(
                        "proc connector failed ({e}); discovery falls back to the /proc scan"
                    );
                    if let Some(c) = self.connector.take() {
                        let _ = ctx.deregister(std::os::fd::AsFd::as_fd(&c));
                    }
                    self.scan_only.clear();
                    let _ = write!(Bounded(&mut self.scan_only), "proc connector failed: {e}");
                    return;
                }
            };
            for ev in events(&buf[..n]) {
                self.counters.connector_events += 1;
                match ev.event {
                    ProcEvent::Exec { tgid, .. } => self.examine(tgid, Some(ev.timestamp_ns), ctx),
                    ProcEvent::Comm { pid, tgid } if pid == tgid => {
                        self.examine(tgid, Some(ev.timestamp_ns), ctx)
                    }
                    ProcEvent::Exit { pid, tgid } if pid == tgid => {
                        if let Some(i) = self.table.find(tgid) {
                            let e = self.table.get(i);
                            if !self.alive(e.pid, e.start_ticks) {
                                self.exited(i, ctx);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Entries from state.json: living ones are recognised by (pid, start
    /// time), the rest are forgotten and their groups removed.
    fn restore_tracked(&mut self, ctx: &mut Ctx<'_>) {
        for saved in std::mem::take(&mut self.restored.processes) {
            let target = self.targets.index_of(&saved.target);
            let Some(t) = saved.to_tracked(target) else {
                continue;
            };
            if self.table.push(t).is_err() {
                log::warn!(
                    "state.json holds more processes than limits.max_tracked_processes; {} {} is forgotten",
                    saved.comm,
                    saved.pid
                );
            }
        }
        let mut i = 0;
        while i < self.table.len() {
            let e = self.table.get(i);
            let keep = if e.phase != Phase::Lingering && self.alive(e.pid, e.start_ticks) {
                if e.phase == Phase::Governed {
                    let mut buf = [0u8; 4096];
                    let held = self.cgroups.ensure()
                        && self.cgroups.root().is_some_and(|r| {
                            r.holds(e.group.as_bytes(), e.pid, &mut buf)
                                .unwrap_or(false)
                        });
                    if held {
                        self.counters.recognised += 1;
                        log::info!(
                            "{} {} is still governed in {} (recognised by pid and start time)",
                            e.comm,
                            e.pid,
                            e.group
                        );
                        true
                    } else {
                        log::info!(
                            "{} {} left its group {}; attaching it again",
                            e.comm,
                            e.pid,
                            e.group
                        );
                        let rss = self.rss_of(e.pid);
                        self.attach(i, rss, ctx)
                    }
                } else {
                    true
                }
            } else {
                !self.exited(i, ctx)
            };
            if keep {
                i += 1;
            }
        }
        for saved in std::mem::take(&mut self.restored.targets) {
            if let Some(t) = self
                .targets
                .list
                .iter_mut()
                .find(|t| t.name == saved.target)
            {
                t.attached_total = saved.attached_total;
                t.exited_total = saved.exited_total;
            }
        }
    }

    /// Empty `<name>-<pid>` groups under a cgroup2 root that no tracked
    /// process owns: left by a crash that lost state.json.
    fn remove_leftover_groups(&mut self) {
        let Some(root) = self.cgroups.root() else {
            return;
        };
        if root.kind() != FsKind::Cgroup2 {
            return;
        }
        let mut names = Vec::new();
        let _ = root.each_group(|n| names.push(n.to_vec()));
        for name in names {
            let ours = name
                .rsplit(|&b| b == b'-')
                .next()
                .is_some_and(|pid| !pid.is_empty() && pid.iter().all(u8::is_ascii_digit))
                && name.contains(&b'-');
            let tracked = self.table.iter().any(|t| t.group.as_bytes() == name);
            if ours && !tracked && root.remove_group(&name).is_ok() {
                self.counters.groups_removed += 1;
                log::info!(
                    "removed empty leftover group {}",
                    String::from_utf8_lossy(&name)
                );
            }
        }
    }

    /// Rewrites the limits of governed processes whose target's limits
    /// changed (reload).
    fn rewrite_limits(&mut self) {
        let enabled = self.cgroups.enabled;
        for i in 0..self.table.len() {
            let e = self.table.get(i);
            if e.phase != Phase::Governed {
                continue;
            }
            let Some(limits) = e
                .target
                .and_then(|t| self.targets.list.get(t))
                .map(|t| t.limits)
            else {
                continue;
            };
            let rss = self.rss_of(e.pid);
            let Some(root) = self.cgroups.root() else {
                return;
            };
            let want = table::Applied {
                cpu_max_us: enabled.cpu.then(|| limits.cpu_max_us()),
                cpu_weight: enabled.cpu.then_some(limits.cpu_weight),
                memory_max: enabled.memory.then_some(limits.memory_max),
            };
            if want == e.applied {
                continue;
            }
            match write_limits(root, e.group.as_bytes(), enabled, &limits, rss) {
                Ok((applied, refused)) => {
                    let e = self.table.get_mut(i);
                    e.applied = applied;
                    e.note.clear();
                    if let Some(r) = refused {
                        self.counters.memory_refused += 1;
                        e.refused(r.limit, r.rss);
                    }
                    log::info!(
                        "new limits for {} {}: {}",
                        e.comm,
                        e.pid,
                        docs::AppliedText(&e.applied)
                    );
                }
                Err(f) => log::warn!(
                    "new limits for {} {}: writing {}: {}",
                    e.comm,
                    e.pid,
                    f.file,
                    f.error
                ),
            }
        }
    }
}

impl Service for Govern {
    fn name(&self) -> &'static str {
        "govern"
    }

    fn start(&mut self, ctx: &mut Ctx<'_>) -> io::Result<()> {
        let (targets, warnings) = Targets::from_config(&self.config);
        for w in warnings {
            log::warn!("{w}");
        }
        self.targets = targets;
        self.proc = Some(
            ProcFs::open(32 * 1024)
                .map_err(|e| io::Error::new(e.kind(), format!("opening /proc: {e}")))?,
        );
        self.ticks = procfs::clock_ticks();
        self.boot_secs = procfs::boot_time_secs().unwrap_or_else(|e| {
            log::warn!("boot time unknown ({e}); process start times are shown from the epoch");
            0
        });
        self.cgroups.ensure();
        self.open_connector(ctx);
        self.restore_tracked(ctx);
        self.remove_leftover_groups();
        while self.scan_step(ctx) == Progress::Paused {}
        self.schedule(
            ctx,
            ctx.now.after_millis(self.config.scan_every.as_millis()),
            SCAN,
        );
        self.schedule_due(ctx);
        log::info!(
            "looking for {} target(s) in {} processes; {} governed",
            self.targets.list.len(),
            self.scan.pids,
            self.table.count(Phase::Governed)
        );
        Ok(())
    }

    fn on_ready(&mut self, local: u64, ctx: &mut Ctx<'_>) {
        if local == CONNECTOR {
            self.on_connector(ctx);
            self.schedule_due(ctx);
        }
    }

    fn on_timer(&mut self, id: u32, ctx: &mut Ctx<'_>) {
        match id {
            SCAN | SCAN_MORE => {
                if id == SCAN && self.scan.active {
                    return; // a scan in slices is under way
                }
                if id == SCAN_MORE && !self.scan.active {
                    return;
                }
                match self.scan_step(ctx) {
                    Progress::Paused => self.schedule(ctx, ctx.now, SCAN_MORE),
                    Progress::Done => {
                        let every = self.config.scan_every.as_millis();
                        self.schedule(ctx, ctx.now.after_millis(every), SCAN);
                    }
                }
            }
            DUE => self.on_due(ctx),
            _ => {}
        }
        self.schedule_due(ctx);
    }

    fn reload(&mut self, config: &Config, ctx: &mut Ctx<'_>) {
        let Some(g) = &config.govern else { return };
        if g.cgroup_root != self.config.cgroup_root {
            log::warn!(
                "govern.cgroup_root changed to {}: takes effect at restart (groups live under {})",
                g.cgroup_root.display(),
                self.config.cgroup_root.display()
            );
        }
        let (mut targets, warnings) = Targets::from_config(g);
        for w in warnings {
            log::warn!("{w}");
        }
        for t in &mut targets.list {
            if let Some(old) = self.targets.list.iter().find(|o| o.name == t.name) {
                t.attached_total = old.attached_total;
                t.exited_total = old.exited_total;
            }
        }
        for e in self.table.iter_mut() {
            e.target = e
                .target
                .and_then(|i| self.targets.list.get(i))
                .and_then(|old| targets.index_of(&old.name));
            if e.phase == Phase::Young {
                e.due = ctx.now; // min_runtime may have changed
            }
        }
        self.targets = targets;
        let root = self.config.cgroup_root.clone();
        self.config = g.clone();
        self.config.cgroup_root = root;
        self.rewrite_limits();
        // Passed-over processes are judged again under the new filters.
        self.table.retain(|e| !matches!(e.phase, Phase::Ignored(_)));
        if !self.scan.active {
            self.schedule(ctx, ctx.now, SCAN);
        }
        self.schedule_due(ctx);
    }

    fn report(&self, r: &mut Report) {
        docs::report(self, r);
    }

    fn details(&self, out: &mut [u8]) -> serde_json_core::ser::Result<usize> {
        serde_json_core::to_slice(&docs::Details(self), out)
    }

    fn save_state(&self, out: &mut [u8]) -> serde_json_core::ser::Result<usize> {
        serde_json_core::to_slice(&docs::SavedDoc(self), out)
    }

    fn restore_state(&mut self, saved: &serde_json::Value) {
        match serde_json::from_value::<Saved>(saved.clone()) {
            Ok(s) => {
                self.counters = s.counters;
                self.restored = s;
            }
            Err(e) => log::warn!("its saved state is unreadable ({e}); starting without it"),
        }
    }

    fn stop(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(c) = self.connector.take() {
            c.unsubscribe();
            let _ = ctx.deregister(std::os::fd::AsFd::as_fd(&c));
        }
        log::info!(
            "leaving {} governed process(es) running in their groups",
            self.table.count(Phase::Governed)
        );
    }
}
