//! Paced writeback of a file written in slices, with `sync_file_range(2)`.
//!
//! What it is: two calls for a writer that produces a large file a slice at
//! a time: [`start`] queues what the last slice wrote for writeback, and
//! [`wait`] returns once what earlier slices wrote has reached the device.
//! Used together they keep about one slice of dirty data in flight, so the
//! writer goes at the device's pace and the final fsync has little left to
//! do (an fsync of 100 MB of dirty pages stalls an SD card for seconds; the
//! kernel would otherwise let dirty pages pile up to a share of RAM).
//! What it is not: durability. Neither call flushes metadata or the
//! device's write cache; an fdatasync at the end still does that.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Starts writeback of the dirty pages in `offset .. offset + len`
/// (nothing for `len` 0) without waiting for it.
pub fn start(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

/// Writes back the dirty pages in `offset .. offset + len` (nothing for
/// `len` 0) and waits until all of them, and those already under
/// writeback, are written.
pub fn wait(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    range(
        fd,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

fn range(fd: BorrowedFd<'_>, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    // sync_file_range takes len 0 to mean "to the end of the file".
    if len == 0 {
        return Ok(());
    }
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: sync_file_range(2) takes integers only and touches no memory
    // of ours; the fd is valid for the borrow. The offsets are 64-bit on
    // every target (off64_t on glibc, off_t is 64-bit on musl).
    let rc = unsafe { libc::sync_file_range(fd.as_raw_fd(), offset as _, len as _, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn ranges_are_accepted_and_bad_fds_refused() {
        let path =
            std::env::temp_dir().join(format!("edgekeeper-writeback-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[7u8; 100_000]).unwrap();
        start(f.as_fd(), 0, 100_000).unwrap();
        wait(f.as_fd(), 0, 100_000).unwrap();
        start(f.as_fd(), 0, 0).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 100_000]);
        std::fs::remove_file(&path).unwrap();
        // A pipe is not a file: ESPIPE.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let err = start(r.as_fd(), 0, 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESPIPE));
    }
}
