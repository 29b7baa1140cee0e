//! The processes `govern` looks for, with their filters and limits.
//!
//! What it is: each configured target compiled once (at start and reload)
//! into what the scan needs: its name and how a process's `comm` or argv[0]
//! matches it, its effective filters (the target's overrides, else the
//! `filters` block, with `allowed_users` resolved to uids) and its
//! effective limits (the target's overrides, else `defaults`, so per-target
//! limits really apply). [`Target::admits`] decides whether a process may be
//! governed. What it is not: cgroup writing or the process table.

use std::path::Path;

use crate::config;
use crate::sys::procfs::{COMM_MAX, Status};

/// The cgroup `cpu.max` period: quotas are percent of one core of this.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The limits written into a governed process's group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Percent of one core: 200 is two cores.
    pub cpu_quota: u32,
    pub cpu_weight: u32,
    pub memory_max: u64,
}

impl Limits {
    /// The `cpu.max` quota in microseconds per [`CPU_PERIOD_US`].
    pub fn cpu_max_us(&self) -> u64 {
        u64::from(self.cpu_quota) * CPU_PERIOD_US / 100
    }
}

/// Why a process was passed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Its real or effective uid is in `blocked_uids`.
    BlockedUid(u32),
    /// `allowed_users` is set and its user is not among them.
    NotAllowed(u32),
    /// Its working directory is under one of `blocked_dirs`.
    BlockedDir,
    /// Its working directory could not be read, so `blocked_dirs` cannot
    /// be checked; it is left alone rather than governed by mistake.
    CwdUnknown,
}

/// A target with its effective filters and limits.
#[derive(Debug)]
pub struct Target {
    /// The configured name (`comm`, or argv[0]'s basename when longer than
    /// the 15 bytes a `comm` holds).
    pub name: String,
    pub limits: Limits,
    pub min_runtime_ms: u64,
    pub blocked_uids: Vec<u32>,
    /// `None`: any user; otherwise the uids of `allowed_users` that exist.
    pub allowed_uids: Option<Vec<u32>>,
    pub blocked_dirs: Vec<Vec<u8>>,
    /// Processes of this target put into a group (this run and before).
    pub attached_total: u64,
    /// Governed processes of this target that exited.
    pub exited_total: u64,
}

/// How a `comm` matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    No,
    /// Target `i` by its full name.
    Comm(usize),
    /// The `comm` is the 15-byte cut of a longer target name: argv[0]
    /// decides.
    NeedsArgv0,
}

/// All targets, in config order.
#[derive(Debug, Default)]
pub struct Targets {
    pub list: Vec<Target>,
}

/// Resolves user names to uids; names that do not exist are reported.
fn resolve_users(names: &[String], key: &str, warnings: &mut Vec<String>) -> Vec<u32> {
    let mut uids = Vec::with_capacity(names.len());
    for name in names {
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => uids.push(u.uid.as_raw()),
            Ok(None) => warnings.push(format!(
                "{key}: no user named \"{name}\" on this system; it allows no process"
            )),
            Err(e) => warnings.push(format!("{key}: looking up user \"{name}\": {e}")),
        }
    }
    uids
}

fn dir_bytes(p: &Path) -> Vec<u8> {
    let b = p.as_os_str().as_encoded_bytes();
    match b {
        [rest @ .., b'/'] if !rest.is_empty() => rest.to_vec(),
        b => b.to_vec(),
    }
}

impl Targets {
    /// Compiles the `govern` block. User names are resolved now (start and
    /// reload); the returned warnings name the key of each that failed.
    pub fn from_config(g: &config::Govern) -> (Targets, Vec<String>) {
        let mut warnings = Vec::new();
        let f = &g.filters;
        let global_allowed = (!f.allowed_users.is_empty()).then(|| {
            resolve_users(
                &f.allowed_users,
                "govern.filters.allowed_users",
                &mut warnings,
            )
        });
        let list = g
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let allowed_uids = match &t.allowed_users {
                    Some(names) if names.is_empty() => None,
                    Some(names) => Some(resolve_users(
                        names,
                        &format!("govern.targets[{i}].allowed_users"),
                        &mut warnings,
                    )),
                    None => global_allowed.clone(),
                };
                Target {
                    name: t.comm.clone(),
                    limits: Limits {
                        cpu_quota: t.cpu_quota.unwrap_or(g.defaults.cpu_quota),
                        cpu_weight: t.cpu_weight.unwrap_or(g.defaults.cpu_weight),
                        memory_max: t.memory_max.unwrap_or(g.defaults.memory_max).bytes(),
                    },
                    min_runtime_ms: t.min_runtime.unwrap_or(f.min_runtime).as_millis(),
                    blocked_uids: t
                        .blocked_uids
                        .clone()
                        .unwrap_or_else(|| f.blocked_uids.clone()),
                    allowed_uids,
                    blocked_dirs: t
                        .blocked_dirs
                        .as_ref()
                        .unwrap_or(&f.blocked_dirs)
                        .iter()
                        .map(|d| dir_bytes(d))
                        .collect(),
                    attached_total: 0,
                    exited_total: 0,
                }
            })
            .collect();
        (Targets { list }, warnings)
    }

    /// Matches a process name against the targets.
    pub fn by_comm(&self, comm: &[u8]) -> Match {
        let mut long = false;
        for (i, t) in self.list.iter().enumerate() {
            let name = t.name.as_bytes();
            if name == comm {
                return Match::Comm(i);
            }
            if name.len() > COMM_MAX && &name[..COMM_MAX] == comm {
                long = true;
            }
        }
        if long { Match::NeedsArgv0 } else { Match::No }
    }

    /// The long-named target whose name is argv[0]'s basename.
    pub fn by_argv0(&self, comm: &[u8], argv0: &[u8]) -> Option<usize> {
        self.list.iter().position(|t| {
            let name = t.name.as_bytes();
            name.len() > COMM_MAX && &name[..COMM_MAX] == comm && name == argv0
        })
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|t| t.name == name)
    }
}

/// `path` is `dir` or lies below it (whole components only).
pub fn under(path: &[u8], dir: &[u8]) -> bool {
    if dir == b"/" {
        return path.starts_with(b"/");
    }
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
}

impl Target {
    /// Whether [`Target::admits`] needs the working directory.
    pub fn needs_cwd(&self) -> bool {
        !self.blocked_dirs.is_empty()
    }

    /// Whether a process with this `status` and working directory (`None`:
    /// unreadable) may be governed. Blocking wins over allowing.
    pub fn admits(&self, status: &Status, cwd: Option<&[u8]>) -> Result<(), Filter> {
        for uid in [status.uid_real, status.uid_effective] {
            if self.blocked_uids.contains(&uid) {
                return Err(Filter::BlockedUid(uid));
            }
        }
        if let Some(allowed) = &self.allowed_uids {
            if !allowed.contains(&status.uid_real) {
                return Err(Filter::NotAllowed(status.uid_real));
            }
        }
        if !self.needs_cwd() {
            return Ok(());
        }
        let Some(cwd) = cwd else {
            return Err(Filter::CwdUnknown);
        };
        let cwd = cwd.strip_suffix(b" (deleted)").unwrap_or(cwd);
        if self.blocked_dirs.iter().any(|d| under(cwd, d)) {
            return Err(Filter::BlockedDir);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn govern(json: &str) -> config::Govern {
        let c = config::Config::parse(
            &format!("{{\"govern\": {json}}}"),
            Path::new("/etc/edgekeeper/x.json"),
        )
        .unwrap();
        c.govern.unwrap()
    }

    #[test]
    fn per_target_limits_and_filters_override_the_defaults() {
        let g = govern(
            r#"{"defaults": {"cpu_quota": 200, "cpu_weight": 100, "memory_max": "4GiB"},
                "filters": {"min_runtime": "5s", "blocked_uids": [0], "blocked_dirs": ["/tmp"]},
                "targets": [
                  {"comm": "ffmpeg", "cpu_quota": 300, "memory_max": "8GiB", "min_runtime": "10s"},
                  {"comm": "gst-launch-1.0", "blocked_uids": [], "blocked_dirs": ["/srv/x/"]}]}"#,
        );
        let (t, warnings) = Targets::from_config(&g);
        assert!(warnings.is_empty());
        let ff = &t.list[0];
        assert_eq!(
            ff.limits,
            Limits {
                cpu_quota: 300,
                cpu_weight: 100,
                memory_max: 8 << 30
            }
        );
        assert_eq!(ff.limits.cpu_max_us(), 300_000);
        assert_eq!(ff.min_runtime_ms, 10_000);
        assert_eq!(ff.blocked_uids, vec![0]);
        assert_eq!(ff.blocked_dirs, vec![b"/tmp".to_vec()]);
        let gst = &t.list[1];
        assert_eq!(gst.limits.cpu_max_us(), 200_000);
        assert_eq!(gst.limits.memory_max, 4 << 30);
        assert_eq!(gst.min_runtime_ms, 5_000);
        assert!(gst.blocked_uids.is_empty());
        assert_eq!(gst.blocked_dirs, vec![b"/srv/x".to_vec()]);
    }

    #[test]
    fn names_match_by_comm_and_long_names_by_argv0() {
        let g = govern(
            r#"{"targets": [{"comm": "ffmpeg"}, {"comm": "camera-recorder-main"}, {"comm": "camera-recorder-aux"}]}"#,
        );
        let (t, _) = Targets::from_config(&g);
        assert_eq!(t.by_comm(b"ffmpeg"), Match::Comm(0));
        assert_eq!(t.by_comm(b"ffmpe"), Match::No);
        assert_eq!(t.by_comm(b"camera-recorder"), Match::NeedsArgv0);
        assert_eq!(
            t.by_argv0(b"camera-recorder", b"camera-recorder-aux"),
            Some(2)
        );
        assert_eq!(t.by_argv0(b"camera-recorder", b"camera-recorder-x"), None);
        assert_eq!(t.by_argv0(b"ffmpeg", b"ffmpeg"), None);
    }

    #[test]
    fn filters_hold() {
        let g = govern(
            r#"{"filters": {"blocked_uids": [0, 7], "blocked_dirs": ["/tmp", "/"]},
                "targets": [{"comm": "a"}, {"comm": "b", "blocked_dirs": ["/tmp"], "allowed_users": ["root"]}]}"#,
        );
        let (t, warnings) = Targets::from_config(&g);
        assert!(warnings.is_empty(), "{warnings:?}");
        let user = |real, effective| Status {
            uid_real: real,
            uid_effective: effective,
            rss_bytes: None,
        };
        let a = &t.list[0];
        assert_eq!(
            a.admits(&user(0, 0), Some(b"/home")),
            Err(Filter::BlockedUid(0))
        );
        assert_eq!(
            a.admits(&user(1000, 7), Some(b"/home")),
            Err(Filter::BlockedUid(7)),
            "a blocked effective uid blocks"
        );
        // "/" blocks every directory.
        assert_eq!(
            a.admits(&user(1000, 1000), Some(b"/home")),
            Err(Filter::BlockedDir)
        );
        let b = &t.list[1];
        assert_eq!(
            b.admits(&user(1000, 1000), Some(b"/home")),
            Err(Filter::NotAllowed(1000))
        );
        // root is allowed by name here, but blocked by uid: blocking wins.
        assert_eq!(
            b.admits(&user(0, 0), Some(b"/home")),
            Err(Filter::BlockedUid(0))
        );
        assert_eq!(
            b.admits(&user(5, 5), Some(b"/tmp/x (deleted)")),
            Err(Filter::NotAllowed(5))
        );
    }

    #[test]
    fn directories_block_whole_components_only() {
        assert!(under(b"/tmp", b"/tmp"));
        assert!(under(b"/tmp/a/b", b"/tmp"));
        assert!(!under(b"/tmpfoo", b"/tmp"));
        assert!(under(b"/anything", b"/"));
        let g = govern(r#"{"filters": {"blocked_uids": []}, "targets": [{"comm": "a"}]}"#);
        let (t, _) = Targets::from_config(&g);
        let s = Status::default();
        assert_eq!(
            t.list[0].admits(&s, Some(b"/tmp/x (deleted)")),
            Err(Filter::BlockedDir)
        );
        assert_eq!(t.list[0].admits(&s, None), Err(Filter::CwdUnknown));
        assert_eq!(t.list[0].admits(&s, Some(b"/tmpx")), Ok(()));
    }

    #[test]
    fn unknown_users_are_reported_and_allow_nobody() {
        let g = govern(
            r#"{"filters": {"allowed_users": ["no-such-user-edgekeeper"]}, "targets": [{"comm": "a"}]}"#,
        );
        let (t, warnings) = Targets::from_config(&g);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("govern.filters.allowed_users"));
        assert!(warnings[0].contains("no-such-user-edgekeeper"));
        assert_eq!(t.list[0].allowed_uids, Some(vec![]));
    }
}
