//! One capture directory: frames arriving, analysed, described in sidecars.
//!
//! What it is: an inotify watch on the directory (IN_MOVED_TO for frames
//! renamed into place, as ffmpeg's `-atomic_writing` does, and
//! IN_CLOSE_WRITE for frames written in place), the built-in analysis of a
//! frame (size, JPEG structure, width and height, XXH3 64-bit hash, sequence
//! number from the name, dropped frames, time since the previous frame) read
//! through a buffer made at start, the sidecar written atomically (temporary
//! name, then rename), and what follows from a stream of frames: stalls,
//! freezes, corrupt and dark frames, sequence resets after a capture
//! restart. At start, the newest `catch_up` frames without a current
//! sidecar are found in one pass over the directory names (no stat of the
//! others) and analysed before READY=1.
//! What it is not: the Service glue (timers, tokens, reports): `mod.rs`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::ffi::CStr;
use std::fmt::Write as _;
use std::io::{self, Read, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, fstat, fstatat};
use serde::Serialize;

use super::analyzer::{Analyzer, Finished, Verdict, Waiting};
use super::jpeg;
use crate::config::FrameRule;
use crate::report::alerts::{Alert, AlertLevel};
use crate::services::relocate::mover::Name;
use crate::services::{Ctx, RawJson};
use crate::sys::clock::{Instant, WallTime};
use crate::sys::dir::{DirStream, Entries};
use crate::sys::fs::open_dir;
use crate::sys::inotify::{self, Events, Inotify};
use crate::sys::pattern::Patterns;

/// Frame sizes kept for the rolling median behind `frame_dark`.
const SIZES: usize = 32;
/// Arrivals kept for the frames-per-second figure.
const ARRIVALS: usize = 32;
/// A frame under this percentage of the median size is dark (blank).
const DARK_BELOW_PERCENT: u64 = 30;
/// Sizes needed before the median means anything.
const DARK_MIN_SAMPLES: usize = 8;
/// One read of this many bytes per loop turn (about 50 frames with the
/// events of their own sidecars): a backlog is worked off in slices, and
/// epoll (level-triggered) brings us back for the rest.
const EVENT_BUFFER: usize = 4 * 1024;

/// The built-in analysis of one frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Analysis {
    pub seq: Option<u64>,
    pub bytes: u64,
    pub width: u16,
    pub height: u16,
    pub valid: bool,
    pub hash: u64,
    pub interval_ms: Option<u64>,
    pub dropped_before: u64,
    pub reset: bool,
    pub dark: bool,
    /// Identical frames in a row, this one included.
    pub identical_run: u32,
    pub analysed_at: WallTime,
}

/// What the capture has seen, since start.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Counters {
    pub analysed: u64,
    pub invalid: u64,
    pub dark: u64,
    pub dropped: u64,
    pub gaps: u64,
    pub resets: u64,
    pub stalls: u64,
    pub freezes: u64,
    pub sidecars: u64,
    pub stale_sidecars: u64,
    pub already_analysed: u64,
    pub read_errors: u64,
    pub vanished: u64,
    pub catch_up: u64,
    /// Frames without a sidecar that a catch-up pass left alone (older
    /// than the newest `catch_up`, or lost to a queue overflow).
    pub skipped: u64,
    pub sidecar_failures: u64,
}

/// The sidecar beside a frame (`capture_000001.json`).
#[derive(Serialize)]
struct Sidecar<'a> {
    frame: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    bytes: u64,
    width: u16,
    height: u16,
    valid: bool,
    hash: &'a str,
    analysed_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval_ms: Option<u64>,
    dropped_before: u64,
    reset: bool,
    dark: bool,
    identical_run: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    analyzer: Option<AnalyzerField<'a>>,
}

/// `"analyzer": {...program output...}` or `"analyzer": {"error": "..."}`.
enum AnalyzerField<'a> {
    Output(RawJson<'a>),
    Error(&'a str),
}

impl Serialize for AnalyzerField<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AnalyzerField::Output(raw) => raw.serialize(s),
            AnalyzerField::Error(e) => {
                use serde::ser::SerializeStruct;
                let mut st = s.serialize_struct("AnalyzerError", 1)?;
                st.serialize_field("error", e)?;
                st.end()
            }
        }
    }
}

/// The sidecar of a frame that could not be read: it is not retried.
#[derive(Serialize)]
struct ErrorSidecar<'a> {
    frame: &'a str,
    error: &'a str,
    analysed_at: &'a str,
}

pub struct Capture {
    pub name: String,
    pub dir_path: PathBuf,
    dir_bytes: Vec<u8>,
    patterns: Patterns,
    ignore: Patterns,
    sidecars: bool,
    catch_up: usize,
    stall_after_ms: u64,
    freeze_after: u32,
    inotify: Option<Inotify>,
    dir: Option<OwnedFd>,
    pub dir_error: Option<i32>,
    events: Vec<u8>,
    pub analyzer: Option<Analyzer>,
    // What the stream of frames has been like.
    last_seq: Option<u64>,
    last_mtime_ms: Option<i64>,
    pub last_frame: heapless::Vec<u8, 256>,
    pub last_arrival: Option<Instant>,
    arrivals: VecDeque<Instant>,
    sizes: VecDeque<u64>,
    last_hash: Option<u64>,
    identical_run: u32,
    pub frozen: bool,
    pub stalled: bool,
    pub counters: Counters,
    error_text: String,
}

/// Where a frame's bytes go while it is read and hashed.
pub struct Scratch {
    pub read: Vec<u8>,
    pub json: Vec<u8>,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            read: vec![0; 128 * 1024],
            json: vec![0; super::analyzer::OUTPUT + 4096],
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Capture {
    pub fn new(cfg: &FrameRule) -> Capture {
        Capture {
            name: cfg.name.clone(),
            dir_bytes: std::os::unix::ffi::OsStrExt::as_bytes(cfg.dir.as_os_str()).to_vec(),
            dir_path: cfg.dir.clone(),
            patterns: Patterns::new(&cfg.patterns),
            ignore: Patterns::new(&cfg.ignore),
            sidecars: cfg.sidecar,
            catch_up: cfg.catch_up as usize,
            stall_after_ms: cfg.stall_after.as_millis(),
            freeze_after: cfg.freeze_after,
            inotify: None,
            dir: None,
            dir_error: None,
            events: vec![0; EVENT_BUFFER],
            analyzer: cfg.analyzer.as_ref().map(Analyzer::new),
            last_seq: None,
            last_mtime_ms: None,
            last_frame: heapless::Vec::new(),
            last_arrival: None,
            arrivals: VecDeque::with_capacity(ARRIVALS),
            sizes: VecDeque::with_capacity(SIZES),
            last_hash: None,
            identical_run: 0,
            frozen: false,
            stalled: false,
            counters: Counters::default(),
            error_text: String::with_capacity(256),
        }
    }

    /// Takes the limits of a reloaded config for the same directory,
    /// keeping the watch and what the stream of frames has been like. An
    /// analyzer change waits while the old analyzer still runs children.
    pub fn adopt(&mut self, cfg: &FrameRule) {
        self.patterns = Patterns::new(&cfg.patterns);
        self.ignore = Patterns::new(&cfg.ignore);
        self.sidecars = cfg.sidecar;
        self.catch_up = cfg.catch_up as usize;
        self.stall_after_ms = cfg.stall_after.as_millis();
        self.freeze_after = cfg.freeze_after;
        if self.stall_after_ms == 0 {
            self.stalled = false;
        }
        let busy = self.analyzer.as_ref().is_some_and(|a| a.busy() > 0);
        if busy {
            log::warn!(
                "{}: analyzer children are running; its new settings apply at the next restart",
                self.name
            );
        } else {
            self.analyzer = cfg.analyzer.as_ref().map(Analyzer::new);
        }
    }

    pub fn inotify_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inotify.as_ref().map(|i| i.as_fd())
    }

    pub fn stall_after_ms(&self) -> u64 {
        self.stall_after_ms
    }

    /// Opens and watches the directory; false (and `dir_error`) if it is
    /// not there yet.
    pub fn open(&mut self) -> bool {
        let result = (|| -> io::Result<(OwnedFd, Inotify)> {
            let dir = open_dir(&self.dir_path)?;
            let ino = Inotify::new()?;
            let mut path = self.dir_bytes.clone();
            path.push(0);
            let cpath = CStr::from_bytes_with_nul(&path).map_err(io::Error::other)?;
            ino.add_watch(
                cpath,
                inotify::IN_MOVED_TO
                    | inotify::IN_CLOSE_WRITE
                    | inotify::IN_DELETE_SELF
                    | inotify::IN_MOVE_SELF
                    | inotify::IN_ONLYDIR
                    | inotify::IN_DONT_FOLLOW,
            )?;
            Ok((dir, ino))
        })();
        match result {
            Ok((dir, ino)) => {
                self.dir = Some(dir);
                self.inotify = Some(ino);
                if self.dir_error.take().is_some() {
                    log::info!(
                        "{}: capture directory {} is there now",
                        self.name,
                        self.dir_path.display()
                    );
                }
                true
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                if self.dir_error != Some(errno) {
                    log::error!(
                        "{}: capture directory {}: {e}",
                        self.name,
                        self.dir_path.display()
                    );
                }
                self.dir_error = Some(errno);
                self.dir = None;
                self.inotify = None;
                false
            }
        }
    }

    /// The newest `catch_up` frames without a current sidecar, oldest
    /// first, found in one pass over the names: a frame is looked at (stat)
    /// only if its sequence number would make it into the newest N, so a
    /// directory of 220,000 frames costs a few dozen stats.
    pub fn catch_up(&mut self, scratch: &mut Scratch, ctx: &mut Ctx<'_>) -> io::Result<()> {
        let Some(dir) = self.dir.as_ref() else {
            return Ok(());
        };
        let n = self.catch_up;
        let mut newest: BinaryHeap<Reverse<(u64, Vec<u8>)>> = BinaryHeap::with_capacity(n + 1);
        let mut highest: Option<u64> = None;
        let (mut frames, mut sidecars) = (0u64, 0u64);
        let mut stream = DirStream::open_at(dir.as_fd(), c".")?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let got = stream.read(&mut buf)?;
            if got == 0 {
                break;
            }
            for e in Entries::new(&buf[..got]) {
                let name = e.name.to_bytes();
                if !self.is_frame(name) {
                    if name.ends_with(b".json") && !name.starts_with(b".") {
                        sidecars += 1;
                    }
                    continue;
                }
                frames += 1;
                let Some(seq) = sequence(name) else { continue };
                highest = Some(highest.map_or(seq, |h| h.max(seq)));
                if n == 0 {
                    continue;
                }
                if newest.len() == n && newest.peek().is_some_and(|Reverse((min, _))| seq <= *min) {
                    continue;
                }
                if self.sidecar_state(dir.as_fd(), e.name) == SidecarState::Current {
                    continue;
                }
                newest.push(Reverse((seq, name.to_vec())));
                if newest.len() > n {
                    newest.pop();
                }
            }
        }
        let mut picked: Vec<(u64, Vec<u8>)> = newest.into_iter().map(|Reverse(x)| x).collect();
        picked.sort_unstable_by_key(|p| p.0);
        for (_, name) in &picked {
            self.counters.catch_up += 1;
            self.frame(name, false, scratch, ctx);
        }
        // Live frames continue from the newest present, not from the
        // newest analysed: no false gap at the first one.
        if let Some(h) = highest {
            self.last_seq = Some(self.last_seq.map_or(h, |l| l.max(h)));
        }
        // Counted, not silently lost: frames without a sidecar that this
        // pass did not take (sidecars of frames deleted since may make this
        // an underestimate, never an overestimate of what was analysed).
        let left = if self.sidecars {
            frames
                .saturating_sub(sidecars)
                .saturating_sub(picked.len() as u64)
        } else {
            0
        };
        self.counters.skipped += left;
        if !picked.is_empty() || left > 0 {
            log::info!(
                "{}: caught up on {} frame(s) without a current sidecar, the newest up to seq {}; {left} older one(s) left alone",
                self.name,
                picked.len(),
                picked.last().map_or(0, |p| p.0)
            );
        }
        Ok(())
    }

    fn is_frame(&self, name: &[u8]) -> bool {
        self.patterns.matches(name) && !self.ignore.matches(name)
    }

    /// Whether the frame's sidecar is there and at least as new as the
    /// frame (a capture restarted without `-start_number` reuses names, and
    /// then the old sidecar is stale). One stat when there is none.
    fn sidecar_state(&self, dir: BorrowedFd<'_>, name: &CStr) -> SidecarState {
        if !self.sidecars {
            return SidecarState::Missing;
        }
        let mut buf = [0u8; 264];
        let Some(sidecar) = sidecar_name(name.to_bytes(), &mut buf) else {
            return SidecarState::Missing;
        };
        let Ok(side) = fstatat(dir, sidecar, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            return SidecarState::Missing;
        };
        match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(frame) if mtime_ns(&side) < mtime_ns(&frame) => SidecarState::Stale,
            // Current, or the frame is gone: nothing to analyse either way.
            _ => SidecarState::Current,
        }
    }

    /// Reads and handles the queued events. Returns true if the capture
    /// directory went away.
    pub fn on_events(&mut self, scratch: &mut Scratch, ctx: &mut Ctx<'_>) -> bool {
        let mut lost_dir = false;
        let Some(ino) = &self.inotify else {
            return true;
        };
        let n = match ino.read(&mut self.events) {
            Ok(n) => n,
            Err(e) => {
                log::error!("{}: reading inotify events: {e}", self.name);
                0
            }
        };
        let events = std::mem::take(&mut self.events);
        for ev in Events::new(&events[..n]) {
            if ev.is(inotify::IN_DELETE_SELF | inotify::IN_MOVE_SELF | inotify::IN_IGNORED) {
                lost_dir = true;
                continue;
            }
            if ev.is(inotify::IN_Q_OVERFLOW) {
                // Too many frames at once: the newest matter, and the
                // catch-up pass finds them.
                log::warn!(
                    "{}: inotify queue overflowed; catching up on the newest frames",
                    self.name
                );
                let _ = self.catch_up(scratch, ctx);
                continue;
            }
            if ev.is(inotify::IN_ISDIR) || !self.is_frame(ev.name) {
                continue;
            }
            self.frame(ev.name, true, scratch, ctx);
        }
        self.events = events;
        if lost_dir {
            log::error!(
                "{}: capture directory {} was removed or moved",
                self.name,
                self.dir_path.display()
            );
            self.dir = None;
            self.inotify = None;
            self.dir_error = Some(libc::ENOENT);
        }
        lost_dir
    }

    /// Analyses one frame and writes its sidecar (or queues it for the
    /// external analyzer). `live`: it just arrived (not catch-up).
    pub fn frame(&mut self, name: &[u8], live: bool, scratch: &mut Scratch, ctx: &mut Ctx<'_>) {
        let mut cbuf = [0u8; 256];
        if name.len() >= cbuf.len() {
            return;
        }
        cbuf[..name.len()].copy_from_slice(name);
        let Ok(cname) = CStr::from_bytes_with_nul(&cbuf[..=name.len()]) else {
            return;
        };
        if live {
            self.arrived(ctx.now);
        }
        let opened = {
            let Some(dir) = self.dir.as_ref().map(|d| d.as_fd()) else {
                return;
            };
            match self.sidecar_state(dir, cname) {
                SidecarState::Current => {
                    self.counters.already_analysed += 1;
                    return;
                }
                SidecarState::Stale => self.counters.stale_sidecars += 1,
                SidecarState::Missing => {}
            }
            // O_NONBLOCK: a FIFO named like a frame must not block the loop.
            openat(
                dir,
                cname,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
                Mode::empty(),
            )
        };
        let file = match opened {
            Ok(fd) => std::fs::File::from(fd),
            Err(Errno::ENOENT) => {
                self.counters.vanished += 1;
                return;
            }
            Err(e) => return self.unreadable(name, e.into(), scratch, ctx),
        };
        let st = match fstat(file.as_fd()) {
            Ok(st) if crate::sys::dir::Kind::of_stat(&st) == crate::sys::dir::Kind::File => st,
            Ok(_) => {
                return self.unreadable(name, io::Error::other("not a regular file"), scratch, ctx);
            }
            Err(e) => return self.unreadable(name, e.into(), scratch, ctx),
        };
        let analysis = match self.analyse(file, &st, name, ctx.wall, scratch) {
            Ok(a) => a,
            Err(e) => return self.unreadable(name, e, scratch, ctx),
        };
        self.counters.analysed += 1;
        self.last_frame.clear();
        let _ = self.last_frame.extend_from_slice(name);
        self.raise_for(&analysis, name, ctx);
        if let Some(analyzer) = self.analyzer.as_mut() {
            let mut n = heapless::Vec::new();
            let _ = n.extend_from_slice(name);
            if let Some(skipped) = analyzer.enqueue(Waiting { name: n, analysis }) {
                // Skipped by the analyzer, not lost: the built-in analysis
                // still gets its sidecar.
                self.write_sidecar(
                    &skipped.name,
                    &skipped.analysis,
                    Some(AnalyzerField::Error("skipped: analyzer backlog")),
                    scratch,
                );
            }
            return;
        }
        self.write_sidecar(name, &analysis, None, scratch);
    }

    fn arrived(&mut self, now: Instant) {
        if self.stalled {
            let since = self.last_arrival.map_or(0, |t| now.millis_since(t));
            log::info!(
                "{}: frames resumed after {:.1} s",
                self.name,
                since as f64 / 1000.0
            );
            self.stalled = false;
        }
        self.last_arrival = Some(now);
        if self.arrivals.len() == ARRIVALS {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(now);
    }

    /// Reads, hashes and parses the frame; updates the stream state.
    fn analyse(
        &mut self,
        mut file: std::fs::File,
        st: &FileStat,
        name: &[u8],
        now: WallTime,
        scratch: &mut Scratch,
    ) -> io::Result<Analysis> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut head = jpeg::Head::default();
        let mut tail = [0u8; 2];
        let mut total = 0u64;
        let mut first = true;
        let size = st.st_size.max(0) as u64;
        loop {
            let n = match file.read(&mut scratch.read) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let chunk = &scratch.read[..n];
            if first {
                head = jpeg::scan_head(chunk);
                first = false;
            }
            hasher.update(chunk);
            if n >= 2 {
                tail.copy_from_slice(&chunk[n - 2..]);
            } else {
                tail = [tail[1], chunk[0]];
            }
            total += n as u64;
            // A short read that reached the size fstat gave is the end: no
            // extra read for the end of file.
            if n < scratch.read.len() && total >= size {
                break;
            }
        }
        let hash = hasher.digest();
        let valid = head.soi && head.sof && total >= 4 && jpeg::ends_with_eoi(&tail);
        let seq = sequence(name);
        let mut dropped_before = 0;
        let mut reset = false;
        if let (Some(seq), Some(last)) = (seq, self.last_seq) {
            if seq > last + 1 {
                dropped_before = seq - last - 1;
            } else if seq < last {
                reset = true;
            }
        }
        if seq.is_some() {
            self.last_seq = seq;
        }
        let (secs, nsecs) = crate::sys::clock::mtime(st);
        let mtime_ms = secs * 1000 + nsecs / 1_000_000;
        let interval_ms = self
            .last_mtime_ms
            .filter(|&l| mtime_ms >= l && !reset)
            .map(|l| (mtime_ms - l) as u64);
        self.last_mtime_ms = Some(mtime_ms);
        let dark = self.dark(total);
        if self.last_hash == Some(hash) {
            self.identical_run += 1;
        } else {
            self.identical_run = 1;
            if self.frozen {
                self.frozen = false;
                log::info!("{}: frames are changing again", self.name);
            }
        }
        self.last_hash = Some(hash);
        Ok(Analysis {
            seq,
            bytes: total,
            width: head.width,
            height: head.height,
            valid,
            hash,
            interval_ms,
            dropped_before,
            reset,
            dark,
            identical_run: self.identical_run,
            analysed_at: now,
        })
    }

    /// Far smaller than the rolling median of recent frames: a black or
    /// blank image. The median is over the sizes before this frame.
    fn dark(&mut self, bytes: u64) -> bool {
        let mut dark = false;
        if self.sizes.len() >= DARK_MIN_SAMPLES {
            let mut sorted = [0u64; SIZES];
            let n = self.sizes.len();
            for (i, s) in self.sizes.iter().enumerate() {
                sorted[i] = *s;
            }
            let (_, median, _) = sorted[..n].select_nth_unstable(n / 2);
            dark = bytes * 100 < *median * DARK_BELOW_PERCENT;
        }
        if self.sizes.len() == SIZES {
            self.sizes.pop_front();
        }
        self.sizes.push_back(bytes);
        dark
    }

    fn raise_for(&mut self, a: &Analysis, name: &[u8], ctx: &mut Ctx<'_>) {
        let mut msg = heapless::String::<320>::new();
        if a.reset {
            self.counters.resets += 1;
            log::info!(
                "{}: sequence went back to {} at {}: the capture restarted (not a gap)",
                self.name,
                a.seq.unwrap_or(0),
                Name(name)
            );
        }
        if a.dropped_before > 0 {
            self.counters.dropped += a.dropped_before;
            self.counters.gaps += 1;
            let _ = write!(
                msg,
                "{} frame(s) dropped before {}",
                a.dropped_before,
                Name(name)
            );
            self.alert(
                ctx,
                AlertLevel::Warning,
                "frame_gap",
                &msg,
                Some(a.dropped_before as f64),
            );
        }
        if !a.valid {
            self.counters.invalid += 1;
            msg.clear();
            let _ = write!(
                msg,
                "{} is not a whole JPEG ({} bytes)",
                Name(name),
                a.bytes
            );
            self.alert(
                ctx,
                AlertLevel::Warning,
                "frame_corrupt",
                &msg,
                Some(a.bytes as f64),
            );
        }
        if a.dark {
            self.counters.dark += 1;
            msg.clear();
            let _ = write!(
                msg,
                "{} is far smaller than recent frames ({} bytes): black or blank?",
                Name(name),
                a.bytes
            );
            self.alert(
                ctx,
                AlertLevel::Warning,
                "frame_dark",
                &msg,
                Some(a.bytes as f64),
            );
        }
        if self.freeze_after > 0 && a.identical_run >= self.freeze_after && !self.frozen {
            self.frozen = true;
            self.counters.freezes += 1;
            msg.clear();
            let _ = write!(
                msg,
                "{} identical frames in a row, up to {}: the image is frozen",
                a.identical_run,
                Name(name)
            );
            self.alert(
                ctx,
                AlertLevel::Warning,
                "frame_freeze",
                &msg,
                Some(f64::from(a.identical_run)),
            );
        }
    }

    fn alert(
        &self,
        ctx: &mut Ctx<'_>,
        level: AlertLevel,
        kind: &str,
        message: &str,
        value: Option<f64>,
    ) {
        ctx.raise(&Alert {
            level,
            kind,
            source: &self.name,
            message,
            value,
        });
    }

    /// The stall timer fired: no frame for `stall_after`.
    pub fn stall_check(&mut self, ctx: &mut Ctx<'_>) -> Option<Instant> {
        if self.stall_after_ms == 0 {
            return None;
        }
        let since = self
            .last_arrival
            .map_or(self.stall_after_ms, |t| ctx.now.millis_since(t));
        if since < self.stall_after_ms {
            // A frame came meanwhile: look again when it would be late.
            return self
                .last_arrival
                .map(|t| t.after_millis(self.stall_after_ms));
        }
        if !self.stalled {
            self.stalled = true;
            self.counters.stalls += 1;
            let mut msg = heapless::String::<320>::new();
            let _ = write!(msg, "no frame for {:.1} s", since as f64 / 1000.0);
            if !self.last_frame.is_empty() {
                let _ = write!(msg, " (last: {})", Name(&self.last_frame));
            }
            log::warn!("{}: {msg}", self.name);
            self.alert(
                ctx,
                AlertLevel::Warning,
                "frame_stall",
                &msg,
                Some(since as f64 / 1000.0),
            );
        }
        None
    }

    /// A frame that cannot be read gets an error sidecar, so it is never
    /// retried forever.
    fn unreadable(
        &mut self,
        name: &[u8],
        err: io::Error,
        scratch: &mut Scratch,
        ctx: &mut Ctx<'_>,
    ) {
        self.counters.read_errors += 1;
        log::warn!("{}: cannot read {}: {err}", self.name, Name(name));
        self.error_text.clear();
        let _ = write!(self.error_text, "{err}");
        let mut at = heapless::String::<32>::new();
        let _ = write!(at, "{}", ctx.wall.iso());
        let mut frame = heapless::String::<256>::new();
        lossy(name, &mut frame);
        let doc = ErrorSidecar {
            frame: &frame,
            error: &self.error_text,
            analysed_at: &at,
        };
        if self.sidecars {
            let written = serde_json_core::to_slice(&doc, &mut scratch.json)
                .map_err(|_| io::Error::other("sidecar too large"))
                .and_then(|n| self.put_sidecar(name, n, scratch));
            match written {
                Ok(()) => self.counters.sidecars += 1,
                Err(_) => self.counters.sidecar_failures += 1,
            }
        }
    }

    /// Writes the sidecar of `name` from `a`.
    fn write_sidecar(
        &mut self,
        name: &[u8],
        a: &Analysis,
        analyzer: Option<AnalyzerField<'_>>,
        scratch: &mut Scratch,
    ) {
        if !self.sidecars {
            return;
        }
        let mut hash = heapless::String::<16>::new();
        let _ = write!(hash, "{:016x}", a.hash);
        let mut at = heapless::String::<32>::new();
        let _ = write!(at, "{}", a.analysed_at.iso());
        let mut frame = heapless::String::<256>::new();
        lossy(name, &mut frame);
        let doc = Sidecar {
            frame: &frame,
            seq: a.seq,
            bytes: a.bytes,
            width: a.width,
            height: a.height,
            valid: a.valid,
            hash: &hash,
            analysed_at: &at,
            interval_ms: a.interval_ms,
            dropped_before: a.dropped_before,
            reset: a.reset,
            dark: a.dark,
            identical_run: a.identical_run,
            analyzer,
        };
        let written = serde_json_core::to_slice(&doc, &mut scratch.json)
            .map_err(|_| io::Error::other("sidecar too large"))
            .and_then(|n| self.put_sidecar(name, n, scratch));
        match written {
            Ok(()) => self.counters.sidecars += 1,
            Err(e) => {
                if self.counters.sidecar_failures == 0 {
                    log::warn!(
                        "{}: cannot write the sidecar of {}: {e}",
                        self.name,
                        Name(name)
                    );
                }
                self.counters.sidecar_failures += 1;
            }
        }
    }

    /// `scratch.json[..n]` → `.NAME.json.tmp` → `NAME.json`: readers see
    /// the old sidecar or the new one, never half of one. (An `O_TMPFILE`
    /// linked into place was measured too: on ext4 its orphan-list journal
    /// work made it slower than this, and it would wear an SD card more.)
    fn put_sidecar(&self, name: &[u8], n: usize, scratch: &mut Scratch) -> io::Result<()> {
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let mut buf = [0u8; 264];
        let sidecar = sidecar_name(name, &mut buf)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
        let mut tbuf = [0u8; 272];
        let tmp = temp_name(sidecar.to_bytes(), &mut tbuf)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
        let fd = openat(
            dir.as_fd(),
            tmp,
            OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_TRUNC
                | OFlag::O_CLOEXEC
                | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o644),
        )?;
        let mut f = std::fs::File::from(fd);
        scratch.json[n] = b'\n';
        f.write_all(&scratch.json[..=n])?;
        drop(f);
        renameat(dir.as_fd(), tmp, dir.as_fd(), sidecar)?;
        Ok(())
    }

    /// Writes the sidecar of a frame the analyzer finished with.
    pub fn analyzer_done(&mut self, finished: Finished<'_>, scratch: &mut Scratch) {
        let field = match finished.verdict {
            Verdict::Object(raw) => AnalyzerField::Output(RawJson(raw)),
            Verdict::Failed(why) => AnalyzerField::Error(why),
        };
        self.write_sidecar(
            &finished.frame.name,
            &finished.frame.analysis,
            Some(field),
            scratch,
        );
    }

    /// Starts analyzer runs while slots are free; `started` registers each
    /// run's pipe and timeout. A frame whose program could not start gets
    /// its sidecar with the reason.
    pub fn run_analyzer(
        &mut self,
        now: Instant,
        scratch: &mut Scratch,
        started: &mut dyn FnMut(usize, BorrowedFd<'_>, Instant),
    ) {
        let Some(analyzer) = self.analyzer.as_mut() else {
            return;
        };
        let mut failed: Vec<(Waiting, String)> = Vec::new();
        analyzer.start_runs(&self.dir_bytes, now, started, &mut |f| {
            if let Verdict::Failed(why) = f.verdict {
                failed.push((f.frame.clone(), why.to_string()));
            }
        });
        for (frame, why) in failed {
            self.write_sidecar(
                &frame.name,
                &frame.analysis,
                Some(AnalyzerField::Error(&why)),
                scratch,
            );
        }
    }

    /// Frames per second over the recent arrivals (0 while stalled).
    pub fn fps(&self, now: Instant) -> f64 {
        if self.stalled || self.arrivals.len() < 2 {
            return 0.0;
        }
        let (Some(first), Some(last)) = (self.arrivals.front(), self.arrivals.back()) else {
            return 0.0;
        };
        if now.millis_since(*last) > 5_000 {
            return 0.0;
        }
        let span_ms = last.millis_since(*first);
        if span_ms == 0 {
            return 0.0;
        }
        (self.arrivals.len() - 1) as f64 * 1000.0 / span_ms as f64
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }
}

fn mtime_ns(st: &FileStat) -> i128 {
    let (secs, nsecs) = crate::sys::clock::mtime(st);
    i128::from(secs) * 1_000_000_000 + i128::from(nsecs)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SidecarState {
    Missing,
    Stale,
    Current,
}

/// `capture_000001.jpg` → `capture_000001.json` (a name without an
/// extension gets `.json` added).
pub fn sidecar_name<'b>(frame: &[u8], buf: &'b mut [u8; 264]) -> Option<&'b CStr> {
    let stem = match frame.iter().rposition(|&b| b == b'.') {
        Some(p) if p > 0 => &frame[..p],
        _ => frame,
    };
    let len = stem.len() + 5;
    if len > 255 {
        return None;
    }
    buf[..stem.len()].copy_from_slice(stem);
    buf[stem.len()..len].copy_from_slice(b".json");
    buf[len] = 0;
    CStr::from_bytes_with_nul(&buf[..=len]).ok()
}

/// `.NAME.tmp`, the name a sidecar is written under before its rename.
fn temp_name<'b>(sidecar: &[u8], buf: &'b mut [u8; 272]) -> Option<&'b CStr> {
    let len = sidecar.len() + 5;
    if len > 255 {
        return None;
    }
    buf[0] = b'.';
    buf[1..=sidecar.len()].copy_from_slice(sidecar);
    buf[sidecar.len() + 1..len].copy_from_slice(b".tmp");
    buf[len] = 0;
    CStr::from_bytes_with_nul(&buf[..=len]).ok()
}

/// The sequence number of a frame: the last run of digits in its name
/// before the extension (`capture_000123.jpg` → 123).
pub fn sequence(name: &[u8]) -> Option<u64> {
    let stem = match name.iter().rposition(|&b| b == b'.') {
        Some(p) if p > 0 => &name[..p],
        _ => name,
    };
    let end = stem.iter().rposition(u8::is_ascii_digit)? + 1;
    let start = stem[..end]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |p| p + 1);
    let digits = &stem[start..end];
    if digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The frame name as JSON text: UTF-8 as it is, invalid bytes as U+FFFD
/// (the sidecar's own file name carries the exact bytes).
fn lossy(name: &[u8], out: &mut heapless::String<256>) {
    for chunk in name.utf8_chunks() {
        let _ = out.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            let _ = out.push('\u{FFFD}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_come_from_the_last_digits() {
        assert_eq!(sequence(b"capture_000000123.jpg"), Some(123));
        assert_eq!(sequence(b"cam2_frame_0042.jpg"), Some(42));
        assert_eq!(sequence(b"snapshot.jpg"), None);
        assert_eq!(sequence(b"99999999999999999999999.jpg"), None);
        assert_eq!(sequence(b"7"), Some(7));
    }

    #[test]
    fn sidecar_and_temporary_names() {
        let mut b = [0u8; 264];
        assert_eq!(
            sidecar_name(b"capture_000001.jpg", &mut b)
                .unwrap()
                .to_bytes(),
            b"capture_000001.json"
        );
        assert_eq!(
            sidecar_name(b"frame", &mut b).unwrap().to_bytes(),
            b"frame.json"
        );
        let mut t = [0u8; 272];
        assert_eq!(
            temp_name(b"capture_1.json", &mut t).unwrap().to_bytes(),
            b".capture_1.json.tmp"
        );
        assert!(sidecar_name(&[b'x'; 252], &mut b).is_none());
    }
}
