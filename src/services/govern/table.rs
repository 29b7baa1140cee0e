//! The governed-process table: who is tracked, in which phase, and what
//! survives a restart.
//!
//! What it is: [`Tracked`] (one process, identified by PID *and* start
//! time, so a reused PID is a different process), its [`Phase`], the
//! [`Table`] preallocated to `limits.max_tracked_processes` and never grown
//! past it, the service's [`Counters`], and the shapes written to and read
//! from state.json. What it is not: /proc reading or cgroup writing.

use serde::{Deserialize, Serialize};

use super::targets::Filter;
use crate::services::Bounded;
use crate::sys::clock::Instant;

/// Where a tracked process stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Younger than its `min_runtime`; looked at again when it comes of age.
    Young,
    /// Of age, but `cgroup_root` is unusable; attached once it is.
    Waiting,
    /// An attach failed; tried again at `due`.
    Retrying,
    /// In its group with its limits.
    Governed,
    /// Attaching failed `max_attempts` times; left alone until it exits.
    GaveUp,
    /// Passed over by a filter; left alone until it exits or a reload.
    Ignored(Filter),
    /// Exited, but its group still holds processes (children it left);
    /// removed once empty.
    Lingering,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Young => "young",
            Phase::Waiting => "waiting",
            Phase::Retrying => "retrying",
            Phase::Governed => "governed",
            Phase::GaveUp => "gave_up",
            Phase::Ignored(_) => "ignored",
            Phase::Lingering => "lingering",
        }
    }
    /// Phases kept in state.json.
    pub fn is_saved(self) -> bool {
        matches!(self, Phase::Governed | Phase::GaveUp | Phase::Lingering)
    }
    fn from_saved(s: &str) -> Option<Phase> {
        match s {
            "governed" => Some(Phase::Governed),
            "gave_up" => Some(Phase::GaveUp),
            "lingering" => Some(Phase::Lingering),
            _ => None,
        }
    }
}

/// Limit values written into a group (`None`: not written).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub cpu_max_us: Option<u64>,
    pub cpu_weight: Option<u32>,
    pub memory_max: Option<u64>,
}

pub type Comm = heapless::String<16>;
pub type GroupName = heapless::String<32>;
pub type Note = heapless::String<160>;

/// One tracked process.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub pid: i32,
    /// Start time in clock ticks after boot: with the PID, the identity.
    pub start_ticks: u64,
    pub comm: Comm,
    /// Index into the targets; `None` once a reload removed its target.
    pub target: Option<usize>,
    pub phase: Phase,
    /// `<comm>-<pid>`; empty until a group was made.
    pub group: GroupName,
    /// Wall-clock start of the process, seconds since the epoch.
    pub started_at: i64,
    /// When it entered its phase (governed since …), seconds since the epoch.
    pub since: i64,
    pub attempts: u32,
    pub due: Instant,
    pub applied: Applied,
    /// Why it is not (fully) governed: the last error, the filter, a
    /// refused memory limit.
    pub note: Note,
    /// The scan generation that last saw it.
    pub seen: u32,
}

impl Tracked {
    pub fn new(pid: i32, start_ticks: u64, comm: &[u8], target: usize) -> Tracked {
        Tracked {
            pid,
            start_ticks,
            comm: utf8_prefix(comm),
            target: Some(target),
            phase: Phase::Young,
            group: GroupName::new(),
            started_at: 0,
            since: 0,
            attempts: 0,
            due: Instant::from_nanos(0),
            applied: Applied::default(),
            note: Note::new(),
            seen: 0,
        }
    }

    /// Whether this is the process (pid, start time) names.
    pub fn is(&self, pid: i32, start_ticks: u64) -> bool {
        self.pid == pid && self.start_ticks == start_ticks
    }

    /// Notes and warns that its `memory.max` of `limit` bytes was refused:
    /// it already uses `rss`.
    pub fn refused(&mut self, limit: u64, rss: u64) {
        self.note(format_args!(
            "memory.max {limit} refused: it already uses {rss} bytes (VmRSS) and the kernel would OOM-kill it"
        ));
        log::warn!("{} {}: {}", self.comm, self.pid, self.note);
    }

    /// Sets the note, cut to fit.
    pub fn note(&mut self, args: core::fmt::Arguments<'_>) {
        self.note.clear();
        let _ = core::fmt::Write::write_fmt(&mut Bounded(&mut self.note), args);
    }
}

/// The longest valid UTF-8 prefix of a process name (a 15-byte cut can
/// split a character), as group names and status need text.
pub fn utf8_prefix<const N: usize>(bytes: &[u8]) -> heapless::String<N> {
    let valid = match core::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    };
    crate::report::alerts::bounded(valid)
}

/// The table is full (`limits.max_tracked_processes`).
#[derive(Debug)]
pub struct Full;

/// Tracked processes, in the order they were found.
pub struct Table {
    entries: Vec<Tracked>,
}

impl Table {
    /// A table for `capacity` processes, allocated now.
    pub fn with_capacity(capacity: usize) -> Table {
        Table {
            entries: Vec::with_capacity(capacity.max(1)),
        }
    }
    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Adds `t` unless the table is full; never grows it.
    pub fn push(&mut self, t: Tracked) -> Result<usize, Full> {
        if self.entries.len() == self.entries.capacity() {
            return Err(Full);
        }
        self.entries.push(t);
        Ok(self.entries.len() - 1)
    }
    pub fn find(&self, pid: i32) -> Option<usize> {
        self.entries.iter().position(|t| t.pid == pid)
    }
    pub fn remove(&mut self, i: usize) -> Tracked {
        self.entries.remove(i)
    }
    pub fn get(&self, i: usize) -> &Tracked {
        &self.entries[i]
    }
    pub fn get_mut(&mut self, i: usize) -> &mut Tracked {
        &mut self.entries[i]
    }
    pub fn iter(&self) -> std::slice::Iter<'_, Tracked> {
        self.entries.iter()
    }
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Tracked> {
        self.entries.iter_mut()
    }
    /// The earliest deadline of a process waiting for one.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter(|t| matches!(t.phase, Phase::Young | Phase::Retrying))
            .map(|t| t.due)
            .min()
    }
    pub fn count(&self, phase: Phase) -> usize {
        self.entries.iter().filter(|t| t.phase == phase).count()
    }
    pub fn retain(&mut self, keep: impl FnMut(&Tracked) -> bool) {
        self.entries.retain(keep)
    }
}

/// What the service counts; kept in state.json so totals survive restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub scans: u64,
    pub scan_failures: u64,
    pub scan_time_us: u64,
    pub connector_events: u64,
    pub connector_overflows: u64,
    pub discovered: u64,
    pub attached: u64,
    pub recognised: u64,
    pub attach_failures: u64,
    pub gave_up: u64,
    pub exited: u64,
    pub pid_reuses: u64,
    pub groups_removed: u64,
    pub group_remove_failures: u64,
    pub filtered_uid: u64,
    pub filtered_user: u64,
    pub filtered_dir: u64,
    pub held_young: u64,
    pub memory_refused: u64,
    pub table_full: u64,
}

/// One process as state.json holds it; `S` is `&str` when saving and
/// `String` when loading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedProcess<S> {
    pub pid: i32,
    pub start_ticks: u64,
    pub comm: S,
    pub target: S,
    pub group: S,
    pub phase: S,
    pub since: i64,
    pub started_at: i64,
    pub cpu_max_us: Option<u64>,
    pub cpu_weight: Option<u32>,
    pub memory_max: Option<u64>,
}

impl SavedProcess<String> {
    /// Back into a table entry (target resolved by the caller).
    pub fn to_tracked(&self, target: Option<usize>) -> Option<Tracked> {
        let phase = Phase::from_saved(&self.phase)?;
        let mut t = Tracked::new(self.pid, self.start_ticks, self.comm.as_bytes(), 0);
        t.target = target;
        t.phase = phase;
        t.group = crate::report::alerts::bounded(&self.group);
        t.since = self.since;
        t.started_at = self.started_at;
        t.applied = Applied {
            cpu_max_us: self.cpu_max_us,
            cpu_weight: self.cpu_weight,
            memory_max: self.memory_max,
        };
        Some(t)
    }
}

/// A target's totals as state.json holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct SavedTarget {
    pub target: String,
    pub attached_total: u64,
    pub exited_total: u64,
}

/// The service's piece of state.json, as read back.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Saved {
    pub processes: Vec<SavedProcess<String>>,
    pub counters: Counters,
    pub targets: Vec<SavedTarget>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_never_grows_past_its_capacity() {
        let mut t = Table::with_capacity(2);
        t.push(Tracked::new(1, 10, b"ffmpeg", 0)).unwrap();
        t.push(Tracked::new(2, 20, b"ffmpeg", 0)).unwrap();
        assert!(t.push(Tracked::new(3, 30, b"ffmpeg", 0)).is_err());
        assert_eq!(t.capacity(), 2);
        assert_eq!(t.find(2), Some(1));
        t.remove(0);
        assert_eq!(t.find(2), Some(0));
        assert!(t.push(Tracked::new(3, 30, b"ffmpeg", 0)).is_ok());
    }

    #[test]
    fn identity_is_pid_and_start_time() {
        let t = Tracked::new(4242, 1000, b"ffmpeg", 0);
        assert!(t.is(4242, 1000));
        assert!(!t.is(4242, 1001), "a reused PID is another process");
        assert!(!t.is(4243, 1000));
    }

    #[test]
    fn names_cut_mid_character_stay_text() {
        // "caméra-recorder" cut by the kernel inside the é.
        let comm = "caméra".as_bytes();
        let cut = &comm[..4];
        assert_eq!(utf8_prefix::<16>(cut).as_str(), "cam");
        let mut t = Tracked::new(1, 1, b"x", 0);
        t.note(format_args!("{}", "a".repeat(500)));
        assert_eq!(t.note.len(), 160);
    }

    #[test]
    fn saved_processes_round_trip_through_json() {
        let mut t = Tracked::new(77, 123_456, b"ffmpeg", 0);
        t.phase = Phase::Governed;
        t.group = crate::report::alerts::bounded("ffmpeg-77");
        t.since = 1_795_386_100;
        t.applied.cpu_max_us = Some(300_000);
        let saved = SavedProcess {
            pid: t.pid,
            start_ticks: t.start_ticks,
            comm: t.comm.as_str(),
            target: "ffmpeg",
            group: t.group.as_str(),
            phase: t.phase.as_str(),
            since: t.since,
            started_at: t.started_at,
            cpu_max_us: t.applied.cpu_max_us,
            cpu_weight: None,
            memory_max: None,
        };
        let mut buf = [0u8; 512];
        let n = serde_json_core::to_slice(&saved, &mut buf).unwrap();
        let back: SavedProcess<String> = serde_json::from_slice(&buf[..n]).unwrap();
        let again = back.to_tracked(Some(0)).unwrap();
        assert!(again.is(77, 123_456));
        assert_eq!(again.phase, Phase::Governed);
        assert_eq!(again.group.as_str(), "ffmpeg-77");
        assert_eq!(again.applied, t.applied);
        let mut young = back.clone();
        young.phase = "young".into();
        assert!(
            young.to_tracked(None).is_none(),
            "only settled phases are saved"
        );
    }
}
