//! What `govern` can tell about the machine before it runs, and what the
//! demo needs from it.
//!
//! What it is: [`host_notes`] for `edgekeeper check` (is `cgroup_root` on
//! cgroup2, which controllers can its groups get, is the kernel's memory
//! controller on), and [`demo_cgroup_root`] and [`demo_config`] for
//! `edgekeeper demo` (real cgroup v2 where writable, else a directory
//! standing in for cgroupfs). What it is not: used by the running service.

use std::path::{Path, PathBuf};

use super::groups::memory_note;
use crate::config;
use crate::sys::cgroup::{self, Controllers, FsKind, MemoryController};

/// What `edgekeeper check` says about this machine for a `govern` block:
/// whether `cgroup_root` is on cgroup2, which controllers its groups can
/// get, and whether the kernel has its memory controller on.
pub fn host_notes(g: &config::Govern) -> Vec<String> {
    let mut notes = Vec::new();
    let root = &g.cgroup_root;
    let parent = root.parent().unwrap_or(Path::new("/"));
    let probe = if root.exists() {
        root.as_path()
    } else {
        parent
    };
    match FsKind::of(probe) {
        Ok(FsKind::Cgroup2) => {
            let offered = |p: &Path| {
                Controllers::parse(&std::fs::read(p.join("cgroup.controllers")).unwrap_or_default())
            };
            let mut have = offered(parent);
            if root.exists() {
                let own = offered(root);
                have.cpu |= own.cpu;
                have.memory |= own.memory;
            }
            let missing = Controllers::ALL.missing_from(have);
            if missing.any() {
                notes.push(format!(
                    "cgroup controller {} is not offered to {}: its groups will be made and processes moved, without the {} limits",
                    missing.names(),
                    root.display(),
                    missing.names()
                ));
            }
        }
        Ok(FsKind::Plain) => notes.push(format!(
            "cgroup_root {} is not on a cgroup2 file system{}: govern would write limit files into a plain directory and enforce nothing",
            root.display(),
            match cgroup::cgroup2_mount() {
                Some(m) => format!(" (cgroup2 is mounted at {})", m.display()),
                None => " (no cgroup2 file system is mounted)".into(),
            }
        )),
        Err(e) => notes.push(format!(
            "cgroup_root {}: {} cannot be used: {e}",
            root.display(),
            probe.display()
        )),
    }
    if let Some(note) = MemoryController::detect().ok().and_then(memory_note) {
        notes.push(note);
    }
    notes
}

/// Where `edgekeeper demo` should put its groups.
#[derive(Debug)]
pub struct DemoCgroups {
    /// The `cgroup_root` for the demo config.
    pub root: PathBuf,
    /// True when it is real cgroup v2 (processes are really moved).
    pub real: bool,
    /// One sentence saying which, and why.
    pub explanation: String,
}

/// Picks the demo's `cgroup_root`: a group on this machine's cgroup2 mount
/// when it is writable, else a directory standing in for cgroupfs inside
/// `sandbox` (made here). The demo should remove a real `root` (rmdir)
/// after the daemon stopped and its named child was killed.
pub fn demo_cgroup_root(sandbox: &Path) -> DemoCgroups {
    let why = match cgroup::cgroup2_mount() {
        Some(mount) => {
            let root = mount.join(format!("edgekeeper-demo-{}", std::process::id()));
            match std::fs::create_dir(&root).and_then(|()| std::fs::remove_dir(&root)) {
                Ok(()) => {
                    return DemoCgroups {
                        explanation: format!(
                            "real cgroup v2 at {}: the group is made and the process really moved",
                            root.display()
                        ),
                        root,
                        real: true,
                    };
                }
                Err(e) => format!("cgroup v2 at {} is not writable ({e})", mount.display()),
            }
        }
        None => "no cgroup v2 file system is mounted".to_string(),
    };
    let root = sandbox.join("cgroupfs").join("edgekeeper.slice");
    let _ = std::fs::create_dir_all(sandbox.join("cgroupfs"));
    DemoCgroups {
        explanation: format!(
            "{why}: groups go to {}, a directory standing in for cgroupfs; limit files are written there and nothing is enforced",
            root.display()
        ),
        root,
        real: false,
    }
}

/// A `govern` block for the demo: one target, `ffmpeg`, found within a
/// second and governed whoever runs the demo (root included) wherever it
/// runs (`/tmp` included).
pub fn demo_config(root: &Path) -> String {
    let root = serde_json::to_string(&root.to_string_lossy()).unwrap_or_else(|_| "\"\"".into());
    format!(
        r#"{{"cgroup_root": {root}, "scan_every": "1s",
    "filters": {{"min_runtime": "1s", "blocked_uids": [], "blocked_dirs": []}},
    "defaults": {{"cpu_quota": 50, "cpu_weight": 100, "memory_max": "512MiB"}},
    "targets": [{{"comm": "ffmpeg", "cpu_quota": 100}}]}}"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_demo_block_is_a_valid_govern_config() {
        let text = format!(
            "{{\"govern\": {}}}",
            demo_config(Path::new("/x/\"q\"/slice"))
        );
        let c = Config::parse(&text, Path::new("/etc/edgekeeper/demo.json")).unwrap();
        let g = c.govern.unwrap();
        assert_eq!(g.cgroup_root, Path::new("/x/\"q\"/slice"));
        assert!(g.filters.blocked_uids.is_empty());
        assert_eq!(g.targets[0].comm, "ffmpeg");
    }

    #[test]
    fn the_demo_root_is_real_cgroup2_or_a_stand_in() {
        let sandbox =
            std::env::temp_dir().join(format!("edgekeeper-demo-root-{}", std::process::id()));
        let d = demo_cgroup_root(&sandbox);
        if d.real {
            assert!(d.explanation.contains("real cgroup v2"));
            assert_eq!(
                FsKind::of(d.root.parent().unwrap()).unwrap(),
                FsKind::Cgroup2
            );
            assert!(!d.root.exists(), "the probe group is removed");
        } else {
            assert!(
                d.explanation.contains("standing in for cgroupfs"),
                "{}",
                d.explanation
            );
            assert!(d.root.starts_with(&sandbox));
            assert!(d.root.parent().unwrap().is_dir());
        }
        let _ = std::fs::remove_dir_all(&sandbox);
    }
}
