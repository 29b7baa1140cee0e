//! One instance per `run_dir`: an `flock` on `run_dir/edgekeeper.lock`.
//!
//! What it is: taking the lock (non-blocking), writing our pid into the file
//! so a second instance can name the holder, and holding it until the
//! process ends (the kernel drops it even on SIGKILL). What it is not: a
//! pid file for stopping the daemon; systemd tracks the main pid itself.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

pub struct InstanceLock {
    _file: Flock<File>,
    pub path: PathBuf,
}

#[derive(Debug)]
pub enum LockError {
    /// Another process holds the lock; its pid if it wrote one.
    Held {
        path: PathBuf,
        pid: Option<u32>,
    },
    Io {
        path: PathBuf,
        error: io::Error,
    },
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Held {
                path,
                pid: Some(pid),
            } => write!(
                f,
                "another edgekeeper (pid {pid}) is running on this run_dir: it holds {}",
                path.display()
            ),
            LockError::Held { path, pid: None } => write!(
                f,
                "another edgekeeper is running on this run_dir: it holds {}",
                path.display()
            ),
            LockError::Io { path, error } => write!(
                f,
                "{}: cannot take the instance lock: {error}",
                path.display()
            ),
        }
    }
}

impl InstanceLock {
    pub fn acquire(run_dir: &Path) -> Result<InstanceLock, LockError> {
        let path = run_dir.join("edgekeeper.lock");
        let io_err = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(io_err)?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    pid: text.trim().parse().ok(),
                    path,
                });
            }
            Err((_, e)) => return Err(io_err(e.into())),
        };
        let wrote = locked
            .set_len(0)
            .and_then(|()| locked.rewind())
            .and_then(|()| writeln!(locked, "{}", std::process::id()));
        wrote.map_err(io_err)?;
        Ok(InstanceLock {
            _file: locked,
            path,
        })
    }
}
