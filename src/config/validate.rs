//! Checks a parsed config for values that are well-typed but unusable.
//!
//! What it is: every range, uniqueness and consistency rule of the schema,
//! each failure returned as `(key path, message)` so the user is told
//! exactly which key to change. What it is not: a check of the machine
//! (whether a root exists, a cgroup is writable): that is each service's
//! start-up, which reports through health, because a directory may appear
//! after boot while a typo never fixes itself.

use std::collections::HashSet;
use std::path::{Component, Path};

use super::*;

type Invalid = (String, String);

fn fail<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err((key.into(), message.into()))
}

fn range(key: &str, value: u64, min: u64, max: u64) -> Result<(), Invalid> {
    if value < min || value > max {
        return fail(
            key,
            format!("{value} is out of range: must be {min}..={max}"),
        );
    }
    Ok(())
}

fn at_least(key: &str, value: Duration, min: Duration) -> Result<(), Invalid> {
    if value < min {
        return fail(key, format!("\"{value}\" is too short: at least \"{min}\""));
    }
    Ok(())
}

fn name(key: &str, value: &str, seen: &mut HashSet<String>) -> Result<(), Invalid> {
    if value.is_empty() || value.len() > 64 {
        return fail(key, "must be 1 to 64 characters");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return fail(
            key,
            format!("\"{value}\" may hold only letters, digits, '-', '_' and '.'"),
        );
    }
    if !seen.insert(value.to_owned()) {
        return fail(
            key,
            format!("\"{value}\" is used by another entry; names must be unique"),
        );
    }
    Ok(())
}

/// File-name patterns for fnmatch(3): non-empty, at least one, no '/'.
fn patterns(key: &str, list: &[String]) -> Result<(), Invalid> {
    if list.is_empty() {
        return fail(key, "needs at least one pattern");
    }
    for (i, p) in list.iter().enumerate() {
        if p.is_empty() || p.contains('/') || p.contains('\0') {
            return fail(
                format!("{key}[{i}]"),
                format!("\"{p}\" must be a non-empty file-name pattern without '/'"),
            );
        }
    }
    Ok(())
}

fn command(key: &str, argv: &[String]) -> Result<(), Invalid> {
    if argv.is_empty() || argv[0].is_empty() {
        return fail(
            key,
            "needs a program to run: [\"/path/to/program\", \"arg\", ...]",
        );
    }
    if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
        return fail(format!("{key}[{i}]"), "contains a NUL byte");
    }
    Ok(())
}

fn percent(key: &str, value: u8) -> Result<(), Invalid> {
    range(key, value.into(), 1, 100)
}

/// `a` equals `b` or lies below it, comparing components lexically.
fn inside(a: &Path, b: &Path) -> bool {
    a.starts_with(b)
}

pub(super) fn check(c: &Config) -> Result<(), Invalid> {
    at_least("status_every", c.status_every, Duration::from_millis(100))?;
    if c.log.max_size < Size::from_bytes(4096) {
        return fail(
            "log.max_size",
            format!("\"{}\" is too small: at least \"4KiB\"", c.log.max_size),
        );
    }
    range("log.keep", c.log.keep.into(), 0, 100)?;
    range(
        "limits.max_watches",
        c.limits.max_watches.into(),
        1,
        1 << 22,
    )?;
    range(
        "limits.max_tracked_processes",
        c.limits.max_tracked_processes.into(),
        1,
        65536,
    )?;

    let mut names = HashSet::new();
    for (i, r) in c.relocate.iter().enumerate() {
        relocate(&format!("relocate[{i}]"), r, &mut names)?;
    }
    let mut names = HashSet::new();
    for (i, f) in c.frames.iter().enumerate() {
        frames(&format!("frames[{i}]"), f, &mut names)?;
    }
    if let Some(g) = &c.govern {
        govern(g)?;
    }
    if let Some(s) = &c.storage {
        storage(s)?;
    }
    at_least("alerts.cooldown", c.alerts.cooldown, Duration::from_secs(0))?;
    if let Some(argv) = &c.alerts.command {
        command("alerts.command", argv)?;
        for (i, arg) in argv.iter().enumerate() {
            placeholders(&format!("alerts.command[{i}]"), arg)?;
        }
    }
    Ok(())
}

fn placeholders(key: &str, arg: &str) -> Result<(), Invalid> {
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return fail(key, format!("\"{arg}\" has a '{{' without '}}'"));
        };
        let word = &rest[open + 1..open + close];
        if !matches!(word, "level" | "kind" | "source" | "message" | "value") {
            return fail(
                key,
                format!(
                    "unknown placeholder {{{word}}}: use {{level}}, {{kind}}, {{source}}, {{message}} or {{value}}"
                ),
            );
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

fn relocate(key: &str, r: &RelocateRule, names: &mut HashSet<String>) -> Result<(), Invalid> {
    name(&format!("{key}.name"), &r.name, names)?;
    patterns(&format!("{key}.match"), &r.patterns)?;
    if inside(&r.root, &r.target) {
        return fail(
            format!("{key}.target"),
            format!(
                "\"{}\" contains the root \"{}\": files moved there would be found again",
                r.target.display(),
                r.root.display()
            ),
        );
    }
    for (i, e) in r.exclude.iter().enumerate() {
        let p = Path::new(e);
        if e.is_empty()
            || p.is_absolute()
            || p.components().any(|c| !matches!(c, Component::Normal(_)))
        {
            return fail(
                format!("{key}.exclude[{i}]"),
                format!("\"{e}\" must be a path relative to the root, without '.' or '..'"),
            );
        }
    }
    at_least(
        &format!("{key}.sweep_every"),
        r.sweep_every,
        Duration::from_secs(1),
    )?;
    at_least(
        &format!("{key}.sweep_every_busy"),
        r.sweep_every_busy,
        Duration::from_secs(1),
    )?;
    if r.sweep_every_busy > r.sweep_every {
        return fail(
            format!("{key}.sweep_every_busy"),
            format!(
                "\"{}\" is longer than sweep_every \"{}\": busy sweeps are the more frequent ones",
                r.sweep_every_busy, r.sweep_every
            ),
        );
    }
    Ok(())
}

fn frames(key: &str, f: &FrameRule, names: &mut HashSet<String>) -> Result<(), Invalid> {
    name(&format!("{key}.name"), &f.name, names)?;
    patterns(&format!("{key}.match"), &f.patterns)?;
    for (i, p) in f.ignore.iter().enumerate() {
        if p.is_empty() || p.contains('/') {
            return fail(
                format!("{key}.ignore[{i}]"),
                "must be a non-empty file-name pattern without '/'",
            );
        }
    }
    range(&format!("{key}.catch_up"), f.catch_up.into(), 0, 10_000)?;
    if f.stall_after != Duration::from_millis(0) {
        at_least(
            &format!("{key}.stall_after"),
            f.stall_after,
            Duration::from_millis(100),
        )?;
    }
    if f.freeze_after == 1 {
        return fail(
            format!("{key}.freeze_after"),
            "1 would flag every frame: use 0 (off) or 2 and more",
        );
    }
    if let Some(a) = &f.analyzer {
        command(&format!("{key}.analyzer.command"), &a.command)?;
        at_least(
            &format!("{key}.analyzer.timeout"),
            a.timeout,
            Duration::from_millis(100),
        )?;
        range(
            &format!("{key}.analyzer.max_parallel"),
            a.max_parallel.into(),
            1,
            16,
        )?;
    }
    Ok(())
}

fn limits(
    key: &str,
    quota: Option<u32>,
    weight: Option<u32>,
    memory: Option<Size>,
) -> Result<(), Invalid> {
    if let Some(q) = quota {
        range(&format!("{key}.cpu_quota"), q.into(), 1, 100_000)?;
    }
    if let Some(w) = weight {
        range(&format!("{key}.cpu_weight"), w.into(), 1, 10_000)?;
    }
    if let Some(m) = memory {
        if m < Size::from_bytes(1 << 20) {
            return fail(
                format!("{key}.memory_max"),
                format!("\"{m}\" is too small: at least \"1MiB\""),
            );
        }
    }
    Ok(())
}

fn govern(g: &Govern) -> Result<(), Invalid> {
    at_least("govern.scan_every", g.scan_every, Duration::from_secs(1))?;
    range("govern.max_attempts", g.max_attempts.into(), 1, 100)?;
    let d = &g.defaults;
    limits(
        "govern.defaults",
        Some(d.cpu_quota),
        Some(d.cpu_weight),
        Some(d.memory_max),
    )?;
    users("govern.filters.allowed_users", &g.filters.allowed_users)?;
    if g.targets.is_empty() {
        return fail(
            "govern.targets",
            "needs at least one target, like {\"comm\": \"ffmpeg\"}",
        );
    }
    let mut seen = HashSet::new();
    for (i, t) in g.targets.iter().enumerate() {
        let key = format!("govern.targets[{i}]");
        if t.comm.is_empty() || t.comm.len() > 255 || t.comm.contains('/') {
            return fail(
                format!("{key}.comm"),
                "must be a process name of 1 to 255 bytes without '/'",
            );
        }
        if !seen.insert(t.comm.as_str()) {
            return fail(
                format!("{key}.comm"),
                format!("\"{}\" is already a target", t.comm),
            );
        }
        limits(&key, t.cpu_quota, t.cpu_weight, t.memory_max)?;
        if let Some(u) = &t.allowed_users {
            users(&format!("{key}.allowed_users"), u)?;
        }
    }
    Ok(())
}

fn users(key: &str, names: &[String]) -> Result<(), Invalid> {
    for (i, n) in names.iter().enumerate() {
        if n.is_empty() || n.contains([':', '/', '\0']) {
            return fail(format!("{key}[{i}]"), format!("\"{n}\" is not a user name"));
        }
    }
    Ok(())
}

fn storage(s: &Storage) -> Result<(), Invalid> {
    at_least("storage.check_every", s.check_every, Duration::from_secs(1))?;
    let mut seen = HashSet::new();
    for (i, m) in s.mounts.iter().enumerate() {
        let key = format!("storage.mounts[{i}]");
        if !seen.insert(m.path.as_path()) {
            return fail(
                format!("{key}.path"),
                format!("\"{}\" is listed twice", m.path.display()),
            );
        }
        if let Some(w) = m.warn_used {
            percent(&format!("{key}.warn_used"), w)?;
        }
        if let Some(c) = m.critical_used {
            percent(&format!("{key}.critical_used"), c)?;
        }
        if m.quota == Some(Size::from_bytes(0)) {
            return fail(format!("{key}.quota"), "must be more than 0B");
        }
        if let (Some(w), Some(c)) = (m.warn_used, m.critical_used) {
            if w >= c {
                return fail(
                    format!("{key}.warn_used"),
                    format!("{w} must be below critical_used {c}"),
                );
            }
        }
    }
    percent("storage.emergency.at_used", s.emergency.at_used)?;
    percent("storage.emergency.until_used", s.emergency.until_used)?;
    if s.emergency.until_used >= s.emergency.at_used {
        return fail(
            "storage.emergency.until_used",
            format!(
                "{} must be below at_used {}",
                s.emergency.until_used, s.emergency.at_used
            ),
        );
    }
    let mut names = HashSet::new();
    for (i, r) in s.retention.iter().enumerate() {
        let key = format!("storage.retention[{i}]");
        name(&format!("{key}.name"), &r.name, &mut names)?;
        patterns(&format!("{key}.match"), &r.patterns)?;
        if r.depth == Some(0) {
            return fail(
                format!("{key}.depth"),
                "must be 1 or more (1: entries directly in root)",
            );
        }
    }
    for (i, o) in s.orphans.iter().enumerate() {
        let key = format!("storage.orphans[{i}]");
        patterns(&format!("{key}.match"), &o.patterns)?;
        if o.companion_ext.contains('/') {
            return fail(format!("{key}.companion_ext"), "must not contain '/'");
        }
    }
    for (i, r) in s.rotate.iter().enumerate() {
        let key = format!("storage.rotate[{i}]");
        let file = r.pattern.file_name().map(|n| n.to_string_lossy());
        if file.is_none_or(|n| n.is_empty()) {
            return fail(
                format!("{key}.match"),
                "must end in a file-name pattern, like \"/var/log/app/*.log\"",
            );
        }
        if r.max_size.is_none() && r.max_age.is_none() {
            return fail(
                key,
                "needs max_size, max_age or both: otherwise nothing is ever rotated",
            );
        }
        if r.max_size == Some(Size::from_bytes(0)) {
            return fail(format!("{key}.max_size"), "must be more than 0B");
        }
        range(&format!("{key}.keep"), r.keep.into(), 1, 100)?;
    }
    let mut names = HashSet::new();
    for (i, j) in s.jobs.iter().enumerate() {
        let key = format!("storage.jobs[{i}]");
        name(&format!("{key}.name"), &j.name, &mut names)?;
        match (&j.at, j.every) {
            (Some(at), None) => {
                JobTime::parse(at).map_err(|m| (format!("{key}.at"), m))?;
            }
            (None, Some(every)) => {
                at_least(&format!("{key}.every"), every, Duration::from_secs(1))?
            }
            (Some(_), Some(_)) => return fail(key, "has both at and every: give one"),
            (None, None) => {
                return fail(key, "needs at (\"02:00\", \"Sun 03:00\") or every (\"6h\")");
            }
        }
        if let Some(t) = j.timeout {
            at_least(&format!("{key}.timeout"), t, Duration::from_millis(100))?;
        }
        command(&format!("{key}.command"), &j.command)?;
    }
    Ok(())
}

/// When a scheduled job runs: daily at `HH:MM`, or weekly `Ddd HH:MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobTime {
    /// 0 = Sunday .. 6 = Saturday; `None`: every day.
    pub weekday: Option<u8>,
    pub hour: u8,
    pub minute: u8,
}

const WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

impl JobTime {
    pub fn parse(text: &str) -> Result<JobTime, String> {
        let bad =
            || format!("\"{text}\" is not a time: use \"HH:MM\" (daily) or \"Sun 03:00\" (weekly)");
        let (weekday, clock) = match text.split_once(' ') {
            Some((day, clock)) => {
                let d = WEEKDAYS
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case(day))
                    .ok_or_else(bad)?;
                (Some(d as u8), clock.trim())
            }
            None => (None, text),
        };
        let (h, m) = clock.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let hour: u8 = h.parse().map_err(|_| bad())?;
        let minute: u8 = m.parse().map_err(|_| bad())?;
        if hour > 23 || minute > 59 {
            return Err(bad());
        }
        Ok(JobTime {
            weekday,
            hour,
            minute,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_times_daily_and_weekly() {
        assert_eq!(
            JobTime::parse("02:00").unwrap(),
            JobTime {
                weekday: None,
                hour: 2,
                minute: 0
            }
        );
        assert_eq!(JobTime::parse("Sun 03:00").unwrap().weekday, Some(0));
        assert_eq!(JobTime::parse("sat 23:59").unwrap().weekday, Some(6));
        for bad in ["24:00", "2:00", "Sunday 03:00", "03:60", "", "noon"] {
            assert!(JobTime::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn placeholders_are_checked() {
        assert!(placeholders("k", "{level}-{kind}: {message} ({value}) from {source}").is_ok());
        assert!(
            placeholders("k", "{lvl}")
                .unwrap_err()
                .1
                .contains("unknown placeholder")
        );
        assert!(placeholders("k", "{level").is_err());
    }
}
