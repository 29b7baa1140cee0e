//! The systemd notify protocol, spoken directly on `$NOTIFY_SOCKET`.
//!
//! What it is: reading `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace) and `WATCHDOG_USEC`/`WATCHDOG_PID` once at start, then sending
//! datagrams such as `READY=1` or `WATCHDOG=1` from a socket made once.
//! Sending allocates nothing. What it is not: libsystemd. When the variables
//! are absent (not run by systemd) every send is a no-op.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog_usec: Option<u64>,
}

impl Notifier {
    /// Reads the environment, then removes the variables so that children
    /// (alert commands, analyzers, jobs) do not talk to systemd as us.
    ///
    /// Call it while the process is single-threaded (at start).
    pub fn from_env() -> io::Result<Notifier> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let watchdog_usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        let watchdog_pid = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|v| v.parse::<u32>().ok());
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            // SAFETY: edgekeeper calls this once at start, before it spawns
            // anything or starts any thread, so no other thread can read the
            // environment concurrently.
            unsafe { std::env::remove_var(var) };
        }
        // The watchdog is meant for us unless WATCHDOG_PID names another.
        let watchdog_usec = watchdog_usec
            .filter(|&us| us > 0)
            .filter(|_| watchdog_pid.is_none_or(|p| p == std::process::id()));
        let target = match socket {
            None => None,
            Some(s) => {
                let bytes = s.as_encoded_bytes();
                let addr = match bytes.first() {
                    Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
                    Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(&s))?,
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "NOTIFY_SOCKET must be an absolute path or start with '@'",
                        ));
                    }
                };
                Some((UnixDatagram::unbound()?, addr))
            }
        };
        Ok(Notifier {
            target,
            watchdog_usec,
        })
    }

    /// A notifier that sends to a socket at `path` (tests, embedding).
    pub fn to_path(path: &std::path::Path, watchdog_usec: Option<u64>) -> io::Result<Notifier> {
        Ok(Notifier {
            target: Some((UnixDatagram::unbound()?, SocketAddr::from_pathname(path)?)),
            watchdog_usec,
        })
    }

    /// A notifier that sends nothing (commands other than `run`, tests).
    pub fn none() -> Notifier {
        Notifier {
            target: None,
            watchdog_usec: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `WATCHDOG_USEC` when systemd expects pings from this process.
    pub fn watchdog_usec(&self) -> Option<u64> {
        self.watchdog_usec.filter(|_| self.target.is_some())
    }

    /// Sends one datagram of newline-separated `KEY=value` assignments.
    pub fn send(&self, message: &[u8]) -> io::Result<()> {
        match &self.target {
            Some((socket, addr)) => socket.send_to_addr(message, addr).map(drop),
            None => Ok(()),
        }
    }
}
