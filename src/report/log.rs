//! The log sink behind the `log` facade: stderr for the journal, and the
//! capped field log that people read on the device.
//!
//! What it is: one global logger. Each record becomes one line (control
//! characters escaped, so a file name with a newline cannot split it),
//! formatted into a fixed buffer. On stderr it carries a `<N>` syslog
//! priority prefix when stderr is the journal (`JOURNAL_STREAM` names it),
//! and a UTC timestamp otherwise. The field log file gets `timestamp LEVEL
//! service: message`; it is buffered and written at most every
//! [`FLUSH_AFTER_MS`] (the daemon schedules [`flush_due`]) or at once for a
//! warning or worse, and it is rotated so that it never takes more than
//! `max_size × (keep + 1)` bytes on the SD card.
//! What it is not: a structured or remote logging system.

use std::ffi::{CString, OsStr};
use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config;
use crate::sys::clock::{Instant, WallTime};

/// A pending field-log buffer is written this long after its first line.
pub const FLUSH_AFTER_MS: u64 = 2_000;
const LINE_MAX: usize = 1024;
const BUFFER: usize = 16 * 1024;

/// What the log sink has done, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogStats {
    pub lines: u64,
    pub warnings: u64,
    pub errors: u64,
    pub file_bytes: u64,
    pub rotations: u64,
    pub write_errors: u64,
}

struct Sink {
    level: LevelFilter,
    journal: bool,
    file: Option<FieldLog>,
    stats: LogStats,
}

struct Logger(Mutex<Option<Sink>>);

static LOGGER: Logger = Logger(Mutex::new(None));

fn with_sink<R>(f: impl FnOnce(&mut Sink) -> R) -> Option<R> {
    let mut guard = LOGGER.0.lock().unwrap_or_else(|p| p.into_inner());
    guard.as_mut().map(f)
}

/// Installs the logger for stderr only, at `level` (before a config is read).
pub fn init_stderr(level: LevelFilter) {
    let journal = stderr_is_journal();
    {
        let mut guard = LOGGER.0.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(sink) => sink.level = level,
            None => {
                *guard = Some(Sink {
                    level,
                    journal,
                    file: None,
                    stats: LogStats::default(),
                })
            }
        }
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Applies the `log` block of a config: level, and the field log file
/// (opened, or reopened when its path or limits changed). A file that cannot
/// be opened is reported and the daemon goes on with stderr alone.
pub fn configure(cfg: &config::Log) -> io::Result<()> {
    init_stderr(cfg.level.filter());
    let result = with_sink(|sink| {
        let same = match (&sink.file, &cfg.file) {
            (Some(f), Some(p)) => {
                f.path == *p && f.max_size == cfg.max_size.bytes() && f.keep == cfg.keep
            }
            (None, None) => true,
            _ => false,
        };
        if same {
            return Ok(());
        }
        if let Some(old) = sink.file.as_mut() {
            old.flush(&mut sink.stats);
        }
        sink.file = None;
        if let Some(path) = &cfg.file {
            sink.file = Some(FieldLog::open(path, cfg.max_size.bytes(), cfg.keep)?);
        }
        Ok(())
    });
    result.unwrap_or(Ok(()))
}

/// Writes the buffered field-log lines now.
pub fn flush() {
    with_sink(|sink| {
        if let Some(f) = sink.file.as_mut() {
            f.flush(&mut sink.stats)
        }
    });
}

/// When the buffered lines must be written, if any are buffered.
pub fn flush_due() -> Option<Instant> {
    with_sink(|sink| sink.file.as_ref().and_then(|f| f.pending_since))
        .flatten()
        .map(|t| t.after_millis(FLUSH_AFTER_MS))
}

pub fn stats() -> LogStats {
    with_sink(|sink| sink.stats).unwrap_or_default()
}

/// `JOURNAL_STREAM` is `device:inode` of the journal's stream socket; it is
/// ours only if stderr is still that socket (not redirected since).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    match nix::sys::stat::fstat(io::stderr().as_fd()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// The service a record belongs to: `edgekeeper::services::relocate::x` →
/// `relocate`; the rest of edgekeeper is `core`.
fn service_of(target: &str) -> &str {
    match target.strip_prefix("edgekeeper::") {
        Some(rest) => match rest.strip_prefix("services::") {
            Some(svc) => svc.split("::").next().unwrap_or(svc),
            None => "core",
        },
        None if target == "edgekeeper" => "core",
        None => target,
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut message = Line::new();
        let _ = write!(message, "{}", record.args());
        let service = service_of(record.target());
        let now = WallTime::now();
        with_sink(|sink| {
            if record.level() > sink.level {
                return;
            }
            sink.stats.lines += 1;
            match record.level() {
                Level::Error => sink.stats.errors += 1,
                Level::Warn => sink.stats.warnings += 1,
                _ => {}
            }
            let mut line = Line::new();
            if sink.journal {
                let prio = match record.level() {
                    Level::Error => 3,
                    Level::Warn => 4,
                    Level::Info => 6,
                    Level::Debug | Level::Trace => 7,
                };
                let _ = write!(line, "<{prio}>{service}: ");
            } else {
                let _ = write!(line, "{} {:<5} {service}: ", now.iso(), record.level());
            }
            line.push_raw(message.as_bytes());
            line.push_raw(b"\n");
            let _ = io::stderr().write_all(line.as_bytes());
            if let Some(file) = sink.file.as_mut() {
                let mut line = Line::new();
                let _ = write!(line, "{} {:<5} {service}: ", now.iso(), record.level());
                line.push_raw(message.as_bytes());
                line.push_raw(b"\n");
                let urgent = record.level() <= Level::Warn;
                file.append(line.as_bytes(), urgent, &mut sink.stats);
            }
        });
    }

    fn flush(&self) {
        flush()
    }
}

/// One log line in a fixed buffer. Text written through `fmt::Write` has
/// control characters escaped; what does not fit is cut and marked `…`.
struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
    cut: bool,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; LINE_MAX],
            len: 0,
            cut: false,
        }
    }
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    /// Appends bytes as they are; keeps room for the newline.
    fn push_raw(&mut self, bytes: &[u8]) {
        let room = LINE_MAX - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        if n < bytes.len() {
            // Keep the line whole: end it with a newline even when cut.
            self.buf[LINE_MAX - 1] = b'\n';
        }
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        const MARK: &[u8] = "…".as_bytes();
        for c in s.chars() {
            if self.cut {
                return Ok(());
            }
            let mut tmp = [0u8; 4];
            let escaped: &[u8] = match c {
                '\n' => b"\\n",
                '\r' => b"\\r",
                '\t' => b"\\t",
                c if c.is_control() => b"?",
                c => c.encode_utf8(&mut tmp).as_bytes(),
            };
            // Room for the text, the cut mark and the newline.
            if self.len + escaped.len() + MARK.len() + 1 > LINE_MAX {
                self.buf[self.len..self.len + MARK.len()].copy_from_slice(MARK);
                self.len += MARK.len();
                self.cut = true;
                return Ok(());
            }
            self.buf[self.len..self.len + escaped.len()].copy_from_slice(escaped);
            self.len += escaped.len();
        }
        Ok(())
    }
}

/// The field log file with its rotation. Never larger, all files together,
/// than `max_size × (keep + 1)`.
pub struct FieldLog {
    path: PathBuf,
    /// `path.1` .. `path.keep`, made once so rotation allocates nothing.
    rotated: Vec<CString>,
    current: CString,
    max_size: u64,
    keep: u32,
    file: File,
    /// Bytes in the file plus bytes buffered for it.
    size: u64,
    buf: Vec<u8>,
    pending_since: Option<Instant>,
}

impl FieldLog {
    pub fn open(path: &Path, max_size: u64, keep: u32) -> io::Result<FieldLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = Self::open_file(path)?;
        let size = file.metadata()?.size();
        let bytes = path.as_os_str().as_bytes();
        let rotated = (1..=keep)
            .map(|i| crate::sys::fs::cstring(format!("{}.{i}", path.display()).as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        let mut log = FieldLog {
            path: path.to_path_buf(),
            rotated,
            current: crate::sys::fs::cstring(bytes)?,
            max_size,
            keep,
            file,
            size,
            buf: Vec::with_capacity(BUFFER),
            pending_since: None,
        };
        // A file left larger than the limit (by a smaller max_size now, or an
        // older version) is rotated before anything is added.
        if log.size > max_size {
            log.rotate()?;
        }
        Ok(log)
    }

    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    }

    /// Adds one line; writes at once when `urgent`, when the buffer is full,
    /// or when the line would take the file past `max_size` (then rotates).
    pub fn append(&mut self, line: &[u8], urgent: bool, stats: &mut LogStats) {
        let len = line.len() as u64;
        if self.size + len > self.max_size {
            self.flush(stats);
            if let Err(_e) = self.rotate() {
                stats.write_errors += 1;
                return;
            }
            stats.rotations += 1;
        }
        if self.buf.len() + line.len() > self.buf.capacity() {
            self.flush(stats);
        }
        self.buf
            .extend_from_slice(&line[..line.len().min(self.buf.capacity())]);
        self.size += len;
        if self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        if urgent {
            self.flush(stats);
        }
    }

    pub fn flush(&mut self, stats: &mut LogStats) {
        if self.buf.is_empty() {
            return;
        }
        match self.file.write_all(&self.buf) {
            Ok(()) => stats.file_bytes += self.buf.len() as u64,
            Err(_) => {
                // Lost lines are counted; the file size we track must not
                // include what never reached it.
                stats.write_errors += 1;
                self.size = self.size.saturating_sub(self.buf.len() as u64);
            }
        }
        self.buf.clear();
        self.pending_since = None;
    }

    /// `path.(keep-1)` → `path.keep`, …, `path` → `path.1`, new empty `path`.
    /// With `keep: 0` the file is emptied instead.
    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            self.file.set_len(0)?;
        } else {
            for i in (1..self.rotated.len()).rev() {
                let from = Path::new(OsStr::from_bytes(self.rotated[i - 1].to_bytes()));
                let to = Path::new(OsStr::from_bytes(self.rotated[i].to_bytes()));
                match std::fs::rename(from, to) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            let current = Path::new(OsStr::from_bytes(self.current.to_bytes()));
            match std::fs::rename(
                current,
                Path::new(OsStr::from_bytes(self.rotated[0].to_bytes())),
            ) {
                // Someone removed the log: start a new one.
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            self.file = Self::open_file(current)?;
        }
        self.size = self.buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_named_from_the_module_path() {
        assert_eq!(
            service_of("edgekeeper::services::relocate::walk"),
            "relocate"
        );
        assert_eq!(service_of("edgekeeper::services::storage"), "storage");
        assert_eq!(service_of("edgekeeper::daemon"), "core");
        assert_eq!(service_of("edgekeeper"), "core");
    }

    #[test]
    fn a_line_escapes_control_characters_and_is_cut_whole() {
        let mut l = Line::new();
        write!(l, "moved a\nb").unwrap();
        assert_eq!(l.as_bytes(), b"moved a\\nb");
        let mut l = Line::new();
        write!(l, "{}", "x".repeat(5000)).unwrap();
        l.push_raw(b"\n");
        assert!(l.len <= LINE_MAX);
        assert!(l.as_bytes().ends_with("…\n".as_bytes()));
    }

    #[test]
    fn the_field_log_never_exceeds_its_budget() {
        let dir = std::env::temp_dir().join(format!("edgekeeper-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("field.log");
        let (max, keep) = (4096u64, 2u32);
        let mut log = FieldLog::open(&path, max, keep).unwrap();
        let mut stats = LogStats::default();
        for i in 0..2000 {
            let line = format!("2026-11-22T00:00:00.000Z INFO  core: line number {i}\n");
            log.append(line.as_bytes(), i % 7 == 0, &mut stats);
            let total: u64 = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum();
            assert!(total <= max * (keep as u64 + 1), "{total} bytes on disk");
        }
        log.flush(&mut stats);
        assert!(stats.rotations > 10);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["field.log", "field.log.1", "field.log.2"]);
        for name in &names {
            assert!(std::fs::metadata(dir.join(name)).unwrap().len() <= max);
        }
        // The newest line is in the current file, whole.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("line number 1999\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
