//! The mounts the storage service watches: how full each is, what it sits
//! on, and how much has been written to it.
//!
//! What it is: [`Watched`], one configured `storage.mounts` entry resolved
//! at start (the mount it is on from `/proc/self/mountinfo`, the block
//! device behind it and whether that is an SD card, its warn and critical
//! thresholds with the SD defaults of 80 % / 90 % and 85 % / 95 % for the
//! rest), then checked every `check_every`: used % as `df` computes it (or
//! against a `quota`), threshold alerts (`disk_warning`, `disk_critical`,
//! raised again at most once per cooldown while the condition lasts), and
//! for SD cards the bytes written since boot and today (local date), with
//! `sd_wear` when a daily `sd_write_budget` is exceeded. A check is one
//! `statvfs` and one `pread`: no allocation.
//! What it is not: cleanup. Emergency deletion is driven from `mod.rs`
//! when a check finds a mount at `emergency.at_used`.

use std::io;
use std::path::{Path, PathBuf};

use crate::config::Mount;
use crate::report::alerts::{Alert, AlertLevel};
use crate::services::Ctx;
use crate::sys::mounts::{self, BlockDevice, DiskStat, MountEntry, Usage};

/// How full a mount is against its thresholds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Ok,
    Warning,
    Critical,
}

/// Bytes written to an SD card today, kept across restarts (state.json)
/// and reboots (the kernel's counter restarts at boot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SdDay {
    /// The local date, as `YYYYMMDD`.
    pub day: i64,
    pub bytes: u64,
    /// The kernel's since-boot counter at the last check.
    pub seen: u64,
    /// Which boot `seen` belongs to (the start of /proc/sys/kernel/random/boot_id).
    pub boot: u64,
}

pub struct Watched {
    pub cfg: Mount,
    /// The file system it is on (`None` until resolved, or if not found).
    pub fs: Option<MountEntry>,
    pub device: Option<BlockDevice>,
    disk_stat: Option<DiskStat>,
    /// `st_dev` of the path: retention rules on the same device belong here.
    pub dev: Option<u64>,
    pub warn: u8,
    pub critical: u8,
    /// The last measurement (for a quota mount: against the quota).
    pub usage: Option<Usage>,
    pub percent: u8,
    pub level: Level,
    pub error: Option<i32>,
    /// Bytes of the files below a quota mount, from its last walk.
    pub quota_used: Option<u64>,
    pub written_since_boot: Option<u64>,
    pub sd_day: SdDay,
    pub checks: u64,
}

impl Watched {
    pub fn new(cfg: &Mount) -> Watched {
        Watched {
            cfg: cfg.clone(),
            fs: None,
            device: None,
            disk_stat: None,
            dev: None,
            warn: cfg.warn_used.unwrap_or(85),
            critical: cfg.critical_used.unwrap_or(95),
            usage: None,
            percent: 0,
            level: Level::Ok,
            error: None,
            quota_used: None,
            written_since_boot: None,
            sd_day: SdDay::default(),
            checks: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    pub fn quota(&self) -> Option<u64> {
        self.cfg.quota.map(|q| q.bytes())
    }

    /// Finds the mount, device and thresholds (start and reload; reads
    /// mountinfo, so it allocates).
    pub fn resolve(&mut self, mountinfo: &[MountEntry], sys: &Path) {
        let meta = match std::fs::metadata(&self.cfg.path) {
            Ok(m) => m,
            Err(e) => {
                self.error = e.raw_os_error();
                return;
            }
        };
        self.error = None;
        let dev = std::os::unix::fs::MetadataExt::dev(&meta);
        self.dev = Some(dev);
        let numbers = mounts::dev_numbers(dev);
        let real = std::fs::canonicalize(&self.cfg.path).unwrap_or_else(|_| self.cfg.path.clone());
        self.fs = mounts::mount_of(mountinfo, &real, Some(numbers)).cloned();
        self.device =
            BlockDevice::find(&sys.join("dev/block"), numbers.0, numbers.1).or_else(|| {
                self.fs
                    .as_ref()
                    .and_then(|m| BlockDevice::from_source(&m.source, m.major))
            });
        self.thresholds();
        self.disk_stat = self
            .device
            .as_ref()
            .and_then(|d| DiskStat::open(&sys.join("block"), &d.disk).ok());
    }

    /// Warn and critical percentages: as configured, else by device.
    fn thresholds(&mut self) {
        let (warn, critical) = if self.is_sd() { (80, 90) } else { (85, 95) };
        self.warn = self.cfg.warn_used.unwrap_or(warn);
        self.critical = self.cfg.critical_used.unwrap_or(critical);
        if self.warn >= self.critical {
            // One given, the other defaulted across it: keep them apart.
            if self.cfg.critical_used.is_none() {
                self.critical = (self.warn + 5).min(100);
            } else {
                self.warn = self.critical.saturating_sub(5);
            }
        }
    }

    pub fn is_sd(&self) -> bool {
        self.device.as_ref().is_some_and(|d| d.sd)
    }

    /// Measures now: the real file system, or the quota against what its
    /// last walk found.
    pub fn measure(&self) -> io::Result<Usage> {
        let real = Usage::of(&self.cfg.path)?;
        Ok(match (self.quota(), self.quota_used) {
            (Some(quota), Some(used)) => quota_usage(quota, used, real.avail),
            (Some(quota), None) => quota_usage(quota, 0, real.avail),
            (None, _) => real,
        })
    }

    /// The periodic check: usage, thresholds, SD writes. Returns the used
    /// percentage, or `None` when the path cannot be measured.
    pub fn check(&mut self, ctx: &mut Ctx<'_>, boot: u64) -> Option<u8> {
        self.checks += 1;
        let usage = match self.measure() {
            Ok(u) => u,
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                if self.error != Some(errno) {
                    log::warn!("mount {}: {e}", self.cfg.path.display());
                }
                self.error = Some(errno);
                self.usage = None;
                return None;
            }
        };
        if self.error.take().is_some() {
            log::info!("mount {} can be measured again", self.cfg.path.display());
        }
        self.usage = Some(usage);
        self.percent = usage.used_percent();
        let level = if self.percent >= self.critical {
            Level::Critical
        } else if self.percent >= self.warn {
            Level::Warning
        } else {
            Level::Ok
        };
        if level < self.level {
            log::info!(
                "{} is back to {} % used (warns at {} %)",
                self.cfg.path.display(),
                self.percent,
                self.warn
            );
        }
        self.level = level;
        if level > Level::Ok {
            self.raise_threshold(ctx, usage);
        }
        self.sd_writes(ctx, boot);
        Some(self.percent)
    }

    fn raise_threshold(&self, ctx: &mut Ctx<'_>, usage: Usage) {
        use core::fmt::Write;
        let (kind, alert_level, at) = match self.level {
            Level::Critical => ("disk_critical", AlertLevel::Critical, self.critical),
            _ => ("disk_warning", AlertLevel::Warning, self.warn),
        };
        let mut msg = heapless::String::<256>::new();
        let _ = write!(
            msg,
            "{} is {} % used ({} free of {}{}); {} at {} %",
            self.cfg.path.display(),
            self.percent,
            Bytes(usage.avail),
            Bytes(usage.used + usage.avail),
            if self.quota().is_some() { " quota" } else { "" },
            if self.level == Level::Critical {
                "critical"
            } else {
                "warns"
            },
            at
        );
        let mut source = heapless::String::<128>::new();
        let _ = write!(source, "{}", self.cfg.path.display());
        ctx.raise(&Alert {
            level: alert_level,
            kind,
            source: &source,
            message: &msg,
            value: Some(f64::from(self.percent)),
        });
    }

    /// Bytes written to an SD card: since boot from the kernel, today
    /// accumulated across checks; `sd_wear` past the daily budget.
    fn sd_writes(&mut self, ctx: &mut Ctx<'_>, boot: u64) {
        let Some(stat) = &self.disk_stat else { return };
        let Ok(now) = stat.bytes_written() else {
            return;
        };
        self.written_since_boot = Some(now);
        let today = local_day(ctx.wall.secs);
        let d = &mut self.sd_day;
        let delta = if *d == SdDay::default() {
            0 // first sight, nothing saved: count from now on
        } else if d.boot == boot && now >= d.seen {
            now - d.seen
        } else {
            now // rebooted since the last check: all of this boot
        };
        if d.day != today {
            // A new day: what was written since the last check belongs to
            // it (the check interval is short against a day).
            *ctx.state_changed = true;
            d.day = today;
            d.bytes = 0;
        }
        if d.boot != boot {
            *ctx.state_changed = true;
        }
        d.bytes += delta;
        d.seen = now;
        d.boot = boot;
        let today_bytes = d.bytes;
        if !self.is_sd() {
            return;
        }
        let Some(budget) = self.cfg.sd_write_budget.map(|b| b.bytes()) else {
            return;
        };
        if today_bytes > budget {
            use core::fmt::Write;
            let mut msg = heapless::String::<256>::new();
            let _ = write!(
                msg,
                "{} written to {} today, over its budget of {} a day",
                Bytes(today_bytes),
                self.device.as_ref().map_or("?", |d| d.disk.as_str()),
                Bytes(budget)
            );
            let mut source = heapless::String::<128>::new();
            let _ = write!(source, "{}", self.cfg.path.display());
            ctx.raise(&Alert {
                level: AlertLevel::Warning,
                kind: "sd_wear",
                source: &source,
                message: &msg,
                value: Some(today_bytes as f64),
            });
        }
    }
}

/// The local date of `secs` as `YYYYMMDD` (UTC days where the C library
/// cannot say).
pub fn local_day(secs: i64) -> i64 {
    match crate::sys::localtime::local(secs) {
        Some(t) => t.year * 10_000 + i64::from(t.month) * 100 + i64::from(t.day),
        None => secs.div_euclid(86_400),
    }
}

/// A quota as if it were a disk: used is what the files take (or what the
/// real file system leaves, if that is less), free the rest.
pub fn quota_usage(quota: u64, used: u64, real_avail: u64) -> Usage {
    let free = quota.saturating_sub(used).min(real_avail);
    Usage {
        total: quota,
        used: quota - free,
        avail: free,
    }
}

/// `usage` after `freed` more bytes are gone.
pub fn after_freeing(usage: Usage, freed: u64) -> Usage {
    let freed = freed.min(usage.used);
    Usage {
        total: usage.total,
        used: usage.used - freed,
        avail: usage.avail + freed,
    }
}

/// Bytes to free from `usage` for its used % (as df rounds it) to be at or
/// below `percent`.
pub fn bytes_over(usage: Usage, percent: u8) -> u64 {
    let base = usage.used + usage.avail;
    let target = (u128::from(base) * u128::from(percent) / 100) as u64;
    usage.used.saturating_sub(target)
}

/// The start of this boot's id, to tell a reboot from a counter that went
/// back (0 when it cannot be read).
pub fn boot_id() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
        return 0;
    };
    let hex: String = text
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    u64::from_str_radix(&hex, 16).unwrap_or(0)
}

/// A byte count for people: `12.3 MB` (powers of 1000, as disks are sold).
pub struct Bytes(pub u64);

pub const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];

/// `bytes` in tenths of its unit (an index into [`UNITS`]), rounded: one
/// decimal in integers (printed per deleted file by `sweep`, where float
/// formatting showed in profiles). Unit 0 is whole bytes.
pub fn tenths(bytes: u64) -> (u64, usize) {
    let mut unit = 0;
    let mut scale = 1u64;
    while bytes / scale >= 1000 && unit < UNITS.len() - 1 {
        scale *= 1000;
        unit += 1;
    }
    if unit == 0 {
        return (bytes * 10, 0);
    }
    let t = (u128::from(bytes) * 10 + u128::from(scale) / 2) / u128::from(scale);
    (t as u64, unit)
}

impl core::fmt::Display for Bytes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 < 1000 {
            return write!(f, "{} B", self.0);
        }
        let (tenths, unit) = tenths(self.0);
        write!(f, "{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

/// The mounts, as configured, resolved against this machine.
pub fn resolve_all(config: &[Mount]) -> Vec<Watched> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| mounts::parse_mountinfo(&t))
        .unwrap_or_default();
    config
        .iter()
        .map(|c| {
            let mut w = Watched::new(c);
            w.resolve(&mountinfo, Path::new("/sys"));
            w
        })
        .collect()
}

/// Which watched mount a retention root belongs to: the one with the
/// longest path that holds it on the same device (a quota mount holds the
/// roots below it).
pub fn mount_for(mounts: &[Watched], root: &Path) -> Option<usize> {
    let dev = std::fs::metadata(root)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::dev(&m));
    let real: PathBuf = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            let base = std::fs::canonicalize(m.path()).unwrap_or_else(|_| m.path().to_path_buf());
            real.starts_with(&base) && (m.dev.is_none() || dev.is_none() || m.dev == dev)
        })
        .max_by_key(|(_, m)| m.path().as_os_str().len())
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emergency_arithmetic_follows_df_rounding() {
        // 1000 bytes: 910 used, 90 free: 92 % as df rounds (910/1000 -> 91,
        // here with 0 reserved).
        let u = Usage {
            total: 1000,
            used: 910,
            avail: 90,
        };
        assert_eq!(u.used_percent(), 91);
        // Down to 80 %: 110 bytes to free.
        assert_eq!(bytes_over(u, 80), 110);
        assert_eq!(after_freeing(u, 110).used_percent(), 80);
        assert_eq!(after_freeing(u, 109).used_percent(), 81);
        assert_eq!(bytes_over(after_freeing(u, 200), 80), 0);
    }

    #[test]
    fn a_quota_is_a_disk_of_its_own_size() {
        // 2 MB quota, 1.8 MB of files, plenty on the real disk: 90 %.
        let u = quota_usage(2_000_000, 1_800_000, 10_000_000_000);
        assert_eq!(u.used_percent(), 90);
        // The real disk nearly full: the quota cannot be used beyond it.
        let u = quota_usage(2_000_000, 1_000_000, 100_000);
        assert_eq!(u.avail, 100_000);
        assert_eq!(u.used_percent(), 95);
        // Over quota.
        assert_eq!(quota_usage(1000, 5000, 10_000).used_percent(), 100);
    }

    #[test]
    fn sd_cards_get_the_stricter_default_thresholds() {
        let info = mounts::parse_mountinfo(
            "22 1 179:2 / / rw - ext4 /dev/root rw\n31 22 8:1 / /mnt/storage rw - ext4 /dev/sda1 rw\n",
        );
        let threshold = |json: &str, entry: &MountEntry| {
            let cfg: Mount = serde_json::from_str(json).unwrap();
            let mut w = Watched::new(&cfg);
            w.device = BlockDevice::from_source(&entry.source, entry.major);
            w.thresholds();
            (w.is_sd(), w.warn, w.critical)
        };
        assert_eq!(threshold(r#"{"path": "/"}"#, &info[0]), (true, 80, 90));
        assert_eq!(
            threshold(r#"{"path": "/mnt/storage"}"#, &info[1]),
            (false, 85, 95)
        );
        // Configured values win; one given across the other's default is
        // kept apart from it.
        assert_eq!(
            threshold(
                r#"{"path": "/", "warn_used": 70, "critical_used": 75}"#,
                &info[0]
            ),
            (true, 70, 75)
        );
        assert_eq!(
            threshold(r#"{"path": "/", "warn_used": 92}"#, &info[0]),
            (true, 92, 97)
        );
        assert_eq!(
            threshold(r#"{"path": "/", "critical_used": 60}"#, &info[1]),
            (false, 55, 60)
        );
    }

    #[test]
    fn bytes_print_for_people() {
        assert_eq!(Bytes(999).to_string(), "999 B");
        assert_eq!(Bytes(12_345_678).to_string(), "12.3 MB");
        assert_eq!(Bytes(4_000_000_000).to_string(), "4.0 GB");
        assert_eq!(Bytes(4096).to_string(), "4.1 KB");
        assert_eq!(Bytes(999_960).to_string(), "1000.0 KB");
        assert_eq!(Bytes(u64::MAX).to_string(), "18446.7 PB");
    }
}
