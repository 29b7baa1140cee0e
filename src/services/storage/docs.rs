//! What the storage service writes into status.json (its details) and
//! state.json (what survives a restart), serialised straight from the
//! running service with serde-json-core, nothing copied or allocated.
//!
//! What it is: `Details` (mounts with their device, usage, thresholds and
//! SD writes; retention rules with their last pass and totals; orphan
//! rules; the emergency under way or the last one; the clock hold; jobs)
//! and `Saved` (jobs' last runs, SD cards' bytes written today).
//! What it is not: a schema for anything read back but `Saved`.

use serde::Serialize;
use serde::ser::{SerializeSeq, SerializeStruct, Serializer};

use super::{Storage, mounts::Watched};
use crate::sys::clock::WallTime;

fn text(p: &std::path::Path) -> &str {
    p.to_str().unwrap_or("?")
}

fn iso(secs: i64) -> heapless::String<32> {
    let mut s = heapless::String::new();
    let _ = core::fmt::Write::write_fmt(
        &mut s,
        format_args!("{}", WallTime::from_secs(secs).iso_secs()),
    );
    s
}

fn iso_ns(ns: Option<i64>) -> Option<heapless::String<32>> {
    ns.map(|ns| iso(ns.div_euclid(1_000_000_000)))
}

fn errno_text(e: Option<i32>) -> Option<heapless::String<96>> {
    e.map(|e| {
        let mut s = heapless::String::new();
        let _ = core::fmt::Write::write_fmt(
            &mut crate::services::Bounded(&mut s),
            format_args!("{}", nix::errno::Errno::from_raw(e).desc()),
        );
        s
    })
}

pub struct Details<'a>(pub &'a Storage);

impl Serialize for Details<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let st = self.0;
        let mut d = s.serialize_struct("Storage", 7)?;
        d.serialize_field("mounts", &Mounts(&st.mounts))?;
        d.serialize_field("retention", &Rules(st))?;
        d.serialize_field("orphans", &Orphans(st))?;
        d.serialize_field("emergency", &Emergency(st))?;
        d.serialize_field("wait_for_clock_sync", &st.config.wait_for_clock_sync)?;
        d.serialize_field("retention_held", &st.clock_held)?;
        d.serialize_field("jobs", &st.jobs.details())?;
        d.end()
    }
}

struct Mounts<'a>(&'a [Watched]);

impl Serialize for Mounts<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for m in self.0 {
            seq.serialize_element(&MountDoc(m))?;
        }
        seq.end()
    }
}

struct MountDoc<'a>(&'a Watched);

impl Serialize for MountDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m = self.0;
        let mut d = s.serialize_struct("Mount", 18)?;
        d.serialize_field("path", text(m.path()))?;
        d.serialize_field("mount_point", &m.fs.as_ref().map(|f| text(&f.mount_point)))?;
        d.serialize_field("fstype", &m.fs.as_ref().map(|f| f.fstype.as_str()))?;
        d.serialize_field("device", &m.device.as_ref().map(|d| d.name.as_str()))?;
        d.serialize_field("disk", &m.device.as_ref().map(|d| d.disk.as_str()))?;
        d.serialize_field("sd", &m.is_sd())?;
        d.serialize_field("size_bytes", &m.usage.map(|u| u.total))?;
        d.serialize_field("used_bytes", &m.usage.map(|u| u.used))?;
        d.serialize_field("free_bytes", &m.usage.map(|u| u.avail))?;
        d.serialize_field("used_percent", &m.usage.map(|_| m.percent))?;
        d.serialize_field("warn_used", &m.warn)?;
        d.serialize_field("critical_used", &m.critical)?;
        d.serialize_field("level", &m.level)?;
        d.serialize_field("quota_bytes", &m.quota())?;
        d.serialize_field("written_since_boot_bytes", &m.written_since_boot)?;
        d.serialize_field(
            "written_today_bytes",
            &m.written_since_boot.map(|_| m.sd_day.bytes),
        )?;
        d.serialize_field(
            "sd_write_budget_bytes",
            &m.cfg.sd_write_budget.map(|b| b.bytes()),
        )?;
        d.serialize_field("error", &errno_text(m.error))?;
        d.end()
    }
}

struct Rules<'a>(&'a Storage);

impl Serialize for Rules<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let st = self.0;
        let mut seq = s.serialize_seq(Some(st.rules.len()))?;
        for r in &st.rules {
            let last = r.last.map(|(_, t)| t);
            let doc = RuleDoc {
                name: &r.cfg.name,
                root: text(&r.cfg.root),
                mount: r.mount.map(|m| text(st.mounts[m].path())),
                kind: match r.cfg.kind {
                    crate::config::EntryKind::File => "file",
                    crate::config::EntryKind::Dir => "dir",
                },
                max_age_ms: r.cfg.max_age.map(|a| a.as_millis()),
                priority: r.cfg.priority,
                emergency_keep: r.cfg.emergency_keep,
                last_pass_at: r.last.map(|(at, _)| iso(at.secs)),
                entries: last.map(|t| t.entries),
                bytes: last.map(|t| t.bytes),
                oldest: last.and_then(|t| iso_ns(t.oldest_ns)),
                newest: last.and_then(|t| iso_ns(t.newest_ns)),
                totals: &r.totals,
                root_error: errno_text(r.root_error),
            };
            seq.serialize_element(&doc)?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct RuleDoc<'a> {
    name: &'a str,
    root: &'a str,
    mount: Option<&'a str>,
    kind: &'a str,
    max_age_ms: Option<u64>,
    priority: u32,
    emergency_keep: u32,
    last_pass_at: Option<heapless::String<32>>,
    entries: Option<u64>,
    bytes: Option<u64>,
    oldest: Option<heapless::String<32>>,
    newest: Option<heapless::String<32>>,
    totals: &'a super::RuleTotals,
    root_error: Option<heapless::String<96>>,
}

struct Orphans<'a>(&'a Storage);

impl Serialize for Orphans<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.orphans.len()))?;
        for o in &self.0.orphans {
            #[derive(Serialize)]
            struct Doc<'a> {
                dir: &'a str,
                companion_dir: &'a str,
                companion_ext: &'a str,
                deleted_total: u64,
                failed_total: u64,
                error: Option<heapless::String<96>>,
            }
            seq.serialize_element(&Doc {
                dir: text(&o.cfg.dir),
                companion_dir: text(&o.cfg.companion_dir),
                companion_ext: &o.cfg.companion_ext,
                deleted_total: o.deleted,
                failed_total: o.failed,
                error: errno_text(o.error),
            })?;
        }
        seq.end()
    }
}

struct Emergency<'a>(&'a Storage);

impl Serialize for Emergency<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let st = self.0;
        let mut d = s.serialize_struct("Emergency", 5)?;
        d.serialize_field("at_used", &st.config.emergency.at_used)?;
        d.serialize_field("until_used", &st.config.emergency.until_used)?;
        d.serialize_field(
            "running_on",
            &st.emergency
                .as_ref()
                .map(|e| text(st.mounts[e.mount].path())),
        )?;
        #[derive(Serialize)]
        struct Last<'a> {
            at: heapless::String<32>,
            mount: &'a str,
            from_percent: u8,
            to_percent: u8,
            deleted: u64,
            bytes_freed: u64,
            failed: u64,
            reached: bool,
        }
        d.serialize_field(
            "last",
            &st.last_emergency.as_ref().map(|o| Last {
                at: iso(o.at.secs),
                mount: text(st.mounts[o.mount].path()),
                from_percent: o.from_percent,
                to_percent: o.to_percent,
                deleted: o.deleted,
                bytes_freed: o.bytes_freed,
                failed: o.failed,
                reached: o.reached,
            }),
        )?;
        d.end()
    }
}

/// What state.json keeps for the storage service.
pub struct Saved<'a>(pub &'a Storage);

impl Serialize for Saved<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let st = self.0;
        let mut d = s.serialize_struct("Saved", 2)?;
        d.serialize_field("jobs", &st.jobs.save_state())?;
        d.serialize_field("sd", &SavedSd(&st.mounts))?;
        d.end()
    }
}

struct SavedSd<'a>(&'a [Watched]);

impl Serialize for SavedSd<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        for m in self.0.iter().filter(|m| m.written_since_boot.is_some()) {
            #[derive(Serialize)]
            struct Doc<'a> {
                path: &'a str,
                day: &'a super::mounts::SdDay,
            }
            seq.serialize_element(&Doc {
                path: text(m.path()),
                day: &m.sd_day,
            })?;
        }
        seq.end()
    }
}
