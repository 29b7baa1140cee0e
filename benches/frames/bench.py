#!/usr/bin/env python3
"""Benchmark of edgekeeper's frames service against a Python frame monitor.

The Python monitor is what runs beside ffmpeg in the field: inotify
(inotify_simple) on the capture directory, and for every frame renamed into
place: read it, check the JPEG markers and find its size, hash it, write a
JSON sidecar (temporary name, then rename). edgekeeper does the same work.
Both run on the same kind of frames in the same run:

  (a) drain: the monitor is stopped with SIGSTOP while N frames of about
      100 KB are written as temp + rename, then SIGCONT; time until every
      sidecar exists, and the CPU seconds the monitor spent;
  (b) live: 4 cameras at 30 fps for S seconds: latency rename -> sidecar
      (p50, p99) and CPU % of one core.

The drain is run --drain-repeat times (default 3), the two monitors taking
turns at going first, and the medians are reported: on ext4 the first run
after many deletions pays for the kernel's recently-deleted inode scan on
every file it creates, which would otherwise land on whichever monitor ran
first. The work directory is under /tmp, or /dev/shm when /tmp is mounted
with online discard (as benches/storage does, and for the same reason).

Usage: bench.py --bin PATH [--frames 2000] [--live-seconds 60]
                [--drain-repeat 3] [--work DIR]
"""
import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import select
import ctypes
import importlib.util
import statistics


def _storage_bench():
    """benches/storage/bench.py, for its choice of scratch file system."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "storage", "bench.py")
    spec = importlib.util.spec_from_file_location("storage_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

CLK_TCK = os.sysconf("SC_CLK_TCK")

PY_MONITOR = r'''
import hashlib, json, os, sys, time
from inotify_simple import INotify, flags
dirs = sys.argv[1:]
ino = INotify()
wds = {ino.add_watch(d, flags.MOVED_TO | flags.CLOSE_WRITE): d for d in dirs}
def size_of(head):
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF: return 0, 0
        m = head[i + 1]
        if m in (0xD8, 0x01) or 0xD0 <= m <= 0xD7: i += 2; continue
        ln = (head[i + 2] << 8) | head[i + 3]
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            return (head[i + 7] << 8) | head[i + 8], (head[i + 5] << 8) | head[i + 6]
        if m == 0xDA: return 0, 0
        i += 2 + ln
    return 0, 0
print("ready", flush=True)
while True:
    for ev in ino.read():
        name = ev.name
        if not (name.startswith("capture_") and name.endswith(".jpg")): continue
        d = wds[ev.wd]
        path = os.path.join(d, name)
        try:
            with open(path, "rb") as f: data = f.read()
        except FileNotFoundError:
            continue
        w, h = size_of(data[:65536])
        side = {"frame": name, "seq": int(name[8:-4]), "bytes": len(data), "width": w, "height": h,
                "valid": data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9",
                "hash": hashlib.blake2b(data, digest_size=8).hexdigest(),
                "analysed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = os.path.join(d, "." + name[:-4] + ".json.tmp")
        with open(tmp, "w") as f: json.dump(side, f)
        os.rename(tmp, os.path.join(d, name[:-4] + ".json"))
'''


def synthetic(n, size):
    """A JPEG-shaped frame (SOI, SOF0 1280x720, data, EOI), distinct per n."""
    head = bytes([0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x02, 0xD0, 0x05, 0x00, 0x03,
                  1, 0x22, 0, 2, 0x11, 0, 3, 0x11, 0, 0xFF, 0xDA, 0x00, 0x02])
    body = (n.to_bytes(8, "little") * (size // 8 + 1))[:size]
    return head + body.replace(b"\xff", b"\xfe") + b"\xff\xd9"


def write_frame(d, n, data):
    name = f"capture_{n:09d}.jpg"
    tmp = os.path.join(d, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    t = time.monotonic()
    os.rename(tmp, os.path.join(d, name))
    return name, t


def group_cpu(pid, user_only=False):
    """CPU seconds of the process (user + system, or user alone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        return (utime + cutime if user_only else utime + stime + cutime + cstime) / CLK_TCK
    except OSError:
        return 0.0


def _watch_loop(dirs, conn, stop):
    """In its own process (no GIL shared with the frame writer): timestamps
    sidecars as they appear, with CLOCK_MONOTONIC (system-wide)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    wds = {}
    for d in dirs:
        # IN_MOVED_TO (renamed into place) and IN_CREATE (linked into place)
        wds[libc.inotify_add_watch(fd, d.encode(), 0x80 | 0x100)] = d
    seen = {}
    conn.send("ready")
    last_sent = 0.0
    while not stop.is_set():
        r, _, _ = select.select([fd], [], [], 0.02)
        if not r:
            conn.send(len(seen))
            continue
        now = time.monotonic()
        buf = os.read(fd, 1 << 16)
        i = 0
        while i + 16 <= len(buf):
            wd, mask, _, ln = struct.unpack_from("iIII", buf, i)
            if mask & 0x4000:
                seen[("overflow", str(now))] = now
            name = buf[i + 16:i + 16 + ln].rstrip(b"\0").decode()
            if name.endswith(".json"):
                seen.setdefault((wds.get(wd), name[:-5] + ".jpg"), now)
            i += 16 + ln
        # Progress at most every 20 ms, so the pipe never fills while the
        # parent is busy writing frames.
        if now - last_sent > 0.02:
            conn.send(len(seen))
            last_sent = now
    conn.send(seen)


class SidecarWatch:
    """Timestamps sidecars as they appear, from a separate process."""

    def __init__(self, dirs):
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.stop_event = ctx.Event()
        self.proc = ctx.Process(target=_watch_loop, args=(dirs, child, self.stop_event), daemon=True)
        self.proc.start()
        assert self.conn.recv() == "ready"
        self.count = 0
        self.seen = {}

    def progress(self):
        while self.conn.poll():
            msg = self.conn.recv()
            if isinstance(msg, int):
                self.count = msg
        return self.count

    def close(self):
        self.stop_event.set()
        while True:
            msg = self.conn.recv()
            if isinstance(msg, dict):
                self.seen = msg
                break
        self.proc.join()


class Monitor:
    def __init__(self, name, work):
        self.name, self.work, self.proc = name, work, None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Edgekeeper(Monitor):
    def __init__(self, work, binary):
        super().__init__("edgekeeper", work)
        self.binary = binary

    def start(self, dirs):
        caps = ",\n".join(
            f'{{"name": "cam{i}", "dir": "{d}", "match": ["capture_*.jpg"], "stall_after": "0s", "catch_up": 0}}'
            for i, d in enumerate(dirs))
        cfg = os.path.join(self.work, "edgekeeper.json")
        with open(cfg, "w") as f:
            f.write(f'{{"state_dir": "ek-state", "run_dir": "ek-run", "log": {{"file": null, "level": "warn"}},'
                    f' "frames": [{caps}]}}')
        sock_path = os.path.join(self.work, "notify.sock")
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        self.proc = subprocess.Popen([self.binary, "--config", cfg, "run"], env=dict(os.environ, NOTIFY_SOCKET=sock_path),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sock.settimeout(60)
        while "READY=1" not in sock.recv(4096).decode().split("\n"):
            pass
        sock.close()


class Python(Monitor):
    def __init__(self, work):
        super().__init__("python inotify", work)

    def start(self, dirs):
        self.proc = subprocess.Popen([sys.executable, "-c", PY_MONITOR, *dirs], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.proc.stdout.readline()


def fresh_dirs(work, tag, n):
    dirs = []
    for i in range(n):
        d = os.path.join(work, f"{tag}-cam{i}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        dirs.append(d)
    return dirs


def drain(mon, work, frames, size):
    [d] = fresh_dirs(work, mon.name.replace(" ", "_") + "-drain", 1)
    mon.start([d])
    watch = SidecarWatch([d])
    os.kill(mon.proc.pid, signal.SIGSTOP)
    for n in range(1, frames + 1):
        write_frame(d, n, synthetic(n, size))
    cpu0 = group_cpu(mon.proc.pid)
    t0 = time.monotonic()
    os.kill(mon.proc.pid, signal.SIGCONT)
    end = t0 + 300
    while watch.progress() < frames and time.monotonic() < end:
        time.sleep(0.005)
    cpu = group_cpu(mon.proc.pid) - cpu0
    watch.close()
    took = (max(watch.seen.values()) - t0) if len(watch.seen) == frames else float("inf")
    mon.stop()
    return took, cpu, len(watch.seen)


def live(mon, work, seconds, size, cameras=4, fps=30):
    dirs = fresh_dirs(work, mon.name.replace(" ", "_") + "-live", cameras)
    mon.start(dirs)
    watch = SidecarWatch(dirs)
    time.sleep(0.3)
    frames = [synthetic(n, size) for n in range(8)]
    renamed = {}
    cpu0 = group_cpu(mon.proc.pid)
    user0 = group_cpu(mon.proc.pid, user_only=True)
    t0 = time.monotonic()
    n = 0
    period = 1.0 / fps
    while time.monotonic() - t0 < seconds:
        tick = t0 + n * period
        delay = tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        n += 1
        for d in dirs:
            name, t = write_frame(d, n, frames[n % 8])
            renamed[(d, name)] = t
    wall = time.monotonic() - t0
    time.sleep(0.5)
    cpu = group_cpu(mon.proc.pid) - cpu0
    user = group_cpu(mon.proc.pid, user_only=True) - user0
    watch.close()
    mon.stop()
    lat = [(watch.seen[k] - t) * 1000 for k, t in renamed.items() if k in watch.seen]
    # Missed = frames without a sidecar on disk (the watcher's own view is
    # only used for latency).
    missed = sum(1 for (d, name) in renamed if not os.path.exists(os.path.join(d, name[:-4] + ".json")))
    return lat, cpu / wall * 100, missed, user / wall * 100


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--live-seconds", type=float, default=60)
    ap.add_argument("--drain-repeat", type=int, default=3)
    ap.add_argument("--work", default=None,
                    help="default: /tmp/edgekeeper-frames-bench, or under /dev/shm when /tmp is mounted with discard")
    args = ap.parse_args()
    if args.work:
        work = os.path.abspath(args.work)
    else:
        scratch, note = _storage_bench().pick_scratch(None)
        if note:
            print(f"note: {note}", flush=True)
        work = os.path.join(scratch, "edgekeeper-frames-bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    mons = [Edgekeeper(work, os.path.abspath(args.bin)), Python(work)]
    drains = {m.name: [] for m in mons}
    for r in range(args.drain_repeat):
        for m in (mons if r % 2 == 0 else mons[::-1]):
            print(f"{m.name}: drain {r + 1}/{args.drain_repeat} of {args.frames} frames ...", flush=True)
            drains[m.name].append(drain(m, work, args.frames, args.size))
    rows = {}
    for m in mons:
        runs = drains[m.name]
        d = (statistics.median(t for t, _, _ in runs), statistics.median(c for _, c, _ in runs),
             min(n for _, _, n in runs))
        print(f"{m.name}: drains {', '.join(f'{t:.3f} s' for t, _, _ in runs)}", flush=True)
        print(f"{m.name}: live, 4 cameras at 30 fps for {args.live_seconds:.0f} s ...", flush=True)
        l = live(m, work, args.live_seconds, args.size)
        rows[m.name] = (d, l)
    print()
    print(f"{'monitor':<16} {'drain s':>8} {'frames/s':>9} {'drain CPU s':>12} {'live p50 ms':>12} {'live p99 ms':>12} {'live CPU %':>11} {'of it user':>11} {'missed':>7}")
    for name, ((took, cpu, done), (lat, cpu_pct, missed, user_pct)) in rows.items():
        fps = args.frames / took if took != float("inf") else 0
        print(f"{name:<16} {took:>8.2f} {fps:>9.0f} {cpu:>12.2f} {pct(lat, 50):>12.2f} {pct(lat, 99):>12.2f} {cpu_pct:>11.2f} {user_pct:>11.2f} {args.frames - done + missed:>7}")
    ek, py = rows["edgekeeper"], rows["python inotify"]
    ek_fps = args.frames / ek[0][0]
    py_fps = args.frames / py[0][0] if py[0][0] != float("inf") else 0
    checks = [
        ("drain frames/s vs python", ek_fps / max(py_fps, 1e-9), ">= 10x", ek_fps >= 10 * py_fps),
        ("live latency p99 ms", pct(ek[1][0], 99), "< 2", pct(ek[1][0], 99) < 2),
        ("live CPU % of one core", ek[1][1], "< 1", ek[1][1] < 1),
        ("frames missed", args.frames - ek[0][2] + ek[1][2], "0", ek[0][2] == args.frames and ek[1][2] == 0),
    ]
    print()
    for what, value, target, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {what:<28} {value:>10.2f}   target {target}")


if __name__ == "__main__":
    main()
