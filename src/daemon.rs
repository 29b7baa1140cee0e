//! The daemon behind `edgekeeper run`: start-up, the loop, reload, stop.
//!
//! What it is: the owner of everything that lives for the whole run (config,
//! reactor, notifier, instance lock, state, alerts, status files, services)
//! and the dispatcher that routes each wake of the reactor to its owner: a
//! signal to the core, a deadline to whoever scheduled it, a ready fd to the
//! service whose token it carries. Core deadlines are the status snapshot,
//! the systemd watchdog ping, the spaced state write, the field-log flush and
//! the alert-command timeout. After `READY=1` a turn of the loop allocates
//! nothing (tests/steady_state.rs counts).
//! What it is not: a service. Services live in `services/` and see the
//! daemon only through `Ctx`.

use std::io;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

use crate::config::{Config, ConfigError};
use crate::reactor::{Reactor, TimerId, Wake};
use crate::report::alerts::{Alert, AlertLevel, Alerts};
use crate::report::status::{CoreCounters, Snapshot, StatusFiles};
use crate::report::{self, log as sink};
use crate::services::{self, Ctx, Pieces, Service, TOKEN_OWNER_SHIFT};
use crate::state::{self, Lifetime, StateStore};
use crate::sys::clock::{Instant, WallTime};
use crate::sys::lock::{InstanceLock, LockError};
use crate::sys::notify::Notifier;
use crate::sys::process::{block_signals, reap_one};

/// The signals the daemon takes through its signalfd.
pub const SIGNALS: [Signal; 5] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGCHLD,
];

/// Owner id of the core's own deadlines; services are 1, 2, …
const CORE: u16 = 0;
const STATUS: TimerId = TimerId { owner: CORE, id: 1 };
const WATCHDOG: TimerId = TimerId { owner: CORE, id: 2 };
const STATE: TimerId = TimerId { owner: CORE, id: 3 };
const LOG_FLUSH: TimerId = TimerId { owner: CORE, id: 4 };
const ALERT_COMMANDS: TimerId = TimerId { owner: CORE, id: 5 };

/// Deadlines the core itself may have queued at once.
const CORE_TIMERS: usize = 8;
/// Deadlines kept free for services that grow on reload.
const SPARE_TIMERS: usize = 64;

/// Why the daemon could not start or had to stop.
#[derive(Debug)]
pub enum RunError {
    /// Exit 78: the config is invalid.
    Config(ConfigError),
    /// Exit 1: another instance holds the lock.
    Lock(LockError),
    /// Exit 1: something the daemon needs failed; the text names it.
    Io(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Config(e) => write!(f, "{e}"),
            RunError::Lock(e) => write!(f, "{e}"),
            RunError::Io(e) => write!(f, "{e}"),
        }
    }
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> RunError {
    move |e| RunError::Io(format!("{what}: {e}"))
}

pub struct Daemon {
    config_path: PathBuf,
    config_path_text: String,
    config: Config,
    config_loaded: WallTime,
    last_reload_error: Option<String>,
    reactor: Reactor,
    notifier: Notifier,
    _lock: InstanceLock,
    status_files: StatusFiles,
    state: StateStore,
    state_dirty: bool,
    lifetime: Lifetime,
    alerts: Alerts,
    services: Vec<Box<dyn Service>>,
    not_built: Vec<&'static str>,
    /// Scratch for the services' status details and saved state.
    pieces: Pieces,
    core: CoreCounters,
    started: WallTime,
    started_at: Instant,
    stopping: bool,
    status_line: heapless::String<256>,
    notify_buf: heapless::String<320>,
}

impl Daemon {
    /// Everything before `READY=1`: config, logs, lock, state, signals,
    /// services' start-up scans, the first status snapshot.
    pub fn start(config_path: &Path, notifier: Notifier) -> Result<Daemon, RunError> {
        let config_path =
            &std::path::absolute(config_path).unwrap_or_else(|_| config_path.to_path_buf());
        let config = Config::load(config_path).map_err(RunError::Config)?;
        std::fs::create_dir_all(&config.run_dir)
            .map_err(io_err(format_args!("run_dir {}", config.run_dir.display())))?;
        let lock = InstanceLock::acquire(&config.run_dir).map_err(RunError::Lock)?;
        // The field log is shared with nobody: configure it once the lock
        // says this is the only instance.
        if let Err(e) = sink::configure(&config.log) {
            if let Some(file) = &config.log.file {
                log::warn!("log.file {}: {e}; logging to stderr only", file.display());
            }
        }
        let capacity = StateStore::capacity_for(report::alerts::COOLDOWNS);
        let opened = StateStore::open(&config.state_dir, capacity).map_err(io_err(
            format_args!("state_dir {}", config.state_dir.display()),
        ))?;
        block_signals(&SIGNALS).map_err(|e| RunError::Io(format!("blocking signals: {e}")))?;
        let built = services::build(&config);
        // Room for what the services need now, and spare for rules a reload
        // may add.
        let timers: usize = built.services.iter().map(|s| s.max_timers()).sum();
        let reactor = Reactor::new(&SIGNALS, CORE_TIMERS + timers + SPARE_TIMERS, 64)
            .map_err(io_err("event loop"))?;
        let mut built = built;
        for svc in &mut built.services {
            if let Some(saved) = opened.loaded.services.get(svc.name()) {
                svc.restore_state(saved);
            }
        }
        let mut alerts = Alerts::new(&config.alerts);
        alerts.restore(opened.loaded.alert_cooldowns);
        let mut lifetime = opened.loaded.lifetime;
        lifetime.starts += 1;
        let tracked_bytes = BYTES_PER_TRACKED * config_limits_tracked(&config);
        let status_files = StatusFiles::with_capacity(&config.run_dir, 32 * 1024 + tracked_bytes)
            .map_err(io_err(format_args!("run_dir {}", config.run_dir.display())))?;
        let pieces = Pieces::with_capacity(16 * 1024 + tracked_bytes);
        let now = Instant::now();
        let mut daemon = Daemon {
            config_path_text: config_path.display().to_string(),
            config_path: config_path.to_path_buf(),
            config,
            config_loaded: WallTime::now(),
            last_reload_error: None,
            reactor,
            notifier,
            _lock: lock,
            status_files,
            state: opened.store,
            state_dirty: true,
            lifetime,
            alerts,
            pieces,
            services: built.services,
            not_built: built.not_built,
            core: CoreCounters::default(),
            started: WallTime::now(),
            started_at: now,
            stopping: false,
            status_line: heapless::String::new(),
            notify_buf: heapless::String::new(),
        };
        log::info!(
            "edgekeeper {} starting (pid {}, config {}, run_dir {}, state_dir {})",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            daemon.config_path.display(),
            daemon.config.run_dir.display(),
            daemon.config.state_dir.display()
        );
        if let Some((aside, why)) = opened.moved_aside {
            let message = format!(
                "state file was corrupt ({why}); moved aside to {} and starting fresh",
                aside.display()
            );
            log::warn!("{message}");
            let source = daemon.state.path().display().to_string();
            daemon.raise(AlertLevel::Warning, "state_corrupt", &source, &message);
        }
        daemon.warn_not_built();
        for owner in 1..=daemon.services.len() as u16 {
            let started = daemon.with_service(owner, now, |svc, ctx| {
                svc.start(ctx)
                    .map_err(io_err(format_args!("starting {}", svc.name())))
            });
            started.unwrap_or(Ok(()))?;
        }
        daemon.schedule(
            STATUS,
            now.after_millis(daemon.config.status_every.as_millis()),
        );
        if let Some(us) = daemon.notifier.watchdog_usec() {
            log::info!(
                "systemd watchdog every {} ms: pinging every {} ms",
                us / 1000,
                us / 2000
            );
            daemon.schedule(WATCHDOG, now.after_micros(us / 2));
        }
        daemon.save_state(now);
        daemon.write_status(true);
        daemon.notify(format_args!("READY=1"));
        log::info!("ready: {} service(s) running", daemon.services.len());
        Ok(daemon)
    }

    fn warn_not_built(&self) {
        for name in &self.not_built {
            log::warn!(
                "{name} is configured but this edgekeeper build does not provide it yet: its block was validated and is not acted on"
            );
        }
    }

    /// Runs the loop until SIGTERM or SIGINT, then stops cleanly.
    pub fn run(mut self) -> Result<(), RunError> {
        while !self.stopping {
            self.turn(None)?;
        }
        self.stop();
        Ok(())
    }

    /// One turn of the loop: wait (at most `timeout_ms`), handle every wake.
    pub fn turn(&mut self, timeout_ms: Option<u16>) -> Result<(), RunError> {
        let n = self
            .reactor
            .poll(timeout_ms)
            .map_err(io_err("waiting for events"))?
            .len();
        for i in 0..n {
            let wake = self.reactor.woken()[i];
            self.dispatch(wake);
        }
        self.core.loop_iterations += 1;
        self.housekeeping();
        Ok(())
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    fn dispatch(&mut self, wake: Wake) {
        let now = Instant::now();
        match wake {
            Wake::Signal(Signal::SIGTERM | Signal::SIGINT) => {
                log::info!("stop requested");
                self.stopping = true;
            }
            Wake::Signal(Signal::SIGHUP) => self.reload(),
            Wake::Signal(Signal::SIGUSR1) => {
                log::debug!("status snapshot requested (SIGUSR1)");
                self.write_status(true);
            }
            Wake::Signal(Signal::SIGCHLD) => self.reap_children(),
            Wake::Signal(other) => log::debug!("ignoring {other}"),
            Wake::Deadline(STATUS) => {
                self.write_status(true);
                self.schedule(
                    STATUS,
                    now.after_millis(self.config.status_every.as_millis()),
                );
            }
            Wake::Deadline(WATCHDOG) => {
                self.notify(format_args!("WATCHDOG=1"));
                self.core.watchdog_pings += 1;
                if let Some(us) = self.notifier.watchdog_usec() {
                    self.schedule(WATCHDOG, now.after_micros(us / 2));
                }
            }
            Wake::Deadline(STATE) => {
                if self.state_dirty {
                    self.save_state(now);
                }
            }
            Wake::Deadline(LOG_FLUSH) => sink::flush(),
            Wake::Deadline(ALERT_COMMANDS) => self.alerts.kill_overdue(now),
            Wake::Deadline(TimerId { owner, id }) => {
                self.with_service(owner, now, |svc, ctx| svc.on_timer(id, ctx));
            }
            Wake::Ready(token) => {
                let owner = (token.0 >> TOKEN_OWNER_SHIFT) as u16;
                let local = token.0 & ((1 << TOKEN_OWNER_SHIFT) - 1);
                self.with_service(owner, now, |svc, ctx| svc.on_ready(local, ctx));
            }
        }
    }

    /// Calls `f` with service `owner` and a context for it; `None` if no
    /// such service (a stale token or timer).
    fn with_service<R>(
        &mut self,
        owner: u16,
        now: Instant,
        f: impl FnOnce(&mut dyn Service, &mut Ctx<'_>) -> R,
    ) -> Option<R> {
        let Some(svc) = (owner as usize)
            .checked_sub(1)
            .and_then(|i| self.services.get_mut(i))
        else {
            log::debug!("wake for unknown owner {owner}");
            return None;
        };
        let mut ctx = Ctx {
            reactor: &mut self.reactor,
            alerts: &mut self.alerts,
            now,
            wall: WallTime::now(),
            state_changed: &mut self.state_dirty,
            owner,
        };
        Some(f(svc.as_mut(), &mut ctx))
    }

    fn reap_children(&mut self) {
        while let Some((pid, exit)) = reap_one() {
            self.core.children_reaped += 1;
            if self.alerts.on_child_exit(pid, exit) {
                continue;
            }
            let now = Instant::now();
            let claimed = (1..=self.services.len() as u16).any(|owner| {
                self.with_service(owner, now, |svc, ctx| svc.on_child_exit(pid, exit, ctx))
                    == Some(true)
            });
            if !claimed {
                log::debug!("reaped unknown child {pid}: {exit:?}");
            }
        }
    }

    /// Deadlines that follow from what the turn changed.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        if self.state_dirty && !self.reactor.is_scheduled(STATE) {
            self.schedule(STATE, self.state.due(now));
        }
        if let Some(at) = sink::flush_due() {
            if !self.reactor.is_scheduled(LOG_FLUSH) {
                self.schedule(LOG_FLUSH, at);
            }
        }
        match self.alerts.command_deadline() {
            Some(at) => self.schedule(ALERT_COMMANDS, at),
            None => self.reactor.cancel(ALERT_COMMANDS),
        }
    }

    fn schedule(&mut self, id: TimerId, at: Instant) {
        if self.reactor.schedule(at, id).is_err() {
            // The core's deadlines are counted into the capacity at start.
            log::error!("deadline queue full; core timer {} dropped", id.id);
        }
    }

    fn notify(&mut self, message: std::fmt::Arguments<'_>) {
        use std::fmt::Write;
        self.notify_buf.clear();
        let _ = self.notify_buf.write_fmt(message);
        if let Err(e) = self.notifier.send(self.notify_buf.as_bytes()) {
            log::warn!("sd_notify {}: {e}", self.notify_buf);
        }
    }

    fn raise(&mut self, level: AlertLevel, kind: &str, source: &str, message: &str) {
        let alert = Alert {
            level,
            kind,
            source,
            message,
            value: None,
        };
        if self.alerts.raise(&alert, WallTime::now()) {
            self.state_dirty = true;
        }
    }

    /// SIGHUP: re-read the config. A bad one is logged, alerted and ignored;
    /// the daemon goes on with the config it has.
    fn reload(&mut self) {
        let now = Instant::now();
        self.notify(format_args!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            now.as_micros()
        ));
        log::info!("reloading config from {}", self.config_path.display());
        match Config::load(&self.config_path) {
            Err(e) => {
                self.core.config_reload_failures += 1;
                let message =
                    format!("config reload refused, still running on the previous config: {e}");
                log::error!("{message}");
                let source = self.config_path_text.clone();
                self.raise(AlertLevel::Warning, "config_invalid", &source, &message);
                self.last_reload_error = Some(e.to_string());
            }
            Ok(mut new) => {
                self.keep_restart_only_settings(&mut new);
                if let Err(e) = sink::configure(&new.log) {
                    log::warn!("log.file: {e}; logging to stderr only");
                }
                self.alerts.configure(&new.alerts);
                for i in 0..self.services.len() {
                    let owner = i as u16 + 1;
                    self.with_service(owner, now, |svc, ctx| svc.reload(&new, ctx));
                }
                if new.status_every != self.config.status_every {
                    self.schedule(STATUS, now.after_millis(new.status_every.as_millis()));
                }
                self.not_built = services::build(&new).not_built;
                self.config = new;
                self.config_loaded = WallTime::now();
                self.last_reload_error = None;
                self.core.config_reloads += 1;
                log::info!("config reloaded");
                self.warn_not_built();
            }
        }
        self.notify(format_args!("READY=1"));
        self.write_status(true);
    }

    /// Settings that size or place what was made at start keep their old
    /// values until a restart; the user is told which.
    fn keep_restart_only_settings(&self, new: &mut Config) {
        let old = &self.config;
        if new.run_dir != old.run_dir {
            log::warn!(
                "run_dir changed to {}: takes effect at restart",
                new.run_dir.display()
            );
            new.run_dir = old.run_dir.clone();
        }
        if new.state_dir != old.state_dir {
            log::warn!(
                "state_dir changed to {}: takes effect at restart",
                new.state_dir.display()
            );
            new.state_dir = old.state_dir.clone();
        }
        if new.limits != old.limits {
            log::warn!("limits changed: take effect at restart");
            new.limits = old.limits.clone();
        }
        if new.services() != old.services() {
            log::warn!("services turned on or off: takes effect at restart");
        }
    }

    fn save_state(&mut self, now: Instant) {
        self.pieces
            .collect(&self.services, |svc, out| svc.save_state(out));
        let mut lifetime = self.lifetime;
        lifetime.alerts_raised += self.alerts.raised;
        lifetime.alerts_suppressed += self.alerts.suppressed;
        let snapshot = state::Snapshot {
            saved_at: WallTime::now(),
            lifetime,
            alert_cooldowns: self.alerts.cooldowns(),
            services: Some(&self.pieces),
        };
        match self.state.save(&snapshot, now) {
            Ok(()) => {
                self.core.state_writes += 1;
                self.state_dirty = false;
            }
            Err(e) => {
                self.core.state_write_failures += 1;
                log::error!(
                    "state {}: {e}; retrying in {} s",
                    self.state.path().display(),
                    state::MIN_INTERVAL_MS / 1000
                );
            }
        }
    }

    fn write_status(&mut self, running: bool) {
        self.pieces
            .collect(&self.services, |svc, out| svc.details(out));
        let now = WallTime::now();
        let mut lifetime = self.lifetime;
        lifetime.alerts_raised += self.alerts.raised;
        lifetime.alerts_suppressed += self.alerts.suppressed;
        let snapshot = Snapshot {
            pid: std::process::id(),
            running,
            started: self.started,
            now,
            uptime_ms: Instant::now().millis_since(self.started_at),
            status_every_ms: self.config.status_every.as_millis(),
            config_path: &self.config_path_text,
            config_loaded: self.config_loaded,
            last_reload_error: self.last_reload_error.as_deref(),
            watchdog_usec: self.notifier.watchdog_usec(),
            core: &self.core,
            log: sink::stats(),
            lifetime,
            services: &self.services,
            details: &self.pieces,
            not_built: &self.not_built,
            alerts: &self.alerts,
        };
        let mut line = heapless::String::<256>::new();
        snapshot.summary(&mut line);
        match self.status_files.write(&snapshot) {
            Ok(()) => self.core.status_writes += 1,
            Err(e) => {
                self.core.status_write_failures += 1;
                log::warn!("status snapshot in {}: {e}", self.config.run_dir.display());
            }
        }
        if running && line != self.status_line {
            self.notify(format_args!("STATUS={line}"));
            self.status_line = line;
        }
    }

    /// SIGTERM/SIGINT: tell systemd, stop services, flush state, status and
    /// logs. Governed processes and files are left as they are.
    pub fn stop(mut self) {
        self.notify(format_args!("STOPPING=1"));
        let now = Instant::now();
        for i in 0..self.services.len() {
            let owner = i as u16 + 1;
            self.with_service(owner, now, |svc, ctx| svc.stop(ctx));
        }
        self.save_state(now);
        self.write_status(false);
        log::info!("stopped");
        sink::flush();
    }
}

/// Bytes of status details or state to expect per tracked process (govern
/// shows pid, names, group, limits, times and a note of up to 160 bytes).
const BYTES_PER_TRACKED: usize = 512;

/// Tracked processes to make room for in status and state.
fn config_limits_tracked(config: &Config) -> usize {
    if config.govern.is_some() {
        config.limits.max_tracked_processes as usize
    } else {
        0
    }
}
