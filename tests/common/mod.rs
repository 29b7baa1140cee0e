//! Shared helpers for the integration tests: a sandbox directory with a
//! config, the real `edgekeeper` binary started in it, signals, and waiting
//! for files with deadlines (generous, because the aarch64 suite runs the
//! binary under qemu).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_edgekeeper");

/// A scratch directory removed when dropped.
pub struct Sandbox {
    pub dir: PathBuf,
}

impl Sandbox {
    pub fn new(name: &str) -> Sandbox {
        let dir = std::env::temp_dir().join(format!("edgekeeper-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Sandbox { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("edgekeeper.json")
    }

    /// Writes `edgekeeper.json`: `extra` is spliced into a config whose
    /// state, run and log directories live in the sandbox.
    /// Alerts go to `alerts/` unless `extra` has its own `alerts` block.
    pub fn write_config(&self, extra: &str) {
        let alerts = if extra.contains("\"alerts\"") {
            ""
        } else {
            ",\n  \"alerts\": {\"dir\": \"alerts\"}"
        };
        let text = format!(
            "{{\n  \"state_dir\": \"state\",\n  \"run_dir\": \"run\",\n  \"log\": {{\"file\": \"log/edgekeeper.log\", \"level\": \"debug\"}}{alerts}{}{extra}\n}}\n",
            if extra.is_empty() { "" } else { ",\n  " }
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(self.config_path()).args(args);
        c.env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env_remove("EDGEKEEPER_CONFIG");
        c
    }

    pub fn run_cli(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Starts `edgekeeper run` and waits for its first status snapshot.
    pub fn start(&self) -> Daemon {
        self.start_with(|_| {})
    }

    pub fn start_with(&self, env: impl FnOnce(&mut Command)) -> Daemon {
        let mut c = self.command(&["run"]);
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        env(&mut c);
        let child = c.spawn().unwrap();
        let mut d = Daemon::new(child, self.path("run/status.json"));
        let pid = d.child.id();
        let up = wait_for(Duration::from_secs(20), || {
            if let Ok(Some(_)) = d.child.try_wait() {
                return Some(false);
            }
            std::fs::read_to_string(&d.status)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|v| v["pid"] == pid && v["running"] == true)
                .then_some(true)
        });
        if up != Some(true) {
            let _ = d.child.kill();
            let status = d.child.wait().unwrap();
            let err = d
                .stderr
                .take()
                .map(|t| t.join().unwrap())
                .unwrap_or_default();
            panic!("edgekeeper (pid {pid}) wrote no status snapshot ({status}); stderr:\n{err}");
        }
        d
    }

    pub fn files_in(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = match std::fs::read_dir(self.path(rel)) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running daemon, killed if a test fails before stopping it. Its
/// stderr, when piped, is drained by a thread so a chatty daemon never
/// blocks on a full pipe.
pub struct Daemon {
    pub child: Child,
    pub status: PathBuf,
    pub stderr: Option<std::thread::JoinHandle<String>>,
}

impl Daemon {
    pub fn new(mut child: Child, status: PathBuf) -> Daemon {
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = std::io::Read::read_to_end(&mut e, &mut bytes);
                String::from_utf8_lossy(&bytes).into_owned()
            })
        });
        Daemon {
            child,
            status,
            stderr,
        }
    }
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    pub fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.status).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Sends SIGUSR1 and waits for a snapshot written after it that
    /// satisfies `ok`.
    pub fn status_where(&self, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let before = self.status()["core"]["status_writes"].as_u64().unwrap();
        self.signal(nix::sys::signal::Signal::SIGUSR1);
        wait_for(Duration::from_secs(20), || {
            let v = serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(&self.status).ok()?,
            )
            .ok()?;
            (v["core"]["status_writes"].as_u64()? > before && ok(&v)).then_some(v)
        })
        .unwrap_or_else(|| panic!("no matching status snapshot; last: {}", self.status()))
    }

    /// SIGTERM, then waits for the exit; returns the exit code, the time it
    /// took and what the daemon wrote on stderr.
    pub fn stop(mut self) -> (i32, Duration, String) {
        let start = Instant::now();
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.child.wait().unwrap();
        let took = start.elapsed();
        let err = self
            .stderr
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default();
        (status.code().unwrap_or(-1), took, err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`/`true`, or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> T) -> Option<T::Output>
where
    T: Found,
{
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f().found() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub trait Found {
    type Output;
    fn found(self) -> Option<Self::Output>;
}

impl Found for bool {
    type Output = ();
    fn found(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Found for Option<T> {
    type Output = T;
    fn found(self) -> Option<T> {
        self
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn total_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// For tests that run the daemon in their own thread: an emptied scratch
/// directory holding `edgekeeper.json` with `config`; returns both paths.
pub fn scratch_config(name: &str, config: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("edgekeeper-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("edgekeeper.json");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}
