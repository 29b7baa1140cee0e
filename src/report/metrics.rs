//! `run_dir/edgekeeper.prom`: the status snapshot in the Prometheus text
//! exposition format, for node_exporter's textfile collector.
//!
//! What it is: a renderer from [`Snapshot`] into a reused `String`, every
//! metric with `# HELP` and `# TYPE`, names `edgekeeper_*` with the unit in
//! the name, service counters as `edgekeeper_<service>_<counter>`.
//! What it is not: an HTTP endpoint; node_exporter already serves one.

use std::fmt::Write;

use super::status::Snapshot;
use crate::services::{CounterKind, Report};

pub const FILE_NAME: &str = "edgekeeper.prom";

/// The four services, so that `edgekeeper_service_enabled` lists them all.
pub const SERVICES: [&str; 4] = ["relocate", "frames", "govern", "storage"];

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

pub fn render(snap: &Snapshot<'_>, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP edgekeeper_build_info Version and target of the running edgekeeper.\n\
         # TYPE edgekeeper_build_info gauge\n\
         edgekeeper_build_info{{version=\"{}\",target=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        env!("EDGEKEEPER_TARGET")
    );
    let c = snap.core;
    metric(
        out,
        "edgekeeper_up",
        "gauge",
        "1 while the daemon runs, 0 in the snapshot written at stop.",
        u64::from(snap.running),
    );
    metric(
        out,
        "edgekeeper_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        snap.uptime_ms / 1000,
    );
    metric(
        out,
        "edgekeeper_start_time_seconds",
        "gauge",
        "Start time, seconds since the epoch.",
        snap.started.secs.max(0) as u64,
    );
    metric(
        out,
        "edgekeeper_loop_iterations_total",
        "counter",
        "Event loop wake-ups.",
        c.loop_iterations,
    );
    metric(
        out,
        "edgekeeper_watchdog_pings_total",
        "counter",
        "WATCHDOG=1 messages sent to systemd.",
        c.watchdog_pings,
    );
    metric(
        out,
        "edgekeeper_config_reloads_total",
        "counter",
        "Configs re-read and applied on SIGHUP.",
        c.config_reloads,
    );
    metric(
        out,
        "edgekeeper_config_reload_failures_total",
        "counter",
        "SIGHUP reloads refused because the config was invalid.",
        c.config_reload_failures,
    );
    metric(
        out,
        "edgekeeper_state_writes_total",
        "counter",
        "Writes of state.json.",
        c.state_writes,
    );
    metric(
        out,
        "edgekeeper_state_write_failures_total",
        "counter",
        "Failed writes of state.json.",
        c.state_write_failures,
    );
    metric(
        out,
        "edgekeeper_starts_total",
        "counter",
        "Daemon starts over the device's life (kept in state.json).",
        snap.lifetime.starts,
    );
    metric(
        out,
        "edgekeeper_log_lines_total",
        "counter",
        "Log lines emitted.",
        snap.log.lines,
    );
    metric(
        out,
        "edgekeeper_log_file_written_bytes_total",
        "counter",
        "Bytes written to the field log.",
        snap.log.file_bytes,
    );
    metric(
        out,
        "edgekeeper_log_rotations_total",
        "counter",
        "Field log rotations.",
        snap.log.rotations,
    );
    metric(
        out,
        "edgekeeper_alerts_raised_total",
        "counter",
        "Alerts raised.",
        snap.alerts.raised,
    );
    metric(
        out,
        "edgekeeper_alerts_suppressed_total",
        "counter",
        "Alerts suppressed by their cooldown.",
        snap.alerts.suppressed,
    );
    let (watches, tracked) = snap.usage();
    metric(
        out,
        "edgekeeper_watches",
        "gauge",
        "inotify watches in use.",
        watches,
    );
    metric(
        out,
        "edgekeeper_tracked_processes",
        "gauge",
        "Processes tracked by govern.",
        tracked,
    );

    let _ = writeln!(
        out,
        "# HELP edgekeeper_service_enabled 1 if the service is configured and running.\n\
         # TYPE edgekeeper_service_enabled gauge"
    );
    for name in SERVICES {
        let on = snap.services.iter().any(|s| s.name() == name);
        let _ = writeln!(
            out,
            "edgekeeper_service_enabled{{service=\"{name}\"}} {}",
            u8::from(on)
        );
    }
    let _ = writeln!(
        out,
        "# HELP edgekeeper_service_health Service health: 0 healthy, 1 degraded, 2 unhealthy.\n\
         # TYPE edgekeeper_service_health gauge"
    );
    for svc in snap.services {
        let mut r = Report::default();
        svc.report(&mut r);
        let _ = writeln!(
            out,
            "edgekeeper_service_health{{service=\"{}\"}} {}",
            svc.name(),
            r.health.gauge()
        );
    }
    for name in snap.not_built {
        let _ = writeln!(out, "edgekeeper_service_health{{service=\"{name}\"}} 2");
    }
    for svc in snap.services {
        svc.metrics(out);
        let mut r = Report::default();
        svc.report(&mut r);
        for counter in &r.counters {
            let kind = match counter.kind {
                CounterKind::Counter => "counter",
                CounterKind::Gauge => "gauge",
            };
            let name = BaseUnit(counter.name);
            let _ = writeln!(
                out,
                "# HELP edgekeeper_{svc}_{name} {help}\n# TYPE edgekeeper_{svc}_{name} {kind}\nedgekeeper_{svc}_{name} {value}",
                svc = svc.name(),
                help = counter.help,
                value = Value(counter.name, counter.value)
            );
        }
        labelled(out, svc.name(), &r);
    }
}

/// Labelled series, grouped by metric name under one HELP and TYPE.
fn labelled(out: &mut String, svc: &str, r: &Report) {
    for (i, l) in r.labelled.iter().enumerate() {
        let raw = l.counter.name;
        if r.labelled[..i].iter().any(|e| e.counter.name == raw) {
            continue;
        }
        let name = BaseUnit(raw);
        let kind = match l.counter.kind {
            CounterKind::Counter => "counter",
            CounterKind::Gauge => "gauge",
        };
        let _ = writeln!(
            out,
            "# HELP edgekeeper_{svc}_{name} {}\n# TYPE edgekeeper_{svc}_{name} {kind}",
            l.counter.help
        );
        for e in r.labelled[i..].iter().filter(|e| e.counter.name == raw) {
            let _ = write!(out, "edgekeeper_{svc}_{name}{{{}=\"", e.label);
            for c in e.value.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            let _ = writeln!(out, "\"}} {}", Value(raw, e.counter.value));
        }
    }
}

/// A counter name in Prometheus base units: services count time in whole
/// microseconds (status.json shows them so), metrics in seconds.
struct BaseUnit(&'static str);

impl std::fmt::Display for BaseUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.split_once("_microseconds") {
            Some((stem, rest)) => write!(f, "{stem}_seconds{rest}"),
            None => f.write_str(self.0),
        }
    }
}

/// A counter's value in the unit [`BaseUnit`] names.
struct Value(&'static str, u64);

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.contains("_microseconds") {
            write!(f, "{}.{:06}", self.1 / 1_000_000, self.1 % 1_000_000)
        } else {
            write!(f, "{}", self.1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microsecond_counters_are_exposed_in_seconds() {
        assert_eq!(
            BaseUnit("scan_time_microseconds_total").to_string(),
            "scan_time_seconds_total"
        );
        assert_eq!(
            BaseUnit("scan_last_microseconds").to_string(),
            "scan_last_seconds"
        );
        assert_eq!(
            BaseUnit("files_moved_total").to_string(),
            "files_moved_total"
        );
        assert_eq!(
            Value("scan_last_microseconds", 1_234_567).to_string(),
            "1.234567"
        );
        assert_eq!(Value("scan_last_microseconds", 42).to_string(), "0.000042");
        assert_eq!(Value("files_moved_total", 42).to_string(), "42");
    }
}
