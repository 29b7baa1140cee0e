//! cgroup v2 file operations: groups, limit files, moving a process.
//!
//! What it is: [`CgroupRoot`], a directory held open under which groups
//! are made (`mkdir`), limit files written (`cpu.max`, `cpu.weight`,
//! `memory.max`, each in one `write`, as cgroupfs requires), a process
//! moved (`cgroup.procs`) and empty groups removed (`rmdir`), all with
//! `*at` calls on fixed path buffers; which controllers a group offers
//! (`cgroup.controllers`) and enabling them for its children
//! (`cgroup.subtree_control`); the parsers that tell why a kernel has no
//! memory controller (`/proc/cgroups`, `/proc/cmdline`); and finding the
//! cgroup2 mount. A root that is not on cgroup2 is a plain directory
//! standing in for cgroupfs (tests, `demo`): the same files are created
//! and written, nothing is enforced, and [`FsKind::Plain`] says so.
//! What it is not: policy. Which limits, for which process, and what a
//! failure means are the caller's.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::dir::{DirStream, Entries};
use super::fs::open_dir;

/// What file system a cgroup root lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    /// The real cgroup v2 file system: limits are enforced.
    Cgroup2,
    /// A plain directory standing in for cgroupfs: files are written, not
    /// enforced.
    Plain,
}

impl FsKind {
    pub fn of(path: &Path) -> io::Result<FsKind> {
        let st = nix::sys::statfs::statfs(path)?;
        Ok(
            if st.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
                FsKind::Cgroup2
            } else {
                FsKind::Plain
            },
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::Cgroup2 => "cgroup2",
            FsKind::Plain => "stand-in directory",
        }
    }
}

/// The controllers edgekeeper writes limits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controllers {
    pub cpu: bool,
    pub memory: bool,
}

impl Controllers {
    pub const ALL: Controllers = Controllers {
        cpu: true,
        memory: true,
    };
    /// Parses a `cgroup.controllers` or `cgroup.subtree_control` line
    /// (`cpuset cpu io memory pids`).
    pub fn parse(text: &[u8]) -> Controllers {
        let mut c = Controllers::default();
        for word in text.split(|b| b.is_ascii_whitespace()) {
            match word {
                b"cpu" | b"+cpu" => c.cpu = true,
                b"memory" | b"+memory" => c.memory = true,
                _ => {}
            }
        }
        c
    }
    pub fn missing_from(self, have: Controllers) -> Controllers {
        Controllers {
            cpu: self.cpu && !have.cpu,
            memory: self.memory && !have.memory,
        }
    }
    pub fn any(self) -> bool {
        self.cpu || self.memory
    }
    /// The names, space separated: `cpu memory`.
    pub fn names(self) -> &'static str {
        match (self.cpu, self.memory) {
            (true, true) => "cpu memory",
            (true, false) => "cpu",
            (false, true) => "memory",
            (false, false) => "",
        }
    }
}

/// Files of a group that a stand-in directory gets (and loses at removal).
const GROUP_FILES: [&CStr; 5] = [
    c"cpu.max",
    c"cpu.weight",
    c"memory.max",
    c"cgroup.procs",
    c"cgroup.subtree_control",
];

const PATH_BUF: usize = 512;

/// Builds `a/b\0` (or `a\0` when `b` is empty) into `out`.
fn rel_path<'a>(a: &[u8], b: &[u8], out: &'a mut [u8; PATH_BUF]) -> io::Result<&'a CStr> {
    let len = a.len() + if b.is_empty() { 0 } else { 1 + b.len() };
    if len + 1 > out.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    if a.is_empty() || a.contains(&0) || b.contains(&0) || a.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    out[..a.len()].copy_from_slice(a);
    if !b.is_empty() {
        out[a.len()] = b'/';
        out[a.len() + 1..len].copy_from_slice(b);
    }
    out[len] = 0;
    CStr::from_bytes_with_nul(&out[..=len]).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The directory under which governed processes get their groups.
pub struct CgroupRoot {
    path: PathBuf,
    fd: OwnedFd,
    kind: FsKind,
}

impl CgroupRoot {
    /// Opens `path`, making it first if it does not exist. Only the last
    /// component is made: the parent (a cgroup, or the directory standing
    /// in for one) must exist, so a mistyped path is not invented.
    pub fn open_or_make(path: &Path) -> io::Result<CgroupRoot> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let parent = path.parent().unwrap_or(Path::new("/"));
                // A missing parent fails with ENOENT; nothing is invented.
                FsKind::of(parent)?;
                std::fs::create_dir(path)?;
            }
            Err(e) => return Err(e),
        }
        let fd = open_dir(path)?;
        let kind = FsKind::of(path)?;
        Ok(CgroupRoot {
            path: path.to_path_buf(),
            fd,
            kind,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the directory held open was removed, or its path now leads
    /// elsewhere (removed and made again by someone else): the groups made
    /// in it are gone.
    pub fn is_gone(&self) -> bool {
        super::fs::moved_or_removed(self.fd.as_fd(), &self.path)
    }

    /// Whether group `name` exists under the root.
    pub fn has_group(&self, name: &[u8]) -> bool {
        let mut path = [0u8; PATH_BUF];
        match rel_path(name, b"", &mut path) {
            Ok(p) => nix::sys::stat::fstatat(
                self.fd.as_fd(),
                p,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .is_ok(),
            Err(_) => true,
        }
    }

    pub fn kind(&self) -> FsKind {
        self.kind
    }

    /// Reads `rel` (`cgroup.controllers`, `GROUP/cgroup.procs`) into `buf`.
    pub fn read(&self, group: &[u8], file: &[u8], buf: &mut [u8]) -> io::Result<usize> {
        let mut path = [0u8; PATH_BUF];
        let path = if group.is_empty() {
            rel_path(file, b"", &mut path)?
        } else {
            rel_path(group, file, &mut path)?
        };
        let fd = openat(
            self.fd.as_fd(),
            path,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut n = 0;
        while n < buf.len() {
            match nix::unistd::read(&fd, &mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }

    /// Writes `value` to `file` of `group` (of the root itself when `group`
    /// is empty) in one `write`, as cgroupfs takes a value. A stand-in
    /// directory gets the file made.
    pub fn write(&self, group: &[u8], file: &[u8], value: &[u8]) -> io::Result<()> {
        let mut path = [0u8; PATH_BUF];
        let path = if group.is_empty() {
            rel_path(file, b"", &mut path)?
        } else {
            rel_path(group, file, &mut path)?
        };
        let mut flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        if self.kind == FsKind::Plain {
            flags |= OFlag::O_CREAT | OFlag::O_TRUNC;
        }
        let fd = openat(
            self.fd.as_fd(),
            path,
            flags,
            Mode::from_bits_truncate(0o644),
        )?;
        loop {
            match nix::unistd::write(&fd, value) {
                Ok(n) if n == value.len() => return Ok(()),
                Ok(_) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Makes group `name`; `Ok(false)` if it was already there.
    pub fn make_group(&self, name: &[u8]) -> io::Result<bool> {
        let mut path = [0u8; PATH_BUF];
        let path = rel_path(name, b"", &mut path)?;
        match mkdirat(self.fd.as_fd(), path, Mode::from_bits_truncate(0o755)) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves process `pid` into group `name` (`cgroup.procs`). `ESRCH`:
    /// the process is gone.
    pub fn move_process(&self, name: &[u8], pid: i32) -> io::Result<()> {
        let mut digits = heapless::String::<16>::new();
        let _ = core::fmt::Write::write_fmt(&mut digits, format_args!("{pid}\n"));
        self.write(name, b"cgroup.procs", digits.as_bytes())
    }

    /// Whether `pid` is listed in group `name`'s `cgroup.procs`.
    pub fn holds(&self, name: &[u8], pid: i32, buf: &mut [u8]) -> io::Result<bool> {
        let n = self.read(name, b"cgroup.procs", buf)?;
        let mut digits = heapless::String::<16>::new();
        let _ = core::fmt::Write::write_fmt(&mut digits, format_args!("{pid}"));
        Ok(buf[..n]
            .split(|b| b.is_ascii_whitespace())
            .any(|w| w == digits.as_bytes()))
    }

    /// Removes group `name`. cgroupfs refuses (`EBUSY`) while a process is
    /// in it; a stand-in directory loses the files edgekeeper made first.
    /// A group that is already gone is fine.
    pub fn remove_group(&self, name: &[u8]) -> io::Result<()> {
        let mut path = [0u8; PATH_BUF];
        if self.kind == FsKind::Plain {
            for file in GROUP_FILES {
                let p = rel_path(name, file.to_bytes(), &mut path)?;
                let _ = unlinkat(self.fd.as_fd(), p, UnlinkatFlags::NoRemoveDir);
            }
        }
        let p = rel_path(name, b"", &mut path)?;
        match unlinkat(self.fd.as_fd(), p, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Calls `f` with the name of every group directly under the root.
    /// Start-up and reload only (makes a listing buffer).
    pub fn each_group(&self, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        let mut dir = DirStream::open(&self.path)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = dir.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            for e in Entries::new(&buf[..n]) {
                if !e.is_dot() && e.d_type == libc::DT_DIR {
                    f(e.name.to_bytes());
                }
            }
        }
    }
}

/// Why a kernel offers no memory controller to cgroup v2, from its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryController {
    /// The kernel has it and it is on; whether a group offers it is seen
    /// in `cgroup.controllers`.
    On,
    /// Built in but switched off at boot (`cgroup_disable=memory`, or a
    /// Raspberry Pi kernel booted without `cgroup_enable=memory`).
    OffAtBoot { cmdline_disables: bool },
    /// Bound to a cgroup v1 hierarchy, so cgroup v2 cannot use it.
    BoundToV1 { hierarchy: u32 },
    /// The kernel was built without it (no `memory` line).
    NotBuilt,
}

impl MemoryController {
    /// Reads `/proc/cgroups` and `/proc/cmdline` of this machine.
    pub fn detect() -> io::Result<MemoryController> {
        let cgroups = std::fs::read_to_string("/proc/cgroups")?;
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        Ok(MemoryController::from_files(&cgroups, &cmdline))
    }

    /// Decides from the text of `/proc/cgroups`
    /// (`#subsys_name hierarchy num_cgroups enabled`) and `/proc/cmdline`.
    pub fn from_files(proc_cgroups: &str, cmdline: &str) -> MemoryController {
        let disables = cmdline_disables_memory(cmdline);
        let row = proc_cgroups.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("memory")).then(|| {
                let hierarchy = f.next().and_then(|v| v.parse::<u32>().ok());
                let enabled = f.nth(1).and_then(|v| v.parse::<u32>().ok());
                (hierarchy, enabled)
            })
        });
        match row {
            None if disables => MemoryController::OffAtBoot {
                cmdline_disables: true,
            },
            None => MemoryController::NotBuilt,
            Some((_, Some(0))) => MemoryController::OffAtBoot {
                cmdline_disables: disables,
            },
            Some((Some(h), _)) if h != 0 => MemoryController::BoundToV1 { hierarchy: h },
            Some(_) if disables => MemoryController::OffAtBoot {
                cmdline_disables: true,
            },
            Some(_) => MemoryController::On,
        }
    }
}

/// Whether the kernel command line switches the memory controller off:
/// `cgroup_disable=memory` (possibly in a list) not overridden by a later
/// `cgroup_enable=memory`.
pub fn cmdline_disables_memory(cmdline: &str) -> bool {
    let mut off = false;
    for arg in cmdline.split_whitespace() {
        if arg == "--" {
            break; // what follows goes to init, not the kernel
        }
        if let Some(list) = arg.strip_prefix("cgroup_disable=") {
            if list.split(',').any(|c| c == "memory") {
                off = true;
            }
        } else if let Some(list) = arg.strip_prefix("cgroup_enable=") {
            if list.split(',').any(|c| c == "memory") {
                off = false;
            }
        }
    }
    off
}

/// The first cgroup2 mount point in `/proc/self/mountinfo` text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    super::mounts::parse_mountinfo(mountinfo)
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point)
}

/// This machine's cgroup2 mount point, if it has one.
pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup2_mount_in(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("edgekeeper-cg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn controllers_parse_from_both_file_forms() {
        assert_eq!(
            Controllers::parse(b"cpuset cpu io memory hugetlb pids rdma misc\n"),
            Controllers::ALL
        );
        assert_eq!(Controllers::parse(b"hugetlb\n"), Controllers::default());
        let c = Controllers::parse(b"+cpu");
        assert!(c.cpu && !c.memory);
        assert_eq!(Controllers::ALL.missing_from(c).names(), "memory");
        // `cpuset` is not `cpu`.
        assert_eq!(Controllers::parse(b"cpuset"), Controllers::default());
    }

    #[test]
    fn tells_why_the_memory_controller_is_missing() {
        let header = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n";
        // Raspberry Pi OS without cgroup_enable=memory.
        let pi = format!("{header}cpu\t0\t90\t1\nmemory\t0\t90\t0\n");
        assert_eq!(
            MemoryController::from_files(&pi, "console=serial0,115200 root=PARTUUID=1 rootwait"),
            MemoryController::OffAtBoot {
                cmdline_disables: false
            }
        );
        let on = format!("{header}memory\t0\t90\t1\n");
        assert_eq!(
            MemoryController::from_files(&on, "root=/dev/mmcblk0p2 cgroup_enable=memory"),
            MemoryController::On
        );
        assert_eq!(
            MemoryController::from_files(&on, "cgroup_disable=cpuset,memory quiet"),
            MemoryController::OffAtBoot {
                cmdline_disables: true
            }
        );
        assert_eq!(
            MemoryController::from_files(&on, "cgroup_disable=memory cgroup_enable=memory"),
            MemoryController::On
        );
        assert_eq!(
            MemoryController::from_files(&on, "quiet -- cgroup_disable=memory"),
            MemoryController::On,
            "arguments after -- belong to init"
        );
        let v1 = format!("{header}memory\t4\t21\t1\n");
        assert_eq!(
            MemoryController::from_files(&v1, ""),
            MemoryController::BoundToV1 { hierarchy: 4 }
        );
        assert_eq!(
            MemoryController::from_files(&format!("{header}cpu\t0\t1\t1\n"), ""),
            MemoryController::NotBuilt
        );
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let mi = "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n\
                  31 22 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in("41 31 0:38 / /mnt/a\\040b rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/mnt/a b"))
        );
        assert_eq!(cgroup2_mount_in(""), None);
    }

    #[test]
    fn a_stand_in_directory_gets_the_files_and_loses_them_at_removal() {
        let dir = scratch("standin");
        std::fs::create_dir_all(&dir).unwrap();
        let root = CgroupRoot::open_or_make(&dir.join("edgekeeper.slice")).unwrap();
        assert_eq!(root.kind(), FsKind::Plain);
        assert!(root.make_group(b"ffmpeg-42").unwrap());
        assert!(!root.make_group(b"ffmpeg-42").unwrap());
        root.write(b"ffmpeg-42", b"cpu.max", b"300000 100000\n")
            .unwrap();
        root.move_process(b"ffmpeg-42", 42).unwrap();
        let g = dir.join("edgekeeper.slice/ffmpeg-42");
        assert_eq!(
            std::fs::read(g.join("cpu.max")).unwrap(),
            b"300000 100000\n"
        );
        let mut buf = [0u8; 64];
        assert!(root.holds(b"ffmpeg-42", 42, &mut buf).unwrap());
        assert!(!root.holds(b"ffmpeg-42", 4, &mut buf).unwrap());
        let mut seen = Vec::new();
        root.each_group(|n| seen.push(n.to_vec())).unwrap();
        assert_eq!(seen, vec![b"ffmpeg-42".to_vec()]);
        root.remove_group(b"ffmpeg-42").unwrap();
        assert!(!g.exists());
        root.remove_group(b"ffmpeg-42").unwrap();
        // Names that would leave the root are refused.
        assert!(root.make_group(b"../x").is_err());
        assert!(root.write(b"a/b", b"cpu.max", b"1").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_parent_is_not_invented() {
        let dir = scratch("noparent");
        let err = CgroupRoot::open_or_make(&dir.join("a/b")).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!dir.exists());
    }
}
