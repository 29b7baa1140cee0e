//! The systemd notify protocol against a fake `NOTIFY_SOCKET` receiver:
//! READY=1 after start-up, WATCHDOG=1 at half of `WATCHDOG_USEC`, STATUS=,
//! RELOADING=1 with MONOTONIC_USEC on SIGHUP, STOPPING=1 on SIGTERM, and an
//! exit within one second.

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use common::Sandbox;
use nix::sys::signal::Signal;

/// Every datagram received, with when it arrived.
fn collect(socket: &UnixDatagram, until: Instant, out: &mut Vec<(Instant, String)>) {
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        socket
            .set_read_timeout(Some(
                until
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            out.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ));
        }
    }
}

fn wait_message(
    socket: &UnixDatagram,
    what: &str,
    limit: Duration,
    out: &mut Vec<(Instant, String)>,
) -> Instant {
    let end = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} within {limit:?}; got {out:?}");
        socket.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let now = Instant::now();
            let hit = msg
                .lines()
                .any(|l| l == what || l.starts_with(&format!("{what}=")));
            out.push((now, msg));
            if hit {
                return now;
            }
        }
    }
}

#[test]
fn ready_watchdog_reload_and_stopping_on_a_path_socket() {
    let sb = Sandbox::new("notify-path");
    sb.write_config("");
    let sock_path = sb.path("notify.sock");
    let socket = UnixDatagram::bind(&sock_path).unwrap();
    let watchdog_usec = 400_000u64; // pings expected every 200 ms
    let mut seen = Vec::new();
    let daemon = sb.start_with(|c| {
        c.env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", watchdog_usec.to_string());
    });
    wait_message(&socket, "READY=1", Duration::from_secs(20), &mut seen);
    assert!(
        seen.iter().any(|(_, m)| m.starts_with("STATUS=")),
        "{seen:?}"
    );

    // Watch the cadence for three seconds.
    let start = Instant::now();
    let mut window = Vec::new();
    collect(&socket, start + Duration::from_secs(3), &mut window);
    let pings: Vec<Instant> = window
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    // 3 s / 200 ms = 15 pings; allow for a slow (emulated) machine, but a
    // ping at the full WATCHDOG_USEC instead of half would give only 7.
    assert!(
        (12..=17).contains(&pings.len()),
        "{} pings in 3 s: {window:?}",
        pings.len()
    );
    for gap in pings.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            gap < Duration::from_micros(watchdog_usec),
            "a gap of {gap:?} would trip the watchdog"
        );
    }
    let status = daemon.status();
    assert_eq!(status["watchdog_usec"], watchdog_usec);

    daemon.signal(Signal::SIGHUP);
    let mut after = Vec::new();
    wait_message(&socket, "RELOADING=1", Duration::from_secs(10), &mut after);
    let reloading = after
        .iter()
        .find(|(_, m)| m.contains("RELOADING=1"))
        .unwrap();
    assert!(
        reloading.1.contains("\nMONOTONIC_USEC="),
        "{:?}",
        reloading.1
    );
    wait_message(&socket, "READY=1", Duration::from_secs(10), &mut after);

    let (code, took, _) = daemon.stop();
    let mut tail = Vec::new();
    wait_message(&socket, "STOPPING=1", Duration::from_secs(1), &mut tail);
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(1), "took {took:?} to stop");
}

#[test]
fn ready_and_stopping_on_an_abstract_socket() {
    let sb = Sandbox::new("notify-abstract");
    sb.write_config("");
    let name = format!("edgekeeper-test-{}", std::process::id());
    let socket =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let mut seen = Vec::new();
    let daemon = sb.start_with(|c| {
        c.env("NOTIFY_SOCKET", format!("@{name}"));
    });
    wait_message(&socket, "READY=1", Duration::from_secs(20), &mut seen);
    let (code, took, _) = daemon.stop();
    wait_message(&socket, "STOPPING=1", Duration::from_secs(1), &mut seen);
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(1), "took {took:?} to stop");
    // No watchdog was asked for, so none is sent.
    assert!(!seen.iter().any(|(_, m)| m == "WATCHDOG=1"), "{seen:?}");
}

#[test]
fn a_watchdog_meant_for_another_pid_is_not_pinged() {
    let sb = Sandbox::new("notify-otherpid");
    sb.write_config("");
    let sock_path = sb.path("notify.sock");
    let socket = UnixDatagram::bind(&sock_path).unwrap();
    let mut seen = Vec::new();
    let daemon = sb.start_with(|c| {
        c.env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "100000")
            .env("WATCHDOG_PID", "1");
    });
    wait_message(&socket, "READY=1", Duration::from_secs(20), &mut seen);
    collect(
        &socket,
        Instant::now() + Duration::from_millis(500),
        &mut seen,
    );
    assert!(!seen.iter().any(|(_, m)| m == "WATCHDOG=1"), "{seen:?}");
    let (code, _, _) = daemon.stop();
    assert_eq!(code, 0);
}

#[test]
fn sigint_stops_like_sigterm() {
    let sb = Sandbox::new("sigint");
    sb.write_config("");
    let mut daemon = sb.start();
    let start = Instant::now();
    daemon.signal(Signal::SIGINT);
    let status = daemon.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(start.elapsed() < Duration::from_secs(1));
    let snapshot: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&daemon.status).unwrap()).unwrap();
    assert_eq!(
        snapshot["running"], false,
        "the last snapshot says it stopped"
    );
}
