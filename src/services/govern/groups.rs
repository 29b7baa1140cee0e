//! `cgroup_root` as `govern` uses it: usable or not, which controllers its
//! groups get, why one is missing, and writing a group's limits.
//!
//! What it is: [`Cgroups`], which opens (or makes) `cgroup_root`, enables
//! the cpu and memory controllers for its groups (in the parent's and its
//! own `cgroup.subtree_control`), remembers why it is unusable or which
//! controller is missing (reported once, then shown as health), and
//! [`write_limits`], which writes `cpu.max`, `cpu.weight` and `memory.max`
//! into a group, refusing a `memory.max` below the process's current
//! resident memory; [`memory_note`] words why a kernel has no memory
//! controller, for the status and for `edgekeeper check`.
//! What it is not: deciding which process is governed (see `super`).

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use super::table::Applied;
use super::targets::{CPU_PERIOD_US, Limits};
use crate::services::Bounded;
use crate::sys::cgroup::{CgroupRoot, Controllers, FsKind, MemoryController};

pub type Reason = heapless::String<320>;

/// `cgroup_root` and what it offers.
pub struct Cgroups {
    path: PathBuf,
    root: Option<CgroupRoot>,
    /// Why the root is unusable; empty while it is usable.
    pub error: Reason,
    /// Controllers enabled for the groups under the root.
    pub enabled: Controllers,
    /// Why a wanted controller is missing; empty when none is.
    pub missing: Reason,
    /// The host kernel's memory controller, in words, if it has none for
    /// cgroup v2.
    pub memory_note: Option<String>,
}

impl Cgroups {
    /// Nothing is touched until [`Cgroups::ensure`].
    pub fn new(path: &Path) -> Cgroups {
        Cgroups {
            path: path.to_path_buf(),
            root: None,
            error: Reason::new(),
            enabled: Controllers::default(),
            missing: Reason::new(),
            memory_note: None,
        }
    }

    pub fn root(&self) -> Option<&CgroupRoot> {
        self.root.as_ref()
    }

    pub fn kind(&self) -> Option<FsKind> {
        self.root.as_ref().map(CgroupRoot::kind)
    }

    /// Opens (or makes) the root if it is not open; on success enables the
    /// controllers. Returns whether the root is usable. Failing again
    /// after a first failure logs nothing new and allocates nothing.
    pub fn ensure(&mut self) -> bool {
        if self.root.is_some() {
            return true;
        }
        match CgroupRoot::open_or_make(&self.path) {
            Ok(root) => {
                let host = MemoryController::detect().ok();
                self.memory_note = host.and_then(memory_note);
                self.enable_controllers(&root, host.and_then(memory_cause));
                log::info!(
                    "cgroup_root {} is ready ({}); groups get controllers: {}",
                    self.path.display(),
                    root.kind().as_str(),
                    if self.enabled.any() {
                        self.enabled.names()
                    } else {
                        "none"
                    }
                );
                if root.kind() == FsKind::Plain {
                    log::warn!(
                        "cgroup_root {} is not on a cgroup2 file system: it is used as a directory standing in for cgroupfs; limit files are written but nothing is enforced",
                        self.path.display()
                    );
                }
                self.root = Some(root);
                self.error.clear();
                true
            }
            Err(e) => {
                let first = self.error.is_empty();
                self.error.clear();
                let w = &mut Bounded(&mut self.error);
                let _ = if e.kind() == io::ErrorKind::NotFound {
                    write!(
                        w,
                        "cgroup_root {} cannot be made: its parent does not exist",
                        self.path.display()
                    )
                } else {
                    write!(w, "cgroup_root {} is unusable: {e}", self.path.display())
                };
                if first {
                    log::error!("{}; processes wait until it is usable", self.error);
                }
                false
            }
        }
    }

    /// The root went away under us (removed, file system unmounted).
    pub fn lost(&mut self, e: &io::Error) {
        self.root = None;
        self.error.clear();
        let _ = write!(
            Bounded(&mut self.error),
            "cgroup_root {} is unusable: {e}",
            self.path.display()
        );
        log::error!("{}; processes wait until it is usable", self.error);
    }

    /// Enables cpu and memory for the root's groups: first in the parent
    /// (so the root offers them), then in the root itself.
    fn enable_controllers(&mut self, root: &CgroupRoot, memory_cause: Option<&str>) {
        let wanted = Controllers::ALL;
        let mut buf = [0u8; 512];
        let offered =
            |root: &CgroupRoot, buf: &mut [u8]| match root.read(b"", b"cgroup.controllers", buf) {
                Ok(n) => Controllers::parse(&buf[..n]),
                // A stand-in directory without the file offers everything.
                Err(_) if root.kind() == FsKind::Plain => Controllers::ALL,
                Err(_) => Controllers::default(),
            };
        let mut have = offered(root, &mut buf);
        let mut failure = String::new();
        if root.kind() == FsKind::Cgroup2 && wanted.missing_from(have).any() {
            if let Some(parent) = self.path.parent() {
                let in_parent =
                    std::fs::read(parent.join("cgroup.controllers")).unwrap_or_default();
                let in_parent = Controllers::parse(&in_parent);
                for (name, missing) in [
                    ("cpu", !have.cpu && in_parent.cpu),
                    ("memory", !have.memory && in_parent.memory),
                ] {
                    if missing {
                        let file = parent.join("cgroup.subtree_control");
                        if let Err(e) = std::fs::write(&file, format!("+{name}")) {
                            failure = format!("enabling {name} in {}: {e}", file.display());
                        }
                    }
                }
                have = offered(root, &mut buf);
            }
        }
        self.enabled = match root.kind() {
            FsKind::Plain => {
                let line = format!("{}\n", plus(have));
                let _ = root.write(b"", b"cgroup.subtree_control", line.as_bytes());
                have
            }
            FsKind::Cgroup2 => {
                for (name, on) in [("+cpu", have.cpu), ("+memory", have.memory)] {
                    if on {
                        if let Err(e) = root.write(b"", b"cgroup.subtree_control", name.as_bytes())
                        {
                            failure = format!(
                                "writing {name} to {}/cgroup.subtree_control: {e}",
                                self.path.display()
                            );
                        }
                    }
                }
                match root.read(b"", b"cgroup.subtree_control", &mut buf) {
                    Ok(n) => Controllers::parse(&buf[..n]),
                    Err(_) => Controllers::default(),
                }
            }
        };
        self.missing.clear();
        let missing = wanted.missing_from(self.enabled);
        if missing.any() {
            let w = &mut Bounded(&mut self.missing);
            let _ = write!(
                w,
                "no {} controller for groups under {}: processes are grouped without {}",
                missing.names(),
                self.path.display(),
                match (missing.cpu, missing.memory) {
                    (true, true) => "cpu_quota, cpu_weight, memory_max",
                    (true, false) => "cpu_quota, cpu_weight",
                    _ => "memory_max",
                }
            );
            if missing.memory {
                if let Some(cause) = memory_cause {
                    let _ = write!(w, " ({cause})");
                }
            }
            if !failure.is_empty() {
                let _ = write!(w, " ({failure})");
            }
            log::warn!("{}", self.missing);
            if let (true, Some(note)) = (missing.memory, &self.memory_note) {
                log::warn!("{note}");
            }
        }
    }
}

fn plus(c: Controllers) -> &'static str {
    match (c.cpu, c.memory) {
        (true, true) => "+cpu +memory",
        (true, false) => "+cpu",
        (false, true) => "+memory",
        (false, false) => "",
    }
}

/// Why the kernel gives cgroup v2 no memory controller, in words a person
/// can act on; `None` when it has one.
pub fn memory_note(mc: MemoryController) -> Option<String> {
    match mc {
        MemoryController::On => None,
        MemoryController::OffAtBoot { cmdline_disables } => Some(format!(
            "the kernel was booted with the memory controller off{}: memory_max cannot be enforced; add cgroup_enable=memory to the kernel command line (/boot/firmware/cmdline.txt on Raspberry Pi OS) and reboot",
            if cmdline_disables {
                " (cgroup_disable=memory is on its command line)"
            } else {
                ""
            }
        )),
        MemoryController::BoundToV1 { hierarchy } => Some(format!(
            "the memory controller is bound to cgroup v1 hierarchy {hierarchy}, so cgroup v2 groups cannot limit memory: memory_max cannot be enforced"
        )),
        MemoryController::NotBuilt => Some(
            "the kernel has no memory controller (built without CONFIG_MEMCG): memory_max cannot be enforced".into(),
        ),
    }
}

/// [`memory_note`] in a few words, for a health reason.
pub fn memory_cause(mc: MemoryController) -> Option<&'static str> {
    match mc {
        MemoryController::On => None,
        MemoryController::OffAtBoot { .. } => Some("kernel booted without cgroup_enable=memory"),
        MemoryController::BoundToV1 { .. } => Some("memory is bound to a cgroup v1 hierarchy"),
        MemoryController::NotBuilt => Some("kernel built without the memory controller"),
    }
}

/// A `memory.max` refused because the process already uses more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub limit: u64,
    pub rss: u64,
}

/// A limit file that could not be written.
#[derive(Debug)]
pub struct Failed {
    pub file: &'static str,
    pub error: io::Error,
}

/// Writes the limits of `group` for the enabled controllers: `cpu.max`
/// (`<quota> 100000`), `cpu.weight`, and `memory.max` unless it is below
/// `rss` (the process's current resident memory, `VmRSS`), which the kernel
/// would answer by OOM-killing the workload.
pub fn write_limits(
    root: &CgroupRoot,
    group: &[u8],
    enabled: Controllers,
    limits: &Limits,
    rss: Option<u64>,
) -> Result<(Applied, Option<Refused>), Failed> {
    let mut applied = Applied::default();
    let mut refused = None;
    let mut value = heapless::String::<48>::new();
    let mut put = |file: &'static str, args: core::fmt::Arguments<'_>| {
        value.clear();
        let _ = value.write_fmt(args);
        root.write(group, file.as_bytes(), value.as_bytes())
            .map_err(|error| Failed { file, error })
    };
    if enabled.cpu {
        let quota = limits.cpu_max_us();
        put("cpu.max", format_args!("{quota} {CPU_PERIOD_US}\n"))?;
        applied.cpu_max_us = Some(quota);
        put("cpu.weight", format_args!("{}\n", limits.cpu_weight))?;
        applied.cpu_weight = Some(limits.cpu_weight);
    }
    if enabled.memory {
        match rss {
            Some(rss) if limits.memory_max < rss => {
                refused = Some(Refused {
                    limit: limits.memory_max,
                    rss,
                })
            }
            _ => {
                put("memory.max", format_args!("{}\n", limits.memory_max))?;
                applied.memory_max = Some(limits.memory_max);
            }
        }
    }
    Ok((applied, refused))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("edgekeeper-groups-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A stand-in root at `<scratch>/slice` with group `ffmpeg-9` made.
    fn stand_in(name: &str) -> (PathBuf, CgroupRoot) {
        let dir = scratch(name);
        let root = CgroupRoot::open_or_make(&dir.join("slice")).unwrap();
        root.make_group(b"ffmpeg-9").unwrap();
        (dir, root)
    }

    #[test]
    fn limit_files_hold_exactly_the_right_strings() {
        let (dir, root) = stand_in("limits");
        let limits = Limits {
            cpu_quota: 200,
            cpu_weight: 50,
            memory_max: 8 << 30,
        };
        let (applied, refused) =
            write_limits(&root, b"ffmpeg-9", Controllers::ALL, &limits, Some(1 << 20)).unwrap();
        assert!(refused.is_none());
        let g = dir.join("slice/ffmpeg-9");
        assert_eq!(
            std::fs::read_to_string(g.join("cpu.max")).unwrap(),
            "200000 100000\n"
        );
        assert_eq!(
            std::fs::read_to_string(g.join("cpu.weight")).unwrap(),
            "50\n"
        );
        assert_eq!(
            std::fs::read_to_string(g.join("memory.max")).unwrap(),
            "8589934592\n"
        );
        assert_eq!(applied.cpu_max_us, Some(200_000));
        assert_eq!(applied.memory_max, Some(8 << 30));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_memory_limit_below_current_usage_is_refused() {
        let (dir, root) = stand_in("refused");
        let limits = Limits {
            cpu_quota: 50,
            cpu_weight: 100,
            memory_max: 16 << 20,
        };
        let (applied, refused) = write_limits(
            &root,
            b"ffmpeg-9",
            Controllers::ALL,
            &limits,
            Some(64 << 20),
        )
        .unwrap();
        assert_eq!(
            refused,
            Some(Refused {
                limit: 16 << 20,
                rss: 64 << 20
            })
        );
        assert_eq!(applied.memory_max, None);
        let g = dir.join("slice/ffmpeg-9");
        assert!(!g.join("memory.max").exists());
        assert_eq!(
            std::fs::read_to_string(g.join("cpu.max")).unwrap(),
            "50000 100000\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_enabled_controllers_get_files() {
        let (dir, root) = stand_in("enabled");
        let limits = Limits {
            cpu_quota: 100,
            cpu_weight: 100,
            memory_max: 1 << 30,
        };
        let cpu_only = Controllers {
            cpu: true,
            memory: false,
        };
        let (applied, _) = write_limits(&root, b"ffmpeg-9", cpu_only, &limits, None).unwrap();
        assert_eq!(applied.memory_max, None);
        assert!(!dir.join("slice/ffmpeg-9/memory.max").exists());
        assert!(dir.join("slice/ffmpeg-9/cpu.max").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stand_in_root_offers_what_its_controllers_file_says() {
        let dir = scratch("offers");
        std::fs::create_dir_all(dir.join("slice")).unwrap();
        std::fs::write(dir.join("slice/cgroup.controllers"), "cpuset cpu io\n").unwrap();
        let mut c = Cgroups::new(&dir.join("slice"));
        assert!(c.ensure());
        assert_eq!(
            c.enabled,
            Controllers {
                cpu: true,
                memory: false
            }
        );
        assert!(c.missing.contains("no memory controller"), "{}", c.missing);
        assert!(c.missing.contains("without memory_max"), "{}", c.missing);
        assert_eq!(
            std::fs::read_to_string(dir.join("slice/cgroup.subtree_control")).unwrap(),
            "+cpu\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unusable_root_says_why() {
        let dir = scratch("unusable");
        let mut c = Cgroups::new(&dir.join("missing/slice"));
        assert!(!c.ensure());
        assert!(c.error.contains("its parent does not exist"), "{}", c.error);
        std::fs::create_dir_all(dir.join("missing")).unwrap();
        assert!(c.ensure());
        assert!(c.error.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_notes_name_the_fix() {
        let off = memory_note(MemoryController::OffAtBoot {
            cmdline_disables: false,
        })
        .unwrap();
        assert!(off.contains("cgroup_enable=memory"), "{off}");
        assert!(
            memory_note(MemoryController::BoundToV1 { hierarchy: 4 })
                .unwrap()
                .contains("hierarchy 4")
        );
        assert_eq!(memory_note(MemoryController::On), None);
    }
}
