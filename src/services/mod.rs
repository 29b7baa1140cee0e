//! What a service is to the daemon: a plain struct behind a small interface.
//!
//! What it is: the [`Service`] trait the daemon drives (start-up scan,
//! ready fds, due timers, exited children, reload, report, stop), the
//! [`Ctx`] through which a service registers fds and timers and raises
//! alerts, and the [`Report`] it fills for status and metrics. A service
//! knows nothing of epoll beyond the tokens it registered.
//! What it is not: the services themselves; they live beside this file and
//! arrive one issue at a time.

pub mod frames;
pub mod govern;
pub mod relocate;
pub mod storage;

use std::io;
use std::os::fd::BorrowedFd;

use nix::unistd::Pid;
use serde::Serialize;

use crate::config::Config;
use crate::reactor::{QueueFull, Reactor, TimerId, Token};
use crate::report::alerts::{Alert, Alerts};
use crate::sys::clock::{Instant, WallTime};
use crate::sys::process::ChildExit;

/// How a service is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Degraded,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unhealthy => "unhealthy",
        }
    }
    /// The value of the `edgekeeper_service_health` gauge.
    pub fn gauge(self) -> u8 {
        self as u8
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// Only ever goes up (Prometheus `counter`, name ends in `_total`).
    Counter,
    /// Goes up and down (Prometheus `gauge`).
    Gauge,
}

/// One number a service reports. `name` is used as is in status.json and
/// as `edgekeeper_<service>_<name>` in metrics, so it carries its unit
/// (`bytes_copied_total`, `watches`).
#[derive(Clone, Copy, Debug)]
pub struct Counter {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: CounterKind,
    pub value: u64,
}

pub const MAX_COUNTERS: usize = 48;

/// A counter broken down by one label, such as a governed target:
/// `edgekeeper_<service>_<name>{<label>="<value>"}` in metrics.
#[derive(Clone, Debug)]
pub struct Labelled {
    pub counter: Counter,
    pub label: &'static str,
    pub value: heapless::String<64>,
}

pub const MAX_LABELLED: usize = 48;

/// What a service says about itself in a status snapshot.
pub struct Report {
    pub health: Health,
    pub reason: heapless::String<240>,
    pub counters: heapless::Vec<Counter, MAX_COUNTERS>,
    /// inotify watches this service holds.
    pub watches: u64,
    /// Processes this service tracks.
    pub tracked: u64,
    /// Counters per label value (metrics only; status.json shows them in
    /// the service's details).
    pub labelled: heapless::Vec<Labelled, MAX_LABELLED>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            health: Health::Healthy,
            reason: heapless::String::new(),
            counters: heapless::Vec::new(),
            watches: 0,
            tracked: 0,
            labelled: heapless::Vec::new(),
        }
    }
}

impl Report {
    pub fn counter(&mut self, name: &'static str, help: &'static str, value: u64) {
        let _ = self.counters.push(Counter {
            name,
            help,
            kind: CounterKind::Counter,
            value,
        });
    }
    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: u64) {
        let _ = self.counters.push(Counter {
            name,
            help,
            kind: CounterKind::Gauge,
            value,
        });
    }
    /// One series of a labelled counter (`kind` as for [`Counter`]).
    pub fn labelled(&mut self, counter: Counter, label: &'static str, value: &str) {
        let _ = self.labelled.push(Labelled {
            counter,
            label,
            value: crate::report::alerts::bounded(value),
        });
    }
    /// Sets health to at least `health`, keeping the first reason given for
    /// the worst state.
    pub fn worsen(&mut self, health: Health, reason: core::fmt::Arguments<'_>) {
        use core::fmt::Write;
        if health > self.health {
            self.health = health;
            self.reason.clear();
        }
        if health == self.health && self.reason.is_empty() {
            // Cut to fit rather than lose a reason longer than the buffer
            // (heapless refuses a whole piece that does not fit).
            let _ = Bounded(&mut self.reason).write_fmt(reason);
        }
    }
}

/// Writes into a heapless string what fits and drops the rest (heapless
/// itself refuses a whole piece that does not fit).
pub struct Bounded<'a, const N: usize>(pub &'a mut heapless::String<N>);

impl<const N: usize> core::fmt::Write for Bounded<'_, N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.chars() {
            if self.0.push(c).is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// What a service may touch while it handles something.
pub struct Ctx<'a> {
    pub reactor: &'a mut Reactor,
    pub alerts: &'a mut Alerts,
    pub now: Instant,
    pub wall: WallTime,
    /// Set it when something that belongs in state.json changed.
    pub state_changed: &'a mut bool,
    pub owner: u16,
}

/// Bits of a token that carry the owner; the rest is the service's own.
pub const TOKEN_OWNER_SHIFT: u32 = 48;

impl Ctx<'_> {
    /// Registers `fd`; it comes back to this service as `on_ready(local)`.
    pub fn register(&mut self, fd: BorrowedFd<'_>, local: u64) -> io::Result<()> {
        self.reactor.register(fd, Token(token(self.owner, local)))
    }
    pub fn deregister(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.reactor.deregister(fd)
    }
    /// Queues timer `id` of this service at `at` (moving it if queued).
    pub fn schedule(&mut self, at: Instant, id: u32) -> Result<(), QueueFull> {
        self.reactor.schedule(
            at,
            TimerId {
                owner: self.owner,
                id,
            },
        )
    }
    pub fn cancel(&mut self, id: u32) {
        self.reactor.cancel(TimerId {
            owner: self.owner,
            id,
        })
    }
    pub fn is_scheduled(&self, id: u32) -> bool {
        self.reactor.is_scheduled(TimerId {
            owner: self.owner,
            id,
        })
    }
    pub fn raise(&mut self, alert: &Alert<'_>) {
        if self.alerts.raise(alert, self.wall) {
            *self.state_changed = true;
        }
    }
}

pub fn token(owner: u16, local: u64) -> u64 {
    (u64::from(owner) << TOKEN_OWNER_SHIFT) | (local & ((1 << TOKEN_OWNER_SHIFT) - 1))
}

/// A service as the daemon sees it.
pub trait Service {
    /// `relocate`, `frames`, `govern` or `storage`.
    fn name(&self) -> &'static str;
    /// How many of its timers may be queued at once (sizes the deadline
    /// queue at start).
    fn max_timers(&self) -> usize {
        16
    }
    /// Start-up: scan, register fds and timers. Returns once the service is
    /// ready (READY=1 is sent after every service's `start`).
    fn start(&mut self, ctx: &mut Ctx<'_>) -> io::Result<()>;
    /// A registered fd is readable.
    fn on_ready(&mut self, local: u64, ctx: &mut Ctx<'_>);
    /// A timer of this service is due.
    fn on_timer(&mut self, id: u32, ctx: &mut Ctx<'_>);
    /// A child exited; return true if it was this service's.
    fn on_child_exit(&mut self, _pid: Pid, _exit: ChildExit, _ctx: &mut Ctx<'_>) -> bool {
        false
    }
    /// The config was reloaded and is valid; adopt what can change live.
    fn reload(&mut self, config: &Config, ctx: &mut Ctx<'_>);
    /// Health and counters for the status snapshot.
    fn report(&self, report: &mut Report);
    /// Metrics beyond the report's counters (labelled, fractional), as
    /// Prometheus text lines with their HELP and TYPE, appended to `out`.
    fn metrics(&self, _out: &mut String) {}
    /// More for status.json, shown as `services.<name>.details`: one JSON
    /// value written into `out` with `serde_json_core::to_slice`; `Ok(0)`
    /// for none. `BufferFull` makes the daemon retry with a larger buffer.
    fn details(&self, _out: &mut [u8]) -> serde_json_core::ser::Result<usize> {
        Ok(0)
    }
    /// What must survive a restart, as one JSON value written into `out`
    /// (kept in state.json under `services.<name>`); `Ok(0)` for nothing.
    /// Set `Ctx::state_changed` when it changes.
    fn save_state(&self, _out: &mut [u8]) -> serde_json_core::ser::Result<usize> {
        Ok(0)
    }
    /// What `save_state` wrote before the restart; called before `start`.
    fn restore_state(&mut self, _saved: &serde_json::Value) {}
    /// The daemon is stopping: release what must not outlive it.
    fn stop(&mut self, _ctx: &mut Ctx<'_>) {}
    /// `edgekeeper sweep`: one full pass now, in a process of its own (the
    /// daemon may be running too), writing one line per action to `out`, or
    /// per action it would take with `dry_run`. Runs without the reactor.
    fn sweep(&mut self, _dry_run: bool, _out: &mut dyn io::Write) -> io::Result<SweepTotals> {
        Ok(SweepTotals::default())
    }
}

/// What a one-shot sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepTotals {
    /// Files moved or deleted (or that would be, in a dry run).
    pub acted: u64,
    /// Actions that failed; the files stay where they are.
    pub failed: u64,
}

/// The services a config turns on, and the configured ones this build does
/// not provide yet (reported as unhealthy rather than silently ignored).
pub struct Built {
    pub services: Vec<Box<dyn Service>>,
    pub not_built: Vec<&'static str>,
}

/// Builds the services a config turns on. Constructors only take the
/// config in: no file is touched, no fd is made until `start` (or `sweep`).
pub fn build(config: &Config) -> Built {
    let mut services: Vec<Box<dyn Service>> = Vec::new();
    if !config.relocate.is_empty() {
        services.push(Box::new(relocate::Relocate::new(config)));
    }
    if !config.frames.is_empty() {
        services.push(Box::new(frames::Frames::new(config)));
    }
    if let Some(g) = &config.govern {
        services.push(Box::new(govern::Govern::new(g, &config.limits)));
    }
    if let Some(s) = &config.storage {
        services.push(Box::new(storage::Storage::new(s)));
    }
    let mut not_built = config.services();
    not_built.retain(|name| !services.iter().any(|s| s.name() == *name));
    Built {
        services,
        not_built,
    }
}

/// Services this build provides, for `edgekeeper version`.
pub const PROVIDED: &[&str] = &["relocate", "frames", "govern", "storage"];

/// JSON pieces written by each service into one buffer made at start, to be
/// embedded in status.json or state.json without copying or allocating.
pub struct Pieces {
    buf: Vec<u8>,
    spans: heapless::Vec<(&'static str, usize, usize), 8>,
}

/// A piece of JSON that is already serialised. Embeds it verbatim through
/// serde-json-core (whose `serialize_bytes` writes raw bytes); only for
/// that serializer.
pub struct RawJson<'a>(pub &'a [u8]);

impl Serialize for RawJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl Pieces {
    pub fn with_capacity(bytes: usize) -> Pieces {
        Pieces {
            buf: vec![0; bytes.max(1024)],
            spans: heapless::Vec::new(),
        }
    }

    /// Asks each service for its piece with `write`.
    pub fn collect(
        &mut self,
        services: &[Box<dyn Service>],
        write: impl Fn(&dyn Service, &mut [u8]) -> serde_json_core::ser::Result<usize>,
    ) {
        self.spans.clear();
        let mut at = 0;
        for svc in services {
            let n = loop {
                match write(svc.as_ref(), &mut self.buf[at..]) {
                    Ok(n) if at + n < self.buf.len() => break n,
                    Ok(_) | Err(serde_json_core::ser::Error::BufferFull) => {
                        let len = self.buf.len() * 2;
                        log::warn!(
                            "{}: status/state piece outgrew its buffer; growing it to {len} bytes",
                            svc.name()
                        );
                        self.buf.resize(len, 0);
                    }
                    Err(e) => {
                        log::error!("{}: cannot serialise its status/state: {e}", svc.name());
                        break 0;
                    }
                }
            };
            if n > 0 {
                let _ = self.spans.push((svc.name(), at, at + n));
                at += n;
            }
        }
    }

    /// The piece of service `name`, if it wrote one.
    pub fn get(&self, name: &str) -> Option<RawJson<'_>> {
        self.spans
            .iter()
            .find(|s| s.0 == name)
            .map(|&(_, a, b)| RawJson(&self.buf[a..b]))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, RawJson<'_>)> {
        self.spans
            .iter()
            .map(|&(n, a, b)| (n, RawJson(&self.buf[a..b])))
    }
}
