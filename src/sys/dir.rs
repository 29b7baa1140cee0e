//! Directory reading that allocates nothing per entry and never follows a
//! symbolic link: `getdents64` into caller-sized buffers, and a resumable,
//! depth-first [`Walker`] that works in bounded slices.
//!
//! What it is: [`DirStream`] (an `O_DIRECTORY | O_NOFOLLOW` fd read with
//! `getdents64`), [`Entries`] (a bounds-checked parser of the kernel's
//! `linux_dirent64` records, no pointer casts), and [`Walker`], which walks a
//! tree one budget of entries at a time so the event loop can serve events
//! and the watchdog between slices. Every directory is opened relative to
//! its parent's fd with `O_NOFOLLOW`, so a directory swapped for a symlink
//! mid-walk is refused (`ELOOP`) instead of followed out of the root. Each
//! level keeps its own buffer, made once, so renaming or deleting entries
//! while walking is as safe as with readdir(3).
//! What it is not: a policy. The caller decides, per directory, whether to
//! descend, and does its own `*at` calls on the fd it is handed.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};

/// What a directory entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Kind {
    pub fn of_stat(st: &FileStat) -> Kind {
        match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFDIR => Kind::Dir,
            SFlag::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

/// An open directory, read with `getdents64`.
pub struct DirStream {
    fd: OwnedFd,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl DirStream {
    /// Opens `path`; a final component that is a symlink is refused.
    pub fn open(path: &Path) -> io::Result<DirStream> {
        let fd = nix::fcntl::open(path, DIR_FLAGS, Mode::empty())?;
        Ok(DirStream { fd })
    }

    /// Opens `name` inside `parent`, refusing a symlink.
    pub fn open_at(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<DirStream> {
        let fd = openat(parent, name, DIR_FLAGS, Mode::empty())?;
        Ok(DirStream { fd })
    }

    /// Reads the next records into `buf`; 0 at the end of the directory.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: getdents64(2) writes at most `buf.len()` bytes into `buf`,
        // which is valid and exclusively borrowed for the call; the fd is
        // open (owned by self).
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                self.fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Goes back to the first entry.
    pub fn rewind(&mut self) -> io::Result<()> {
        nix::unistd::lseek(self.fd.as_fd(), 0, nix::unistd::Whence::SeekSet)?;
        Ok(())
    }
}

impl AsFd for DirStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One record of a `getdents64` buffer.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub ino: u64,
    /// `DT_*` from the file system; `DT_UNKNOWN` (0) when it does not say.
    pub d_type: u8,
    pub name: &'a CStr,
}

impl Entry<'_> {
    /// The kind if the file system reported it.
    pub fn kind(&self) -> Option<Kind> {
        match self.d_type {
            libc::DT_REG => Some(Kind::File),
            libc::DT_DIR => Some(Kind::Dir),
            libc::DT_LNK => Some(Kind::Symlink),
            libc::DT_UNKNOWN => None,
            _ => Some(Kind::Other),
        }
    }

    pub fn is_dot(&self) -> bool {
        matches!(self.name.to_bytes(), b"." | b"..")
    }
}

/// Parses `linux_dirent64` records: `d_ino` u64, `d_off` i64, `d_reclen`
/// u16, `d_type` u8, then the NUL-terminated name, padded to `d_reclen`.
pub struct Entries<'a> {
    buf: &'a [u8],
}

impl<'a> Entries<'a> {
    pub fn new(buf: &'a [u8]) -> Entries<'a> {
        Entries { buf }
    }
}

const DIRENT_HEADER: usize = 19;

impl<'a> Iterator for Entries<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        let b = self.buf;
        if b.len() < DIRENT_HEADER {
            return None;
        }
        let reclen = u16::from_ne_bytes([b[16], b[17]]) as usize;
        let record = match b.get(..reclen) {
            Some(r) if reclen > DIRENT_HEADER => r,
            // A record shorter than its header or longer than the buffer:
            // stop rather than read past it.
            _ => {
                self.buf = &[];
                return None;
            }
        };
        self.buf = &b[reclen..];
        let name = dirent_name(&record[DIRENT_HEADER..])?;
        Some(Entry {
            ino: u64::from_ne_bytes(record[..8].try_into().ok()?),
            d_type: record[18],
            name,
        })
    }
}

/// The NUL-terminated name at the start of `field` (a record's `d_name`
/// and its padding), or None if no NUL ends it. strnlen(3) rather than
/// `CStr::from_bytes_until_nul`: the C library's is word-at-a-time, and
/// the generic search was a tenth of a retention pass's user time.
fn dirent_name(field: &[u8]) -> Option<&CStr> {
    // SAFETY: strnlen reads at most `field.len()` bytes of `field`, which
    // is borrowed for the call.
    let len = unsafe { libc::strnlen(field.as_ptr().cast(), field.len()) };
    if len >= field.len() {
        return None;
    }
    // SAFETY: `field[len]` is the first NUL in `field` (strnlen stops at
    // it), so `field[..=len]` is one NUL-terminated string with none inside.
    Some(unsafe { CStr::from_bytes_with_nul_unchecked(&field[..=len]) })
}

/// What the walker shows its caller.
pub enum Visit<'a> {
    /// A non-directory entry (file, symlink, device, …).
    Entry {
        dir: BorrowedFd<'a>,
        name: &'a CStr,
        kind: Kind,
        path: &'a [u8],
        depth: u32,
    },
    /// A directory; answer [`Decision::Descend`] to walk into it.
    Dir {
        dir: BorrowedFd<'a>,
        name: &'a CStr,
        path: &'a [u8],
        depth: u32,
    },
    /// A directory was walked to its end (after everything inside it).
    /// `parent` is the directory holding it and `name` its name there
    /// (`None` for the directory the walk started at), so the caller can,
    /// say, `unlinkat(parent, name, AT_REMOVEDIR)` once it is emptied.
    Left {
        path: &'a [u8],
        depth: u32,
        parent: Option<BorrowedFd<'a>>,
        name: &'a [u8],
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Descend,
    Skip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The budget ran out; call `step` again to go on.
    Paused,
    /// The whole tree was walked.
    Done,
}

/// What went wrong, without stopping the walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkErrors {
    /// Directories that could not be opened or read (permissions, vanished,
    /// replaced by a symlink).
    pub unreadable: u64,
    /// Entries whose path would not fit `PATH_MAX`, or deeper than the
    /// walker's levels.
    pub too_deep: u64,
}

struct Level {
    dir: Option<DirStream>,
    filled: usize,
    pos: usize,
    /// Length of this directory's path in `Walker::path`.
    path_len: usize,
}

/// A resumable depth-first walk of one tree.
pub struct Walker {
    levels: Vec<Level>,
    /// One buffer for all levels, made at once: the pages of levels a walk
    /// never reaches are never touched.
    bufs: Vec<u8>,
    buf_size: usize,
    /// Levels in use: 0 when no walk is under way.
    depth: usize,
    /// The path of the directory or entry being visited.
    path: Vec<u8>,
    pub errors: WalkErrors,
    /// Entries visited since `start`.
    pub visited: u64,
}

const PATH_MAX: usize = libc::PATH_MAX as usize;

impl Walker {
    /// A walker for trees up to `max_levels` deep (the root is level 1),
    /// each level reading with a `level_buffer`-byte buffer. Everything is
    /// made here; walking allocates nothing.
    pub fn new(max_levels: usize, level_buffer: usize) -> Walker {
        let max_levels = max_levels.max(1);
        let buf_size = level_buffer.max(DIRENT_HEADER + 256);
        Walker {
            levels: (0..max_levels)
                .map(|_| Level {
                    dir: None,
                    filled: 0,
                    pos: 0,
                    path_len: 0,
                })
                .collect(),
            bufs: vec![0; max_levels * buf_size],
            buf_size,
            depth: 0,
            path: Vec::with_capacity(PATH_MAX),
            errors: WalkErrors::default(),
            visited: 0,
        }
    }

    /// Starts (or restarts) a walk at `root`.
    pub fn start(&mut self, root: &Path) -> io::Result<()> {
        let dir = DirStream::open(root)?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(root.as_os_str());
        self.start_dir(dir, bytes)
    }

    /// Starts (or restarts) a walk at a directory already open (say, with
    /// [`DirStream::open_at`] beneath another walk's directory, so nothing
    /// is resolved by path again); `path` is what visits show for it.
    pub fn start_dir(&mut self, dir: DirStream, path: &[u8]) -> io::Result<()> {
        self.abort();
        self.errors = WalkErrors::default();
        self.visited = 0;
        let bytes = match path {
            [rest @ .., b'/'] if !rest.is_empty() => rest,
            b => b,
        };
        if bytes.len() > PATH_MAX {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        self.path.clear();
        self.path.extend_from_slice(bytes);
        self.push_level(dir);
        Ok(())
    }

    /// True while a walk is under way.
    pub fn is_active(&self) -> bool {
        self.depth > 0
    }

    /// Drops the walk in progress, closing its directories.
    pub fn abort(&mut self) {
        while self.depth > 0 {
            self.pop_level();
        }
    }

    fn push_level(&mut self, dir: DirStream) {
        let path_len = self.path.len();
        let level = &mut self.levels[self.depth];
        level.dir = Some(dir);
        level.filled = 0;
        level.pos = 0;
        level.path_len = path_len;
        self.depth += 1;
    }

    /// Closes the deepest directory; returns its path length.
    fn pop_level(&mut self) -> usize {
        self.depth -= 1;
        let level = &mut self.levels[self.depth];
        level.dir = None;
        level.filled = 0;
        level.pos = 0;
        level.path_len
    }

    /// Visits up to `budget` entries, calling `visit` for each.
    pub fn step(
        &mut self,
        mut budget: usize,
        visit: &mut dyn FnMut(Visit<'_>) -> Decision,
    ) -> Progress {
        let max_levels = self.levels.len();
        while budget > 0 && self.depth > 0 {
            let top = self.depth - 1;
            let level = &mut self.levels[top];
            let buf = &mut self.bufs[top * self.buf_size..(top + 1) * self.buf_size];
            if level.pos >= level.filled {
                let Some(dir) = level.dir.as_mut() else { break };
                match dir.read(buf) {
                    Ok(n) if n > 0 => {
                        level.filled = n;
                        level.pos = 0;
                    }
                    end => {
                        // The end of the directory, or an error reading it
                        // (it was removed under us): either way it is done.
                        if end.is_err() {
                            self.errors.unreadable += 1;
                        }
                        let path_len = self.pop_level();
                        let path = &self.path[..path_len];
                        let (parent, name) = if top == 0 {
                            (None, &path[path.len()..])
                        } else {
                            let parent_len = self.levels[top - 1].path_len;
                            (
                                self.levels[top - 1].dir.as_ref().map(AsFd::as_fd),
                                &path[(parent_len + 1).min(path.len())..],
                            )
                        };
                        visit(Visit::Left {
                            path,
                            depth: top as u32,
                            parent,
                            name,
                        });
                        continue;
                    }
                }
            }
            let record = &buf[level.pos..level.filled];
            let Some(entry) = Entries::new(record).next() else {
                level.pos = level.filled;
                continue;
            };
            level.pos += u16::from_ne_bytes([record[16], record[17]]) as usize;
            if entry.is_dot() {
                continue;
            }
            budget -= 1;
            self.visited += 1;
            let Some(dir) = level.dir.as_ref() else { break };
            let dirfd = dir.as_fd();
            let name = entry.name;
            let kind = match entry.kind() {
                Some(k) => k,
                None => match fstatat(dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => Kind::of_stat(&st),
                    Err(_) => continue, // vanished meanwhile
                },
            };
            let name_bytes = name.to_bytes();
            if level.path_len + 1 + name_bytes.len() > PATH_MAX {
                self.errors.too_deep += 1;
                continue;
            }
            self.path.truncate(level.path_len);
            self.path.push(b'/');
            self.path.extend_from_slice(name_bytes);
            let depth = top as u32 + 1;
            if kind != Kind::Dir {
                visit(Visit::Entry {
                    dir: dirfd,
                    name,
                    kind,
                    path: &self.path,
                    depth,
                });
                continue;
            }
            let decision = visit(Visit::Dir {
                dir: dirfd,
                name,
                path: &self.path,
                depth,
            });
            if decision == Decision::Skip {
                continue;
            }
            if self.depth == max_levels {
                self.errors.too_deep += 1;
                continue;
            }
            match DirStream::open_at(dirfd, name) {
                Ok(child) => self.push_level(child),
                Err(_) => self.errors.unreadable += 1,
            }
        }
        if self.depth == 0 {
            Progress::Done
        } else {
            Progress::Paused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn tree(name: &str) -> std::path::PathBuf {
        let root =
            std::env::temp_dir().join(format!("edgekeeper-dir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["a/b/c", "a/e", "f"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in ["1", "a/2", "a/b/3", "a/b/c/4", "a/e/5 with space", "f/6"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("/etc", root.join("a/link")).unwrap();
        root
    }

    fn rel(root: &Path, p: &[u8]) -> String {
        String::from_utf8_lossy(&p[root.as_os_str().len()..]).into_owned()
    }

    #[test]
    fn walks_everything_in_slices_without_following_symlinks() {
        let root = tree("all");
        let mut w = Walker::new(8, 512);
        w.start(&root).unwrap();
        let mut files = BTreeSet::new();
        let mut dirs = BTreeSet::new();
        let mut left = Vec::new();
        let mut slices = 0;
        loop {
            slices += 1;
            let progress = w.step(2, &mut |v| {
                match v {
                    Visit::Entry { path, kind, .. } => {
                        files.insert((rel(&root, path), kind));
                    }
                    Visit::Dir { path, .. } => {
                        dirs.insert(rel(&root, path));
                    }
                    Visit::Left { path, .. } => left.push(rel(&root, path)),
                }
                Decision::Descend
            });
            if progress == Progress::Done {
                break;
            }
        }
        assert!(slices > 4, "a budget of 2 takes many slices: {slices}");
        let expect: BTreeSet<_> = [
            "/1",
            "/a/2",
            "/a/b/3",
            "/a/b/c/4",
            "/a/e/5 with space",
            "/f/6",
        ]
        .iter()
        .map(|f| (f.to_string(), Kind::File))
        .chain([("/a/link".to_string(), Kind::Symlink)])
        .collect();
        assert_eq!(files, expect);
        assert_eq!(
            dirs,
            ["/a", "/a/b", "/a/b/c", "/a/e", "/f"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        assert_eq!(left.last().unwrap(), "", "the root is left last");
        assert_eq!(left.len(), 6);
        assert_eq!(w.errors, WalkErrors::default());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn left_directories_name_their_parent_so_they_can_be_removed() {
        let root = tree("left");
        let mut w = Walker::new(8, 512);
        let sub = DirStream::open(&root.join("a")).unwrap();
        w.start_dir(sub, root.join("a").as_os_str().as_encoded_bytes())
            .unwrap();
        // Empty the tree under a/ bottom-up, as retention removes a
        // directory: files as they are seen, directories once left.
        let mut root_left = 0;
        while w.step(3, &mut |v| {
            match v {
                Visit::Entry { dir, name, .. } => {
                    nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                        .unwrap();
                }
                Visit::Left {
                    parent: Some(parent),
                    name,
                    ..
                } => {
                    let name = std::ffi::CString::new(name).unwrap();
                    nix::unistd::unlinkat(
                        parent,
                        name.as_c_str(),
                        nix::unistd::UnlinkatFlags::RemoveDir,
                    )
                    .unwrap();
                }
                Visit::Left {
                    parent: None, name, ..
                } => {
                    assert!(name.is_empty());
                    root_left += 1;
                }
                Visit::Dir { .. } => {}
            }
            Decision::Descend
        }) == Progress::Paused
        {}
        assert_eq!(root_left, 1);
        assert_eq!(std::fs::read_dir(root.join("a")).unwrap().count(), 0);
        assert!(root.join("f/6").exists(), "outside a/ nothing was touched");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn skipped_directories_are_not_entered_and_depth_is_bounded() {
        let root = tree("skip");
        let mut w = Walker::new(2, 512);
        w.start(&root).unwrap();
        let mut seen = Vec::new();
        while w.step(100, &mut |v| {
            if let Visit::Entry { path, .. } = v {
                seen.push(rel(&root, path));
            }
            match v {
                Visit::Dir { name, .. } if name.to_bytes() == b"f" => Decision::Skip,
                _ => Decision::Descend,
            }
        }) == Progress::Paused
        {}
        seen.sort();
        // Two levels: the root and its subdirectories; /f skipped.
        assert_eq!(seen, ["/1", "/a/2", "/a/link"]);
        assert_eq!(w.errors.too_deep, 2, "a/b and a/e were too deep");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_is_refused() {
        let root = tree("swap");
        let mut w = Walker::new(8, 512);
        w.start(&root).unwrap();
        let mut seen = Vec::new();
        let mut swapped = false;
        while w.step(1, &mut |v| {
            match v {
                Visit::Entry { path, .. } => seen.push(rel(&root, path)),
                Visit::Dir { name, .. } if name.to_bytes() == b"a" && !swapped => {
                    // Between seeing the directory and opening it, someone
                    // replaces it with a link to /etc.
                    std::fs::rename(root.join("a"), root.join("a.old")).unwrap();
                    std::os::unix::fs::symlink("/etc", root.join("a")).unwrap();
                    swapped = true;
                }
                _ => {}
            }
            Decision::Descend
        }) == Progress::Paused
        {}
        assert!(swapped);
        assert!(
            seen.iter().all(|p| !p.starts_with("/a/")),
            "followed the link: {seen:?}"
        );
        assert_eq!(w.errors.unreadable, 1);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_record_parser_stops_at_a_bad_length() {
        let mut rec = vec![0u8; 24];
        rec[16..18].copy_from_slice(&24u16.to_ne_bytes());
        rec[18] = libc::DT_REG;
        rec[19] = b'x';
        assert_eq!(Entries::new(&rec).next().unwrap().name.to_bytes(), b"x");
        rec[16..18].copy_from_slice(&200u16.to_ne_bytes());
        assert!(Entries::new(&rec).next().is_none());
        rec[16..18].copy_from_slice(&3u16.to_ne_bytes());
        assert!(Entries::new(&rec).next().is_none());
    }

    #[test]
    fn a_name_ends_at_its_first_nul_and_a_record_without_one_has_none() {
        assert_eq!(
            dirent_name(b"frame.jpg\0\0\0").unwrap().to_bytes(),
            b"frame.jpg"
        );
        assert_eq!(dirent_name(b"a\0b\0").unwrap().to_bytes(), b"a");
        assert_eq!(dirent_name(b"\0").unwrap().to_bytes(), b"");
        assert!(dirent_name(b"no end").is_none());
        assert!(dirent_name(b"").is_none());
        // Padding after the NUL is whatever was in the buffer before.
        let mut rec = vec![0u8; 32];
        rec[16..18].copy_from_slice(&32u16.to_ne_bytes());
        rec[18] = libc::DT_REG;
        rec[19..24].copy_from_slice(b"x.jpg");
        rec[25..32].copy_from_slice(b"garbage");
        assert_eq!(Entries::new(&rec).next().unwrap().name.to_bytes(), b"x.jpg");
        rec[24] = b'!';
        assert!(Entries::new(&rec).next().is_none(), "no NUL in the record");
    }
}
