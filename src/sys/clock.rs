//! Time as the daemon needs it: a monotonic instant for deadlines, and UTC
//! wall-clock formatting for logs, files and status, without allocation.
//!
//! What it is: `Instant` (CLOCK_MONOTONIC in nanoseconds, the clock the
//! timerfd and systemd's watchdog use), `WallTime` (seconds and
//! milliseconds since the epoch), and formatters that write ISO 8601 UTC
//! into any `fmt::Write`. What it is not: a calendar library; no time zones.

use core::fmt;

use nix::time::{ClockId, clock_gettime};

/// A point on CLOCK_MONOTONIC, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    pub fn now() -> Instant {
        // CLOCK_MONOTONIC cannot fail on Linux with a valid clock id.
        let ts =
            clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always available");
        Instant(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
    }
    pub const fn from_nanos(ns: u64) -> Instant {
        Instant(ns)
    }
    pub const fn as_nanos(self) -> u64 {
        self.0
    }
    pub fn as_micros(self) -> u64 {
        self.0 / 1000
    }
    pub fn after_millis(self, ms: u64) -> Instant {
        Instant(self.0.saturating_add(ms.saturating_mul(1_000_000)))
    }
    pub fn after_micros(self, us: u64) -> Instant {
        Instant(self.0.saturating_add(us.saturating_mul(1000)))
    }
    /// Milliseconds from `earlier` to `self`, 0 if `earlier` is later.
    pub fn millis_since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0) / 1_000_000
    }
}

/// A point in UTC wall-clock time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct WallTime {
    pub secs: i64,
    pub millis: u32,
}

impl WallTime {
    pub fn now() -> WallTime {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => WallTime {
                secs: d.as_secs() as i64,
                millis: d.subsec_millis(),
            },
            Err(_) => WallTime { secs: 0, millis: 0 },
        }
    }
    pub const fn from_secs(secs: i64) -> WallTime {
        WallTime { secs, millis: 0 }
    }

    /// `2026-11-22T22:21:40.123Z`
    pub fn iso(self) -> Iso {
        Iso(self, true)
    }
    /// `2026-11-22T22:21:40Z`
    pub fn iso_secs(self) -> Iso {
        Iso(self, false)
    }
    /// `20261122T222140Z`, for file names.
    pub fn compact(self) -> Compact {
        Compact(self)
    }
}

/// Splits seconds since the epoch into (year, month, day, h, m, s).
/// Days to civil date after Howard Hinnant's `civil_from_days`.
pub fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem / 60 % 60, rem % 60)
}

pub struct Iso(WallTime, bool);

impl fmt::Display for Iso {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, mo, d, h, mi, s) = civil(self.0.secs);
        write!(f, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}")?;
        if self.1 {
            write!(f, ".{:03}", self.0.millis)?;
        }
        f.write_str("Z")
    }
}

pub struct Compact(WallTime);

impl fmt::Display for Compact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, mo, d, h, mi, s) = civil(self.0.secs);
        write!(f, "{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
    }
}

/// A file's modification time as (seconds, nanoseconds) since the epoch,
/// the same on 32-bit targets whose `time_t` is 32 bits (armhf glibc).
#[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
pub fn mtime(st: &nix::sys::stat::FileStat) -> (i64, i64) {
    (i64::from(st.st_mtime), st.st_mtime_nsec as i64)
}

/// A file's device number as u64 on every target.
#[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
pub fn dev(st: &nix::sys::stat::FileStat) -> u64 {
    st.st_dev as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(
            WallTime::from_secs(0).iso_secs().to_string(),
            "1970-01-01T00:00:00Z"
        );
        // 2026-11-22T22:21:40Z, checked with `date -u -d @1795386100`.
        let t = WallTime {
            secs: 1_795_386_100,
            millis: 7,
        };
        assert_eq!(t.iso().to_string(), "2026-11-22T22:21:40.007Z");
        assert_eq!(t.compact().to_string(), "20261122T222140Z");
        // A leap day.
        assert_eq!(
            WallTime::from_secs(951_782_400).iso_secs().to_string(),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn monotonic_moves_forward() {
        let a = Instant::now();
        let b = Instant::now();
        assert!(b >= a);
        assert_eq!(a.after_millis(5).millis_since(a), 5);
        assert_eq!(a.millis_since(a.after_millis(5)), 0);
    }
}
