//! Alerts: things a person should look at, raised by any service.
//!
//! What it is: each alert has a level (`warning` or `critical`), a kind
//! (`disk_critical`, `frame_stall`, …), a source (a mount, a capture name, a
//! rule) and a message with an optional value. It is logged, kept among the
//! last few for status, written as one JSON file in `alerts.dir`, and handed
//! to `alerts.command` (run without a shell). The same kind and source is
//! raised at most once per cooldown; the cooldown table is saved in
//! state.json so a restart does not re-raise everything; a critical alert
//! whose level rose bypasses the cooldown.
//! What it is not: a notification transport. Mail, MQTT or a fleet
//! dashboard hang off `alerts.command` or the alert files.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nix::fcntl::{OFlag, openat};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::config;
use crate::sys::clock::{Instant, WallTime};
use crate::sys::fs::{open_dir, rename_noreplace};
use crate::sys::process::ChildExit;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertLevel {
    Warning,
    Critical,
}

impl AlertLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertLevel::Warning => "warning",
            AlertLevel::Critical => "critical",
        }
    }
}

/// An alert as a service raises it.
#[derive(Clone, Copy, Debug)]
pub struct Alert<'a> {
    pub level: AlertLevel,
    pub kind: &'a str,
    pub source: &'a str,
    pub message: &'a str,
    pub value: Option<f64>,
}

pub type Kind = heapless::String<32>;
pub type Source = heapless::String<128>;

/// The last time a kind and source was raised, as saved in state.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cooldown {
    pub kind: Kind,
    pub source: Source,
    pub level: AlertLevel,
    /// Seconds since the epoch.
    pub at: i64,
}

/// A recently raised alert, for the status snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct Recent {
    pub at: heapless::String<32>,
    pub level: AlertLevel,
    pub kind: Kind,
    pub source: Source,
    pub message: heapless::String<256>,
    pub value: Option<f64>,
}

/// How many kind+source pairs the cooldown table remembers.
pub const COOLDOWNS: usize = 256;
/// How many recent alerts status shows.
pub const RECENT: usize = 8;
/// An alert command still running after this long is killed.
pub const COMMAND_TIMEOUT_MS: u64 = 30_000;
const COMMANDS_AT_ONCE: usize = 8;

pub struct Alerts {
    cooldown_ms: u64,
    dir_path: Option<PathBuf>,
    dir: Option<OwnedFd>,
    command: Option<Vec<String>>,
    table: Vec<Cooldown>,
    recent: VecDeque<Recent>,
    children: Vec<(Pid, Instant)>,
    json: Vec<u8>,
    pub raised: u64,
    pub suppressed: u64,
    pub file_failures: u64,
    pub command_failures: u64,
}

/// Cuts `s` to at most N bytes on a character boundary.
pub fn bounded<const N: usize>(s: &str) -> heapless::String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = heapless::String::new();
    let _ = out.push_str(&s[..end]);
    out
}

#[derive(Serialize)]
struct AlertFile<'a> {
    at: &'a str,
    level: AlertLevel,
    kind: &'a str,
    source: &'a str,
    message: &'a str,
    value: Option<f64>,
}

impl Alerts {
    pub fn new(cfg: &config::Alerts) -> Alerts {
        let mut alerts = Alerts {
            cooldown_ms: 0,
            dir_path: None,
            dir: None,
            command: None,
            table: Vec::with_capacity(COOLDOWNS),
            recent: VecDeque::with_capacity(RECENT),
            children: Vec::with_capacity(COMMANDS_AT_ONCE),
            json: Vec::with_capacity(4096),
            raised: 0,
            suppressed: 0,
            file_failures: 0,
            command_failures: 0,
        };
        alerts.configure(cfg);
        alerts
    }

    /// Adopts a (re)loaded `alerts` block. The cooldown table is kept.
    pub fn configure(&mut self, cfg: &config::Alerts) {
        self.cooldown_ms = cfg.cooldown.as_millis();
        self.command = cfg.command.clone();
        if self.dir_path != cfg.dir {
            self.dir_path = cfg.dir.clone();
            self.dir = None;
            if let Some(path) = &self.dir_path {
                if let Err(e) = std::fs::create_dir_all(path)
                    .and_then(|()| open_dir(path))
                    .map(|fd| self.dir = Some(fd))
                {
                    log::warn!(
                        "alerts.dir {}: {e}; alerts are logged but not written as files",
                        path.display()
                    );
                }
            }
        }
    }

    /// Takes back the cooldowns saved before a restart.
    pub fn restore(&mut self, cooldowns: Vec<Cooldown>) {
        for c in cooldowns.into_iter().take(COOLDOWNS) {
            self.table.push(c);
        }
    }

    pub fn cooldowns(&self) -> &[Cooldown] {
        &self.table
    }

    pub fn recent(&self) -> impl Iterator<Item = &Recent> {
        self.recent.iter()
    }

    /// Raises `alert` unless the same kind and source is cooling down.
    /// Returns true if it was raised (the cooldown table changed).
    pub fn raise(&mut self, alert: &Alert<'_>, now: WallTime) -> bool {
        let kind: Kind = bounded(alert.kind);
        let source: Source = bounded(alert.source);
        let entry = self
            .table
            .iter()
            .position(|c| c.kind == kind && c.source == source);
        if let Some(i) = entry {
            let c = &self.table[i];
            let age_ms = (now.secs - c.at).saturating_mul(1000);
            // A clock that went backwards (a board without RTC before NTP)
            // ends the cooldown rather than silencing alerts for days.
            let cooling = age_ms >= 0 && (age_ms as u64) < self.cooldown_ms;
            let rose_to_critical =
                alert.level == AlertLevel::Critical && c.level < AlertLevel::Critical;
            if cooling && !rose_to_critical {
                self.suppressed += 1;
                log::debug!(
                    "alert {} {} [{}] suppressed: raised {}s ago, cooldown {}s",
                    alert.level.as_str(),
                    alert.kind,
                    alert.source,
                    age_ms / 1000,
                    self.cooldown_ms / 1000
                );
                return false;
            }
        }
        let record = Cooldown {
            kind: kind.clone(),
            source: source.clone(),
            level: alert.level,
            at: now.secs,
        };
        match entry {
            Some(i) => self.table[i] = record,
            None if self.table.len() < COOLDOWNS => self.table.push(record),
            None => {
                // Full: forget the pair raised longest ago.
                if let Some(oldest) = self.table.iter_mut().min_by_key(|c| c.at) {
                    *oldest = record;
                }
            }
        }
        self.raised += 1;
        let value = alert.value.filter(|v| v.is_finite());
        match alert.level {
            AlertLevel::Critical => log::error!(
                "ALERT critical {} [{}]: {}",
                alert.kind,
                alert.source,
                alert.message
            ),
            AlertLevel::Warning => log::warn!(
                "ALERT warning {} [{}]: {}",
                alert.kind,
                alert.source,
                alert.message
            ),
        }
        let mut at = heapless::String::<32>::new();
        let _ = write!(at, "{}", now.iso());
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(Recent {
            at: at.clone(),
            level: alert.level,
            kind,
            source,
            message: bounded(alert.message),
            value,
        });
        if self.dir.is_some() {
            let doc = AlertFile {
                at: &at,
                level: alert.level,
                kind: alert.kind,
                source: alert.source,
                message: alert.message,
                value,
            };
            if let Err(e) = self.write_file(&doc, now) {
                self.file_failures += 1;
                if let Some(path) = &self.dir_path {
                    log::warn!(
                        "alerts.dir {}: cannot write alert file: {e}",
                        path.display()
                    );
                }
            }
        }
        if self.command.is_some() {
            self.run_command(alert, value);
        }
        true
    }

    fn write_file(&mut self, doc: &AlertFile<'_>, now: WallTime) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        self.json.clear();
        self.json.resize(self.json.capacity(), 0);
        let n = serde_json_core::to_slice(doc, &mut self.json)
            .map_err(|_| io::Error::other("alert does not fit its buffer"))?;
        self.json.truncate(n);
        self.json.push(b'\n');
        let tmp = c".alert.tmp";
        let fd = openat(
            dir.as_fd(),
            tmp,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&self.json)?;
        file.sync_all()?;
        drop(file);
        // `<time>-<kind>.json`; a second alert of the kind in the same second
        // (another source) gets `-2`, `-3`, … Nothing is ever overwritten.
        let kind: heapless::String<32> = doc
            .kind
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(32)
            .collect();
        for n in 1..100u32 {
            let mut name = heapless::String::<80>::new();
            let _ = write!(name, "{}-{kind}", now.compact());
            if n > 1 {
                let _ = write!(name, "-{n}");
            }
            let _ = name.push_str(".json\0");
            let name =
                core::ffi::CStr::from_bytes_with_nul(name.as_bytes()).map_err(io::Error::other)?;
            match rename_noreplace(dir.as_fd(), tmp, dir.as_fd(), name) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                other => return other,
            }
        }
        Err(io::Error::other("100 alerts of one kind in one second"))
    }

    fn run_command(&mut self, alert: &Alert<'_>, value: Option<f64>) {
        let Some(argv) = &self.command else { return };
        if self.children.len() == COMMANDS_AT_ONCE {
            self.command_failures += 1;
            log::warn!(
                "alerts.command: {COMMANDS_AT_ONCE} still running; not run for {}",
                alert.kind
            );
            return;
        }
        let value = value.map(|v| v.to_string()).unwrap_or_default();
        let fill = |arg: &str| {
            arg.replace("{level}", alert.level.as_str())
                .replace("{kind}", alert.kind)
                .replace("{source}", alert.source)
                .replace("{message}", alert.message)
                .replace("{value}", &value)
        };
        let spawned = Command::new(&argv[0])
            .args(argv[1..].iter().map(|a| fill(a)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => {
                // Reaped from the loop through SIGCHLD; `child` is dropped
                // without waiting.
                let pid = Pid::from_raw(child.id() as i32);
                self.children
                    .push((pid, Instant::now().after_millis(COMMAND_TIMEOUT_MS)));
            }
            Err(e) => {
                self.command_failures += 1;
                log::warn!("alerts.command {}: {e}", argv[0]);
            }
        }
    }

    /// When the oldest running alert command must be killed.
    pub fn command_deadline(&self) -> Option<Instant> {
        self.children.iter().map(|c| c.1).min()
    }

    /// Kills alert commands that ran past their time.
    pub fn kill_overdue(&mut self, now: Instant) {
        for &(pid, deadline) in &self.children {
            if deadline <= now {
                log::warn!(
                    "alerts.command (pid {pid}) still running after {}s: killed",
                    COMMAND_TIMEOUT_MS / 1000
                );
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }

    /// A child exited; returns true if it was an alert command.
    pub fn on_child_exit(&mut self, pid: Pid, exit: ChildExit) -> bool {
        let Some(i) = self.children.iter().position(|c| c.0 == pid) else {
            return false;
        };
        self.children.swap_remove(i);
        if exit != ChildExit::Exited(0) {
            self.command_failures += 1;
            log::warn!("alerts.command (pid {pid}) failed: {exit:?}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Duration;

    fn warn(kind: &str, source: &str) -> Alert<'static> {
        Alert {
            level: AlertLevel::Warning,
            kind: Box::leak(kind.to_owned().into_boxed_str()),
            source: Box::leak(source.to_owned().into_boxed_str()),
            message: "disk 86% used",
            value: Some(86.0),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("edgekeeper-alerts-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn files(dir: &PathBuf) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn cooldown_suppresses_the_same_kind_and_source_only() {
        let dir = scratch("cooldown");
        let cfg = config::Alerts {
            dir: Some(dir.clone()),
            cooldown: Duration::from_secs(3600),
            command: None,
        };
        let mut a = Alerts::new(&cfg);
        let t = WallTime::from_secs(1_795_386_100);
        assert!(a.raise(&warn("disk_warning", "/"), t));
        assert!(!a.raise(&warn("disk_warning", "/"), WallTime::from_secs(t.secs + 60)));
        assert!(a.raise(&warn("disk_warning", "/data"), t), "another source");
        assert!(a.raise(&warn("disk_critical", "/"), t), "another kind");
        assert!(
            a.raise(
                &warn("disk_warning", "/"),
                WallTime::from_secs(t.secs + 3600)
            ),
            "cooldown over"
        );
        assert_eq!((a.raised, a.suppressed), (4, 1));
        assert_eq!(
            files(&dir),
            [
                "20261122T222140Z-disk_critical.json",
                "20261122T222140Z-disk_warning-2.json",
                "20261122T222140Z-disk_warning.json",
                "20261122T232140Z-disk_warning.json",
            ]
        );
        let doc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("20261122T222140Z-disk_warning-2.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(doc["source"], "/data");
        assert_eq!(doc["level"], "warning");
        assert_eq!(doc["value"], 86.0);
        assert_eq!(doc["at"], "2026-11-22T22:21:40.000Z");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rise_to_critical_bypasses_the_cooldown_once() {
        let mut a = Alerts::new(&config::Alerts::default());
        let t = WallTime::from_secs(1_000_000);
        assert!(a.raise(&warn("frame_stall", "cam0"), t));
        let mut critical = warn("frame_stall", "cam0");
        critical.level = AlertLevel::Critical;
        assert!(a.raise(&critical, WallTime::from_secs(t.secs + 1)));
        assert!(
            !a.raise(&critical, WallTime::from_secs(t.secs + 2)),
            "already critical"
        );
        assert!(!a.raise(
            &warn("frame_stall", "cam0"),
            WallTime::from_secs(t.secs + 3)
        ));
    }

    #[test]
    fn restored_cooldowns_keep_suppressing_and_a_clock_jump_back_ends_them() {
        let mut a = Alerts::new(&config::Alerts::default());
        let t = WallTime::from_secs(2_000_000);
        a.raise(&warn("sd_wear", "mmcblk0"), t);
        let saved = a.cooldowns().to_vec();
        let mut b = Alerts::new(&config::Alerts::default());
        b.restore(saved);
        assert!(!b.raise(
            &warn("sd_wear", "mmcblk0"),
            WallTime::from_secs(t.secs + 10)
        ));
        assert!(b.raise(
            &warn("sd_wear", "mmcblk0"),
            WallTime::from_secs(t.secs - 86_400)
        ));
    }

    #[test]
    fn the_table_forgets_the_oldest_pair_when_full() {
        let mut a = Alerts::new(&config::Alerts::default());
        for i in 0..COOLDOWNS as i64 + 1 {
            assert!(a.raise(&warn("k", &format!("s{i}")), WallTime::from_secs(1000 + i)));
        }
        assert_eq!(a.cooldowns().len(), COOLDOWNS);
        assert!(
            a.raise(&warn("k", "s0"), WallTime::from_secs(5000)),
            "s0 was forgotten"
        );
        assert!(
            !a.raise(&warn("k", "s2"), WallTime::from_secs(5000)),
            "s2 is remembered"
        );
    }
}
