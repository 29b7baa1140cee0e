//! The configuration: one JSON file with comments, described in SPEC.md.
//!
//! What it is: the typed schema of every block (core, `relocate`, `frames`,
//! `govern`, `storage`, `alerts`) with its defaults, loading from a file,
//! resolving relative paths against the file's directory, and validation
//! whose every error names the key path (`govern.targets[1].memory_max`) and,
//! for syntax errors, the line and column. `check` prints [`Config`] back as
//! JSON with every default filled in; that output loads again unchanged.
//! What it is not: the services themselves. Loading allocates freely: it runs
//! at start and on SIGHUP, never in the event path.

mod jsonc;
pub mod units;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use units::{Duration, Size};
pub use validate::JobTime;

/// Where the config is read from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/edgekeeper/edgekeeper.json";
/// The environment variable that overrides [`DEFAULT_PATH`].
pub const PATH_ENV: &str = "EDGEKEEPER_CONFIG";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "defaults::run_dir")]
    pub run_dir: PathBuf,
    #[serde(default = "defaults::status_every")]
    pub status_every: Duration,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub relocate: Vec<RelocateRule>,
    #[serde(default)]
    pub frames: Vec<FrameRule>,
    #[serde(default)]
    pub govern: Option<Govern>,
    #[serde(default)]
    pub storage: Option<Storage>,
    #[serde(default)]
    pub alerts: Alerts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Level::Error => log::LevelFilter::Error,
            Level::Warn => log::LevelFilter::Warn,
            Level::Info => log::LevelFilter::Info,
            Level::Debug => log::LevelFilter::Debug,
            Level::Trace => log::LevelFilter::Trace,
        }
    }
}

/// The field log. `file: null` turns the file off (stderr only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default = "defaults::log_file")]
    pub file: Option<PathBuf>,
    #[serde(default = "defaults::log_max_size")]
    pub max_size: Size,
    #[serde(default = "defaults::log_keep")]
    pub keep: u32,
    #[serde(default = "defaults::log_level")]
    pub level: Level,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            file: defaults::log_file(),
            max_size: defaults::log_max_size(),
            keep: defaults::log_keep(),
            level: defaults::log_level(),
        }
    }
}

/// Bounds that size the preallocated tables at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "defaults::max_watches")]
    pub max_watches: u32,
    #[serde(default = "defaults::max_tracked_processes")]
    pub max_tracked_processes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_watches: defaults::max_watches(),
            max_tracked_processes: defaults::max_tracked_processes(),
        }
    }
}

/// One `relocate` rule: matching files anywhere under `root` go to `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelocateRule {
    pub name: String,
    pub root: PathBuf,
    #[serde(rename = "match")]
    pub patterns: Vec<String>,
    pub target: PathBuf,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub min_age: Duration,
    #[serde(default = "defaults::sweep_every")]
    pub sweep_every: Duration,
    #[serde(default = "defaults::sweep_every_busy")]
    pub sweep_every_busy: Duration,
    #[serde(default = "defaults::busy_threshold")]
    pub busy_threshold: u32,
}

/// One `frames` capture directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameRule {
    pub name: String,
    pub dir: PathBuf,
    #[serde(rename = "match", default = "defaults::frame_match")]
    pub patterns: Vec<String>,
    #[serde(default = "defaults::frame_ignore")]
    pub ignore: Vec<String>,
    #[serde(default = "defaults::yes")]
    pub sidecar: bool,
    #[serde(default = "defaults::catch_up")]
    pub catch_up: u32,
    /// `0s` turns stall detection off.
    #[serde(default = "defaults::stall_after")]
    pub stall_after: Duration,
    /// `0` turns freeze detection off.
    #[serde(default = "defaults::freeze_after")]
    pub freeze_after: u32,
    #[serde(default)]
    pub analyzer: Option<Analyzer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analyzer {
    pub command: Vec<String>,
    #[serde(default = "defaults::analyzer_timeout")]
    pub timeout: Duration,
    #[serde(default = "defaults::max_parallel")]
    pub max_parallel: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Govern {
    #[serde(default = "defaults::cgroup_root")]
    pub cgroup_root: PathBuf,
    #[serde(default = "defaults::scan_every")]
    pub scan_every: Duration,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub filters: Filters,
    #[serde(default)]
    pub defaults: CgroupLimits,
    pub targets: Vec<GovernTarget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    #[serde(default = "defaults::min_runtime")]
    pub min_runtime: Duration,
    #[serde(default = "defaults::blocked_dirs")]
    pub blocked_dirs: Vec<PathBuf>,
    #[serde(default = "defaults::blocked_uids")]
    pub blocked_uids: Vec<u32>,
    #[serde(default)]
    pub allowed_users: Vec<String>,
}

impl Default for Filters {
    fn default() -> Self {
        Filters {
            min_runtime: defaults::min_runtime(),
            blocked_dirs: defaults::blocked_dirs(),
            blocked_uids: defaults::blocked_uids(),
            allowed_users: Vec::new(),
        }
    }
}

/// The limits written into a governed process's group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupLimits {
    /// Percent of one core: 200 means two cores.
    #[serde(default = "defaults::cpu_quota")]
    pub cpu_quota: u32,
    #[serde(default = "defaults::cpu_weight")]
    pub cpu_weight: u32,
    #[serde(default = "defaults::memory_max")]
    pub memory_max: Size,
}

impl Default for CgroupLimits {
    fn default() -> Self {
        CgroupLimits {
            cpu_quota: defaults::cpu_quota(),
            cpu_weight: defaults::cpu_weight(),
            memory_max: defaults::memory_max(),
        }
    }
}

/// A process to govern, with optional overrides of filters and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GovernTarget {
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<Size>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_runtime: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_dirs: Option<Vec<PathBuf>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_uids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_users: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    #[serde(default = "defaults::check_every")]
    pub check_every: Duration,
    #[serde(default)]
    pub wait_for_clock_sync: bool,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub emergency: Emergency,
    #[serde(default)]
    pub retention: Vec<RetentionRule>,
    #[serde(default)]
    pub orphans: Vec<OrphanRule>,
    #[serde(default)]
    pub rotate: Vec<RotateRule>,
    #[serde(default)]
    pub jobs: Vec<Job>,
}

/// A watched mount. Thresholds left `null` are chosen from the device: an SD
/// card (`mmcblk`) warns at 80 % and is critical at 90 %, others 85 % / 95 %.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub path: PathBuf,
    #[serde(default)]
    pub warn_used: Option<u8>,
    #[serde(default)]
    pub critical_used: Option<u8>,
    /// Bytes per day this SD device may be written before `sd_wear` is raised.
    #[serde(default)]
    pub sd_write_budget: Option<Size>,
    /// Treat the directory as a disk of this size: used is what the files
    /// below it take (walked every `check_every`), free is the rest of the
    /// quota or of the real file system, whichever is less. For a share of
    /// a bigger disk (camera storage on the root file system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Size>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Emergency {
    #[serde(default = "defaults::emergency_at")]
    pub at_used: u8,
    #[serde(default = "defaults::emergency_until")]
    pub until_used: u8,
}

impl Default for Emergency {
    fn default() -> Self {
        Emergency {
            at_used: defaults::emergency_at(),
            until_used: defaults::emergency_until(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    pub name: String,
    pub root: PathBuf,
    #[serde(rename = "match")]
    pub patterns: Vec<String>,
    /// `null`: never deleted by age, only by `emergency`.
    #[serde(default)]
    pub max_age: Option<Duration>,
    #[serde(default = "defaults::entry_kind")]
    pub kind: EntryKind,
    /// `null`: unlimited.
    #[serde(default)]
    pub depth: Option<u32>,
    #[serde(default)]
    pub emergency_keep: u32,
    #[serde(default)]
    pub priority: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrphanRule {
    pub dir: PathBuf,
    #[serde(rename = "match", default = "defaults::orphan_match")]
    pub patterns: Vec<String>,
    pub companion_dir: PathBuf,
    pub companion_ext: String,
    #[serde(default = "defaults::orphan_min_age")]
    pub min_age: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRule {
    /// A path pattern: directory plus fnmatch(3) file name, `/var/log/x/*.log`.
    #[serde(rename = "match")]
    pub pattern: PathBuf,
    #[serde(default)]
    pub max_size: Option<Size>,
    #[serde(default)]
    pub max_age: Option<Duration>,
    #[serde(default = "defaults::rotate_keep")]
    pub keep: u32,
    #[serde(default)]
    pub compress: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub name: String,
    /// `"HH:MM"` daily, or `"Sun 03:00"` weekly, local time. Exactly one of
    /// `at` and `every` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// Run every this long (the first run one interval after start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<Duration>,
    pub command: Vec<String>,
    /// `null`: never killed.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// A run missed while the device was off (or the daemon stopped) is
    /// made up once at start.
    #[serde(default)]
    pub catch_up: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    /// One JSON file per alert lands here; `null`: alerts are only logged.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default = "defaults::cooldown")]
    pub cooldown: Duration,
    /// Run for every alert raised, without a shell. Placeholders: `{level}`,
    /// `{kind}`, `{source}`, `{message}`, `{value}`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts {
            dir: None,
            cooldown: defaults::cooldown(),
            command: None,
        }
    }
}

mod defaults {
    use super::*;

    pub fn state_dir() -> PathBuf {
        "/var/lib/edgekeeper".into()
    }
    pub fn run_dir() -> PathBuf {
        "/run/edgekeeper".into()
    }
    pub fn status_every() -> Duration {
        Duration::from_secs(10)
    }
    pub fn log_file() -> Option<PathBuf> {
        Some("/var/log/edgekeeper/edgekeeper.log".into())
    }
    pub fn log_max_size() -> Size {
        Size::from_bytes(1_000_000)
    }
    pub fn log_keep() -> u32 {
        3
    }
    pub fn log_level() -> Level {
        Level::Info
    }
    pub fn max_watches() -> u32 {
        65536
    }
    pub fn max_tracked_processes() -> u32 {
        256
    }
    pub fn sweep_every() -> Duration {
        Duration::from_secs(300)
    }
    pub fn sweep_every_busy() -> Duration {
        Duration::from_secs(60)
    }
    pub fn busy_threshold() -> u32 {
        5
    }
    pub fn frame_match() -> Vec<String> {
        vec!["*.jpg".into()]
    }
    pub fn frame_ignore() -> Vec<String> {
        vec!["*.tmp".into(), "*_thumbnail*".into()]
    }
    pub fn yes() -> bool {
        true
    }
    pub fn catch_up() -> u32 {
        10
    }
    pub fn stall_after() -> Duration {
        Duration::from_secs(10)
    }
    pub fn freeze_after() -> u32 {
        30
    }
    pub fn analyzer_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_parallel() -> u32 {
        1
    }
    pub fn cgroup_root() -> PathBuf {
        "/sys/fs/cgroup/edgekeeper.slice".into()
    }
    pub fn scan_every() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_attempts() -> u32 {
        5
    }
    pub fn min_runtime() -> Duration {
        Duration::from_secs(5)
    }
    pub fn blocked_dirs() -> Vec<PathBuf> {
        vec!["/tmp".into()]
    }
    pub fn blocked_uids() -> Vec<u32> {
        vec![0]
    }
    pub fn cpu_quota() -> u32 {
        200
    }
    pub fn cpu_weight() -> u32 {
        100
    }
    pub fn memory_max() -> Size {
        Size::from_bytes(4 << 30)
    }
    pub fn check_every() -> Duration {
        Duration::from_secs(300)
    }
    pub fn emergency_at() -> u8 {
        90
    }
    pub fn emergency_until() -> u8 {
        80
    }
    pub fn entry_kind() -> EntryKind {
        EntryKind::File
    }
    pub fn orphan_match() -> Vec<String> {
        vec!["*.json".into()]
    }
    pub fn orphan_min_age() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn rotate_keep() -> u32 {
        5
    }
    pub fn cooldown() -> Duration {
        Duration::from_secs(6 * 3600)
    }
}

/// A config that cannot be used, with the place that is wrong.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    /// The text is not JSON (with comments); `key` is where the parser was.
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        key: Option<String>,
        message: String,
    },
    /// The JSON is well-formed but a value is wrong.
    Invalid {
        file: PathBuf,
        key: String,
        at: Option<(usize, usize)>,
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { file, error } => {
                write!(f, "{}: cannot read config: {error}", file.display())
            }
            ConfigError::Syntax {
                file,
                line,
                column,
                key,
                message,
            } => {
                write!(f, "{}:{line}:{column}: ", file.display())?;
                if let Some(key) = key {
                    write!(f, "{key}: ")?;
                }
                write!(f, "{message}")
            }
            ConfigError::Invalid {
                file,
                key,
                at,
                message,
            } => {
                write!(f, "{}", file.display())?;
                if let Some((line, column)) = at {
                    write!(f, ":{line}:{column}")?;
                }
                write!(f, ": {key}: {message}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses, resolves and validates the config at `file`.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|error| ConfigError::Read {
            file: file.to_path_buf(),
            error,
        })?;
        Config::parse(&text, file)
    }

    /// Parses `text` as if read from `file`: relative paths resolve against
    /// the file's directory, errors name the file.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let plain = jsonc::strip(text).map_err(|u| ConfigError::Syntax {
            file: file.to_path_buf(),
            line: u.line,
            column: u.column,
            key: None,
            message: format!("{} is never closed", u.what),
        })?;
        let tree: serde_json::Value =
            serde_json::from_str(&plain).map_err(|e| from_json(file, None, e))?;
        objects_as_objects(&tree, &mut String::new()).map_err(|(key, message)| {
            ConfigError::Invalid {
                file: file.to_path_buf(),
                key,
                at: None,
                message,
            }
        })?;
        let mut de = serde_json::Deserializer::from_str(&plain);
        let mut config: Config =
            serde_path_to_error::deserialize(&mut de).map_err(|e| from_serde(file, e))?;
        // Anything after the top-level object is trailing garbage.
        de.end().map_err(|e| from_json(file, None, e))?;
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let base = std::path::absolute(&base).unwrap_or(base);
        config.resolve_paths(&base);
        validate::check(&config).map_err(|(key, message)| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            at: None,
            message,
        })?;
        Ok(config)
    }

    /// The effective config as pretty JSON, every default filled in.
    pub fn to_pretty_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises: all keys are strings")
    }

    /// Names of the services this config turns on.
    pub fn services(&self) -> Vec<&'static str> {
        let mut on = Vec::new();
        if !self.relocate.is_empty() {
            on.push("relocate");
        }
        if !self.frames.is_empty() {
            on.push("frames");
        }
        if self.govern.is_some() {
            on.push("govern");
        }
        if self.storage.is_some() {
            on.push("storage");
        }
        on
    }

    /// The directories this config makes edgekeeper write into, for the
    /// systemd sandbox (`ProtectSystem=strict` needs each in
    /// `ReadWritePaths=`). Files are given by their directory; rotation
    /// patterns by theirs; govern's cgroup root by its parent, where the
    /// root itself may have to be made.
    pub fn write_paths(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = vec![self.state_dir.clone(), self.run_dir.clone()];
        let parent = |p: &Path| {
            p.parent()
                .map_or_else(|| p.to_path_buf(), Path::to_path_buf)
        };
        if let Some(f) = &self.log.file {
            out.push(parent(f));
        }
        if let Some(d) = &self.alerts.dir {
            out.push(d.clone());
        }
        for r in &self.relocate {
            out.push(r.root.clone());
            out.push(r.target.clone());
        }
        for f in &self.frames {
            out.push(f.dir.clone());
        }
        if let Some(g) = &self.govern {
            out.push(parent(&g.cgroup_root));
        }
        if let Some(s) = &self.storage {
            out.extend(s.retention.iter().map(|r| r.root.clone()));
            out.extend(s.orphans.iter().map(|o| o.dir.clone()));
            out.extend(s.rotate.iter().map(|r| parent(&r.pattern)));
        }
        out.sort();
        out.dedup();
        // A directory inside another listed one is covered by it.
        let all = out.clone();
        out.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
        out
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        let command = |c: &mut Vec<String>| {
            if let Some(program) = c.first_mut() {
                if program.contains('/') && !program.starts_with('/') {
                    *program = base.join(&*program).to_string_lossy().into_owned();
                }
            }
        };
        abs(&mut self.state_dir);
        abs(&mut self.run_dir);
        if let Some(f) = self.log.file.as_mut() {
            abs(f)
        }
        for r in &mut self.relocate {
            abs(&mut r.root);
            abs(&mut r.target);
        }
        for f in &mut self.frames {
            abs(&mut f.dir);
            if let Some(a) = f.analyzer.as_mut() {
                command(&mut a.command);
            }
        }
        if let Some(g) = self.govern.as_mut() {
            abs(&mut g.cgroup_root);
            g.filters.blocked_dirs.iter_mut().for_each(abs);
            for t in &mut g.targets {
                t.blocked_dirs.iter_mut().flatten().for_each(abs);
            }
        }
        if let Some(s) = self.storage.as_mut() {
            s.mounts.iter_mut().for_each(|m| abs(&mut m.path));
            s.retention.iter_mut().for_each(|r| abs(&mut r.root));
            for o in &mut s.orphans {
                abs(&mut o.dir);
                abs(&mut o.companion_dir);
            }
            s.rotate.iter_mut().for_each(|r| abs(&mut r.pattern));
            s.jobs.iter_mut().for_each(|j| command(&mut j.command));
        }
        if let Some(d) = self.alerts.dir.as_mut() {
            abs(d)
        }
        if let Some(c) = self.alerts.command.as_mut() {
            command(c)
        }
    }
}

/// Keys whose value is a list; everywhere else an array is a mistake.
const LIST_KEYS: &[&str] = &[
    "relocate",
    "frames",
    "match",
    "exclude",
    "ignore",
    "command",
    "blocked_dirs",
    "blocked_uids",
    "allowed_users",
    "targets",
    "mounts",
    "retention",
    "orphans",
    "rotate",
    "jobs",
];

/// serde reads a struct from an array by position (`"log": ["/x", "1MB"]`),
/// which no user means and which would silently bind values to the wrong
/// keys. Arrays are allowed only where the schema has a list.
fn objects_as_objects(
    value: &serde_json::Value,
    path: &mut String,
) -> Result<(), (String, String)> {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                if v.is_array() && !LIST_KEYS.contains(&key.as_str()) {
                    return Err((
                        path.clone(),
                        "invalid type: a list, expected an object or a value".into(),
                    ));
                }
                objects_as_objects(v, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Array(items) => {
            if path.is_empty() {
                return Err((
                    "(top level)".into(),
                    "invalid type: a list, expected an object".into(),
                ));
            }
            for (i, v) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if v.is_array() {
                    return Err((path.clone(), "invalid type: a list inside a list".into()));
                }
                objects_as_objects(v, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn from_serde(file: &Path, err: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    // serde_path_to_error writes `?` for a place it could not name (inside
    // a map key it has not read yet): leave the key out then.
    let key = err.path().to_string();
    let key = (key != "." && !key.contains('?')).then_some(key);
    from_json(file, key, err.into_inner())
}

fn from_json(file: &Path, key: Option<String>, err: serde_json::Error) -> ConfigError {
    let (line, column) = (err.line(), err.column());
    // serde_json appends " at line L column C"; we print the position first.
    let mut message = err.to_string();
    if let Some(cut) = message.rfind(" at line ") {
        message.truncate(cut);
    }
    match (err.classify(), key) {
        (serde_json::error::Category::Data, key) => ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.unwrap_or_else(|| "(top level)".into()),
            at: Some((line, column)),
            message,
        },
        (_, key) => ConfigError::Syntax {
            file: file.to_path_buf(),
            line,
            column,
            key,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/edgekeeper/test.json"))
    }

    #[test]
    fn an_empty_object_is_a_config_with_every_service_off() {
        let c = parse("{}").unwrap();
        assert!(c.services().is_empty());
        assert_eq!(c.status_every, Duration::from_secs(10));
        assert_eq!(c.limits.max_watches, 65536);
        assert_eq!(c.alerts.cooldown.to_string(), "6h");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let c =
            parse(r#"{"state_dir": "state", "run_dir": "/run/x", "alerts": {"dir": "../alerts"}}"#)
                .unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/edgekeeper/state"));
        assert_eq!(c.run_dir, Path::new("/run/x"));
        assert_eq!(
            c.alerts.dir.unwrap(),
            Path::new("/etc/edgekeeper/../alerts")
        );
    }

    #[test]
    fn write_paths_cover_every_directory_written_once() {
        let c = parse(
            r#"{"state_dir": "/var/lib/ek", "run_dir": "/run/ek", "log": {"file": "/var/log/ek/ek.log"},
                "relocate": [{"name": "a", "root": "/data/x", "match": ["*.log"], "target": "/data/x/state/logs"}],
                "frames": [{"name": "c", "dir": "/var/captures/cam0"}],
                "govern": {"cgroup_root": "/sys/fs/cgroup/edgekeeper.slice", "targets": [{"comm": "ffmpeg"}]},
                "storage": {"rotate": [{"match": "/mnt/storage/logs/*.log", "max_size": "1MB"}]}}"#,
        )
        .unwrap();
        let paths: Vec<String> = c
            .write_paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                "/data/x",
                "/mnt/storage/logs",
                "/run/ek",
                "/sys/fs/cgroup",
                "/var/captures/cam0",
                "/var/lib/ek",
                "/var/log/ek"
            ]
        );
    }

    #[test]
    fn the_effective_config_loads_back_unchanged() {
        let c = parse(
            r#"{"relocate": [{"name": "a", "root": "/d", "match": ["*.log"], "target": "/t"}]}"#,
        )
        .unwrap();
        let again = parse(&c.to_pretty_json()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn type_errors_name_the_key_path_and_position() {
        let err = parse("{\n \"govern\": {\"targets\": [{\"comm\": \"a\"}, {\"comm\": \"b\", \"memory_max\": 5}]}\n}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("govern.targets[1].memory_max"), "{err}");
        assert!(err.contains("test.json:2:"), "{err}");
    }
}
