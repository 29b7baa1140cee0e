//! Child processes and signals at the level the reactor needs them.
//!
//! What it is: blocking the signals the daemon takes through signalfd, and
//! reaping exited children without blocking. What it is not: spawning (std's
//! `Command` does that, and resets the signal mask in the child).

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Blocks `signals` for the calling thread (and threads it starts later),
/// so they queue for a signalfd instead of running default actions.
pub fn block_signals(signals: &[Signal]) -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    for &s in signals {
        set.add(s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    Ok(set)
}

/// How a reaped child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildExit {
    Exited(i32),
    Signaled(Signal),
}

/// Reaps one exited child, if any, without blocking.
pub fn reap_one() -> Option<(Pid, ChildExit)> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => return Some((pid, ChildExit::Exited(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => return Some((pid, ChildExit::Signaled(sig))),
            // Stopped/continued children are not exits; look again.
            Ok(WaitStatus::StillAlive) => return None,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None, // ECHILD: no children at all
        }
    }
}
