//! The reactor: one thread, one epoll set, one timerfd, one signalfd.
//!
//! What it is: the event loop's plumbing. Owners register file descriptors
//! under a [`Token`] and deadlines under a [`TimerId`]; [`Reactor::poll`]
//! waits for the next thing to happen and hands back [`Wake`]s: a ready
//! token, a due deadline, or a signal. Small and dumb, after firecracker's
//! event-manager: it knows nothing of logs, frames or cgroups.
//! What it is not: a dispatcher. The daemon routes each wake to whoever
//! owns the token or timer. Nothing here allocates after `new`.

pub mod deadlines;

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use deadlines::Deadlines;
pub use deadlines::{QueueFull, TimerId};

use crate::sys::clock::Instant;

/// Identifies a registered file descriptor to its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

const SIGNALS: u64 = u64::MAX;
const TIMER: u64 = u64::MAX - 1;

/// Something that happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    Ready(Token),
    Deadline(TimerId),
    Signal(Signal),
}

pub struct Reactor {
    epoll: Epoll,
    signals: SignalFd,
    timer: TimerFd,
    armed: Option<Instant>,
    deadlines: Deadlines,
    events: Vec<EpollEvent>,
    ready: Vec<Wake>,
}

impl Reactor {
    /// Makes the reactor. `signals` must already be blocked (see
    /// [`crate::sys::process::block_signals`]); `max_deadlines` and
    /// `max_events` size the queues once.
    pub fn new(signals: &[Signal], max_deadlines: usize, max_events: usize) -> io::Result<Reactor> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let mut mask = nix::sys::signal::SigSet::empty();
        for &s in signals {
            mask.add(s);
        }
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        epoll.add(&signals, EpollEvent::new(EpollFlags::EPOLLIN, SIGNALS))?;
        epoll.add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER))?;
        let max_events = max_events.max(8);
        Ok(Reactor {
            epoll,
            signals,
            timer,
            armed: None,
            deadlines: Deadlines::with_capacity(max_deadlines),
            events: vec![EpollEvent::empty(); max_events],
            ready: Vec::with_capacity(max_events + max_deadlines + 8),
        })
    }

    /// Watches `fd` for readability; wakes come back as `Wake::Ready(token)`.
    pub fn register(&self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
        assert!(
            token.0 < TIMER,
            "token values u64::MAX-1.. are the reactor's own"
        );
        self.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token.0))?;
        Ok(())
    }

    pub fn deregister(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.epoll.delete(fd)?;
        Ok(())
    }

    /// Queues `id` to come back as `Wake::Deadline(id)` at `at` (moving it if
    /// it was already queued).
    pub fn schedule(&mut self, at: Instant, id: TimerId) -> Result<(), QueueFull> {
        self.deadlines.schedule(at, id)
    }

    pub fn cancel(&mut self, id: TimerId) {
        self.deadlines.cancel(id)
    }

    pub fn is_scheduled(&self, id: TimerId) -> bool {
        self.deadlines.is_scheduled(id)
    }

    /// Waits until something happens (or `timeout_ms` passes) and returns
    /// what did. Due deadlines are returned even if no fd became ready.
    /// The wakes stay readable through [`Reactor::woken`] until the next
    /// poll, so the caller can act on each while scheduling new deadlines.
    pub fn poll(&mut self, timeout_ms: Option<u16>) -> io::Result<&[Wake]> {
        self.ready.clear();
        self.arm()?;
        let timeout = match timeout_ms {
            Some(ms) => EpollTimeout::from(ms),
            None => EpollTimeout::NONE,
        };
        let n = match self.epoll.wait(&mut self.events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for event in &self.events[..n] {
            match event.data() {
                SIGNALS => {
                    while let Ok(Some(info)) = self.signals.read_signal() {
                        if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                            self.ready.push(Wake::Signal(sig));
                        }
                    }
                }
                TIMER => {
                    // Drain the expiration count; deadlines are checked below
                    // whatever woke us, so a late or early fire loses nothing.
                    let _ = self.timer.wait();
                    self.armed = None;
                }
                token => self.ready.push(Wake::Ready(Token(token))),
            }
        }
        let now = Instant::now();
        while self.ready.len() < self.ready.capacity() {
            match self.deadlines.pop_due(now) {
                Some(id) => self.ready.push(Wake::Deadline(id)),
                None => break,
            }
        }
        Ok(&self.ready)
    }

    /// The wakes of the last poll.
    pub fn woken(&self) -> &[Wake] {
        &self.ready
    }

    /// Points the timerfd at the earliest deadline, touching it only when
    /// that changed.
    fn arm(&mut self) -> io::Result<()> {
        let next = self.deadlines.earliest();
        if next == self.armed {
            return Ok(());
        }
        match next {
            Some(at) => {
                // An absolute time of 0 would disarm the timer: fire at 1 ns.
                let ns = at.as_nanos().max(1);
                let spec = TimeSpec::new((ns / 1_000_000_000) as _, (ns % 1_000_000_000) as _);
                self.timer.set(
                    Expiration::OneShot(spec),
                    TimerSetTimeFlags::TFD_TIMER_ABSTIME,
                )?;
            }
            None => self.timer.unset()?,
        }
        self.armed = next;
        Ok(())
    }

    /// The signalfd, for tests that need to see it is registered.
    pub fn signal_fd(&self) -> BorrowedFd<'_> {
        self.signals.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn deadlines_fire_through_the_timerfd() {
        let mut r = Reactor::new(&[], 4, 4).unwrap();
        let id = TimerId { owner: 3, id: 7 };
        let start = Instant::now();
        r.schedule(start.after_millis(30), id).unwrap();
        let mut woke = Vec::new();
        while woke.is_empty() {
            woke.extend_from_slice(r.poll(Some(1000)).unwrap());
        }
        assert_eq!(woke, vec![Wake::Deadline(id)]);
        assert!(Instant::now().millis_since(start) >= 30);
        assert!(!r.is_scheduled(id));
    }

    #[test]
    fn ready_fds_come_back_with_their_token() {
        let mut r = Reactor::new(&[], 4, 4).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        r.register(a.as_fd(), Token(42)).unwrap();
        std::io::Write::write_all(&mut b, b"x").unwrap();
        assert_eq!(r.poll(Some(1000)).unwrap(), &[Wake::Ready(Token(42))]);
        r.deregister(a.as_fd()).unwrap();
        assert_eq!(r.poll(Some(10)).unwrap(), &[]);
    }
}
