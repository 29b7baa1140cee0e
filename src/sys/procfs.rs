//! Reading processes out of /proc without allocating per process.
//!
//! What it is: [`ProcFs`], an open `/proc` directory that lists PIDs with
//! `getdents64` into a buffer made once and reads `/proc/PID/<file>` with
//! `openat` relative to it into caller buffers; parsers for
//! `/proc/PID/stat` (split after the *last* `)`, because a process name may
//! hold spaces and parentheses), `/proc/PID/status` (uids, resident memory)
//! and `/proc/PID/cmdline` (the basename of argv[0]); the system's clock
//! ticks (from `sysconf`, never assumed) and boot time, which turn a stat
//! start time into an age and a wall-clock time.
//! What it is not: a process model or policy. Which processes matter, and
//! what is done with them, is the caller's business.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

use super::dir::{DirStream, Entries};

/// The most bytes a process name (`comm`) holds; longer names are cut.
pub const COMM_MAX: usize = 15;
/// `PF_KTHREAD` in the stat `flags` field: a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// The fields of `/proc/PID/stat` the daemon uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat<'a> {
    pub pid: i32,
    /// The process name as the kernel keeps it (at most 15 bytes, any
    /// bytes but NUL, spaces and parentheses included).
    pub comm: &'a [u8],
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub state: u8,
    pub ppid: i32,
    pub flags: u64,
    /// Start time in clock ticks after boot (field 22).
    pub start_ticks: u64,
}

impl Stat<'_> {
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
    /// A zombie or dead process: it has exited, only its entry remains.
    pub fn has_exited(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

fn number(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in field {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

fn signed(field: &[u8]) -> Option<i64> {
    match field.split_first() {
        Some((b'-', rest)) => number(rest).and_then(|n| i64::try_from(n).ok()).map(|n| -n),
        _ => number(field).and_then(|n| i64::try_from(n).ok()),
    }
}

/// Parses one `/proc/PID/stat` line: `pid (comm) state ppid … starttime …`.
/// The name is everything between the first `(` and the last `)`, so a name
/// like `a) R (b` cannot shift the fields that follow.
pub fn parse_stat(buf: &[u8]) -> Option<Stat<'_>> {
    let open = buf.iter().position(|&b| b == b'(')?;
    let close = buf.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let pid = i32::try_from(number(buf[..open].trim_ascii())?).ok()?;
    let comm = &buf[open + 1..close];
    let mut fields = buf[close + 1..]
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    // Field 3 is the state; field 22 (the 20th after the name) the start.
    let state = match fields.next()? {
        [s] => *s,
        _ => return None,
    };
    let ppid = i32::try_from(signed(fields.next()?)?).ok()?;
    let mut fields = fields.skip(4); // pgrp, session, tty_nr, tpgid
    let flags = number(fields.next()?)?; // field 9
    let start_ticks = number(fields.nth(12)?)?; // fields 10..=21 skipped
    Some(Stat {
        pid,
        comm,
        state,
        ppid,
        flags,
        start_ticks,
    })
}

/// The fields of `/proc/PID/status` the daemon uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub uid_real: u32,
    pub uid_effective: u32,
    /// Resident memory (`VmRSS`) in bytes; `None` for kernel threads.
    pub rss_bytes: Option<u64>,
}

/// Parses `/proc/PID/status` (`Key:\tvalue` lines). The `Name:` line is
/// escaped by the kernel, so a process name cannot forge another line.
pub fn parse_status(buf: &[u8]) -> Option<Status> {
    let mut status = Status::default();
    let mut uids = false;
    for line in buf.split(|&b| b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"Uid:") {
            let mut ids = rest
                .split(|b| b.is_ascii_whitespace())
                .filter(|f| !f.is_empty());
            status.uid_real = u32::try_from(number(ids.next()?)?).ok()?;
            status.uid_effective = u32::try_from(number(ids.next()?)?).ok()?;
            uids = true;
        } else if let Some(rest) = line.strip_prefix(b"VmRSS:") {
            let mut parts = rest
                .split(|b| b.is_ascii_whitespace())
                .filter(|f| !f.is_empty());
            let kib = number(parts.next()?)?;
            status.rss_bytes = Some(kib.saturating_mul(1024));
        }
    }
    uids.then_some(status)
}

/// The basename of argv[0] from a `/proc/PID/cmdline` buffer (NUL-separated
/// arguments): `/usr/bin/ffmpeg\0-i\0…` → `ffmpeg`.
pub fn argv0_basename(cmdline: &[u8]) -> &[u8] {
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or(&[]);
    match argv0.iter().rposition(|&b| b == b'/') {
        Some(slash) => &argv0[slash + 1..],
        None => argv0,
    }
}

/// Clock ticks per second of the running kernel, as `/proc/PID/stat`
/// counts start times (`sysconf(_SC_CLK_TCK)`; 100 if it cannot say).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf(3) takes a plain integer name and touches no memory
    // of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Milliseconds since boot on CLOCK_BOOTTIME, the clock stat start times
/// are counted on (it includes time spent suspended).
pub fn since_boot_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000,
        Err(_) => 0,
    }
}

/// Boot time in seconds since the epoch (`btime` in `/proc/stat`), which
/// with a start time in ticks gives a process's wall-clock start.
pub fn boot_time_secs() -> io::Result<i64> {
    let text = std::fs::read("/proc/stat")?;
    text.split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"btime "))
        .and_then(|v| signed(v.trim_ascii()))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/stat has no btime line"))
}

/// `/proc`, open, with a buffer for its listing.
pub struct ProcFs {
    dir: DirStream,
    listing: Vec<u8>,
    filled: usize,
    pos: usize,
}

/// Builds `PID/<file>\0` into `out`.
fn pid_path<'a>(pid: i32, file: &[u8], out: &'a mut [u8; 64]) -> io::Result<&'a CStr> {
    let mut digits = [0u8; 10];
    let mut n = pid.unsigned_abs();
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = &digits[d..];
    let len = digits.len() + 1 + file.len();
    if len + 1 > out.len() || file.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    out[..digits.len()].copy_from_slice(digits);
    out[digits.len()] = b'/';
    out[digits.len() + 1..len].copy_from_slice(file);
    out[len] = 0;
    CStr::from_bytes_with_nul(&out[..=len]).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl ProcFs {
    /// Opens `/proc` with a listing buffer of `listing_bytes` (made now).
    pub fn open(listing_bytes: usize) -> io::Result<ProcFs> {
        Self::open_at(Path::new("/proc"), listing_bytes)
    }

    /// Opens a proc file system mounted at `path`.
    pub fn open_at(path: &Path, listing_bytes: usize) -> io::Result<ProcFs> {
        Ok(ProcFs {
            dir: DirStream::open(path)?,
            listing: vec![0; listing_bytes.max(4096)],
            filled: 0,
            pos: 0,
        })
    }

    /// Starts the listing again from the first PID.
    pub fn rewind(&mut self) -> io::Result<()> {
        self.filled = 0;
        self.pos = 0;
        self.dir.rewind()
    }

    /// The next PID of the listing; `None` at its end.
    pub fn next_pid(&mut self) -> io::Result<Option<i32>> {
        loop {
            if self.pos >= self.filled {
                let n = self.dir.read(&mut self.listing)?;
                if n == 0 {
                    return Ok(None);
                }
                self.filled = n;
                self.pos = 0;
            }
            let record = &self.listing[self.pos..self.filled];
            let Some(entry) = Entries::new(record).next() else {
                self.pos = self.filled;
                continue;
            };
            self.pos += usize::from(u16::from_ne_bytes([record[16], record[17]]));
            if let Some(pid) = number(entry.name.to_bytes()) {
                if let Ok(pid) = i32::try_from(pid) {
                    return Ok(Some(pid));
                }
            }
        }
    }

    fn open_file(&self, pid: i32, file: &[u8]) -> io::Result<OwnedFd> {
        let mut path = [0u8; 64];
        let path = pid_path(pid, file, &mut path)?;
        Ok(openat(
            self.dir.as_fd(),
            path,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )?)
    }

    /// Reads `/proc/PID/<file>` into `buf` (as much as fits); a process
    /// that is gone gives `NotFound`. One `read`: the kernel produces these
    /// files whole, so a buffer big enough gets everything at once, and a
    /// second call only to see the end would double the cost of a scan.
    pub fn read(&self, pid: i32, file: &[u8], buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.open_file(pid, file).map_err(gone)?;
        loop {
            match nix::unistd::read(&fd, buf) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(gone(e.into())),
            }
        }
    }

    /// The process name from `/proc/PID/comm` (the cheapest file to read,
    /// so a scan reads it first and the rest only for a match).
    pub fn comm<'b>(&self, pid: i32, buf: &'b mut [u8; 32]) -> io::Result<&'b [u8]> {
        let n = self.read(pid, b"comm", buf)?;
        let comm = &buf[..n];
        Ok(comm.strip_suffix(b"\n").unwrap_or(comm))
    }

    /// `/proc/PID/stat`, parsed; `NotFound` when the process is gone.
    pub fn stat<'b>(&self, pid: i32, buf: &'b mut [u8]) -> io::Result<Stat<'b>> {
        let n = self.read(pid, b"stat", buf)?;
        parse_stat(&buf[..n]).ok_or_else(|| bad("unparsable /proc/PID/stat"))
    }

    /// `/proc/PID/status`, parsed.
    pub fn status(&self, pid: i32, buf: &mut [u8]) -> io::Result<Status> {
        let n = self.read(pid, b"status", buf)?;
        parse_status(&buf[..n]).ok_or_else(|| bad("unparsable /proc/PID/status"))
    }

    /// The basename of the process's argv[0] (empty for kernel threads).
    pub fn argv0<'b>(&self, pid: i32, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        let n = self.read(pid, b"cmdline", buf)?;
        Ok(argv0_basename(&buf[..n]))
    }

    /// The process's working directory (`readlink /proc/PID/cwd`), with the
    /// kernel's ` (deleted)` suffix if it was removed. Reading another
    /// user's needs privilege (`EACCES` otherwise).
    pub fn cwd<'b>(&self, pid: i32, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        let mut path = [0u8; 64];
        let path = pid_path(pid, b"cwd", &mut path)?;
        // SAFETY: readlinkat(2) reads the NUL-terminated `path` (borrowed for
        // the call) and writes at most `buf.len()` bytes into `buf`, which is
        // exclusively borrowed; the directory fd is kept open by `self`.
        let n = unsafe {
            libc::readlinkat(
                self.dir.as_fd().as_raw_fd(),
                path.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(gone(io::Error::last_os_error()));
        }
        let n = n as usize;
        if n == buf.len() {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        Ok(&buf[..n])
    }
}

/// A process that exited between listing and reading shows as `ENOENT` or
/// `ESRCH`; both mean "gone".
fn gone(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ESRCH) => io::Error::from(io::ErrorKind::NotFound),
        _ => e,
    }
}

fn bad(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line as the kernel writes it, for a given name and start.
    fn line(pid: i32, comm: &[u8], state: u8, start: u64) -> Vec<u8> {
        let mut v = format!("{pid} (").into_bytes();
        v.extend_from_slice(comm);
        v.extend_from_slice(b") ");
        v.push(state);
        v.extend_from_slice(
            format!(
                " 1 {pid} {pid} 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 1 0 {start} 2240512 212 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
            )
            .as_bytes(),
        );
        v
    }

    #[test]
    fn parses_a_plain_stat_line() {
        let l = line(4242, b"ffmpeg", b'S', 98765);
        let s = parse_stat(&l).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, b"ffmpeg");
        assert_eq!(s.state, b'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.flags, 4194560);
        assert_eq!(s.start_ticks, 98765);
        assert!(!s.is_kernel_thread());
        assert!(!s.has_exited());
    }

    #[test]
    fn names_with_spaces_and_parentheses_do_not_shift_fields() {
        for comm in [
            &b"a b"[..],
            b"x) R 7 8 (",
            b")",
            b"((",
            b"a)\n) Z 9 (",
            b" ",
            b"",
            b"gst-launch-1.0",
        ] {
            let l = line(77, comm, b'R', 123_456_789);
            let s = parse_stat(&l).unwrap_or_else(|| panic!("{comm:?}"));
            assert_eq!(s.comm, comm);
            assert_eq!(s.state, b'R');
            assert_eq!(s.start_ticks, 123_456_789);
        }
    }

    /// A tiny deterministic generator, so the fuzz runs are repeatable.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn fuzzed_names_round_trip_and_garbage_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let alphabet = b"()) (a Z\n\t9-.\xff\x01";
        for _ in 0..20_000 {
            let len = (rng.next() % 16) as usize;
            let comm: Vec<u8> = (0..len)
                .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                .collect();
            let start = rng.next() >> 20;
            let l = line(12, &comm, b'S', start);
            let s = parse_stat(&l).unwrap_or_else(|| panic!("{comm:?}"));
            assert_eq!((s.comm, s.start_ticks, s.state), (&comm[..], start, b'S'));
            // Cut or corrupted lines are refused or parsed, never a panic.
            let cut = (rng.next() % l.len() as u64) as usize;
            let _ = parse_stat(&l[..cut]);
            let mut bad = l.clone();
            let at = (rng.next() % bad.len() as u64) as usize;
            bad[at] = alphabet[(rng.next() % alphabet.len() as u64) as usize];
            let _ = parse_stat(&bad);
            let random: Vec<u8> = (0..(rng.next() % 80)).map(|_| rng.next() as u8).collect();
            let _ = parse_stat(&random);
            let _ = parse_status(&random);
        }
    }

    #[test]
    fn refuses_what_is_not_a_stat_line() {
        assert!(parse_stat(b"").is_none());
        assert!(parse_stat(b"12 (x").is_none());
        assert!(parse_stat(b"12 )x( S 1").is_none());
        assert!(parse_stat(b"12 (x) S 1 2 3").is_none());
        assert!(parse_stat(b"nope (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 0 0 1 0 5 1").is_none());
    }

    #[test]
    fn parses_status_uids_and_resident_memory() {
        let text = b"Name:\tffmpeg\\nUid:\t0\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t1001\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nVmRSS:\t   20480 kB\n";
        let s = parse_status(text).unwrap();
        assert_eq!(s.uid_real, 1000);
        assert_eq!(s.uid_effective, 1001);
        assert_eq!(s.rss_bytes, Some(20480 * 1024));
        assert!(parse_status(b"Name:\tx\n").is_none());
    }

    #[test]
    fn argv0_basename_takes_the_last_path_component() {
        assert_eq!(argv0_basename(b"/usr/bin/ffmpeg\0-i\0x\0"), b"ffmpeg");
        assert_eq!(
            argv0_basename(b"camera-recorder-main\0"),
            b"camera-recorder-main"
        );
        assert_eq!(argv0_basename(b""), b"");
        assert_eq!(argv0_basename(b"/a/b/\0"), b"");
    }

    #[test]
    fn reads_this_process_from_the_real_proc() {
        let proc = ProcFs::open(8192).unwrap();
        let me = std::process::id() as i32;
        let mut buf = [0u8; 1024];
        let stat = proc.stat(me, &mut buf).unwrap();
        assert_eq!(stat.pid, me);
        let mut name = [0u8; 32];
        let comm = proc.comm(me, &mut name).unwrap();
        assert_eq!(comm, stat.comm);
        assert!(!comm.is_empty() && !comm.ends_with(b"\n"));
        assert!(stat.start_ticks > 0);
        let mut buf = [0u8; 4096];
        let status = proc.status(me, &mut buf).unwrap();
        assert_eq!(status.uid_real, nix::unistd::getuid().as_raw());
        assert!(status.rss_bytes.unwrap() > 0);
        let mut buf = [0u8; 4096];
        let cwd = proc.cwd(me, &mut buf).unwrap();
        let here = std::env::current_dir().unwrap();
        assert_eq!(cwd, here.as_os_str().as_encoded_bytes());
        assert!(clock_ticks() >= 100);
        let boot = boot_time_secs().unwrap();
        assert!(boot > 1_000_000_000);
        // The process started after boot and before now.
        let started_ms = stat.start_ticks * 1000 / clock_ticks();
        assert!(started_ms <= since_boot_ms() + 1000);
    }

    #[test]
    fn lists_pids_including_this_one_and_a_vanished_pid_is_not_found() {
        let mut proc = ProcFs::open(4096).unwrap();
        let me = std::process::id() as i32;
        let mut pids = Vec::new();
        while let Some(pid) = proc.next_pid().unwrap() {
            pids.push(pid);
        }
        assert!(pids.contains(&me), "{pids:?}");
        assert!(pids.contains(&1));
        proc.rewind().unwrap();
        assert!(proc.next_pid().unwrap().is_some());
        let mut buf = [0u8; 1024];
        // PIDs never go above pid_max (at most 2^22).
        let err = proc.stat(1 << 23, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
