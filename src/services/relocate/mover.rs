//! Moving one file into a target directory without ever losing or
//! overwriting anything.
//!
//! What it is: the decision and the syscalls for one file. Same file system:
//! `renameat2(RENAME_NOREPLACE)` (a writer that has the file open keeps its
//! inode, so nothing it writes later is lost). Across file systems: only a
//! file nobody has open for writing (probed with a read lease, held for the
//! whole copy) is copied into an unnamed `O_TMPFILE` in the target, synced,
//! linked under its final name (link never replaces), the directory synced,
//! and only then is the source unlinked. A crash at any step leaves the file
//! whole at its source or its target. Where `O_TMPFILE` is missing, a named
//! `.edgekeeper-partial-<pid>-<n>` temporary is used and renamed into place;
//! leftovers of a crash are removed by [`Target::clean_partials`]. A taken
//! name gets a numbered suffix (`casa-1.log` → `casa-1.1.log`).
//! What it is not: a scheduler. Whether and when to try a file is the
//! service's business; this reports what happened and why.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::sys::dir::{DirStream, Entries, Kind};
use crate::sys::fs::{
    Lease, link_unnamed, open_dir, open_unnamed, release_lease, rename_noreplace, take_read_lease,
};

/// Names of temporaries a crash may leave in a target (only where the file
/// system lacks `O_TMPFILE`).
pub const PARTIAL_PREFIX: &[u8] = b".edgekeeper-partial-";
/// How many suffixes are tried before a collision counts as a failure.
const MAX_SUFFIX: u32 = 100_000;
/// Without a lease to ask, a file modified this recently may still have a
/// writer, so it is not copied across file systems yet.
const QUIET_WITHOUT_LEASE_S: i64 = 5;

/// How long a writer that raced an unlink is waited for (see
/// `Target::rescue_tail`); a stall of the loop that only a race costs.
const RESCUE_WAIT_MS: u32 = 100;

/// A file whose status changed this recently is not copied across file
/// systems without a close event (see `copy_in`).
const JUST_CREATED_MS: i64 = 1000;

/// If `f`'s inode changed (was created, written, renamed) less than `ms`
/// ago by the wall clock, how long until it is `ms` old (a change in the
/// future counts as just now).
fn young_for_ms(f: &File, ms: i64) -> Option<u64> {
    let Ok(st) = fstat(f.as_fd()) else {
        return Some(ms as u64);
    };
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let ctime_ms = i64::from(st.st_ctime) * 1000 + (st.st_ctime_nsec as i64) / 1_000_000;
    let now = crate::sys::clock::WallTime::now();
    let age = (now.secs * 1000 + i64::from(now.millis) - ctime_ms).max(0);
    (age < ms).then(|| (ms - age).max(1) as u64)
}

/// Whether `name` in `dir` holds exactly what `src` holds (`len` bytes): a
/// copy a crash left linked before its source was unlinked.
fn same_content(dir: BorrowedFd<'_>, name: &CStr, src: &File, len: u64) -> bool {
    let Ok(fd) = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) else {
        return false;
    };
    match fstat(fd.as_fd()) {
        Ok(st) if Kind::of_stat(&st) == Kind::File && st.st_size as u64 == len => {}
        _ => return false,
    }
    let (mut a, mut b) = ([0u8; 8192], [0u8; 8192]);
    let mut at = 0u64;
    while at < len {
        let want = ((len - at) as usize).min(a.len());
        let (Ok(n), Ok(m)) = (
            nix::sys::uio::pread(src.as_fd(), &mut a[..want], at as libc::off_t),
            nix::sys::uio::pread(fd.as_fd(), &mut b[..want], at as libc::off_t),
        ) else {
            return false;
        };
        if n == 0 || n != m || a[..n] != b[..n] {
            return false;
        }
        at += n as u64;
    }
    true
}

/// The directory files are moved into.
pub struct Target {
    pub path: PathBuf,
    dir: Option<OwnedFd>,
    dev: u64,
    unnamed: bool,
    partials: u64,
}

/// Why a file was left where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// It was gone before we got to it (moved or deleted by someone else).
    Gone,
    /// Not a regular file: symlinks are never followed or moved.
    NotRegular,
    /// Modified less than `min_age` ago; try again after this many ms.
    Young(u64),
    /// Someone has it open for writing; copying now would lose what they
    /// write later. Wait for IN_CLOSE_WRITE or the next sweep.
    WriterOpen,
}

/// What happened to one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Renamed within one file system.
    Renamed {
        collided: bool,
    },
    /// Copied across file systems, then unlinked at the source.
    Copied {
        bytes: u64,
        collided: bool,
    },
    /// Would be moved (`--dry-run`).
    WouldMove,
    Skipped(Skip),
    /// Failed at `step`; the file is still whole at its source.
    Failed {
        errno: i32,
        step: &'static str,
    },
}

/// What a move needs to know beyond the file itself.
pub struct Request<'a> {
    pub dir: BorrowedFd<'a>,
    pub name: &'a CStr,
    pub min_age_ms: u64,
    /// The file was just closed after writing (IN_CLOSE_WRITE).
    pub closed: bool,
    pub now_secs: i64,
    pub dry_run: bool,
}

fn failed(step: &'static str) -> impl Fn(Errno) -> Outcome {
    move |e| Outcome::Failed {
        errno: e as i32,
        step,
    }
}

impl Target {
    pub fn new(path: PathBuf) -> Target {
        Target {
            path,
            dir: None,
            dev: 0,
            unnamed: true,
            partials: 0,
        }
    }

    /// The target's fd, (re)creating the directory if it is missing.
    pub fn open(&mut self) -> io::Result<BorrowedFd<'_>> {
        if self.dir.is_none() {
            std::fs::create_dir_all(&self.path)?;
            let fd = open_dir(&self.path)?;
            self.dev = crate::sys::clock::dev(&fstat(fd.as_fd())?);
            self.dir = Some(fd);
        }
        Ok(self.dir.as_ref().map(|d| d.as_fd()).expect("opened above"))
    }

    /// The device the target lives on, once opened.
    pub fn dev(&self) -> Option<u64> {
        self.dir.as_ref().map(|_| self.dev)
    }

    /// Forgets the fd: the directory was deleted or replaced.
    fn reopen_next_time(&mut self) {
        self.dir = None;
    }

    /// True if the open target directory was deleted under us.
    /// The directory held open is no longer the target: deleted, or
    /// renamed away (its path now leads elsewhere, or nowhere), so files
    /// moved into it would not be where users look.
    fn deleted(&self) -> bool {
        self.dir
            .as_ref()
            .is_some_and(|d| crate::sys::fs::moved_or_removed(d.as_fd(), &self.path))
    }

    /// Removes temporaries a crash left behind (whose process is gone).
    /// Their sources were never unlinked, so nothing is lost. Returns how
    /// many were removed.
    pub fn clean_partials(&mut self) -> io::Result<u64> {
        let dir = self.open()?;
        let mut stream = DirStream::open_at(dir, c".")?;
        let mut buf = [0u8; 4096];
        let mut removed = 0;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            for e in Entries::new(&buf[..n]) {
                let name = e.name.to_bytes();
                let Some(rest) = name.strip_prefix(PARTIAL_PREFIX) else {
                    continue;
                };
                let pid = rest.split(|&b| b == b'-').next().unwrap_or(b"");
                let alive = std::str::from_utf8(pid)
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|p| {
                        p == std::process::id()
                            || std::path::Path::new(&format!("/proc/{p}")).exists()
                    });
                if !alive && unlinkat(dir, e.name, UnlinkatFlags::NoRemoveDir).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Moves `req.name` from `req.dir` into the target. The final name is
    /// written into `final_name` (without NUL) for the caller to report.
    pub fn relocate(
        &mut self,
        req: &Request<'_>,
        final_name: &mut heapless::Vec<u8, 256>,
    ) -> Outcome {
        final_name.clear();
        let st = match fstatat(req.dir, req.name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Outcome::Skipped(Skip::Gone),
            Err(e) => return failed("stat")(e),
        };
        if Kind::of_stat(&st) != Kind::File {
            return Outcome::Skipped(Skip::NotRegular);
        }
        if req.min_age_ms > 0 {
            let age_ms = (req.now_secs - crate::sys::clock::mtime(&st).0).saturating_mul(1000);
            if age_ms < req.min_age_ms as i64 {
                return Outcome::Skipped(Skip::Young(
                    (req.min_age_ms as i64 - age_ms.max(0)) as u64,
                ));
            }
        }
        if req.dry_run {
            let _ = final_name.extend_from_slice(req.name.to_bytes());
            return Outcome::WouldMove;
        }
        // The target may have been deleted while we ran: make it again once.
        for attempt in 0..2 {
            if attempt == 1 || self.deleted() {
                self.reopen_next_time();
            }
            let outcome = self.try_relocate(req, &st, final_name);
            let target_gone = matches!(outcome, Outcome::Failed { errno, .. } if errno == libc::ENOENT)
                && self.deleted();
            if !target_gone {
                return outcome;
            }
        }
        Outcome::Failed {
            errno: libc::ENOENT,
            step: "target",
        }
    }

    fn try_relocate(
        &mut self,
        req: &Request<'_>,
        st: &FileStat,
        final_name: &mut heapless::Vec<u8, 256>,
    ) -> Outcome {
        if let Err(e) = self.open() {
            return Outcome::Failed {
                errno: e.raw_os_error().unwrap_or(libc::EIO),
                step: "target",
            };
        }
        if crate::sys::clock::dev(st) == self.dev {
            match self.rename_in(req, final_name) {
                Err(Errno::EXDEV) => {} // another mount of the same device
                Ok(collided) => return Outcome::Renamed { collided },
                Err(Errno::ENOENT) if self.deleted() => return failed("target")(Errno::ENOENT),
                Err(Errno::ENOENT) => return Outcome::Skipped(Skip::Gone),
                Err(e) => return failed("rename")(e),
            }
        }
        self.copy_in(req, st, final_name)
    }

    /// Same file system: rename under the first free name.
    fn rename_in(
        &mut self,
        req: &Request<'_>,
        final_name: &mut heapless::Vec<u8, 256>,
    ) -> Result<bool, Errno> {
        let dir = self.dir.as_ref().map(|d| d.as_fd()).ok_or(Errno::EBADF)?;
        let mut buf = [0u8; 256];
        for k in 0..MAX_SUFFIX {
            let candidate = suffixed(req.name.to_bytes(), k, &mut buf);
            match rename_noreplace(req.dir, req.name, dir, candidate) {
                Ok(()) => {
                    final_name.clear();
                    let _ = final_name.extend_from_slice(candidate.to_bytes());
                    return Ok(k > 0);
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        }
        Err(Errno::EEXIST)
    }

    /// Across file systems: leased copy into an unnamed file, link, unlink.
    fn copy_in(
        &mut self,
        req: &Request<'_>,
        st: &FileStat,
        final_name: &mut heapless::Vec<u8, 256>,
    ) -> Outcome {
        let src = match openat(
            req.dir,
            req.name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => File::from(fd),
            Err(Errno::ENOENT) => return Outcome::Skipped(Skip::Gone),
            Err(e) => return failed("open")(e),
        };
        match fstat(src.as_fd()) {
            Ok(now) if now.st_ino == st.st_ino && now.st_dev == st.st_dev => {}
            Ok(_) => return Outcome::Skipped(Skip::Gone), // replaced meanwhile
            Err(e) => return failed("stat")(e),
        }
        // A file created a moment ago may be between its creation and its
        // writer's open becoming a write (IN_CREATE comes first): a lease
        // taken in that window is granted, and the writer's open, breaking
        // it just after our last look, would write into the source we
        // unlink. Such a file waits for its IN_CLOSE_WRITE (or the next
        // look, once it is a second old).
        if !req.closed {
            if let Some(wait) = young_for_ms(&src, JUST_CREATED_MS) {
                return Outcome::Skipped(Skip::Young(wait));
            }
        }
        let lease = take_read_lease(src.as_fd());
        match lease {
            Lease::Held => {}
            Lease::Writer => return Outcome::Skipped(Skip::WriterOpen),
            Lease::Unavailable(_) => {
                // No way to ask the kernel: trust a close event, or a file
                // that has been quiet for a while.
                if !req.closed
                    && req.now_secs - crate::sys::clock::mtime(st).0 < QUIET_WITHOUT_LEASE_S
                {
                    return Outcome::Skipped(Skip::WriterOpen);
                }
            }
        }
        let held = lease == Lease::Held;
        let outcome = self.copy_leased(req, &src, st, held, final_name);
        if held {
            release_lease(src.as_fd());
        }
        outcome
    }

    fn copy_leased(
        &mut self,
        req: &Request<'_>,
        src: &File,
        st: &FileStat,
        held: bool,
        final_name: &mut heapless::Vec<u8, 256>,
    ) -> Outcome {
        let Some(dir) = self.dir.as_ref().map(|d| d.as_fd()) else {
            return failed("target")(Errno::EBADF);
        };
        let mut tmp_name = [0u8; 64];
        let (tmp, named) = match self.unnamed.then(|| open_unnamed(dir)) {
            Some(Ok(fd)) => (fd, None),
            Some(Err(e))
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                return Outcome::Failed {
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                    step: "create",
                };
            }
            _ => {
                self.unnamed = false;
                self.partials += 1;
                let name = partial_name(self.partials, &mut tmp_name);
                match openat(
                    dir,
                    name,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                ) {
                    Ok(fd) => (fd, Some(name)),
                    Err(e) => return failed("create")(e),
                }
            }
        };
        let discard = |named: Option<&CStr>| {
            if let Some(n) = named {
                let _ = unlinkat(dir, n, UnlinkatFlags::NoRemoveDir);
            }
        };
        let mut to = File::from(tmp);
        // std's copy uses copy_file_range or sendfile between two files: no
        // user-space buffer, nothing allocated.
        let copied = io::copy(&mut &*src, &mut to).and_then(|n| to.sync_all().map(|()| n));
        let bytes = match copied {
            Ok(n) => n,
            Err(e) => {
                discard(named);
                return Outcome::Failed {
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                    step: "copy",
                };
            }
        };
        if held && crate::sys::fs::lease_broken(src.as_fd()) {
            discard(named);
            return Outcome::Skipped(Skip::WriterOpen);
        }
        let mut buf = [0u8; 256];
        let mut placed = None;
        for k in 0..MAX_SUFFIX {
            let candidate = suffixed(req.name.to_bytes(), k, &mut buf);
            let linked = match named {
                None => link_unnamed(to.as_fd(), dir, candidate),
                Some(n) => rename_noreplace(dir, n, dir, candidate),
            };
            match linked {
                Ok(()) => {
                    placed = Some(k);
                    final_name.clear();
                    let _ = final_name.extend_from_slice(candidate.to_bytes());
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // A crash between linking a copy and unlinking its
                    // source (or a source that cannot be unlinked) leaves
                    // the same file in both places: finish that move
                    // rather than copy it once more under a suffix.
                    if same_content(dir, candidate, src, bytes) {
                        discard(named);
                        final_name.clear();
                        let _ = final_name.extend_from_slice(candidate.to_bytes());
                        return unlink_source(req, src, st, held, bytes, k > 0, dir, candidate);
                    }
                    continue;
                }
                Err(e) => {
                    discard(named);
                    return Outcome::Failed {
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                        step: "link",
                    };
                }
            }
        }
        let Some(k) = placed else {
            discard(named);
            return failed("link")(Errno::EEXIST);
        };
        let final_c = CStr::from_bytes_until_nul(&buf).unwrap_or(c"");
        let undo = || {
            let _ = unlinkat(dir, final_c, UnlinkatFlags::NoRemoveDir);
        };
        if let Err(e) = nix::unistd::fsync(dir) {
            undo();
            return failed("sync")(e);
        }
        // A writer that asked to open the file while we copied is waiting
        // for our lease: it would write into the source after we unlink it.
        // Take the copy back and leave the file for later.
        if held && crate::sys::fs::lease_broken(src.as_fd()) {
            undo();
            return Outcome::Skipped(Skip::WriterOpen);
        }
        unlink_source(req, src, st, held, bytes, k > 0, dir, final_c)
    }
}

/// The copy is in place as `to` in `dir`: unlink the source, only the file
/// we copied, not one that took its name since.
#[allow(clippy::too_many_arguments)]
fn unlink_source(
    req: &Request<'_>,
    src: &File,
    st: &FileStat,
    held: bool,
    bytes: u64,
    collided: bool,
    dir: BorrowedFd<'_>,
    to: &CStr,
) -> Outcome {
    match fstatat(req.dir, req.name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(now) if now.st_ino == st.st_ino && now.st_dev == st.st_dev => {
            if let Err(e) = unlinkat(req.dir, req.name, UnlinkatFlags::NoRemoveDir) {
                // The copy is whole in the target, the source is still
                // there: nothing lost, the file is in both places (and
                // the next try sees the copy and only unlinks).
                return failed("unlink")(e);
            }
        }
        _ => return Outcome::Copied { bytes, collided },
    }
    // A writer whose open had already found the name, between our last
    // look at the lease and the unlink, now waits for the lease and
    // will write into the unlinked source. Let it, then bring what it
    // wrote into the copy.
    if held && crate::sys::fs::lease_broken(src.as_fd()) {
        return rescue_tail(src, bytes, collided, dir, to);
    }
    Outcome::Copied { bytes, collided }
}

/// After a writer raced the unlink: release the lease so it can go on,
/// wait (briefly: a logger that opens per line writes and closes at once)
/// until no writer has the file, and append what it wrote to the copy `to`.
fn rescue_tail(src: &File, bytes: u64, collided: bool, dir: BorrowedFd<'_>, to: &CStr) -> Outcome {
    release_lease(src.as_fd());
    let mut waited = 0;
    while waited < RESCUE_WAIT_MS && take_read_lease(src.as_fd()) == Lease::Writer {
        std::thread::sleep(std::time::Duration::from_millis(1));
        waited += 1;
    }
    let Ok(fd) = openat(
        dir,
        to,
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return Outcome::Copied { bytes, collided };
    };
    let mut out = File::from(fd);
    let mut buf = [0u8; 8192];
    let mut at = bytes;
    while let Ok(n) = nix::sys::uio::pread(src.as_fd(), &mut buf, at as libc::off_t) {
        if n == 0 || out.write_all(&buf[..n]).is_err() {
            break;
        }
        at += n as u64;
    }
    let _ = out.sync_all();
    release_lease(src.as_fd());
    log::warn!(
        "a writer opened {} just as it was moved across file systems; {} byte(s) it wrote were added to the copy{}",
        to.to_string_lossy(),
        at - bytes,
        if waited >= RESCUE_WAIT_MS {
            " (it still had it open after 100 ms: what it writes later is lost)"
        } else {
            ""
        }
    );
    Outcome::Copied {
        bytes: at,
        collided,
    }
}

/// `casa-1.log` with k=0 → `casa-1.log`, k=2 → `casa-1.2.log`; a name with
/// no extension (or a leading-dot name) gets `.k` at the end. The stem is
/// cut so the result fits NAME_MAX.
pub fn suffixed<'b>(name: &[u8], k: u32, buf: &'b mut [u8; 256]) -> &'b CStr {
    let mut n = 0;
    let mut put = |bytes: &[u8], n: &mut usize| {
        let room = 255 - *n;
        let take = bytes.len().min(room);
        buf[*n..*n + take].copy_from_slice(&bytes[..take]);
        *n += take;
    };
    if k == 0 {
        put(name, &mut n);
    } else {
        let dot = name.iter().rposition(|&b| b == b'.').filter(|&p| p > 0);
        let (stem, ext) = match dot {
            Some(p) => (&name[..p], &name[p..]),
            None => (name, &b""[..]),
        };
        let mut digits = [0u8; 12];
        let mut w = &mut digits[..];
        let _ = write!(w, ".{k}");
        let dlen = 12 - w.len();
        let keep = stem.len().min(255usize.saturating_sub(dlen + ext.len()));
        put(&stem[..keep], &mut n);
        put(&digits[..dlen], &mut n);
        put(ext, &mut n);
    }
    buf[n] = 0;
    CStr::from_bytes_with_nul(&buf[..=n]).unwrap_or(c"")
}

fn partial_name(n: u64, buf: &mut [u8; 64]) -> &CStr {
    let mut w = &mut buf[..];
    let _ = w.write_all(PARTIAL_PREFIX);
    let _ = write!(w, "{}-{n}\0", std::process::id());
    let len = 64 - w.len();
    CStr::from_bytes_with_nul(&buf[..len]).unwrap_or(c"")
}

/// A file name for logs: valid UTF-8 as is, other bytes as `\xNN`.
pub struct Name<'a>(pub &'a [u8]);

impl std::fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// `OsStr` view of a byte name, for std APIs.
pub fn os(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &[u8], k: u32) -> Vec<u8> {
        let mut buf = [0u8; 256];
        suffixed(name, k, &mut buf).to_bytes().to_vec()
    }

    #[test]
    fn suffixes_go_before_the_extension() {
        assert_eq!(s(b"casa-1.log", 0), b"casa-1.log");
        assert_eq!(s(b"casa-1.log", 1), b"casa-1.1.log");
        assert_eq!(s(b"casa-1.log", 12), b"casa-1.12.log");
        assert_eq!(s(b"README", 3), b"README.3");
        assert_eq!(s(b".hidden", 1), b".hidden.1");
        let long = [b'a'; 255];
        let out = s(&long, 7);
        assert_eq!(out.len(), 255);
        assert!(out.ends_with(b".7"));
    }

    #[test]
    fn names_print_with_invalid_bytes_escaped() {
        assert_eq!(Name(b"casa \xff.log").to_string(), "casa \\xff.log");
        assert_eq!(Name("é.log".as_bytes()).to_string(), "é.log");
    }
}
