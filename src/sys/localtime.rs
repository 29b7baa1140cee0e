//! Local (civil) time through the C library: the device's time zone.
//!
//! What it is: [`local`] splits seconds since the epoch into the local
//! date, time, weekday and UTC offset (`localtime_r`), and [`from_local`]
//! turns a local date and time back into seconds since the epoch
//! (`mktime` with `tm_isdst = -1`, so the C library decides whether
//! daylight saving time applies and normalises out-of-range fields: day 32
//! of January is 1 February, and a time that does not exist because the
//! clocks went forward is moved past the gap). [`refresh`] makes the C
//! library read the zone again (`TZ`, else `/etc/localtime`), so a zone
//! changed on a running device is picked up.
//! What it is not: a time-zone database or calendar library. It knows only
//! the zone the C library knows, and nothing here decides when anything
//! runs. Formatting in UTC is [`crate::sys::clock`]'s.
//!
//! The C library reads the `TZ` environment variable inside these calls.
//! edgekeeper never changes its environment after start (the one
//! `remove_var` in `sys::notify` runs before any thread or child exists),
//! so nothing can race those reads.

/// A local date and time, as `localtime_r` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTime {
    pub year: i64,
    /// 1 = January .. 12 = December.
    pub month: u32,
    /// 1 ..= 31.
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Sunday .. 6 = Saturday.
    pub weekday: u32,
    /// Daylight saving time is in effect.
    pub dst: bool,
    /// Seconds east of UTC: local = UTC + offset.
    pub utc_offset: i64,
}

unsafe extern "C" {
    /// POSIX `tzset(3)`; `libc` declares it only for Windows.
    fn tzset();
}

/// Makes the C library read the time zone again.
pub fn refresh() {
    // SAFETY: tzset takes no arguments and only updates the C library's
    // own zone state; the environment it reads is not changed concurrently
    // (see the module comment).
    unsafe { tzset() }
}

/// The local time at `secs` seconds since the epoch; `None` if the C
/// library cannot represent it (beyond a 32-bit `time_t`).
#[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
pub fn local(secs: i64) -> Option<LocalTime> {
    let t = libc::time_t::try_from(secs).ok()?;
    // SAFETY: `tm` is plain old data (integers and a pointer the C library
    // may set to a static string); all zeros is a valid value.
    let mut tm: libc::tm = unsafe { core::mem::zeroed() };
    // SAFETY: both pointers refer to live, properly aligned locals for the
    // whole call; localtime_r writes only into `tm` and returns null on
    // failure.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        return None;
    }
    Some(LocalTime {
        year: i64::from(tm.tm_year) + 1900,
        month: (tm.tm_mon + 1) as u32,
        day: tm.tm_mday as u32,
        hour: tm.tm_hour as u32,
        minute: tm.tm_min as u32,
        second: tm.tm_sec.min(59) as u32,
        weekday: tm.tm_wday as u32,
        dst: tm.tm_isdst > 0,
        utc_offset: tm.tm_gmtoff as i64,
    })
}

/// Seconds since the epoch of a local date and time, with daylight saving
/// time decided by the C library. Fields out of range are normalised the
/// way `mktime` does (`day` may be 0, negative or past the month's end,
/// which is how callers step over days and months). A time inside a
/// spring-forward gap comes back moved past the gap; a time that occurs
/// twice (autumn) comes back as one of the two. `None` if the C library
/// cannot represent the result.
#[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
pub fn from_local(
    year: i64,
    month: u32,
    day: i64,
    hour: u32,
    minute: u32,
    second: u32,
) -> Option<i64> {
    // SAFETY: as in `local`: all zeros is a valid `tm`.
    let mut tm: libc::tm = unsafe { core::mem::zeroed() };
    tm.tm_year = libc::c_int::try_from(year - 1900).ok()?;
    tm.tm_mon = libc::c_int::try_from(month).ok()? - 1;
    tm.tm_mday = libc::c_int::try_from(day).ok()?;
    tm.tm_hour = libc::c_int::try_from(hour).ok()?;
    tm.tm_min = libc::c_int::try_from(minute).ok()?;
    tm.tm_sec = libc::c_int::try_from(second).ok()?;
    tm.tm_isdst = -1;
    nix::errno::Errno::clear();
    // SAFETY: `tm` is a live, aligned local; mktime reads and normalises it
    // in place and returns (time_t)-1 on failure.
    let t = unsafe { libc::mktime(&mut tm) };
    // -1 is also 1969-12-31T23:59:59Z; errno tells the two apart.
    if t == -1 && nix::errno::Errno::last_raw() != 0 {
        return None;
    }
    Some(i64::from(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::clock::civil;

    /// Instants around month, year and leap-day ends, in 2026–2028.
    const SAMPLES: [i64; 6] = [
        1_769_904_000, // 2026-02-01T00:00:00Z
        1_772_323_199, // 2026-02-28T23:59:59Z
        1_798_761_600, // 2027-01-01T00:00:00Z
        1_835_395_200, // 2028-02-29T00:00:00Z
        1_795_386_100, // 2026-11-22T22:21:40Z
        1_782_864_000, // 2026-07-01T00:00:00Z
    ];

    #[test]
    fn local_time_is_utc_plus_the_offset_it_reports() {
        refresh();
        for secs in SAMPLES {
            let l = local(secs).unwrap();
            // Holds in any zone: the fields are the UTC civil time of
            // `secs + offset`, computed independently of the C library.
            let (y, mo, d, h, mi, s) = civil(secs + l.utc_offset);
            assert_eq!(
                (l.year, l.month, l.day, l.hour, l.minute, l.second),
                (y, mo, d, h, mi, s),
                "{secs}"
            );
            // 1970-01-01 was a Thursday.
            let days = (secs + l.utc_offset).div_euclid(86_400);
            assert_eq!(l.weekday as i64, (days + 4).rem_euclid(7), "{secs}");
        }
    }

    #[test]
    fn from_local_inverts_local_and_normalises_days() {
        for secs in SAMPLES {
            let l = local(secs).unwrap();
            let back = from_local(
                l.year,
                l.month,
                i64::from(l.day),
                l.hour,
                l.minute,
                l.second,
            );
            assert_eq!(back, Some(secs), "{l:?}");
        }
        // Day 32 of January is 1 February; day 0 of March is the last of
        // February (a leap day in 2028).
        assert_eq!(
            from_local(2026, 1, 32, 12, 0, 0),
            from_local(2026, 2, 1, 12, 0, 0)
        );
        let feb_end = local(from_local(2028, 3, 0, 12, 0, 0).unwrap()).unwrap();
        assert_eq!((feb_end.month, feb_end.day), (2, 29));
        let dec_next = local(from_local(2026, 12, 32, 12, 0, 0).unwrap()).unwrap();
        assert_eq!((dec_next.year, dec_next.month, dec_next.day), (2027, 1, 1));
    }
}
