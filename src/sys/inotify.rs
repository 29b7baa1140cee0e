//! Raw inotify: an instance, watches on paths, and the kernel's packed event
//! buffer read into caller-owned storage.
//!
//! What it is: `inotify_init1`/`inotify_add_watch`/`inotify_rm_watch` from
//! `inotify-sys`, each unsafe call fenced with its SAFETY comment, and
//! [`Events`], an iterator that parses `struct inotify_event` records out of
//! a byte buffer with bounds-checked reads (no pointer casts, so a short or
//! corrupt buffer ends the iteration instead of reading past it; fuzzed in
//! issue 8). What it is not: a recursive watcher; the watch table of the
//! relocate service builds that on top.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

pub use inotify_sys::{
    IN_ATTRIB, IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_DONT_FOLLOW,
    IN_EXCL_UNLINK, IN_IGNORED, IN_ISDIR, IN_MOVE_SELF, IN_MOVED_FROM, IN_MOVED_TO, IN_ONLYDIR,
    IN_Q_OVERFLOW, IN_UNMOUNT,
};

/// Size of `struct inotify_event` without its name.
pub const HEADER: usize = 16;
/// A read buffer this large holds at least one event with the longest name.
pub const MIN_BUFFER: usize = HEADER + 256;

pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    /// A non-blocking, close-on-exec instance.
    pub fn new() -> io::Result<Inotify> {
        // SAFETY: inotify_init1 takes flags only and returns a new fd or -1.
        let fd = unsafe {
            inotify_sys::inotify_init1(inotify_sys::IN_NONBLOCK | inotify_sys::IN_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by no one
        // else.
        Ok(Inotify {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `path` for `mask`; returns the watch descriptor. Adding a
    /// path already watched returns its existing descriptor.
    pub fn add_watch(&self, path: &CStr, mask: u32) -> io::Result<i32> {
        // SAFETY: `path` is a valid NUL-terminated string for the duration of
        // the call and the fd is open (owned by self).
        let wd =
            unsafe { inotify_sys::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(wd)
    }

    pub fn rm_watch(&self, wd: i32) -> io::Result<()> {
        // SAFETY: plain integer arguments; the fd is open (owned by self).
        let rc = unsafe { inotify_sys::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads queued events into `buf`; `Ok(0)` when none are queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match nix::unistd::read(self.fd.as_fd(), buf) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsFd for Inotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One event, borrowing its name from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event<'a> {
    pub wd: i32,
    pub mask: u32,
    pub cookie: u32,
    /// The file name within the watched directory, without NUL padding;
    /// empty for events about the watched directory itself.
    pub name: &'a [u8],
}

impl Event<'_> {
    pub fn is(&self, bits: u32) -> bool {
        self.mask & bits != 0
    }
}

/// Parses the events in `buf[..len]` as the kernel packs them.
pub struct Events<'a> {
    buf: &'a [u8],
}

impl<'a> Events<'a> {
    pub fn new(buf: &'a [u8]) -> Events<'a> {
        Events { buf }
    }
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

impl<'a> Iterator for Events<'a> {
    type Item = Event<'a>;

    fn next(&mut self) -> Option<Event<'a>> {
        if self.buf.len() < HEADER {
            return None;
        }
        let len = word(self.buf, 12) as usize;
        let Some(record) = self.buf.get(..HEADER.checked_add(len)?) else {
            // A record claiming more bytes than were read: stop, never read
            // past the buffer.
            self.buf = &[];
            return None;
        };
        let raw_name = &record[HEADER..];
        let name_len = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        let event = Event {
            wd: word(record, 0) as i32,
            mask: word(record, 4),
            cookie: word(record, 8),
            name: &raw_name[..name_len],
        };
        self.buf = &self.buf[record.len()..];
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(wd: i32, mask: u32, cookie: u32, name: &[u8], pad: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&wd.to_ne_bytes());
        v.extend_from_slice(&mask.to_ne_bytes());
        v.extend_from_slice(&cookie.to_ne_bytes());
        v.extend_from_slice(&((name.len() + pad) as u32).to_ne_bytes());
        v.extend_from_slice(name);
        v.extend(std::iter::repeat_n(0, pad));
        v
    }

    #[test]
    fn parses_packed_events_and_strips_padding() {
        let mut buf = record(1, IN_CREATE, 0, b"casa-1.log", 6);
        buf.extend(record(2, IN_MOVED_TO | IN_ISDIR, 7, b"", 0));
        buf.extend(record(3, IN_Q_OVERFLOW, 0, b"a\nb \xff", 3));
        let events: Vec<_> = Events::new(&buf).collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].name, b"casa-1.log");
        assert!(events[1].is(IN_ISDIR) && events[1].cookie == 7 && events[1].name.is_empty());
        assert_eq!(events[2].name, b"a\nb \xff");
    }

    #[test]
    fn a_truncated_buffer_ends_the_iteration() {
        let buf = record(1, IN_CREATE, 0, b"name", 12);
        for cut in 0..buf.len() {
            let n = Events::new(&buf[..cut]).count();
            assert_eq!(n, 0, "cut at {cut}");
        }
        // A length field pointing far past the end.
        let mut bad = record(1, IN_CREATE, 0, b"x", 3);
        bad[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(Events::new(&bad).count(), 0);
    }

    #[test]
    fn real_events_from_a_real_directory() {
        let dir = std::env::temp_dir().join(format!("edgekeeper-inotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ino = Inotify::new().unwrap();
        let path = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        let wd = ino
            .add_watch(&path, IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO)
            .unwrap();
        std::fs::write(dir.join("frame 1.jpg"), b"x").unwrap();
        std::fs::rename(dir.join("frame 1.jpg"), dir.join("frame 2.jpg")).unwrap();
        let mut buf = [0u8; 4096];
        let n = ino.read(&mut buf).unwrap();
        let seen: Vec<(u32, Vec<u8>)> = Events::new(&buf[..n])
            .inspect(|e| assert_eq!(e.wd, wd))
            .map(|e| (e.mask, e.name.to_vec()))
            .collect();
        assert_eq!(
            seen,
            vec![
                (IN_CREATE, b"frame 1.jpg".to_vec()),
                (IN_CLOSE_WRITE, b"frame 1.jpg".to_vec()),
                (IN_MOVED_TO, b"frame 2.jpg".to_vec()),
            ]
        );
        assert_eq!(ino.read(&mut buf).unwrap(), 0, "non-blocking and drained");
        ino.rm_watch(wd).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
