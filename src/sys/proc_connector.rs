//! The netlink process connector: the kernel says when a process execs,
//! renames itself or exits, within microseconds.
//!
//! What it is: [`ProcConnector`], a non-blocking `NETLINK_CONNECTOR`
//! socket subscribed to `CN_IDX_PROC` (`PROC_CN_MCAST_LISTEN`, confirmed by
//! the kernel's acknowledgement before it is trusted), and [`events`], a
//! bounds-checked parser of the packed `nlmsghdr` → `cn_msg` →
//! `proc_event` records it receives (byte offsets, no pointer casts).
//! Subscribing needs `CAP_NET_ADMIN` in the initial namespaces; elsewhere
//! [`ProcConnector::open`] fails and the caller scans /proc instead.
//! What it is not: a process table. Events name PIDs; whether one matters
//! is decided by reading /proc.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const NLMSG_HDR: usize = 16;
const CN_MSG: usize = 20;
const NLMSG_DONE: u16 = 3;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_CN_MCAST_IGNORE: u32 = 2;

const PROC_EVENT_NONE: u32 = 0;
const PROC_EVENT_EXEC: u32 = 0x2;
const PROC_EVENT_COMM: u32 = 0x200;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

/// What the kernel reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    /// Thread `pid` of process `tgid` executed a new program.
    Exec { pid: i32, tgid: i32 },
    /// Thread `pid` of process `tgid` changed its name (`PR_SET_NAME`).
    Comm { pid: i32, tgid: i32 },
    /// Thread `pid` of process `tgid` exited.
    Exit { pid: i32, tgid: i32 },
    /// The answer to a subscription request: 0, or an errno.
    Ack { err: u32 },
    /// Forks, uid changes and the rest.
    Other,
}

/// One event with the kernel's CLOCK_MONOTONIC time of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub event: ProcEvent,
    pub timestamp_ns: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses one `proc_event`: `what` u32, `cpu` u32, `timestamp_ns` u64,
/// then the event's data.
fn proc_event(data: &[u8]) -> Option<Event> {
    let what = u32_at(data, 0)?;
    let timestamp_ns = u64_at(data, 8)?;
    let pid = || u32_at(data, 16).map(|v| v as i32);
    let tgid = || u32_at(data, 20).map(|v| v as i32);
    let event = match what {
        PROC_EVENT_NONE => ProcEvent::Ack {
            err: u32_at(data, 16)?,
        },
        PROC_EVENT_EXEC => ProcEvent::Exec {
            pid: pid()?,
            tgid: tgid()?,
        },
        PROC_EVENT_COMM => ProcEvent::Comm {
            pid: pid()?,
            tgid: tgid()?,
        },
        PROC_EVENT_EXIT => ProcEvent::Exit {
            pid: pid()?,
            tgid: tgid()?,
        },
        _ => ProcEvent::Other,
    };
    Some(Event {
        event,
        timestamp_ns,
    })
}

/// The events in one received buffer.
pub struct Events<'a> {
    buf: &'a [u8],
}

/// Iterates the process events in `buf` (what one `recv` returned).
pub fn events(buf: &[u8]) -> Events<'_> {
    Events { buf }
}

impl Iterator for Events<'_> {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            let b = self.buf;
            let len = u32_at(b, 0)? as usize;
            if len < NLMSG_HDR || len > b.len() {
                self.buf = &[];
                return None;
            }
            // Messages are 4-byte aligned (NLMSG_ALIGN).
            self.buf = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
            let payload = &b[NLMSG_HDR..len];
            let (Some(idx), Some(val), Some(data_len)) =
                (u32_at(payload, 0), u32_at(payload, 4), u16_at(payload, 16))
            else {
                continue;
            };
            if idx != CN_IDX_PROC || val != CN_VAL_PROC {
                continue;
            }
            let Some(data) = payload.get(CN_MSG..CN_MSG + usize::from(data_len)) else {
                continue;
            };
            if let Some(e) = proc_event(data) {
                return Some(e);
            }
        }
    }
}

/// A subscribed process-connector socket.
pub struct ProcConnector {
    fd: OwnedFd,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn kernel_address() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain old data (integers); all zeros is a
    // valid value of it.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

impl ProcConnector {
    /// Opens the socket, subscribes, and waits up to `ack_wait` for the
    /// kernel to acknowledge. Refused (`EPERM`), unsupported
    /// (`EPROTONOSUPPORT`, e.g. under qemu-user) or unanswered (not in the
    /// initial PID namespace: `TimedOut`) is an error.
    pub fn open(ack_wait: Duration) -> io::Result<ProcConnector> {
        // SAFETY: socket(2) takes integers only; a non-negative result is a
        // new descriptor that we alone own.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_CONNECTOR,
            )
        })?;
        // SAFETY: `raw` was just returned by socket(2) and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // A deep receive queue rides out bursts of execs and exits; an
        // overflow is survivable (ENOBUFS, then a /proc scan) but costly.
        let size: libc::c_int = 4 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt(2) reads `size_of::<c_int>()` bytes from a
            // live local; the fd is open.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
        let mut addr = kernel_address();
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: bind(2) reads `size_of::<sockaddr_nl>()` bytes from a live
        // local of that type; the fd is open.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        let connector = ProcConnector { fd };
        connector.send_op(PROC_CN_MCAST_LISTEN)?;
        connector.wait_for_ack(ack_wait)?;
        Ok(connector)
    }

    fn send_op(&self, op: u32) -> io::Result<()> {
        let mut msg = [0u8; NLMSG_HDR + CN_MSG + 4];
        let total = msg.len() as u32;
        msg[0..4].copy_from_slice(&total.to_ne_bytes());
        msg[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg[12..16].copy_from_slice(&std::process::id().to_ne_bytes());
        let cn = &mut msg[NLMSG_HDR..];
        cn[0..4].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
        cn[4..8].copy_from_slice(&CN_VAL_PROC.to_ne_bytes());
        cn[16..18].copy_from_slice(&4u16.to_ne_bytes());
        cn[CN_MSG..CN_MSG + 4].copy_from_slice(&op.to_ne_bytes());
        let addr = kernel_address();
        // SAFETY: sendto(2) reads `msg.len()` bytes from `msg` and the
        // address from a live local of the stated size; the fd is open.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait_for_ack(&self, wait: Duration) -> io::Result<()> {
        let end = Instant::now() + wait;
        let mut buf = [0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not acknowledge the subscription (not in the initial PID namespace?)",
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) reads and writes one pollfd, a live local.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                continue;
            }
            let n = match self.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            for e in events(&buf[..n]) {
                if let ProcEvent::Ack { err } = e.event {
                    return match err {
                        0 => Ok(()),
                        err => Err(io::Error::from_raw_os_error(err as i32)),
                    };
                }
            }
        }
    }

    /// Receives one datagram of events into `buf`. `WouldBlock` when none
    /// is queued; `ENOBUFS` when the queue overflowed and events were lost
    /// (scan /proc to catch up).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`,
        // exclusively borrowed for the call; the fd is open.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Unsubscribes (closing the socket does too; this says it politely).
    pub fn unsubscribe(&self) {
        let _ = self.send_op(PROC_CN_MCAST_IGNORE);
    }
}

impl AsFd for ProcConnector {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One datagram as the kernel sends it: nlmsghdr, cn_msg, proc_event.
    fn datagram(what: u32, ts: u64, pid: i32, tgid: i32) -> Vec<u8> {
        let mut ev = Vec::new();
        ev.extend_from_slice(&what.to_ne_bytes());
        ev.extend_from_slice(&1u32.to_ne_bytes()); // cpu
        ev.extend_from_slice(&ts.to_ne_bytes());
        ev.extend_from_slice(&(pid as u32).to_ne_bytes());
        ev.extend_from_slice(&(tgid as u32).to_ne_bytes());
        ev.extend_from_slice(&[0u8; 16]);
        let mut cn = Vec::new();
        cn.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        cn.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        cn.extend_from_slice(&[0u8; 8]); // seq, ack
        cn.extend_from_slice(&(ev.len() as u16).to_ne_bytes());
        cn.extend_from_slice(&0u16.to_ne_bytes());
        cn.extend_from_slice(&ev);
        let mut nl = Vec::new();
        nl.extend_from_slice(&((NLMSG_HDR + cn.len()) as u32).to_ne_bytes());
        nl.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        nl.extend_from_slice(&[0u8; 10]);
        nl.extend_from_slice(&cn);
        while nl.len() % 4 != 0 {
            nl.push(0);
        }
        nl
    }

    #[test]
    fn parses_exec_comm_exit_and_ack() {
        let mut buf = datagram(PROC_EVENT_EXEC, 77, 10, 10);
        buf.extend(datagram(PROC_EVENT_COMM, 78, 11, 10));
        buf.extend(datagram(PROC_EVENT_EXIT, 79, 12, 12));
        buf.extend(datagram(1, 80, 13, 13)); // fork
        buf.extend(datagram(PROC_EVENT_NONE, 81, 0, 0));
        let got: Vec<Event> = events(&buf).collect();
        assert_eq!(
            got.iter().map(|e| e.event).collect::<Vec<_>>(),
            vec![
                ProcEvent::Exec { pid: 10, tgid: 10 },
                ProcEvent::Comm { pid: 11, tgid: 10 },
                ProcEvent::Exit { pid: 12, tgid: 12 },
                ProcEvent::Other,
                ProcEvent::Ack { err: 0 },
            ]
        );
        assert_eq!(got[0].timestamp_ns, 77);
    }

    #[test]
    fn cut_and_corrupt_buffers_end_the_iteration_without_panic() {
        let buf = datagram(PROC_EVENT_EXEC, 1, 5, 5);
        for cut in 0..buf.len() {
            let n = events(&buf[..cut]).count();
            assert!(n <= 1);
        }
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..5000 {
            let mut b = buf.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % b.len() as u64) as usize;
                b[at] = (x >> 32) as u8;
            }
            let _ = events(&b).count();
        }
        // A foreign connector index is skipped.
        let mut other = datagram(PROC_EVENT_EXEC, 1, 5, 5);
        other[NLMSG_HDR] = 9;
        assert_eq!(events(&other).count(), 0);
    }

    #[test]
    fn subscribes_where_permitted_and_sees_an_exec() {
        let c = match ProcConnector::open(Duration::from_millis(500)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("SKIPPED: the process connector is not available here: {e}");
                return;
            }
        };
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 8192];
        let (mut exec, mut exit) = (false, false);
        while Instant::now() < end && !(exec && exit) {
            match c.recv(&mut buf) {
                Ok(n) => {
                    for e in events(&buf[..n]) {
                        match e.event {
                            ProcEvent::Exec { tgid, .. } if tgid == pid => exec = true,
                            ProcEvent::Exit { tgid, .. } if tgid == pid => exit = true,
                            _ => {}
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(exec && exit, "exec {exec}, exit {exit}");
        c.unsubscribe();
    }
}
