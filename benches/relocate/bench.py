#!/usr/bin/env python3
"""Benchmark of edgekeeper's relocate service against the tools it replaces.

Runs, on the same tree in the same run:
  - edgekeeper (the real release binary, `run` with a relocate rule),
  - the field's inotifywait pipeline:
        inotifywait -m -r -e create -e moved_to ... | while read f; do mv ...; done
  - a Python watchdog Observer doing shutil.move (the "CASA log daemon"),
  - a bare os.rename loop over the same files (the physical limit),
and prints, for each: (a) time to ready and RSS after ready, (b) drain: the
mover stopped with SIGSTOP while N matching files are created across the
tree, then SIGCONT, time until all are in the target and the CPU seconds its
whole process tree spent, (c) latency p50/p99 of files created 20 ms apart.
Then the ratios against the targets of issue 3.

Usage: bench.py --bin target/release/edgekeeper [--dirs 10000] [--files-per-dir 22]
                [--drain 10000] [--latency 200] [--work DIR]
"""
import argparse
import ctypes
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# ---- helpers -----------------------------------------------------------


def build_tree(root, dirs, files_per_dir):
    """root/dNNN/eNNN leaf directories with non-matching files in each."""
    tops = max(1, int(dirs ** 0.5))
    per_top = (dirs + tops - 1) // tops
    leaves = []
    for t in range(tops):
        for e in range(per_top):
            if len(leaves) == dirs:
                break
            d = os.path.join(root, f"d{t:03d}", f"e{e:03d}")
            os.makedirs(d, exist_ok=True)
            for f in range(files_per_dir):
                fd = os.open(os.path.join(d, f"frame_{f:03d}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644)
                os.close(fd)
            leaves.append(d)
    return leaves


def group_cpu(pgid):
    """CPU seconds of every process in the group, including reaped children."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) != pgid:
            continue
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        total += utime + stime + cutime + cstime
    return total / CLK_TCK


def group_rss(pgid):
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2:].split()[2]) != pgid:
                continue
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


def count(dirpath):
    try:
        return len(os.listdir(dirpath))
    except FileNotFoundError:
        return 0


def wait_arrivals(watch, n, timeout, stall=60):
    """Waits until `n` files arrived, or `timeout` passed, or nothing arrived
    for `stall` seconds (a mover that lost events never finishes)."""
    end = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while time.monotonic() < end:
        got = len(watch.arrived)
        if got >= n:
            return True
        if got != last:
            last, last_change = got, time.monotonic()
        elif time.monotonic() - last_change > stall:
            return False
        time.sleep(0.005)
    return False


class TargetWatch:
    """Timestamps arrivals in the target with inotify (ctypes, no deps)."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, target):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        libc.inotify_add_watch(self.fd, target.encode(), self.IN_CREATE | self.IN_MOVED_TO)
        self.arrived = {}
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if not r:
                continue
            now = time.monotonic()
            buf = os.read(self.fd, 65536)
            i = 0
            while i + 16 <= len(buf):
                _, _, _, ln = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + ln].rstrip(b"\0").decode()
                self.arrived.setdefault(name, now)
                i += 16 + ln

    def close(self):
        self.stop = True
        self.thread.join()
        os.close(self.fd)


def percentile(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))
    return v[k]


# ---- the movers ---------------------------------------------------------


class Mover:
    name = "?"

    def __init__(self, root, target, work):
        self.root, self.target, self.work = root, target, work
        self.proc = None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Edgekeeper(Mover):
    name = "edgekeeper"

    def __init__(self, root, target, work, binary):
        super().__init__(root, target, work)
        self.binary = binary

    def start(self):
        cfg = os.path.join(self.work, "edgekeeper.json")
        with open(cfg, "w") as f:
            f.write(f"""{{"state_dir": "ek-state", "run_dir": "ek-run", "status_every": "10s",
  "log": {{"file": null, "level": "warn"}},
  "limits": {{"max_watches": 200000}},
  "relocate": [{{"name": "bench", "root": "{self.root}", "match": ["casa-*.log"],
                 "target": "{self.target}", "exclude": ["state"], "sweep_every": "5m", "sweep_every_busy": "1m"}}]}}""")
        sock_path = os.path.join(self.work, "notify.sock")
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        t0 = time.monotonic()
        self.proc = subprocess.Popen([self.binary, "--config", cfg, "run"], env=env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sock.settimeout(300)
        while True:
            msg = sock.recv(4096).decode()
            if "READY=1" in msg.split("\n"):
                break
        ready = time.monotonic() - t0
        sock.close()
        return ready


class Pipeline(Mover):
    name = "inotifywait|mv"

    def start(self):
        script = (
            f'inotifywait -m -r -e create -e moved_to --exclude "^{self.target}" --format "%w%f" "{self.root}" '
            f'| while IFS= read -r f; do case "${{f##*/}}" in casa-*.log) mv -n "$f" "{self.target}"/ ;; esac; done'
        )
        t0 = time.monotonic()
        self.proc = subprocess.Popen(["bash", "-c", script], start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if "Watches established" in line:
                break
        ready = time.monotonic() - t0
        threading.Thread(target=lambda: self.proc.stderr.read(), daemon=True).start()
        return ready


WATCHDOG_SCRIPT = r'''
import fnmatch, os, shutil, sys
from watchdog.observers import Observer
from watchdog.events import FileSystemEventHandler
root, target = sys.argv[1], sys.argv[2]
class Mover(FileSystemEventHandler):
    def on_created(self, e):
        if not e.is_directory: self.move(e.src_path)
    def on_moved(self, e):
        if not e.is_directory: self.move(e.dest_path)
    def move(self, p):
        if p.startswith(target): return
        name = os.path.basename(p)
        if fnmatch.fnmatch(name, "casa-*.log"):
            try: shutil.move(p, os.path.join(target, name))
            except FileNotFoundError: pass
obs = Observer()
obs.schedule(Mover(), root, recursive=True)
obs.start()
print("ready", flush=True)
obs.join()
'''


class Watchdog(Mover):
    name = "python watchdog"

    def start(self):
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", WATCHDOG_SCRIPT, self.root, self.target],
                                     start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.proc.stdout.readline()
        return time.monotonic() - t0


# ---- scenarios -----------------------------------------------------------


def make_matching(leaves, n, tag):
    paths = []
    for i in range(n):
        d = leaves[(i * 7919) % len(leaves)]
        p = os.path.join(d, f"casa-{tag}-{i}.log")
        with open(p, "w") as f:
            f.write(f"log {tag} {i}\n")
        paths.append(p)
    return paths


def reset_target(target):
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)


def run_mover(mover, leaves, args):
    reset_target(mover.target)
    ready = mover.start()
    time.sleep(0.5)
    rss = group_rss(mover.proc.pid)
    pgid = mover.proc.pid
    # (b) drain
    os.killpg(pgid, signal.SIGSTOP)
    make_matching(leaves, args.drain, "drain")
    watch = TargetWatch(mover.target)
    cpu0 = group_cpu(pgid)
    t0 = time.monotonic()
    os.killpg(pgid, signal.SIGCONT)
    done = wait_arrivals(watch, args.drain, args.timeout)
    drain_s = (max(watch.arrived.values()) - t0) if done else float("inf")
    time.sleep(0.2)
    cpu = group_cpu(pgid) - cpu0
    watch.close()
    arrived = count(mover.target)
    # (c) latency
    reset_target_contents(mover.target)
    watch = TargetWatch(mover.target)
    created = {}
    for i in range(args.latency):
        d = leaves[(i * 104729) % len(leaves)]
        name = f"casa-live-{i}.log"
        with open(os.path.join(d, name), "w") as f:
            f.write("live\n")
        created[name] = time.monotonic()
        time.sleep(0.02)
    time.sleep(1.0)
    watch.close()
    lat = [(watch.arrived[n] - t) * 1000 for n, t in created.items() if n in watch.arrived]
    mover.stop()
    # Sweep up whatever a mover left behind so the next starts clean.
    for d in leaves:
        for name in os.listdir(d):
            if name.startswith("casa-"):
                os.unlink(os.path.join(d, name))
    return {
        "ready_s": ready, "rss": rss, "drain_s": drain_s,
        "drained": arrived, "cpu_s": cpu, "lat": lat, "lost_live": args.latency - len(lat),
    }


def reset_target_contents(target):
    for name in os.listdir(target):
        os.unlink(os.path.join(target, name))


def bare_rename(leaves, target, n):
    reset_target(target)
    paths = make_matching(leaves, n, "bare")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    for p in paths:
        os.rename(p, os.path.join(target, os.path.basename(p)))
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dirs", type=int, default=10000)
    ap.add_argument("--files-per-dir", type=int, default=22)
    ap.add_argument("--drain", type=int, default=10000)
    ap.add_argument("--latency", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--work", default="/tmp/edgekeeper-bench")
    ap.add_argument("--only", default="", help="comma list: edgekeeper,pipeline,watchdog")
    args = ap.parse_args()

    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    root = os.path.join(work, "tree")
    target = os.path.join(root, "state", "logs")
    os.makedirs(target)
    t0 = time.monotonic()
    leaves = build_tree(root, args.dirs, args.files_per_dir)
    print(f"tree: {len(leaves)} leaf directories, {len(leaves) * args.files_per_dir} files "
          f"(built in {time.monotonic() - t0:.1f} s); drain {args.drain} files; latency {args.latency} files 20 ms apart",
          flush=True)

    movers = [Edgekeeper(root, target, work, os.path.abspath(args.bin)), Pipeline(root, target, work)]
    try:
        import watchdog  # noqa: F401
        movers.append(Watchdog(root, target, work))
    except ImportError:
        print("python watchdog not installed: skipping it (pip install watchdog)")
    if not shutil.which("inotifywait"):
        print("inotifywait not installed: skipping the pipeline (apt-get install inotify-tools)")
        movers = [m for m in movers if m.name != "inotifywait|mv"]
    if args.only:
        keep = {"edgekeeper": "edgekeeper", "pipeline": "inotifywait|mv", "watchdog": "python watchdog"}
        wanted = {keep[k] for k in args.only.split(",")}
        movers = [m for m in movers if m.name in wanted]

    results = {}
    for m in movers:
        print(f"running {m.name} ...", flush=True)
        try:
            results[m.name] = run_mover(m, leaves, args)
        finally:
            m.stop()
    bare_wall, bare_cpu = bare_rename(leaves, target, args.drain)

    print()
    print(f"{'mover':<16} {'ready s':>8} {'RSS MiB':>8} {'drain s':>8} {'files/s':>9} {'CPU s':>7} {'CPU µs/file':>12} {'p50 ms':>7} {'p99 ms':>7} {'lost':>5}")
    for name, r in results.items():
        fps = args.drain / r["drain_s"] if r["drain_s"] not in (0, float("inf")) else 0
        print(f"{name:<16} {r['ready_s']:>8.2f} {r['rss'] / 2**20:>8.1f} {r['drain_s']:>8.2f} {fps:>9.0f} "
              f"{r['cpu_s']:>7.2f} {r['cpu_s'] / args.drain * 1e6:>12.1f} {percentile(r['lat'], 50):>7.2f} "
              f"{percentile(r['lat'], 99):>7.2f} {args.drain - r['drained'] + r['lost_live']:>5}")
    print(f"{'bare rename':<16} {'':>8} {'':>8} {bare_wall:>8.2f} {args.drain / bare_wall:>9.0f} {bare_cpu:>7.2f} {bare_cpu / args.drain * 1e6:>12.1f}")

    ek = results.get("edgekeeper")
    if not ek:
        return 0
    fps = lambda r: args.drain / r["drain_s"] if r["drain_s"] not in (0, float("inf")) else 0.0
    checks = []
    pipe = results.get("inotifywait|mv")
    wd = results.get("python watchdog")
    if pipe:
        checks.append(("drain files/s vs pipeline", fps(ek) / max(fps(pipe), 1e-9), ">= 30x", fps(ek) >= 30 * fps(pipe)))
        checks.append(("CPU per file vs pipeline (lower)", pipe["cpu_s"] / max(ek["cpu_s"], 1e-9), ">= 20x", pipe["cpu_s"] >= 20 * ek["cpu_s"]))
        checks.append(("time to ready vs inotifywait", ek["ready_s"] / max(pipe["ready_s"], 1e-9), "<= 1x", ek["ready_s"] <= pipe["ready_s"]))
        checks.append(("RSS vs pipeline", ek["rss"] / max(pipe["rss"], 1), "< 1x", ek["rss"] < pipe["rss"]))
    if wd and fps(wd) > 0:
        checks.append(("drain files/s vs watchdog", fps(ek) / fps(wd), ">= 5x", fps(ek) >= 5 * fps(wd)))
    elif wd:
        print(f"note: python watchdog never finished the drain: it lost {args.drain - wd['drained']} of {args.drain} files")
    if wd:
        checks.append(("RSS vs watchdog", ek["rss"] / max(wd["rss"], 1), "< 1x", ek["rss"] < wd["rss"]))
    checks.append(("CPU per file vs bare rename", ek["cpu_s"] / max(bare_cpu, 1e-9), "<= 3x", ek["cpu_s"] <= 3 * bare_cpu))
    checks.append(("latency p99 ms", percentile(ek["lat"], 99), "< 2", percentile(ek["lat"], 99) < 2))
    checks.append(("files lost", args.drain - ek["drained"] + ek["lost_live"], "0", ek["drained"] == args.drain and ek["lost_live"] == 0))
    print()
    for what, value, target, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {what:<34} {value:>10.2f}   target {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
