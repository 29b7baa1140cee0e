//! What `govern` shows and keeps: health and counters for the status
//! snapshot and metrics, `services.govern.details` in status.json (the
//! tracked processes and the targets), and its piece of state.json.
//!
//! What it is: serialisers over the live service, written with
//! serde-json-core into buffers the daemon owns, so a snapshot allocates
//! nothing. What it is not: the decisions; those are in `super`.

use std::fmt::Write as _;

use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};

use super::table::{self, Phase, SavedProcess, Tracked};
use super::targets;
use super::{FAILURES_FOR_DEGRADED, Govern};
use crate::services::{Counter, CounterKind, Health, Report};
use crate::sys::cgroup::FsKind;
use crate::sys::clock::WallTime;

pub(super) fn report(g: &Govern, r: &mut Report) {
    r.tracked = g.table.len() as u64;
    if !g.cgroups.error.is_empty() {
        r.worsen(Health::Unhealthy, format_args!("{}", g.cgroups.error));
    }
    if g.scan.failures_in_row >= FAILURES_FOR_DEGRADED {
        r.worsen(
            Health::Degraded,
            format_args!(
                "{} /proc scans in a row failed: {}",
                g.scan.failures_in_row, g.scan.last_error
            ),
        );
    }
    let gave_up = g.table.count(Phase::GaveUp);
    if gave_up > 0 {
        r.worsen(
            Health::Degraded,
            format_args!(
                "{gave_up} process(es) could not be put into a cgroup after {} attempts: {}",
                g.config.max_attempts, g.last_attach_error
            ),
        );
    } else if g.attach_failures_in_row >= FAILURES_FOR_DEGRADED {
        r.worsen(
            Health::Degraded,
            format_args!(
                "{} attaches in a row failed: {}",
                g.attach_failures_in_row, g.last_attach_error
            ),
        );
    }
    if g.turned_away {
        r.worsen(
            Health::Degraded,
            format_args!(
                "tracking {} processes, the most limits.max_tracked_processes allows: more are not governed",
                g.table.capacity()
            ),
        );
    }
    if !g.cgroups.missing.is_empty() {
        r.worsen(Health::Degraded, format_args!("{}", g.cgroups.missing));
    }
    if g.cgroups.kind() == Some(FsKind::Plain) {
        r.worsen(
            Health::Degraded,
            format_args!(
                "cgroup_root {} is a directory standing in for cgroupfs, not cgroup2: limits are written, not enforced",
                g.root_text
            ),
        );
    }
    let c = &g.counters;
    let governed = g.table.count(Phase::Governed) as u64;
    let pending = g
        .table
        .iter()
        .filter(|t| matches!(t.phase, Phase::Young | Phase::Waiting | Phase::Retrying))
        .count() as u64;
    r.gauge(
        "governed_processes",
        "Processes in their group with their limits.",
        governed,
    );
    r.gauge(
        "pending_processes",
        "Processes of a target waiting to be governed (too young, cgroup_root unusable, or retrying).",
        pending,
    );
    r.counter(
        "discovered_total",
        "Processes of a target found, by scan or proc connector.",
        c.discovered,
    );
    r.counter(
        "attached_total",
        "Processes put into a group with their limits.",
        c.attached,
    );
    r.counter(
        "recognised_total",
        "Processes found already in their group (after a restart), not attached twice.",
        c.recognised,
    );
    r.counter(
        "attach_failures_total",
        "Failed attempts to put a process into its group.",
        c.attach_failures,
    );
    r.counter(
        "gave_up_total",
        "Processes given up on after max_attempts failed attaches.",
        c.gave_up,
    );
    r.counter("exited_total", "Governed processes that exited.", c.exited);
    r.counter(
        "pid_reuses_total",
        "Tracked PIDs found naming a new process.",
        c.pid_reuses,
    );
    r.counter(
        "groups_removed_total",
        "Empty groups removed after their process exited.",
        c.groups_removed,
    );
    r.counter(
        "group_remove_failures_total",
        "Groups that could not be removed after their process exited.",
        c.group_remove_failures,
    );
    r.counter(
        "filtered_uid_total",
        "Processes passed over for a blocked uid.",
        c.filtered_uid,
    );
    r.counter(
        "filtered_user_total",
        "Processes passed over for a user not in allowed_users.",
        c.filtered_user,
    );
    r.counter(
        "filtered_dir_total",
        "Processes passed over for a working directory under blocked_dirs (or unreadable).",
        c.filtered_dir,
    );
    r.counter(
        "held_young_total",
        "Processes found younger than min_runtime and held back.",
        c.held_young,
    );
    r.counter(
        "memory_limits_refused_total",
        "memory.max limits not written because the process already used more.",
        c.memory_refused,
    );
    r.counter(
        "table_full_total",
        "Processes not tracked because the table was full.",
        c.table_full,
    );
    r.counter("scans_total", "Scans of /proc.", c.scans);
    r.counter(
        "scan_failures_total",
        "Scans of /proc that failed.",
        c.scan_failures,
    );
    r.counter(
        "scan_time_microseconds_total",
        "Time spent scanning /proc, in microseconds.",
        c.scan_time_us,
    );
    r.gauge(
        "scan_last_microseconds",
        "Duration of the last /proc scan, in microseconds.",
        g.scan.last_us,
    );
    r.gauge(
        "scan_processes",
        "Processes listed by the last /proc scan.",
        g.scan.pids,
    );
    r.gauge(
        "connector_active",
        "1 while the proc connector reports execs and exits, 0 when discovery is by scanning only.",
        u64::from(g.connector.is_some()),
    );
    r.counter(
        "connector_events_total",
        "Events received from the proc connector.",
        c.connector_events,
    );
    r.counter(
        "connector_overflows_total",
        "Times the proc connector queue overflowed (events lost, /proc scanned).",
        c.connector_overflows,
    );
    r.gauge(
        "discovery_latency_last_microseconds",
        "From a target's exec to its discovery through the proc connector, last one.",
        g.latency_last_us,
    );
    r.gauge(
        "discovery_latency_max_microseconds",
        "From a target's exec to its discovery through the proc connector, most this run.",
        g.latency_max_us,
    );
    for (i, t) in g.targets.list.iter().enumerate() {
        let governed = g.governed_of(i) as u64;
        for (name, help, kind, value) in [
            (
                "target_governed_processes",
                "Processes of a target in their group.",
                CounterKind::Gauge,
                governed,
            ),
            (
                "target_attached_total",
                "Processes of a target put into a group.",
                CounterKind::Counter,
                t.attached_total,
            ),
            (
                "target_exited_total",
                "Governed processes of a target that exited.",
                CounterKind::Counter,
                t.exited_total,
            ),
        ] {
            r.labelled(
                Counter {
                    name,
                    help,
                    kind,
                    value,
                },
                "target",
                &t.name,
            );
        }
    }
}

/// `cpu.max 300000 100000, cpu.weight 100, memory.max 8589934592`.
pub(super) struct AppliedText<'a>(pub(super) &'a table::Applied);

impl std::fmt::Display for AppliedText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.0;
        match a.cpu_max_us {
            Some(q) => write!(f, "cpu.max {q} {}", targets::CPU_PERIOD_US)?,
            None => f.write_str("cpu.max not set")?,
        }
        if let Some(w) = a.cpu_weight {
            write!(f, ", cpu.weight {w}")?;
        }
        match a.memory_max {
            Some(m) => write!(f, ", memory.max {m}"),
            None => f.write_str(", memory.max not set"),
        }
    }
}

/// Serialises each item of an iterator as one JSON list, without
/// collecting it first.
struct Each<I>(I);

impl<I> Serialize for Each<I>
where
    I: Iterator + Clone,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        for item in self.0.clone() {
            seq.serialize_element(&item)?;
        }
        seq.end()
    }
}

fn iso(secs: i64) -> heapless::String<32> {
    let mut out = heapless::String::new();
    let _ = write!(out, "{}", WallTime::from_secs(secs).iso_secs());
    out
}

/// `cpu.max` as written: `300000 100000`.
fn cpu_max_text(quota_us: u64) -> heapless::String<32> {
    let mut out = heapless::String::new();
    let _ = write!(out, "{quota_us} {}", targets::CPU_PERIOD_US);
    out
}

impl Govern {
    fn target_name(&self, e: &Tracked) -> Option<&str> {
        e.target
            .and_then(|t| self.targets.list.get(t))
            .map(|t| t.name.as_str())
    }

    fn governed_of(&self, target: usize) -> usize {
        self.table
            .iter()
            .filter(|e| e.target == Some(target) && e.phase == Phase::Governed)
            .count()
    }
}

/// `services.govern.details` in status.json.
pub(super) struct Details<'a>(pub(super) &'a Govern);

impl Serialize for Details<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let g = self.0;
        let mut st = s.serialize_struct("Details", 8)?;
        st.serialize_field(
            "discovery",
            if g.connector.is_some() {
                "proc_connector"
            } else {
                "scan"
            },
        )?;
        st.serialize_field(
            "scan_only_because",
            &(!g.scan_only.is_empty()).then_some(g.scan_only.as_str()),
        )?;
        st.serialize_field("cgroup_root", g.root_text.as_str())?;
        st.serialize_field(
            "cgroupfs",
            match g.cgroups.kind() {
                Some(k) => k.as_str(),
                None => "unusable",
            },
        )?;
        st.serialize_field("controllers", g.cgroups.enabled.names())?;
        st.serialize_field("memory_controller", &g.cgroups.memory_note.as_deref())?;
        st.serialize_field("processes", &Each(g.table.iter().map(|e| ProcessDoc(g, e))))?;
        st.serialize_field(
            "targets",
            &Each(g.targets.list.iter().enumerate().map(|(i, t)| TargetRow {
                target: &t.name,
                governed: g.governed_of(i),
                attached_total: t.attached_total,
                exited_total: t.exited_total,
                cpu_max: cpu_max_text(t.limits.cpu_max_us()),
                cpu_weight: t.limits.cpu_weight,
                memory_max: t.limits.memory_max,
                min_runtime_ms: t.min_runtime_ms,
            })),
        )?;
        st.end()
    }
}

/// One tracked process, a flat object (`edgekeeper status` shows a table).
struct ProcessDoc<'a>(&'a Govern, &'a Tracked);

impl Serialize for ProcessDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (g, e) = (self.0, self.1);
        let mut m = s.serialize_map(Some(11))?;
        m.serialize_entry("pid", &e.pid)?;
        m.serialize_entry("comm", e.comm.as_str())?;
        m.serialize_entry("target", &g.target_name(e))?;
        m.serialize_entry("state", e.phase.as_str())?;
        m.serialize_entry("group", &(!e.group.is_empty()).then_some(e.group.as_str()))?;
        m.serialize_entry("cpu_max", &e.applied.cpu_max_us.map(cpu_max_text))?;
        m.serialize_entry("cpu_weight", &e.applied.cpu_weight)?;
        m.serialize_entry("memory_max", &e.applied.memory_max)?;
        m.serialize_entry("since", iso(e.since).as_str())?;
        m.serialize_entry("started", iso(e.started_at).as_str())?;
        m.serialize_entry("note", &(!e.note.is_empty()).then_some(e.note.as_str()))?;
        m.end()
    }
}

#[derive(Serialize)]
struct TargetRow<'a> {
    target: &'a str,
    governed: usize,
    attached_total: u64,
    exited_total: u64,
    cpu_max: heapless::String<32>,
    cpu_weight: u32,
    memory_max: u64,
    min_runtime_ms: u64,
}

/// The service's piece of state.json.
pub(super) struct SavedDoc<'a>(pub(super) &'a Govern);

#[derive(Serialize)]
struct SavedTarget<'a> {
    target: &'a str,
    attached_total: u64,
    exited_total: u64,
}

impl Serialize for SavedDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let g = self.0;
        let processes = g
            .table
            .iter()
            .filter(|e| e.phase.is_saved())
            .map(|e| SavedProcess {
                pid: e.pid,
                start_ticks: e.start_ticks,
                comm: e.comm.as_str(),
                target: g.target_name(e).unwrap_or(""),
                group: e.group.as_str(),
                phase: e.phase.as_str(),
                since: e.since,
                started_at: e.started_at,
                cpu_max_us: e.applied.cpu_max_us,
                cpu_weight: e.applied.cpu_weight,
                memory_max: e.applied.memory_max,
            });
        let targets = g.targets.list.iter().map(|t| SavedTarget {
            target: &t.name,
            attached_total: t.attached_total,
            exited_total: t.exited_total,
        });
        let mut st = s.serialize_struct("Saved", 3)?;
        st.serialize_field("processes", &Each(processes))?;
        st.serialize_field("counters", &g.counters)?;
        st.serialize_field("targets", &Each(targets))?;
        st.end()
    }
}
