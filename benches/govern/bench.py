#!/usr/bin/env python3
"""govern's /proc scan against pgrep and a Python /proc scan, same run.

What it is: starts 1,000 sleeping processes (plus one copy of sleep named
ffmpeg, so there is something to find), runs the real release binary with
a govern block of 3 targets and a 1 s scan, and reads the time of its scans
from its own status counters (scan_time_microseconds_total / scans_total,
start-up scan excluded). In the same run it times `pgrep -x ffmpeg` and a
Python scan reading comm, stat and status of every pid, and prints the
ratios. Then it measures discovery through the proc connector: exec of a
target to the daemon's discovery (its discovery_latency_*_microseconds,
taken from the kernel's event timestamp) and to the process's group
appearing on disk, as seen from outside.
What it is not: a test. Numbers depend on the machine; run it on an idle one.

Usage: benches/govern/run.sh (builds the release binary first), or
  python3 benches/govern/bench.py path/to/edgekeeper [processes]
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["ffmpeg", "gst-launch-1.0", "camera-recorder-main"]


def python_scan():
    """What a Python watcher does: comm, stat and status of every pid."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm") as f:
                comm = f.read().rstrip("\n")
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        if comm in TARGETS:
            start = stat[stat.rfind(")") + 2 :].split()[19]
            uid = next(l for l in status.splitlines() if l.startswith("Uid:"))
            found.append((int(name), comm, start, uid))
    return found


def timed(f, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def status(run_dir, pid):
    os.kill(pid, signal.SIGUSR1)
    time.sleep(0.3)
    with open(os.path.join(run_dir, "status.json")) as f:
        return json.load(f)["services"]["govern"]


def main():
    binary = os.path.abspath(sys.argv[1])
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    work = tempfile.mkdtemp(prefix="edgekeeper-bench-")
    sleep = shutil.which("sleep")
    ffmpeg = os.path.join(work, "ffmpeg")
    shutil.copy(sleep, ffmpeg)
    children = []
    daemon = None
    try:
        for _ in range(count):
            children.append(subprocess.Popen([sleep, "3600"]))
        children.append(subprocess.Popen([ffmpeg, "3600"], cwd="/"))
        procs = sum(1 for n in os.listdir("/proc") if n.isdigit())
        config = os.path.join(work, "edgekeeper.json")
        with open(config, "w") as f:
            json.dump(
                {
                    "state_dir": "state",
                    "run_dir": "run",
                    "status_every": "10s",
                    "log": {"file": None, "level": "warn"},
                    "govern": {
                        "cgroup_root": "cgroupfs",
                        "scan_every": "1s",
                        "filters": {"min_runtime": "0s", "blocked_uids": [], "blocked_dirs": []},
                        "targets": [{"comm": t} for t in TARGETS],
                    },
                },
                f,
            )
        daemon = subprocess.Popen(
            [binary, "--config", config, "run"], stderr=subprocess.DEVNULL
        )
        run_dir = os.path.join(work, "run")
        deadline = time.time() + 20
        while not os.path.exists(os.path.join(run_dir, "status.json")):
            if time.time() > deadline:
                sys.exit("edgekeeper did not start")
            time.sleep(0.05)
        time.sleep(1.5)
        first = status(run_dir, daemon.pid)["counters"]
        time.sleep(10)
        later = status(run_dir, daemon.pid)
        c = later["counters"]
        scans = c["scans_total"] - first["scans_total"]
        ek = (c["scan_time_microseconds_total"] - first["scan_time_microseconds_total"]) / scans / 1e6
        ek_last = c["scan_last_microseconds"] / 1e6

        pgrep = shutil.which("pgrep")
        t_pgrep, t_pgrep_min = timed(
            lambda: subprocess.run([pgrep, "-x", "ffmpeg"], stdout=subprocess.DEVNULL), 30
        )
        t_true, _ = timed(lambda: subprocess.run(["true"]), 30)
        t_py, t_py_min = timed(python_scan, 10)

        print(f"processes in /proc: {procs} ({count} sleeping + 1 ffmpeg + the machine's own)")
        print(f"targets: {len(TARGETS)}; discovery: {later['details']['discovery']}")
        print(f"edgekeeper scan (mean of {scans} scans): {ek * 1e3:8.3f} ms  (last {ek_last * 1e3:.3f} ms)")
        print(f"pgrep -x ffmpeg (median of 30 runs):  {t_pgrep * 1e3:8.3f} ms  (min {t_pgrep_min * 1e3:.3f} ms; "
              f"starting a process alone, `true`: {t_true * 1e3:.3f} ms)")
        print(f"Python scan, comm+stat+status (median of 10): {t_py * 1e3:8.3f} ms  (min {t_py_min * 1e3:.3f} ms)")
        print(f"ratio pgrep / edgekeeper:  {t_pgrep / ek:6.1f}x   (target: >= 1)")
        print(f"ratio (pgrep - true) / edgekeeper: {(t_pgrep - t_true) / ek:6.1f}x   (pgrep's scan without its start-up)")
        print(f"ratio Python / edgekeeper: {t_py / ek:6.1f}x   (target: >= 10)")

        if later["details"]["discovery"] != "proc_connector":
            print("proc connector: not available here; discovery latency not measured")
            return
        seen = []
        groups = os.path.join(work, "cgroupfs")
        for _ in range(20):
            t = time.perf_counter()
            p = subprocess.Popen([ffmpeg, "3600"], cwd="/")
            children.append(p)
            procs_file = os.path.join(groups, f"ffmpeg-{p.pid}", "cgroup.procs")
            while not os.path.exists(procs_file):
                if time.perf_counter() - t > 5:
                    break
                time.sleep(0.0002)
            seen.append(time.perf_counter() - t)
            time.sleep(0.05)
        g = status(run_dir, daemon.pid)["counters"]
        print(f"connector: exec to discovery (kernel timestamp to handled), last {g['discovery_latency_last_microseconds']} us, "
              f"max {g['discovery_latency_max_microseconds']} us (target: < 10 ms)")
        print(f"connector: spawn to group on disk, seen from outside, 20 execs: median {statistics.median(seen) * 1e3:.2f} ms, "
              f"max {max(seen) * 1e3:.2f} ms")
    finally:
        if daemon:
            daemon.terminate()
            daemon.wait()
        for p in children:
            p.kill()
        for p in children:
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
