//! The status snapshot: `run_dir/status.json`, and `edgekeeper status`.
//!
//! What it is: the [`Snapshot`] the daemon writes every `status_every`, on
//! SIGUSR1 and at stop (serialised with serde-json-core into a buffer made
//! at start, then replaced atomically on tmpfs), beside the Prometheus
//! file from [`super::metrics`]; and the reader behind `edgekeeper status`,
//! which prints it as a table or raw, and says when no daemon is running.
//! What it is not: a control channel. The daemon is told things by signals.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};

use super::alerts::Alerts;
use super::log::LogStats;
use super::metrics;
use crate::services::{Health, Pieces, RawJson, Report, Service};
use crate::state::Lifetime;
use crate::sys::clock::WallTime;
use crate::sys::fs::AtomicFile;

pub const FILE_NAME: &str = "status.json";

/// Counters of the core loop itself.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CoreCounters {
    pub loop_iterations: u64,
    pub watchdog_pings: u64,
    pub config_reloads: u64,
    pub config_reload_failures: u64,
    pub status_writes: u64,
    pub status_write_failures: u64,
    pub state_writes: u64,
    pub state_write_failures: u64,
    pub children_reaped: u64,
}

/// Everything a status snapshot shows, borrowed from the running daemon.
pub struct Snapshot<'a> {
    pub pid: u32,
    pub running: bool,
    pub started: WallTime,
    pub now: WallTime,
    pub uptime_ms: u64,
    pub status_every_ms: u64,
    pub config_path: &'a str,
    pub config_loaded: WallTime,
    pub last_reload_error: Option<&'a str>,
    pub watchdog_usec: Option<u64>,
    pub core: &'a CoreCounters,
    pub log: LogStats,
    pub lifetime: Lifetime,
    pub services: &'a [Box<dyn Service>],
    /// Each service's `details`, written just before the snapshot.
    pub details: &'a Pieces,
    /// Configured services this build does not provide yet.
    pub not_built: &'a [&'static str],
    pub alerts: &'a Alerts,
}

struct Iso(WallTime, bool);

impl Serialize for Iso {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = heapless::String::<32>::new();
        let _ = if self.1 {
            write!(buf, "{}", self.0.iso())
        } else {
            write!(buf, "{}", self.0.iso_secs())
        };
        s.serialize_str(&buf)
    }
}

struct Services<'a>(&'a [Box<dyn Service>], &'a [&'static str], &'a Pieces);

struct ServiceDoc<'a>(&'a Report, Option<RawJson<'a>>);

impl Serialize for ServiceDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut st = s.serialize_struct("Service", 6)?;
        st.serialize_field("health", &r.health)?;
        st.serialize_field(
            "reason",
            &(!r.reason.is_empty()).then_some(r.reason.as_str()),
        )?;
        st.serialize_field("counters", &Counters(r))?;
        st.serialize_field("watches", &r.watches)?;
        st.serialize_field("tracked", &r.tracked)?;
        if let Some(details) = &self.1 {
            st.serialize_field("details", details)?;
        }
        st.end()
    }
}

struct Counters<'a>(&'a Report);

impl Serialize for Counters<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.counters.len()))?;
        for c in &self.0.counters {
            m.serialize_entry(c.name, &c.value)?;
        }
        m.end()
    }
}

impl Serialize for Services<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len() + self.1.len()))?;
        for svc in self.0 {
            let mut report = Report::default();
            svc.report(&mut report);
            m.serialize_entry(svc.name(), &ServiceDoc(&report, self.2.get(svc.name())))?;
        }
        for name in self.1 {
            let mut report = Report::default();
            report.worsen(
                Health::Unhealthy,
                format_args!("configured, but this edgekeeper build does not provide {name} yet"),
            );
            m.serialize_entry(name, &ServiceDoc(&report, None))?;
        }
        m.end()
    }
}

struct Usage {
    in_use: u64,
    limit: Option<u64>,
}

impl Serialize for Usage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Usage", 2)?;
        st.serialize_field("in_use", &self.in_use)?;
        st.serialize_field("limit", &self.limit)?;
        st.end()
    }
}

struct AlertsDoc<'a>(&'a Alerts);

impl Serialize for AlertsDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let a = self.0;
        let mut st = s.serialize_struct("Alerts", 6)?;
        st.serialize_field("raised", &a.raised)?;
        st.serialize_field("suppressed", &a.suppressed)?;
        st.serialize_field("cooling_down", &a.cooldowns().len())?;
        st.serialize_field("file_failures", &a.file_failures)?;
        st.serialize_field("command_failures", &a.command_failures)?;
        st.serialize_field("last", &Last(a))?;
        st.end()
    }
}

struct Last<'a>(&'a Alerts);

impl Serialize for Last<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        // Newest first.
        let recent: heapless::Vec<_, { super::alerts::RECENT }> = self.0.recent().collect();
        for r in recent.iter().rev() {
            seq.serialize_element(r)?;
        }
        seq.end()
    }
}

impl Snapshot<'_> {
    /// Total watches and tracked processes over all services.
    pub fn usage(&self) -> (u64, u64) {
        let mut watches = 0;
        let mut tracked = 0;
        for svc in self.services {
            let mut r = Report::default();
            svc.report(&mut r);
            watches += r.watches;
            tracked += r.tracked;
        }
        (watches, tracked)
    }

    /// The one-line summary systemd shows (`STATUS=`).
    pub fn summary(&self, out: &mut heapless::String<256>) {
        out.clear();
        if self.services.is_empty() {
            let _ = out.push_str("running, no services configured");
        } else {
            let mut worst = Health::Healthy;
            for svc in self.services {
                let mut r = Report::default();
                svc.report(&mut r);
                worst = worst.max(r.health);
                let _ = write!(out, "{} {}; ", svc.name(), r.health.as_str());
            }
            let _ = write!(out, "overall {}", worst.as_str());
        }
        if self.alerts.raised > 0 {
            let _ = write!(out, "; {} alerts", self.alerts.raised);
        }
    }
}

impl Serialize for Snapshot<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (watches, tracked) = self.usage();
        let mut st = s.serialize_struct("Status", 18)?;
        st.serialize_field("version", env!("CARGO_PKG_VERSION"))?;
        st.serialize_field("pid", &self.pid)?;
        st.serialize_field("running", &self.running)?;
        st.serialize_field("started", &Iso(self.started, false))?;
        st.serialize_field("written_at", &Iso(self.now, true))?;
        st.serialize_field("written_at_unix", &self.now.secs)?;
        st.serialize_field("uptime_s", &(self.uptime_ms / 1000))?;
        st.serialize_field("status_every_ms", &self.status_every_ms)?;
        st.serialize_field("config", &ConfigDoc(self))?;
        st.serialize_field("watchdog_usec", &self.watchdog_usec)?;
        st.serialize_field("core", self.core)?;
        st.serialize_field("log", &self.log)?;
        st.serialize_field("lifetime", &self.lifetime)?;
        st.serialize_field(
            "services",
            &Services(self.services, self.not_built, self.details),
        )?;
        st.serialize_field(
            "watches",
            &Usage {
                in_use: watches,
                limit: None,
            },
        )?;
        st.serialize_field(
            "tracked_processes",
            &Usage {
                in_use: tracked,
                limit: None,
            },
        )?;
        st.serialize_field("alerts", &AlertsDoc(self.alerts))?;
        st.end()
    }
}

struct ConfigDoc<'a, 'b>(&'a Snapshot<'b>);

impl Serialize for ConfigDoc<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let snap = self.0;
        let mut st = s.serialize_struct("Config", 3)?;
        st.serialize_field("path", snap.config_path)?;
        st.serialize_field("loaded_at", &Iso(snap.config_loaded, false))?;
        st.serialize_field("last_reload_error", &snap.last_reload_error)?;
        st.end()
    }
}

/// `status.json` and `edgekeeper.prom`, with their buffers.
pub struct StatusFiles {
    json: AtomicFile,
    prom: AtomicFile,
    json_buf: Vec<u8>,
    prom_buf: String,
}

impl StatusFiles {
    pub fn new(run_dir: &Path) -> io::Result<StatusFiles> {
        Self::with_capacity(run_dir, 32 * 1024)
    }

    /// With a snapshot buffer of `bytes`, sized at start for what the
    /// services will show (so it need not grow in the event path).
    pub fn with_capacity(run_dir: &Path, bytes: usize) -> io::Result<StatusFiles> {
        Ok(StatusFiles {
            json: AtomicFile::new(&run_dir.join(FILE_NAME), false)?,
            prom: AtomicFile::new(&run_dir.join(metrics::FILE_NAME), false)?,
            json_buf: vec![0; bytes.max(32 * 1024)],
            prom_buf: String::with_capacity(32 * 1024),
        })
    }

    /// Writes the metrics first, then the snapshot: whoever sees a new
    /// status.json finds the metrics of the same moment already there.
    pub fn write(&mut self, snap: &Snapshot<'_>) -> io::Result<()> {
        self.prom_buf.clear();
        metrics::render(snap, &mut self.prom_buf);
        self.prom.write(self.prom_buf.as_bytes())?;
        let n = loop {
            match serde_json_core::to_slice(snap, &mut self.json_buf) {
                // Room for the newline that ends the file.
                Ok(n) if n < self.json_buf.len() => break n,
                Ok(_) | Err(serde_json_core::ser::Error::BufferFull) => {
                    let len = self.json_buf.len() * 2;
                    log::warn!("status snapshot outgrew its buffer; growing it to {len} bytes");
                    self.json_buf.resize(len, 0);
                }
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        };
        self.json_buf[n] = b'\n';
        self.json.write(&self.json_buf[..=n])
    }
}

/// What `edgekeeper status` found.
pub enum Shown {
    Running(String),
    /// No running daemon: why, for stderr; exit 3.
    NotRunning(String),
}

/// Reads `run_dir/status.json` and renders it (`raw`: the JSON as written).
pub fn show(run_dir: &Path, raw: bool, now: WallTime) -> Shown {
    let path = run_dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Shown::NotRunning(format!(
                "no running edgekeeper: {} does not exist",
                path.display()
            ));
        }
        Err(e) => return Shown::NotRunning(format!("{}: {e}", path.display())),
    };
    let doc: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return Shown::NotRunning(format!("{}: not a status snapshot: {e}", path.display()));
        }
    };
    let written = doc["written_at_unix"].as_i64().unwrap_or(0);
    let every_ms = doc["status_every_ms"].as_u64().unwrap_or(10_000);
    let age_s = now.secs - written;
    if doc["running"] == false {
        return Shown::NotRunning(format!(
            "no running edgekeeper: pid {} stopped at {}",
            doc["pid"],
            doc["written_at"].as_str().unwrap_or("?")
        ));
    }
    if age_s.saturating_mul(1000) > 3 * every_ms as i64 {
        return Shown::NotRunning(format!(
            "no running edgekeeper: the last snapshot ({}) is {age_s}s old, and a running daemon writes one every {}s",
            path.display(),
            every_ms.div_ceil(1000)
        ));
    }
    if raw {
        return Shown::Running(String::from_utf8_lossy(&bytes).into_owned());
    }
    Shown::Running(table(&doc, age_s))
}

fn table(doc: &serde_json::Value, age_s: i64) -> String {
    use serde_json::Value;
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let uptime = doc["uptime_s"].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "edgekeeper {} (pid {}), up {}, started {}",
        s(&doc["version"]),
        s(&doc["pid"]),
        human_duration(uptime),
        s(&doc["started"])
    );
    let _ = writeln!(
        out,
        "snapshot {} ({age_s}s ago); config {}",
        s(&doc["written_at"]),
        s(&doc["config"]["path"])
    );
    if let Some(err) = doc["config"]["last_reload_error"].as_str() {
        let _ = writeln!(
            out,
            "last reload FAILED, running on the previous config: {err}"
        );
    }
    let _ = writeln!(out);
    let services = doc["services"].as_object();
    match services {
        Some(map) if !map.is_empty() => {
            let _ = writeln!(out, "{:<10} {:<10} REASON", "SERVICE", "HEALTH");
            for (name, svc) in map {
                let _ = writeln!(
                    out,
                    "{name:<10} {:<10} {}",
                    s(&svc["health"]),
                    svc["reason"].as_str().unwrap_or("")
                );
            }
            let _ = writeln!(out);
            let _ = writeln!(out, "{:<40} VALUE", "COUNTER");
            for (name, svc) in map {
                for (counter, value) in svc["counters"].as_object().into_iter().flatten() {
                    let _ = writeln!(out, "{:<40} {}", format!("{name}.{counter}"), s(value));
                }
            }
            for (name, svc) in map {
                details_table(&mut out, name, &svc["details"]);
            }
        }
        _ => {
            let _ = writeln!(out, "no services configured");
        }
    }
    let _ = writeln!(out);
    let core = &doc["core"];
    let _ = writeln!(
        out,
        "core: {} loop iterations, {} watchdog pings, {} reloads ({} failed), {} state writes",
        s(&core["loop_iterations"]),
        s(&core["watchdog_pings"]),
        s(&core["config_reloads"]),
        s(&core["config_reload_failures"]),
        s(&core["state_writes"])
    );
    let _ = writeln!(
        out,
        "watches in use: {}; tracked processes: {}",
        s(&doc["watches"]["in_use"]),
        s(&doc["tracked_processes"]["in_use"])
    );
    let alerts = &doc["alerts"];
    let _ = writeln!(
        out,
        "alerts: {} raised, {} suppressed by cooldown",
        s(&alerts["raised"]),
        s(&alerts["suppressed"])
    );
    for a in alerts["last"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} {:<8} {} [{}] {}",
            s(&a["at"]),
            s(&a["level"]),
            s(&a["kind"]),
            s(&a["source"]),
            s(&a["message"])
        );
    }
    out
}

/// A service's details: plain values as `service.key: value` lines, and
/// each list of flat objects (govern's processes, say) as a table.
fn details_table(out: &mut String, service: &str, details: &serde_json::Value) {
    use serde_json::Value;
    let Some(map) = details.as_object() else {
        return;
    };
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut wrote = false;
    for (key, value) in map {
        if !matches!(value, Value::Array(_) | Value::Object(_)) {
            if !wrote {
                let _ = writeln!(out);
                wrote = true;
            }
            let _ = writeln!(out, "{service}.{key}: {}", cell(value));
        }
    }
    for (key, value) in map {
        let Some(rows) = value.as_array() else {
            continue;
        };
        let Some(columns) = rows.first().and_then(Value::as_object) else {
            continue;
        };
        let columns: Vec<&String> = columns.keys().collect();
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| columns.iter().map(|c| cell(&r[c.as_str()])).collect())
            .collect();
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([c.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let _ = writeln!(out, "\n{service} {key}:");
        let line = |out: &mut String, items: &mut dyn Iterator<Item = String>| {
            let mut text = String::new();
            for (i, item) in items.enumerate() {
                let _ = write!(text, "{item:<w$}  ", w = widths[i]);
            }
            let _ = writeln!(out, "  {}", text.trim_end());
        };
        line(out, &mut columns.iter().map(|c| c.to_uppercase()));
        for row in cells {
            line(out, &mut row.into_iter());
        }
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, s / 60 % 60),
        s => format!("{}d {}h", s / 86_400, s / 3600 % 24),
    }
}
