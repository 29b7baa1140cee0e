//! What survives a restart: `state_dir/state.json`.
//!
//! What it is: loading the state at start (a file that does not parse is
//! moved aside as `state.json.corrupt-<time>` and the daemon starts fresh,
//! losing nothing else), and saving it atomically (temporary file, fsync,
//! rename, fsync of the directory) only when it changed and at most every
//! [`MIN_INTERVAL_MS`], because the state directory usually sits on the SD
//! card. Saving serialises into a buffer made at start.
//! What it is not: a database. The state is small: alert cooldowns, lifetime
//! counters and, as services arrive, what they must remember.

use std::io;
use std::path::{Path, PathBuf};

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

use crate::report::alerts::Cooldown;
use crate::services::Pieces;
use crate::sys::clock::{Instant, WallTime};
use crate::sys::fs::AtomicFile;

pub const FILE_NAME: &str = "state.json";
/// Changes are written at most this often (and always at stop).
pub const MIN_INTERVAL_MS: u64 = 30_000;
const VERSION: u32 = 1;

/// Counters that add up over the device's life, not just this run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Lifetime {
    pub starts: u64,
    pub alerts_raised: u64,
    pub alerts_suppressed: u64,
}

/// The state as read at start. Unknown keys (from a newer version) are
/// ignored rather than treated as corruption.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Loaded {
    pub version: u32,
    pub lifetime: Lifetime,
    pub alert_cooldowns: Vec<Cooldown>,
    /// Each service's own state, as it wrote it.
    pub services: std::collections::BTreeMap<String, serde_json::Value>,
}

/// The state as written: borrowed from the live daemon, never copied.
pub struct Snapshot<'a> {
    pub saved_at: WallTime,
    pub lifetime: Lifetime,
    pub alert_cooldowns: &'a [Cooldown],
    pub services: Option<&'a Pieces>,
}

struct ServiceStates<'a>(&'a Pieces);

impl Serialize for ServiceStates<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (name, raw) in self.0.iter() {
            m.serialize_entry(name, &raw)?;
        }
        m.end()
    }
}

impl Serialize for Snapshot<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut at = heapless::String::<32>::new();
        let _ = core::fmt::Write::write_fmt(&mut at, format_args!("{}", self.saved_at.iso()));
        let mut st = s.serialize_struct("State", 5)?;
        st.serialize_field("version", &VERSION)?;
        st.serialize_field("saved_at", at.as_str())?;
        st.serialize_field("lifetime", &self.lifetime)?;
        st.serialize_field("alert_cooldowns", self.alert_cooldowns)?;
        if let Some(pieces) = self.services {
            st.serialize_field("services", &ServiceStates(pieces))?;
        }
        st.end()
    }
}

/// Reads a state file's bytes (what `open` does after reading the file;
/// fuzzed in `fuzz/`).
pub fn parse(bytes: &[u8]) -> Result<Loaded, serde_json::Error> {
    serde_json::from_slice::<Loaded>(bytes)
}

pub struct StateStore {
    file: AtomicFile,
    buf: Vec<u8>,
    last_write: Option<Instant>,
    pub writes: u64,
    pub write_failures: u64,
}

/// What happened when the state was loaded.
pub struct Opened {
    pub store: StateStore,
    pub loaded: Loaded,
    /// Where a corrupt state file was moved, and why it was corrupt.
    pub moved_aside: Option<(PathBuf, String)>,
}

impl StateStore {
    /// Opens `state_dir/state.json` (making the directory if needed) and
    /// loads it. Only an unreadable file (permissions, I/O) is an error.
    pub fn open(state_dir: &Path, capacity: usize) -> io::Result<Opened> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(FILE_NAME);
        let file = AtomicFile::new(&path, true)?;
        let mut moved_aside = None;
        let loaded = match std::fs::read(&path) {
            Ok(bytes) => match parse(&bytes) {
                Ok(l) => l,
                Err(e) => {
                    let aside = state_dir
                        .join(format!("{FILE_NAME}.corrupt-{}", WallTime::now().compact()));
                    std::fs::rename(&path, &aside)?;
                    moved_aside = Some((aside, e.to_string()));
                    Loaded::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Loaded::default(),
            Err(e) => return Err(e),
        };
        let store = StateStore {
            file,
            buf: vec![0; capacity.max(4096)],
            last_write: None,
            writes: 0,
            write_failures: 0,
        };
        Ok(Opened {
            store,
            loaded,
            moved_aside,
        })
    }

    /// Bytes needed for the state of a daemon with these table sizes.
    pub fn capacity_for(cooldowns: usize) -> usize {
        4096 + cooldowns * 256
    }

    /// When a pending change may be written: now, or 30 s after the last
    /// write.
    pub fn due(&self, now: Instant) -> Instant {
        match self.last_write {
            Some(t) => t.after_millis(MIN_INTERVAL_MS).max(now),
            None => now,
        }
    }

    pub fn save(&mut self, snapshot: &Snapshot<'_>, now: Instant) -> io::Result<()> {
        self.last_write = Some(now);
        // The buffer is sized at start; a state that outgrew it gets more
        // room rather than being lost.
        let result = loop {
            match serde_json_core::to_slice(snapshot, &mut self.buf) {
                Ok(n) if n < self.buf.len() => {
                    self.buf[n] = b'\n';
                    break self.file.write(&self.buf[..=n]);
                }
                Ok(_) | Err(serde_json_core::ser::Error::BufferFull) => {
                    let len = self.buf.len() * 2;
                    self.buf.resize(len, 0);
                }
                Err(e) => break Err(io::Error::other(e.to_string())),
            }
        };
        match &result {
            Ok(()) => self.writes += 1,
            Err(_) => self.write_failures += 1,
        }
        result
    }

    pub fn path(&self) -> PathBuf {
        self.file.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::alerts::{AlertLevel, bounded};

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("edgekeeper-state-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn state_round_trips() {
        let dir = scratch("roundtrip");
        let mut opened = StateStore::open(&dir, 100).unwrap();
        assert!(opened.moved_aside.is_none());
        let cooldowns = vec![Cooldown {
            kind: bounded("disk_warning"),
            source: bounded("/mnt/\"storage\""),
            level: AlertLevel::Critical,
            at: 1_795_386_100,
        }];
        let lifetime = Lifetime {
            starts: 3,
            alerts_raised: 9,
            alerts_suppressed: 1,
        };
        let snap = Snapshot {
            saved_at: WallTime::now(),
            lifetime,
            alert_cooldowns: &cooldowns,
            services: None,
        };
        // A buffer too small for the state grows instead of failing.
        opened.store.save(&snap, Instant::now()).unwrap();
        let again = StateStore::open(&dir, 100).unwrap();
        assert_eq!(again.loaded.lifetime, lifetime);
        assert_eq!(again.loaded.alert_cooldowns, cooldowns);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_state_is_moved_aside_and_the_daemon_starts_fresh() {
        let dir = scratch("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(FILE_NAME),
            b"{\"lifetime\": {\"starts\": 4}, \"alert_cool",
        )
        .unwrap();
        let opened = StateStore::open(&dir, 4096).unwrap();
        let (aside, why) = opened.moved_aside.unwrap();
        assert!(
            aside
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("state.json.corrupt-")
        );
        assert!(why.contains("EOF"), "{why}");
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            b"{\"lifetime\": {\"starts\": 4}, \"alert_cool"
        );
        assert!(!dir.join(FILE_NAME).exists());
        assert_eq!(opened.loaded.lifetime, Lifetime::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_are_spaced_by_the_minimum_interval() {
        let dir = scratch("interval");
        let mut store = StateStore::open(&dir, 4096).unwrap().store;
        let t = Instant::now();
        assert_eq!(store.due(t), t);
        let snap = Snapshot {
            saved_at: WallTime::now(),
            lifetime: Lifetime::default(),
            alert_cooldowns: &[],
            services: None,
        };
        store.save(&snap, t).unwrap();
        assert_eq!(
            store.due(t.after_millis(1)),
            t.after_millis(MIN_INTERVAL_MS)
        );
        assert_eq!(
            store.due(t.after_millis(MIN_INTERVAL_MS + 5)),
            t.after_millis(MIN_INTERVAL_MS + 5)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
