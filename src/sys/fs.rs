//! File-system primitives that lose nothing: atomic replacement of a file,
//! and a rename that never overwrites.
//!
//! What it is: [`AtomicFile`] (write a temporary beside the target, fsync,
//! rename over it, fsync the directory; readers see the old or the new file,
//! never half of one) and [`rename_noreplace`] (`renameat2(RENAME_NOREPLACE)`,
//! or link + unlink where the file system lacks it). Names are held as
//! `CString`s made once, so steady-state writes allocate nothing.
//! What it is not: a directory walker or a cross-device mover; those build on
//! these pieces.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, linkat, unlinkat};

/// Opens a directory for use as the `dirfd` of `*at` calls (and for fsync).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// A file that is always replaced whole.
pub struct AtomicFile {
    dir_path: PathBuf,
    dir: OwnedFd,
    name: CString,
    tmp: CString,
    durable: bool,
}

impl AtomicFile {
    /// Prepares `path` for atomic writes. `durable` adds the fsyncs needed
    /// to survive a power cut (for state on an SD card); tmpfs files such as
    /// the status snapshot skip them. The directory must exist.
    pub fn new(path: &Path, durable: bool) -> io::Result<AtomicFile> {
        let dir_path = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let name = cstring(file.as_bytes())?;
        let mut tmp = b".".to_vec();
        tmp.extend_from_slice(file.as_bytes());
        tmp.extend_from_slice(b".tmp");
        let tmp = cstring(&tmp)?;
        let dir = open_dir(&dir_path)?;
        Ok(AtomicFile {
            dir_path,
            dir,
            name,
            tmp,
            durable,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir_path.join(OsStr::from_bytes(self.name.as_bytes()))
    }

    /// Replaces the file's content with `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.try_write(bytes) {
            // The directory was removed and perhaps made again under our
            // feet (someone cleaned /run): reopen it by path once.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                self.dir = open_dir(&self.dir_path)?;
                self.try_write(bytes)
            }
            other => other,
        }
    }

    fn try_write(&self, bytes: &[u8]) -> io::Result<()> {
        let fd = openat(
            self.dir.as_fd(),
            self.tmp.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )?;
        let mut file = File::from(fd);
        let written = file.write_all(bytes).and_then(|()| {
            if self.durable {
                file.sync_all()
            } else {
                Ok(())
            }
        });
        drop(file);
        if let Err(e) = written {
            let _ = unlinkat(
                self.dir.as_fd(),
                self.tmp.as_c_str(),
                UnlinkatFlags::NoRemoveDir,
            );
            return Err(e);
        }
        nix::fcntl::renameat(
            self.dir.as_fd(),
            self.tmp.as_c_str(),
            self.dir.as_fd(),
            self.name.as_c_str(),
        )?;
        if self.durable {
            nix::unistd::fsync(self.dir.as_fd())?;
        }
        Ok(())
    }
}

/// Makes a C string of a file name, refusing interior NUL bytes.
pub fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file name contains a NUL byte"))
}

/// Renames `from` (in `from_dir`) to `to` (in `to_dir`) unless `to` exists,
/// in which case it fails with `EEXIST` and nothing changes. Both must be on
/// one file system (`EXDEV` otherwise).
pub fn rename_noreplace(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
) -> io::Result<()> {
    // SAFETY: renameat2(2) reads two NUL-terminated strings that outlive the
    // call (borrowed `CStr`s) and two descriptors kept open by the borrows;
    // it writes no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    match Errno::last() {
        // The kernel or the file system (some FUSE and network file
        // systems) does not support the flag: link() also refuses to replace.
        Errno::EINVAL | Errno::ENOSYS => {
            linkat(from_dir, from, to_dir, to, AtFlags::empty())?;
            unlinkat(from_dir, from, UnlinkatFlags::NoRemoveDir)?;
            Ok(())
        }
        e => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("edgekeeper-fs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn atomic_file_replaces_content_and_leaves_no_temporary() {
        let dir = scratch("atomic");
        let path = dir.join("status.json");
        let mut f = AtomicFile::new(&path, true).unwrap();
        f.write(b"first").unwrap();
        f.write(b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("status.json")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_file_survives_its_directory_being_recreated() {
        let dir = scratch("recreated");
        let path = dir.join("status.json");
        let mut f = AtomicFile::new(&path, false).unwrap();
        f.write(b"one").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        f.write(b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_dir_beneath_refuses_symlinks_and_escapes() {
        let dir = scratch("beneath");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("a/link")).unwrap();
        let root = open_dir(&dir).unwrap();
        assert!(open_dir_beneath(root.as_fd(), b"a/b").is_ok());
        assert!(open_dir_beneath(root.as_fd(), b"").is_ok());
        assert!(
            open_dir_beneath(root.as_fd(), b"a/link").is_err(),
            "final symlink"
        );
        std::fs::rename(dir.join("a/b"), dir.join("a/real")).unwrap();
        std::os::unix::fs::symlink(dir.join("a/real"), dir.join("a/b")).unwrap();
        assert!(
            open_dir_beneath(root.as_fd(), b"a/b").is_err(),
            "a symlink even pointing inside"
        );
        assert!(open_dir_beneath(root.as_fd(), b"../..").is_err(), "escape");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rename_noreplace_never_overwrites() {
        let dir = scratch("noreplace");
        std::fs::write(dir.join("a"), b"a").unwrap();
        std::fs::write(dir.join("b"), b"b").unwrap();
        let d = open_dir(&dir).unwrap();
        let err = rename_noreplace(d.as_fd(), c"a", d.as_fd(), c"b").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"b");
        rename_noreplace(d.as_fd(), c"a", d.as_fd(), c"c").unwrap();
        assert!(!dir.join("a").exists());
        assert_eq!(std::fs::read(dir.join("c")).unwrap(), b"a");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Opens an unnamed file in `dir` (`O_TMPFILE`): it has no name until
/// [`link_unnamed`] gives it one, so a crash mid-copy leaves nothing behind.
/// Fails with `EOPNOTSUPP`/`EISDIR`/`EINVAL` where the file system lacks it.
pub fn open_unnamed(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(openat(
        dir,
        c".",
        OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?)
}

/// Gives the unnamed file `fd` the name `name` in `dir`, failing with
/// `EEXIST` rather than replacing anything (link(2) never replaces).
pub fn link_unnamed(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // "/proc/self/fd/<n>" in a stack buffer: linkat with AT_SYMLINK_FOLLOW on
    // that magic link needs no privilege (AT_EMPTY_PATH would).
    let mut buf = [0u8; 32];
    let mut w = &mut buf[..];
    write!(w, "/proc/self/fd/{}\0", fd.as_raw_fd())?;
    let len = buf.iter().position(|&b| b == 0).map_or(0, |p| p + 1);
    let proc_path = CStr::from_bytes_with_nul(&buf[..len]).map_err(io::Error::other)?;
    linkat(
        nix::fcntl::AT_FDCWD,
        proc_path,
        dir,
        name,
        AtFlags::AT_SYMLINK_FOLLOW,
    )?;
    Ok(())
}

/// The block size in which the file system under `dir` can cut a range off
/// the head of a file (`fallocate(FALLOC_FL_COLLAPSE_RANGE)`: ext4 with
/// extents, XFS, F2FS), or `None` where it cannot (tmpfs, vfat, btrfs,
/// ext4 with `data=journal`). Asked by trying it on an unnamed two-block
/// file that never reaches the disk.
pub fn collapse_block(dir: BorrowedFd<'_>) -> Option<u64> {
    let block = nix::sys::statvfs::fstatvfs(dir).ok()?.block_size() as u64;
    if !(512..=1 << 20).contains(&block) {
        return None;
    }
    let fd = open_unnamed(dir).ok()?;
    let mut file = File::from(fd);
    let chunk = [b'\n'; 4096];
    let mut left = 2 * block;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).ok()?;
        left -= n as u64;
    }
    collapse_head(file.as_fd(), block).ok()?;
    let size = nix::sys::stat::fstat(&file).ok()?.st_size as u64;
    (size == block).then_some(block)
}

/// Cuts the first `len` bytes off the file `fd` at once, shifting the rest
/// to offset 0 (`len` a multiple of [`collapse_block`], short of the end).
/// A writer appending meanwhile loses nothing: the cut and its writes are
/// ordered by the inode lock.
pub fn collapse_head(fd: BorrowedFd<'_>, len: u64) -> nix::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| Errno::EFBIG)?;
    nix::fcntl::fallocate(
        fd,
        nix::fcntl::FallocateFlags::FALLOC_FL_COLLAPSE_RANGE,
        0,
        len,
    )
}

/// What a read-lease probe says about writers of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// We hold a read lease: nobody has the file open for writing, and the
    /// kernel will tell [`lease_broken`] if someone opens it for writing.
    Held,
    /// Somebody has the file open for writing.
    Writer,
    /// Leases are not possible here (not the owner without CAP_LEASE, or a
    /// file system without them); the errno says which.
    Unavailable(i32),
}

/// Takes a read lease on `fd` (opened read-only). A lease break is signalled
/// with SIGIO: callers keep SIGIO blocked so it never kills the process.
pub fn take_read_lease(fd: BorrowedFd<'_>) -> Lease {
    // SAFETY: fcntl(F_SETLEASE) takes an integer argument and touches no
    // memory of ours; the fd is valid for the borrow.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if rc == 0 {
        return Lease::Held;
    }
    match Errno::last() {
        Errno::EAGAIN => Lease::Writer,
        e => Lease::Unavailable(e as i32),
    }
}

/// True if a writer tried to open the file since the lease was taken.
pub fn lease_broken(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: fcntl(F_GETLEASE) has no argument and touches no memory of ours.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETLEASE) };
    rc != libc::F_RDLCK
}

/// Gives the lease back (a waiting writer may then open the file).
pub fn release_lease(fd: BorrowedFd<'_>) {
    // SAFETY: as in `take_read_lease`.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
}

/// Opens the directory `rel` (a path relative to `root`, without a leading
/// '/'; empty for `root` itself) refusing every symbolic link on the way and
/// any escape from `root` (`openat2` with `RESOLVE_NO_SYMLINKS |
/// RESOLVE_BENEATH`). On kernels before 5.6, which lack openat2, each
/// component is opened in turn with `O_NOFOLLOW` instead.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    use nix::fcntl::{OpenHow, ResolveFlag, openat2};
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let rel = if rel.is_empty() { &b"."[..] } else { rel };
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
    match openat2(root, rel, how) {
        Err(Errno::ENOSYS) => {}
        other => return Ok(other?),
    }
    let mut dir = openat(root, c".", flags, Mode::empty())?;
    for part in rel
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
    {
        if part == b".." {
            return Err(Errno::EXDEV.into());
        }
        dir = openat(dir.as_fd(), part, flags, Mode::empty())?;
    }
    Ok(dir)
}

/// Whether the directory held open as `fd` is no longer what `path` names:
/// removed (no links left), or renamed away or replaced (the path now
/// leads to another inode, or nowhere).
pub fn moved_or_removed(fd: BorrowedFd<'_>, path: &Path) -> bool {
    let Ok(held) = nix::sys::stat::fstat(fd) else {
        return true;
    };
    if held.st_nlink == 0 {
        return true;
    }
    match nix::sys::stat::stat(path) {
        Ok(now) => now.st_ino != held.st_ino || now.st_dev != held.st_dev,
        Err(_) => true,
    }
}
