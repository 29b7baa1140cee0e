//! A child process that only carries a name: a stand-in for ffmpeg.
//!
//! What it is: [`NamedChild::spawn`] forks a child that names itself with
//! `PR_SET_NAME` (so `/proc/PID/comm` reads, say, `ffmpeg`), optionally
//! moves to a working directory and holds some resident memory, then sleeps
//! until it is killed. `edgekeeper demo` uses it to show `govern` finding
//! and grouping "ffmpeg" with no ffmpeg installed; tests use it for names
//! no binary has (spaces, parentheses). The child dies with the thread
//! that made it (`PR_SET_PDEATHSIG`), and [`NamedChild`] kills and reaps
//! it when dropped.
//! What it is not: a way to run programs; the child execs nothing.

use std::ffi::CStr;
use std::io;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork};

/// Ends the forked child at once, running nothing of the parent's.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// A running named child.
pub struct NamedChild {
    pid: Pid,
    reaped: bool,
}

impl NamedChild {
    /// Forks a child named `name` (the kernel keeps 15 bytes), with `cwd`
    /// as its working directory if given, touching `resident` bytes of
    /// memory so they count in its `VmRSS`. Returns once the child has its
    /// name (and memory).
    pub fn spawn(name: &CStr, cwd: Option<&CStr>, resident: usize) -> io::Result<NamedChild> {
        // Everything the child needs is made before the fork: after it,
        // the child may only make async-signal-safe calls.
        let mut memory = vec![0u8; resident];
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let parent = nix::unistd::getpid();
        // SAFETY: the child only makes async-signal-safe system calls
        // (sigprocmask, prctl, getppid, chdir, write, pause, _exit) and
        // plain memory writes into a buffer allocated before the fork; it
        // never returns into the caller's code, takes no lock and does not
        // allocate.
        match unsafe { fork() }? {
            ForkResult::Child => {
                let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                if nix::unistd::getppid() != parent {
                    exit_now(1);
                }
                if let Some(dir) = cwd {
                    if nix::unistd::chdir(dir).is_err() {
                        exit_now(2);
                    }
                }
                for page in memory.chunks_mut(4096) {
                    page[0] = 1;
                }
                std::hint::black_box(&mut memory);
                if nix::sys::prctl::set_name(name).is_err() {
                    exit_now(3);
                }
                let _ = nix::unistd::write(&ready_w, b"1");
                loop {
                    nix::unistd::pause();
                }
            }
            ForkResult::Parent { child } => {
                drop(ready_w);
                drop(memory);
                let mut child = NamedChild {
                    pid: child,
                    reaped: false,
                };
                let mut byte = [0u8; 1];
                loop {
                    match nix::unistd::read(&ready_r, &mut byte) {
                        Ok(1) => return Ok(child),
                        Err(nix::errno::Errno::EINTR) => continue,
                        Ok(_) | Err(_) => {
                            child.kill();
                            return Err(io::Error::other(
                                "the named child exited before taking its name",
                            ));
                        }
                    }
                }
            }
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Kills the child and reaps it (unless someone else reaped it first).
    pub fn kill(&mut self) {
        if !self.reaped {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = waitpid(self.pid, None);
            self.reaped = true;
        }
    }
}

impl Drop for NamedChild {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_carries_its_name_cwd_and_memory() {
        let mut child = NamedChild::spawn(c"ffmpeg (x) y", Some(c"/"), 16 << 20).unwrap();
        let pid = child.pid().as_raw();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm, "ffmpeg (x) y\n");
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        assert_eq!(cwd, std::path::Path::new("/"));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(rss_kib >= 16 << 10, "VmRSS {rss_kib} kB");
        child.kill();
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
