//! Crash safety of cross-device moves: the daemon is killed with SIGKILL at
//! a random moment while it copies files from disk to tmpfs, 50 times.
//! After every kill each file must be whole at its source or in the target
//! (or both), never partial under a final name; after a restart everything
//! arrives and the target holds nothing that is not a whole original.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Sandbox, wait_for};

fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().unwrap().is_file())
                // A file moved away between the listing and the read is
                // simply not here any more.
                .filter_map(|e| {
                    Some((
                        e.file_name().into_string().unwrap(),
                        std::fs::read(e.path()).ok()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigkill_at_random_points_never_loses_or_tears_a_file() {
    let sb = Sandbox::new("crash");
    let shm = Path::new("/dev/shm");
    if !shm.exists()
        || std::fs::metadata(shm).unwrap().dev() == std::fs::metadata(&sb.dir).unwrap().dev()
    {
        eprintln!("skipping: no tmpfs at /dev/shm on another file system");
        return;
    }
    let target = shm.join(format!("edgekeeper-crash-{}", std::process::id()));
    let mut seed: u64 = 0x5eed_1234_abcd_0001;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    let mut torn_runs = Vec::new();
    let mut duplicates = 0;
    let mut interrupted = 0;
    for run in 0..50 {
        let _ = std::fs::remove_dir_all(sb.path("data"));
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(sb.path("data/sub")).unwrap();
        let mut originals = BTreeMap::new();
        for i in 0..20 {
            let len = 256 * 1024 + (next() as usize % (1536 * 1024));
            let name = format!("casa-{run}-{i}.log");
            // Distinct per file and per position, so a torn copy shows.
            let block: Vec<u8> = (0..4096u32)
                .map(|j| (j as u8) ^ (run as u8).wrapping_mul(31) ^ (i as u8))
                .collect();
            let mut content = name.clone().into_bytes();
            while content.len() < len {
                content.extend_from_slice(&block);
                content.extend_from_slice(&(content.len() as u64).to_le_bytes());
            }
            std::fs::write(sb.path("data/sub").join(&name), &content).unwrap();
            originals.insert(name, content);
        }
        sb.write_config(&format!(
            r#""relocate": [{{"name": "casa", "root": "data", "match": ["casa-*.log"], "target": "{}"}}]"#,
            target.display()
        ));
        // Logs written a moment ago may still be getting their writer, so
        // the daemon leaves a file younger than a second for its close
        // event; these are settled logs found at start.
        std::thread::sleep(Duration::from_millis(1100));
        let mut child = sb.command(&["run"]).stderr(Stdio::null()).spawn().unwrap();
        // The target appears when the daemon starts relocating: kill it at
        // a random point of the next few milliseconds of copying.
        let started = std::time::Instant::now();
        while !target.exists() && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_micros(next() % 20_000));
        child.kill().unwrap();
        child.wait().unwrap();

        let at_source = contents(&sb.path("data/sub"));
        let at_target = contents(&target);
        if !at_source.is_empty() && !at_target.is_empty() {
            interrupted += 1;
        }
        for (name, content) in &at_target {
            if name.starts_with(".edgekeeper-partial-") {
                continue; // only where O_TMPFILE is missing; cleaned at start
            }
            let original = originals
                .get(name)
                .unwrap_or_else(|| panic!("run {run}: unknown file {name} in target"));
            if content != original {
                torn_runs.push(format!(
                    "run {run}: {name} is partial in the target ({} of {} bytes)",
                    content.len(),
                    original.len()
                ));
            }
        }
        for (name, original) in &originals {
            let whole_at_source = at_source.get(name) == Some(original);
            let whole_at_target = at_target.get(name) == Some(original);
            assert!(
                whole_at_source || whole_at_target,
                "run {run}: {name} is whole nowhere"
            );
            if let Some(c) = at_source.get(name) {
                assert_eq!(c, original, "run {run}: {name} damaged at its source");
            }
        }

        // Restarted, the daemon finishes the job.
        let daemon = sb.start();
        let done = wait_for(Duration::from_secs(30), || {
            contents(&sb.path("data/sub")).is_empty()
        });
        assert!(done.is_some(), "run {run}: sources left after restart");
        assert_eq!(daemon.stop().0, 0);
        let after = contents(&target);
        assert!(
            !after.keys().any(|k| k.starts_with(".edgekeeper-partial-")),
            "run {run}: partials not cleaned"
        );
        for (name, original) in &originals {
            let copies = after.values().filter(|c| *c == original).count();
            assert!(copies >= 1, "run {run}: {name} lost");
            duplicates += copies - 1;
        }
        for (name, content) in &after {
            assert!(
                originals.values().any(|o| o == content),
                "run {run}: {name} is not a whole original"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&target);
    assert!(torn_runs.is_empty(), "{torn_runs:#?}");
    // A kill between linking the copy and unlinking the source leaves the
    // file in both places; the restart then moves the source as `.1`.
    eprintln!(
        "{interrupted} of 50 kills landed mid-relocation; {duplicates} file(s) ended up twice (killed between link and unlink)"
    );
}
