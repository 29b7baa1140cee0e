//! The field log on a real daemon: rotated, and never larger than
//! `max_size × (keep + 1)` however much is logged.

mod common;

use common::{Sandbox, total_size};
use nix::sys::signal::Signal;

#[test]
fn the_field_log_stays_within_max_size_times_keep_plus_one() {
    let sb = Sandbox::new("field-log");
    let (max, keep) = (4096u64, 2u64);
    sb.write_raw_config(&format!(
        "{{\"state_dir\": \"state\", \"run_dir\": \"run\", \"log\": {{\"file\": \"log/edgekeeper.log\", \"max_size\": \"{max}B\", \"keep\": {keep}, \"level\": \"debug\"}}}}"
    ));
    let daemon = sb.start();
    // Every SIGHUP logs several lines, every SIGUSR1 one (at debug).
    for round in 1..=60u64 {
        daemon.signal(Signal::SIGHUP);
        let s = daemon.status_where(|v| v["core"]["config_reloads"] == round);
        assert_eq!(s["running"], true);
        let total = total_size(&sb.path("log"));
        assert!(
            total <= max * (keep + 1),
            "{total} bytes after {round} reloads"
        );
    }
    let (code, _, _) = daemon.stop();
    assert_eq!(code, 0);
    assert_eq!(
        sb.files_in("log"),
        ["edgekeeper.log", "edgekeeper.log.1", "edgekeeper.log.2"]
    );
    assert!(total_size(&sb.path("log")) <= max * (keep + 1));
    for name in sb.files_in("log") {
        let text = std::fs::read_to_string(sb.path("log").join(&name)).unwrap();
        assert!(text.len() as u64 <= max, "{name}");
        // Whole lines, each with a UTC timestamp, level and service.
        for line in text.lines() {
            assert!(
                line.len() > 30 && line.as_bytes()[23] == b'Z',
                "{name}: {line:?}"
            );
            assert!(line.contains(" core: "), "{name}: {line:?}");
        }
    }
    let last = std::fs::read_to_string(sb.path("log/edgekeeper.log")).unwrap();
    assert!(last.trim_end().ends_with("core: stopped"), "{last}");
}

#[test]
fn journal_stderr_gets_priority_prefixes() {
    use std::os::unix::fs::MetadataExt;
    let sb = Sandbox::new("journal");
    sb.write_config("");
    // Point JOURNAL_STREAM at the file that will be the daemon's stderr, as
    // systemd does with its stream socket.
    let err_path = sb.path("stderr.txt");
    let err_file = std::fs::File::create(&err_path).unwrap();
    let meta = err_file.metadata().unwrap();
    let mut c = sb.command(&["run"]);
    c.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(err_file);
    let mut child = c.spawn().unwrap();
    common::wait_for(std::time::Duration::from_secs(20), || {
        sb.path("run/status.json").exists()
    })
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        text.lines()
            .next()
            .unwrap()
            .starts_with("<6>core: edgekeeper "),
        "{text}"
    );
    assert!(text.lines().all(|l| l.starts_with('<')), "{text}");

    // Plain stderr (not the journal) carries timestamps instead.
    let mut c = sb.command(&["run"]);
    c.env("JOURNAL_STREAM", "1:1")
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    let d = common::Daemon::new(child, sb.path("run/status.json"));
    common::wait_for(std::time::Duration::from_secs(20), || {
        d.status()["pid"] == d.pid() && d.status()["running"] == true
    })
    .unwrap();
    let (_, _, err) = d.stop();
    assert!(
        err.lines()
            .next()
            .unwrap()
            .contains("Z INFO  core: edgekeeper"),
        "{err}"
    );
}
