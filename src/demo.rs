//! `edgekeeper demo`: a sandbox where the real daemon does real work.
//!
//! What it is: a directory (default `./edgekeeper-demo`) with a config
//! written for it, the daemon started from this very binary on that config,
//! and generators that make the work each service exists for while it runs:
//! logs appearing in new nested directories (relocate), frames renamed in
//! by an ffmpeg-like writer (frames), a process named ffmpeg (govern), and
//! camera storage on a small budget (storage). At the end
//! the daemon is stopped and what happened is printed from its status
//! snapshot, with a check that nothing was lost. Needs no root.
//! What it is not: a test. The integration tests in `tests/` assert the same
//! behaviour under harder conditions; this shows it to a person.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::sys::clock::WallTime;

/// The shortest run in which every part of the demo can show.
const MIN_SECONDS: u64 = 3;

/// Marks a directory as a demo sandbox that `demo` may clear.
const MARKER: &str = ".edgekeeper-demo";

/// One service's part of the demo.
trait Part {
    /// The config block(s), as JSON object members.
    fn config(&self) -> String;
    /// Prepares files before the daemon starts.
    fn prepare(&mut self, dir: &Path) -> io::Result<()>;
    /// Makes work; called about every 50 ms with the seconds elapsed.
    fn tick(&mut self, dir: &Path, elapsed: f64) -> io::Result<()>;
    /// Stops whatever the part runs, before the daemon stops.
    fn finish(&mut self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    /// What happened, from the final status snapshot; false if something
    /// went wrong.
    fn summary(
        &self,
        dir: &Path,
        status: &serde_json::Value,
        out: &mut dyn io::Write,
    ) -> io::Result<bool>;
    /// Removes what the part made outside the sandbox, after the daemon
    /// stopped.
    fn cleanup(&mut self) {}
}

/// Logs appearing anywhere under `data/`, in directories made on the fly,
/// some written slowly by a writer that keeps the file open.
struct Logs {
    created: u64,
    dirs: u64,
    renamed: u64,
    next_at: f64,
    open_writer: Option<(std::fs::File, u32)>,
}

impl Logs {
    fn new() -> Logs {
        Logs {
            created: 0,
            dirs: 0,
            renamed: 0,
            next_at: 0.0,
            open_writer: None,
        }
    }
}

impl Part for Logs {
    fn config(&self) -> String {
        r#""relocate": [{
    "name": "casa-logs",
    "root": "data",
    "match": ["casa-*.log"],
    "target": "data/state/logs",
    "exclude": ["state/logs", ".git"],
    "sweep_every": "5s", "sweep_every_busy": "2s"
  }]"#
        .to_string()
    }

    fn prepare(&mut self, dir: &Path) -> io::Result<()> {
        // Logs already present at start, and files that must stay.
        std::fs::create_dir_all(dir.join("data/old-run/scan-1"))?;
        std::fs::create_dir_all(dir.join("data/.git"))?;
        for name in [
            "data/old-run/casa-20260101.log",
            "data/old-run/scan-1/casa-20260102.log",
        ] {
            std::fs::write(dir.join(name), "written before edgekeeper started\n")?;
            self.created += 1;
        }
        std::fs::write(dir.join("data/.git/casa-in-git.log"), "excluded: stays\n")?;
        std::fs::write(
            dir.join("data/old-run/notes.txt"),
            "does not match: stays\n",
        )?;
        Ok(())
    }

    fn tick(&mut self, dir: &Path, elapsed: f64) -> io::Result<()> {
        if let Some((f, lines)) = &mut self.open_writer {
            writeln!(f, "line {lines} of a log its writer keeps open")?;
            *lines += 1;
            if *lines == 20 {
                self.open_writer = None;
            }
        }
        if elapsed < self.next_at {
            return Ok(());
        }
        self.next_at = elapsed + 0.3;
        // A new observation directory, nested three deep, with logs written
        // right after it is made (before any watch on it can exist).
        self.dirs += 1;
        let d = dir.join(format!(
            "data/obs-{:03}/beam-{}/scan-{}",
            self.dirs,
            self.dirs % 4,
            self.dirs % 3
        ));
        std::fs::create_dir_all(&d)?;
        for i in 0..3 {
            std::fs::write(
                d.join(format!("casa-{:03}-{i}.log", self.dirs)),
                format!("casa log {} {i}\n", self.dirs),
            )?;
            self.created += 1;
        }
        std::fs::write(d.join("image.fits"), "not a log")?;
        if self.dirs % 5 == 0 {
            // A directory renamed while logs are being written into it.
            let from = dir.join(format!("data/obs-{:03}", self.dirs));
            let to = dir.join(format!("data/obs-{:03}-renamed", self.dirs));
            std::fs::rename(&from, &to)?;
            self.renamed += 1;
            std::fs::write(
                to.join(format!("casa-{:03}-after-rename.log", self.dirs)),
                "after rename\n",
            )?;
            self.created += 1;
        }
        if self.dirs % 7 == 1 && self.open_writer.is_none() {
            let f = std::fs::File::create(
                dir.join(format!("data/old-run/casa-{:03}-long.log", self.dirs)),
            )?;
            self.created += 1;
            self.open_writer = Some((f, 0));
        }
        Ok(())
    }

    fn finish(&mut self, _dir: &Path) -> io::Result<()> {
        self.open_writer = None;
        Ok(())
    }

    fn summary(
        &self,
        dir: &Path,
        status: &serde_json::Value,
        out: &mut dyn io::Write,
    ) -> io::Result<bool> {
        let target = dir.join("data/state/logs");
        let arrived = std::fs::read_dir(&target)
            .map(|rd| rd.count() as u64)
            .unwrap_or(0);
        let left = count_matching(&dir.join("data"), &target);
        let c = &status["services"]["relocate"]["counters"];
        writeln!(
            out,
            "relocate: logs appearing anywhere under data/ are moved into data/state/logs"
        )?;
        writeln!(
            out,
            "  made {} logs in {} new nested directories ({} renamed while in use); {} arrived in the target, {} left behind",
            self.created, self.dirs, self.renamed, arrived, left
        )?;
        writeln!(
            out,
            "  {} moved by events at once, {} found by scans of new directories, {} by sweeps; {} inotify events, {} watches",
            c["files_moved_total"].as_u64().unwrap_or(0)
                - c["scan_found_total"].as_u64().unwrap_or(0)
                - c["sweep_found_total"].as_u64().unwrap_or(0),
            c["scan_found_total"],
            c["sweep_found_total"],
            c["events_total"],
            status["services"]["relocate"]["watches"]
        )?;
        let kept = dir.join("data/.git/casa-in-git.log").exists()
            && dir.join("data/old-run/notes.txt").exists();
        let ok = arrived == self.created && left == 0 && kept;
        writeln!(
            out,
            "  {}",
            if ok {
                "OK: every log arrived once, nothing excluded or unmatched was touched"
            } else {
                "PROBLEM: some logs did not arrive, or something that must stay was moved"
            }
        )?;
        Ok(ok)
    }
}

/// An ffmpeg-like camera: frames renamed into place at 20 per second, with a
/// frozen stretch (12 identical frames from 20 % of the run), a corrupt
/// frame after it, and a stall of 1.5 s from 45 % of the run.
struct Camera {
    writer: Option<crate::services::frames::writer::FrameWriter>,
    next_at: f64,
    written: u64,
    frozen: u64,
    corrupt: bool,
    /// When the stall after the corrupt frame began.
    stalled_at: Option<f64>,
}

impl Camera {
    fn new() -> Camera {
        Camera {
            writer: None,
            next_at: 0.0,
            written: 0,
            frozen: 0,
            corrupt: false,
            stalled_at: None,
        }
    }
}

impl Part for Camera {
    fn config(&self) -> String {
        r#""frames": [{
    "name": "cam0",
    "dir": "captures/cam0",
    "match": ["capture_*.jpg"],
    "stall_after": "1s",
    "freeze_after": 10,
    "catch_up": 10
  }]"#
        .to_string()
    }

    fn prepare(&mut self, dir: &Path) -> io::Result<()> {
        let cam = dir.join("captures/cam0");
        std::fs::create_dir_all(&cam)?;
        let mut w = crate::services::frames::writer::FrameWriter::new(&cam, 1280, 720, 40_000);
        // Frames from before the daemon started: the newest get caught up.
        for _ in 0..30 {
            w.write(crate::services::frames::writer::Kind::Fresh)?;
            self.written += 1;
        }
        self.writer = Some(w);
        Ok(())
    }

    fn tick(&mut self, _dir: &Path, elapsed: f64) -> io::Result<()> {
        use crate::services::frames::writer::Kind;
        let Some(w) = self.writer.as_mut() else {
            return Ok(());
        };
        if elapsed < self.next_at {
            return Ok(());
        }
        self.next_at = elapsed + 0.05;
        // The story goes by frames, not by the clock, so a slow machine
        // (the aarch64 suite runs under qemu) tells it in the same order:
        // 8 fresh frames, 12 identical ones (a freeze), a truncated one,
        // then nothing for 1.5 s (a stall), then fresh frames again.
        if let Some(since) = self.stalled_at {
            if elapsed < since + 1.5 {
                return Ok(());
            }
        }
        let live = self.written - 30;
        let kind = if (8..20).contains(&live) {
            self.frozen += 1;
            if self.frozen == 1 {
                Kind::Fresh
            } else {
                Kind::Repeat
            }
        } else if live == 20 && !self.corrupt {
            self.corrupt = true;
            self.stalled_at = Some(elapsed);
            Kind::Truncated
        } else {
            Kind::Fresh
        };
        w.write(kind)?;
        self.written += 1;
        Ok(())
    }

    fn summary(
        &self,
        dir: &Path,
        status: &serde_json::Value,
        out: &mut dyn io::Write,
    ) -> io::Result<bool> {
        let frames = &status["services"]["frames"];
        let c = &frames["counters"];
        let sidecars = std::fs::read_dir(dir.join("captures/cam0"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .count() as u64
            })
            .unwrap_or(0);
        writeln!(
            out,
            "frames: an ffmpeg-like writer renames frames into captures/cam0; each gets a JSON sidecar"
        )?;
        writeln!(
            out,
            "  wrote {} frames (30 before start, {} caught up); {} sidecars; {} analysed live",
            self.written,
            c["catch_up_total"],
            sidecars,
            c["frames_analysed_total"].as_u64().unwrap_or(0)
                - c["catch_up_total"].as_u64().unwrap_or(0)
        )?;
        writeln!(
            out,
            "  corrupt {}, freezes {}, stalls {}, dropped {}",
            c["frames_invalid_total"],
            c["freezes_total"],
            c["stalls_total"],
            c["frames_dropped_total"]
        )?;
        let alerts = std::fs::read_dir(dir.join("alerts"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let raised = |kind: &str| alerts.iter().any(|a| a.ends_with(&format!("-{kind}.json")));
        let ok = c["freezes_total"].as_u64() >= Some(1)
            && c["stalls_total"].as_u64() >= Some(1)
            && c["frames_invalid_total"].as_u64() >= Some(1)
            && raised("frame_freeze")
            && raised("frame_stall")
            && raised("frame_corrupt")
            && c["catch_up_total"] == 10
            && sidecars
                == 10 + c["frames_analysed_total"].as_u64().unwrap_or(0)
                    - c["catch_up_total"].as_u64().unwrap_or(0);
        writeln!(
            out,
            "  {}",
            if ok {
                "OK: the freeze, the stall and the corrupt frame were each alerted; every live frame has its sidecar"
            } else {
                "PROBLEM: an expected alert or sidecar is missing"
            }
        )?;
        Ok(ok)
    }
}

/// A process named `ffmpeg` started outside any job system: govern finds
/// it, puts it in a group with limits, and removes the group when it ends.
struct Ffmpeg {
    cgroups: Option<crate::services::govern::DemoCgroups>,
    child: Option<crate::sys::named_child::NamedChild>,
    pid: Option<i32>,
    seconds: f64,
    spawned: bool,
    governed_seen: bool,
    group_seen: Option<String>,
    /// How govern found processes while it ran (the snapshot at stop no
    /// longer has the connector).
    discovery: Option<String>,
}

impl Ffmpeg {
    fn new(seconds: u64) -> Ffmpeg {
        Ffmpeg {
            cgroups: None,
            child: None,
            pid: None,
            seconds: seconds as f64,
            spawned: false,
            governed_seen: false,
            group_seen: None,
            discovery: None,
        }
    }
}

impl Part for Ffmpeg {
    fn config(&self) -> String {
        let root = self
            .cgroups
            .as_ref()
            .map(|c| c.root.clone())
            .unwrap_or_default();
        format!(
            "\"govern\": {}",
            crate::services::govern::demo_config(&root)
        )
    }

    fn prepare(&mut self, dir: &Path) -> io::Result<()> {
        self.cgroups = Some(crate::services::govern::demo_cgroup_root(dir));
        Ok(())
    }

    fn tick(&mut self, dir: &Path, elapsed: f64) -> io::Result<()> {
        if !self.spawned && elapsed >= 0.1 {
            let child = crate::sys::named_child::NamedChild::spawn(c"ffmpeg", Some(c"/"), 0)?;
            self.pid = Some(child.pid().as_raw());
            self.child = Some(child);
            self.spawned = true;
        }
        // Note what status says while it runs, then end it at 70 %.
        if let (Some(pid), Some(s)) = (self.pid, read_status(dir)) {
            if let Some(d) = s["services"]["govern"]["details"]["discovery"].as_str() {
                self.discovery = Some(d.to_string());
            }
            for p in s["services"]["govern"]["details"]["processes"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if p["pid"] == pid && p["group"].is_string() {
                    self.governed_seen = true;
                    self.group_seen = p["group"].as_str().map(str::to_string);
                }
            }
        }
        if elapsed >= self.seconds * 0.7 {
            if let Some(mut c) = self.child.take() {
                c.kill();
            }
        }
        Ok(())
    }

    fn finish(&mut self, _dir: &Path) -> io::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
        Ok(())
    }

    fn summary(
        &self,
        _dir: &Path,
        status: &serde_json::Value,
        out: &mut dyn io::Write,
    ) -> io::Result<bool> {
        let g = &status["services"]["govern"];
        let c = &g["counters"];
        writeln!(
            out,
            "govern: a process named ffmpeg is started outside any job system"
        )?;
        if let Some(cg) = &self.cgroups {
            writeln!(out, "  {}", cg.explanation)?;
        }
        writeln!(
            out,
            "  discovery by {}; {} attached, {} exited, {} groups removed",
            self.discovery.as_deref().unwrap_or("?"),
            c["attached_total"],
            c["exited_total"],
            c["groups_removed_total"]
        )?;
        if let Some(group) = &self.group_seen {
            writeln!(
                out,
                "  pid {} was held in {group} while it ran",
                self.pid.unwrap_or(0)
            )?;
        }
        let ok = self.governed_seen
            && c["attached_total"].as_u64() >= Some(1)
            && c["groups_removed_total"].as_u64() >= Some(1);
        writeln!(
            out,
            "  {}",
            if ok {
                "OK: found, put in its group with limits, and the group removed when it ended"
            } else {
                "PROBLEM: the ffmpeg process was not governed, or its group was not removed"
            }
        )?;
        Ok(ok)
    }

    fn cleanup(&mut self) {
        if let Some(cg) = &self.cgroups {
            if cg.real {
                let _ = std::fs::remove_dir(&cg.root);
            }
        }
    }
}

/// Camera storage on a small disk budget: expired frames, an old
/// TMPPOINTING directory, orphaned metadata, a program's log to rotate, a
/// job, and a camera that keeps writing until the emergency cleanup has to
/// make room, oldest first, keeping the newest.
struct Disk {
    frames: u64,
    next_at: f64,
}

/// Frames are this big, on a quota of `DISK_QUOTA_KB`.
const FRAME_BYTES: usize = 50_000;
const DISK_QUOTA_KB: u64 = 3000;
/// The newest live frames emergency must keep.
const LIVE_KEEP: u64 = 10;

impl Disk {
    fn new() -> Disk {
        Disk {
            frames: 0,
            next_at: 0.0,
        }
    }

    fn frame(&mut self, dir: &Path, age_secs: u64) -> io::Result<()> {
        let p = dir.join(format!("storage/live/frame_{:06}.jpg", self.frames));
        std::fs::write(&p, vec![0xa5u8; FRAME_BYTES])?;
        set_age(&p, age_secs)?;
        self.frames += 1;
        Ok(())
    }
}

fn set_age(p: &Path, age_secs: u64) -> io::Result<()> {
    let t = std::time::SystemTime::now() - Duration::from_secs(age_secs);
    std::fs::File::open(p)?.set_modified(t)
}

impl Part for Disk {
    fn config(&self) -> String {
        format!(
            r#""storage": {{
    "check_every": "1s",
    "mounts": [ {{ "path": "storage", "quota": "{DISK_QUOTA_KB}KB" }} ],
    "emergency": {{ "at_used": 90, "until_used": 70 }},
    "retention": [
      {{ "name": "processed", "root": "storage/processed", "match": ["*.jpg"], "max_age": "72h", "priority": 0 }},
      {{ "name": "live", "root": "storage/live", "match": ["*.jpg"], "max_age": "24h", "emergency_keep": {LIVE_KEEP}, "priority": 1 }},
      {{ "name": "tmppointing", "root": "storage/pointing", "match": ["TMPPOINTING*"], "kind": "dir", "depth": 1, "max_age": "24h", "emergency_keep": 1, "priority": 2 }}
    ],
    "orphans": [ {{ "dir": "storage/meta", "companion_dir": "storage/live", "companion_ext": ".jpg", "min_age": "1h" }} ],
    "jobs": [ {{ "name": "backup", "every": "2s", "command": ["/bin/sh", "-c", "echo backing up the metadata of the day"] }} ]
  }}"#
        )
    }

    fn prepare(&mut self, dir: &Path) -> io::Result<()> {
        for d in [
            "live",
            "processed",
            "meta",
            "pointing/TMPPOINTING_0815/scan",
        ] {
            std::fs::create_dir_all(dir.join("storage").join(d))?;
        }
        // 20 live frames an hour apart: the 5 older than a day expire.
        for i in 0..20u64 {
            self.frame(dir, (29 - i) * 3600)?;
        }
        // Processed frames, all younger than their 72 h: only an
        // emergency deletes them.
        for i in 0..20u64 {
            let p = dir.join(format!("storage/processed/done_{i:04}.jpg"));
            std::fs::write(&p, vec![0x5au8; FRAME_BYTES])?;
            set_age(&p, (50 - i) * 3600)?;
        }
        // Metadata: one per young frame, and two whose frames are gone.
        for i in 10..20u64 {
            std::fs::write(dir.join(format!("storage/meta/frame_{i:06}.json")), "{}")?;
        }
        for name in ["frame_900001.json", "frame_900002.json"] {
            let p = dir.join("storage/meta").join(name);
            std::fs::write(&p, "{}")?;
            set_age(&p, 2 * 3600)?;
        }
        // A pointing run from three days ago, and one still being written.
        let old = dir.join("storage/pointing/TMPPOINTING_0815");
        std::fs::write(old.join("scan/table.dat"), "old")?;
        for p in [old.join("scan/table.dat"), old.join("scan"), old.clone()] {
            set_age(&p, 3 * 86_400)?;
        }
        std::fs::create_dir_all(dir.join("storage/pointing/TMPPOINTING_now"))?;
        std::fs::write(
            dir.join("storage/pointing/TMPPOINTING_now/table.dat"),
            "new",
        )?;
        Ok(())
    }

    fn tick(&mut self, dir: &Path, elapsed: f64) -> io::Result<()> {
        // The camera: 10 frames a second, 500 KB/s into a 3 MB budget.
        if elapsed >= self.next_at {
            self.next_at = elapsed + 0.1;
            self.frame(dir, 0)?;
        }
        Ok(())
    }

    fn summary(
        &self,
        dir: &Path,
        status: &serde_json::Value,
        out: &mut dyn io::Write,
    ) -> io::Result<bool> {
        let st = &status["services"]["storage"];
        let c = &st["counters"];
        let d = &st["details"];
        writeln!(
            out,
            "storage: camera storage on a {} KB budget, a camera writing 500 KB/s into it",
            DISK_QUOTA_KB
        )?;
        let live: Vec<String> = std::fs::read_dir(dir.join("storage/live"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let newest_kept = (self.frames.saturating_sub(LIVE_KEEP)..self.frames)
            .all(|i| live.contains(&format!("frame_{i:06}.jpg")));
        let expired_gone = (0..5).all(|i| !live.contains(&format!("frame_{i:06}.jpg")));
        let old_gone = !dir.join("storage/pointing/TMPPOINTING_0815").exists();
        let young_kept = dir
            .join("storage/pointing/TMPPOINTING_now/table.dat")
            .exists();
        let pointing_ok = old_gone && young_kept;
        let orphans_ok = !dir.join("storage/meta/frame_900001.json").exists()
            && !dir.join("storage/meta/frame_900002.json").exists();
        writeln!(
            out,
            "  retention: {} expired entries deleted ({} bytes); TMPPOINTING_0815 (3 days old) {}; TMPPOINTING_now (being written) {}",
            c["files_deleted_total"],
            c["bytes_freed_total"],
            if old_gone {
                "removed whole"
            } else {
                "STILL THERE"
            },
            if young_kept { "kept" } else { "GONE" }
        )?;
        writeln!(
            out,
            "  orphans: {} metadata files without a frame deleted",
            c["orphans_deleted_total"]
        )?;
        let last = &d["emergency"]["last"];
        writeln!(
            out,
            "  emergency: {} run(s); the last took {} from {} % to {} %, deleting {} entries (processed first, then the oldest live frames, always keeping the newest {LIVE_KEEP})",
            c["emergencies_total"],
            d["mounts"][0]["path"]
                .as_str()
                .map_or("?", |p| p.rsplit('/').next().unwrap_or(p)),
            last["from_percent"],
            last["to_percent"],
            last["deleted"]
        )?;
        let job = d["jobs"].get(0).cloned().unwrap_or_default();
        writeln!(
            out,
            "  jobs: backup ran {} time(s), last {}",
            job["runs"],
            job["last_outcome"].as_str().unwrap_or("-")
        )?;
        let emergency_ok = c["emergencies_total"].as_u64() >= Some(1) && last["reached"] == true;
        let ok = newest_kept && expired_gone && pointing_ok && orphans_ok && emergency_ok;
        writeln!(
            out,
            "  {}",
            if ok {
                "OK: exactly the expired and orphaned went, the emergency kept to its order and kept the newest frames"
            } else {
                "PROBLEM: something expired was kept, something young went, or the emergency did not make room"
            }
        )?;
        Ok(ok)
    }
}

/// Matching logs still under `root`, outside `target` and `.git`.
fn count_matching(root: &Path, target: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d == target || d.ends_with(".git") {
            continue;
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() && name.starts_with("casa-") && name.ends_with(".log") => {
                    n += 1
                }
                _ => {}
            }
        }
    }
    n
}

/// Runs the demo: prepares `dir`, runs the daemon for `seconds`, prints what
/// happened to `out`. Returns false if a part found a problem.
pub fn run(dir: &Path, seconds: u64, out: &mut dyn io::Write) -> io::Result<bool> {
    let dir = std::path::absolute(dir)?;
    // The camera needs room for a frozen stretch and a 1.5 s stall.
    let seconds = if seconds < MIN_SECONDS {
        writeln!(
            out,
            "(running {MIN_SECONDS} s, the shortest demo in which every part shows)"
        )?;
        MIN_SECONDS
    } else {
        seconds
    };
    fresh_sandbox(&dir)?;
    let mut parts: Vec<Box<dyn Part>> = vec![
        Box::new(Logs::new()),
        Box::new(Camera::new()),
        Box::new(Ffmpeg::new(seconds)),
        Box::new(Disk::new()),
    ];
    // Parts that decide their config from the machine look first.
    for p in &mut parts {
        p.prepare(&dir)?;
    }
    let config = format!(
        "// Written by `edgekeeper demo` for this sandbox.\n{{\n  \"state_dir\": \"state\",\n  \"run_dir\": \"run\",\n  \"status_every\": \"1s\",\n  \"log\": {{ \"file\": \"log/edgekeeper.log\", \"level\": \"info\" }},\n  \"alerts\": {{ \"dir\": \"alerts\", \"cooldown\": \"1m\" }},\n  {}\n}}\n",
        parts
            .iter()
            .map(|p| p.config())
            .collect::<Vec<_>>()
            .join(",\n  ")
    );
    let config_path = dir.join("edgekeeper.json");
    std::fs::write(&config_path, config)?;
    writeln!(out, "edgekeeper demo in {} for {seconds} s", dir.display())?;
    writeln!(out, "  config: {}", config_path.display())?;
    writeln!(
        out,
        "  field log: {}",
        dir.join("log/edgekeeper.log").display()
    )?;
    let mut daemon = start_daemon(&dir, &config_path)?;
    let started = Instant::now();
    let ready = wait_until(Duration::from_secs(30), || {
        read_status(&dir).is_some_and(|s| s["running"] == true)
    });
    if !ready {
        let _ = daemon.kill();
        let _ = daemon.wait();
        for p in &mut parts {
            let _ = p.finish(&dir);
            p.cleanup();
        }
        return Err(io::Error::other(format!(
            "the daemon did not start; see {}",
            dir.join("daemon.stderr").display()
        )));
    }
    writeln!(
        out,
        "  daemon running (pid {}), ready after {} ms; making work...",
        daemon.id(),
        started.elapsed().as_millis()
    )?;
    let begin = Instant::now();
    let mut last_report = 0;
    while begin.elapsed() < Duration::from_secs(seconds) {
        let t = begin.elapsed().as_secs_f64();
        for p in &mut parts {
            p.tick(&dir, t)?;
        }
        if t as u64 >= last_report + 2 {
            last_report = t as u64;
            if let Some(s) = read_status(&dir) {
                let svc = &s["services"];
                writeln!(
                    out,
                    "  {:>3} s: relocate {} ({} moved); frames {} ({} analysed, {:.1} fps)",
                    last_report,
                    svc["relocate"]["health"].as_str().unwrap_or("?"),
                    svc["relocate"]["counters"]["files_moved_total"],
                    svc["frames"]["health"].as_str().unwrap_or("?"),
                    svc["frames"]["counters"]["frames_analysed_total"],
                    svc["frames"]["details"][0]["fps"].as_f64().unwrap_or(0.0)
                )?;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &mut parts {
        p.finish(&dir)?;
    }
    // Give the last events (and a sweep) time to land, then stop.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let exit = daemon.wait()?;
    let status = read_status(&dir).unwrap_or_default();
    writeln!(out, "\ndaemon stopped ({exit}); what happened:")?;
    let mut ok = exit.success();
    for p in &mut parts {
        ok &= p.summary(&dir, &status, out)?;
        p.cleanup();
    }
    let alerts = &status["alerts"];
    writeln!(
        out,
        "alerts: {} raised, {} suppressed by cooldown (files in {})",
        alerts["raised"],
        alerts["suppressed"],
        dir.join("alerts").display()
    )?;
    writeln!(
        out,
        "status snapshot: {}",
        dir.join("run/status.json").display()
    )?;
    writeln!(
        out,
        "metrics: {}",
        dir.join("run/edgekeeper.prom").display()
    )?;
    Ok(ok)
}

fn fresh_sandbox(dir: &Path) -> io::Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !empty && !dir.join(MARKER).exists() {
            return Err(io::Error::other(format!(
                "{} exists and is not an edgekeeper demo sandbox: choose another --dir",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(MARKER),
        format!(
            "made by edgekeeper demo at {}\n",
            WallTime::now().iso_secs()
        ),
    )
}

fn start_daemon(dir: &Path, config: &Path) -> io::Result<Child> {
    let exe: PathBuf = std::env::current_exe()?;
    let stderr = std::fs::File::create(dir.join("daemon.stderr"))?;
    Command::new(exe)
        .arg("--config")
        .arg(config)
        .arg("run")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
}

fn read_status(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(dir.join("run/status.json")).ok()?).ok()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
