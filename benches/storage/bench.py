#!/usr/bin/env python3
"""Benchmark of edgekeeper's storage retention against the tools it replaces.

One retention pass over the same tree, in the same run, each tool on a
fresh identical copy (cp -a of a template, so mtimes are the same):
  - find ROOT -type f -name '*.jpg' -mmin +1440 -delete   (the cron job),
  - a Python os.scandir walk in a subprocess: recursion, entry.stat(), unlink
    when older than max_age (the Python maintenance daemon),
  - edgekeeper --config CFG sweep --only storage   (the real release binary).
Half the files are 48 h old, half 1 h old; max_age is 24 h. For each: wall
seconds, user and system CPU seconds of the process (os.wait4 rusage),
median over --repeat runs; after every run the tree is checked: exactly the
old half gone, the young half still there (anything else is a failure:
exit 1). Then the daemon itself (`edgekeeper run`) on a fresh tree: time
until every old file is deleted, the longest slice of a pass (how long the
event loop was held) and the duration of idle mount checks, from
run_dir/status.json.

The scratch directory is made under --tmp, default /tmp; when /tmp is
mounted with online `discard` (as on this CI VM) every unlink of a file on
disk waits for a synchronous discard and the run would time the disk, so
/dev/shm (tmpfs) is used instead and the output says so.

Usage: bench.py --bin PATH [--dirs 10000] [--files 220000] [--repeat 3]
                [--tmp DIR] [--keep-tmp]
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

OLD_AGE_S = 48 * 3600
YOUNG_AGE_S = 1 * 3600
MAX_AGE = "24h"
MAX_AGE_MIN = 24 * 60
PER_TOP = 100  # leaf directories per top-level directory: dNNNN/eNN

PY_WALK = r'''
import fnmatch, os, stat, sys, time
root, max_age = sys.argv[1], float(sys.argv[2])
cutoff = time.time() - max_age
deleted = 0
def walk(d):
    global deleted
    with os.scandir(d) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                walk(e.path)
            elif fnmatch.fnmatch(e.name, "*.jpg"):
                st = e.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                    os.unlink(e.path)
                    deleted += 1
walk(root)
print(deleted)
'''


# ---- the scratch file system -----------------------------------------------


def mount_of(path):
    """(mount point, fstype, mount and super options) of the file system
    holding `path`, from /proc/self/mountinfo (the last, longest match)."""
    path = os.path.realpath(path)
    best = ("/", "?", set())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            mp = fields[4].replace("\\040", " ")
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                if len(mp) >= len(best[0]):
                    opts = set(fields[5].split(",")) | set(rfields[2].split(",") if len(rfields) > 2 else [])
                    best = (mp, rfields[0], opts)
    return best


def pick_scratch(asked):
    """--tmp DIR when given. Else /tmp, unless /tmp is mounted with online
    `discard`: there every unlink of a file whose blocks reached the disk
    waits for a synchronous discard (ext4_free_blocks -> blkdev_issue_discard),
    milliseconds each on a virtual disk, so the run would time the disk and
    not the tools (and take far too long): then /dev/shm (tmpfs), said so."""
    if asked:
        return asked, None
    mp, fstype, opts = mount_of("/tmp")
    if "discard" in opts:
        shm = mount_of("/dev/shm")
        if shm[1] == "tmpfs" and os.access("/dev/shm", os.W_OK):
            return "/dev/shm", (f"/tmp is {fstype} on {mp} mounted with online discard: every unlink of a file "
                                f"on disk waits for a synchronous discard, which times the disk, not the tools; "
                                f"using /dev/shm (tmpfs) instead (force a place with --tmp DIR)")
        return "/tmp", (f"WARNING: /tmp is {fstype} on {mp} mounted with online discard: unlinks wait for "
                        f"synchronous discards, the numbers are the disk's, not the tools'")
    return "/tmp", None


# ---- the tree ------------------------------------------------------------


def leaf_dirs(dirs):
    tops = (dirs + PER_TOP - 1) // PER_TOP
    per = min(PER_TOP, dirs)
    out = []
    for t in range(tops):
        for e in range(per):
            if len(out) == dirs:
                return out
            out.append(os.path.join(f"d{t:04d}", f"e{e:02d}"))
    return out


def build_template(root, dirs, files, seed=1):
    """`files` files of 100 bytes, capture_NNNNNN.jpg, spread evenly over
    `dirs` leaf directories; exactly files // 2 of them (chosen with a fixed
    seed) 48 h old, the rest 1 h old. Returns (old, young) relative paths."""
    leaves = leaf_dirs(dirs)
    for d in leaves:
        os.makedirs(os.path.join(root, d))
    rng = random.Random(seed)
    is_old = [True] * (files // 2) + [False] * (files - files // 2)
    rng.shuffle(is_old)
    now = time.time()
    t_old, t_young = now - OLD_AGE_S, now - YOUNG_AGE_S
    payload = b"\xff\xd8" + b"x" * 96 + b"\xff\xd9"
    old, young = set(), set()
    for i in range(files):
        rel = os.path.join(leaves[i * len(leaves) // files], f"capture_{i:06d}.jpg")
        p = os.path.join(root, rel)
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
        t = t_old if is_old[i] else t_young
        os.utime(p, (t, t))
        (old if is_old[i] else young).add(rel)
    return old, young


def remaining(root):
    out = set()
    for dirpath, _, names in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in names:
            out.add(os.path.join(rel, n))
    return out


def fresh_copy(template, dest, files):
    """cp -a of the template (mtimes kept), then the same warm-up for every
    tool: a find over the copy (dentry and inode caches warm), and a sync so
    no writeback of the copy lands inside the measurement."""
    if os.path.exists(dest):
        subprocess.run(["rm", "-rf", dest], check=True)
    subprocess.run(["cp", "-a", template, dest], check=True)
    out = subprocess.run(f"find '{dest}' -type f | wc -l", shell=True, check=True,
                         capture_output=True, text=True).stdout
    if int(out) != files:
        raise SystemExit(f"FAILURE: fresh copy {dest} has {out.strip()} files, expected {files}")
    os.sync()


def timed(argv, stdout=subprocess.DEVNULL, stderr=None):
    """Wall seconds, user and system CPU seconds of one process."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=stdout, stderr=stderr)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_utime, ru.ru_stime, p.returncode


def verify(root, old, young, tool):
    """True when exactly the old files are gone and every young one is left."""
    left = remaining(root)
    wrongly_deleted = young - left
    not_deleted = old & left
    stray = left - old - young
    if wrongly_deleted or not_deleted or stray:
        print(f"\n!!!!! FAILURE: {tool} deleted the wrong set: {len(wrongly_deleted)} young files deleted, "
              f"{len(not_deleted)} old files left, {len(stray)} unexpected files", flush=True)
        for p in sorted(wrongly_deleted)[:5]:
            print(f"!!!!!   young, deleted: {p}")
        for p in sorted(not_deleted)[:5]:
            print(f"!!!!!   old, left:      {p}")
        return False, len(old) + len(young) - len(left)
    return True, len(old) + len(young) - len(left)


# ---- the tools -----------------------------------------------------------


def write_config(path, root, daemon=False, mount=None):
    storage = {"retention": [{"name": "frames", "root": root, "match": ["*.jpg"], "max_age": MAX_AGE}]}
    cfg = {"state_dir": "ek-state", "run_dir": "ek-run", "log": {"file": None}}
    if daemon:
        cfg["status_every"] = "1s"
        storage = {"check_every": "2s", "mounts": [{"path": mount}], **storage}
    cfg["storage"] = storage
    with open(path, "w") as f:
        f.write("// edgekeeper storage benchmark (benches/storage)\n")
        json.dump(cfg, f, indent=1)
        f.write("\n")


class Tool:
    def __init__(self, name, argv_of):
        self.name, self.argv_of = name, argv_of
        self.runs = []  # (wall, user, sys)
        self.deleted = None


def run_tool(tool, root, work, old, young):
    """One timed run on the fresh tree at `root`. False on a wrong result."""
    err_path = os.path.join(work, "stderr.txt")
    with open(err_path, "w") as err:
        wall, user, sys_, rc = timed(tool.argv_of(root), stderr=err)
    ok, deleted = verify(root, old, young, tool.name)
    if rc != 0:
        print(f"!!!!! FAILURE: {tool.name} exited {rc}: {open(err_path).read()[-2000:]}", flush=True)
        ok = False
    tool.runs.append((wall, user, sys_))
    tool.deleted = deleted
    print(f"  {tool.name:<18} wall {wall:7.3f} s  user {user:6.3f} s  sys {sys_:6.3f} s  "
          f"deleted {deleted}{'' if ok else '   <-- WRONG'}", flush=True)
    return ok


def med(runs, i):
    return statistics.median(r[i] for r in runs)


# ---- the daemon ------------------------------------------------------------


def read_status(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def storage_counters(status):
    try:
        return status["services"]["storage"]["counters"]
    except (KeyError, TypeError):
        return None


def proc_cpu(pid):
    """CPU seconds (user + system) a running process has used."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_daemon(binary, work, root, old, young, timeout):
    """The daemon on a fresh tree: time to all-deleted, longest slice, idle
    check durations. Returns a dict (ok False on a wrong result)."""
    cfg = os.path.join(work, "daemon.json")
    write_config(cfg, root, daemon=True, mount=os.path.dirname(root))
    if subprocess.run([binary, "--config", cfg, "check"], capture_output=True).returncode != 0:
        raise SystemExit("FAILURE: edgekeeper check rejects the daemon config")
    run_dir = os.path.join(work, "ek-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    status_path = os.path.join(run_dir, "status.json")
    n_old = len(old)
    out = open(os.path.join(work, "daemon.stdout"), "w")
    err = open(os.path.join(work, "daemon.stderr"), "w")
    # SIGUSR1 before its handler is installed would kill the daemon: wait
    # for READY=1 on a notify socket (systemd Type=notify) first.
    sock_path = os.path.join(work, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path)
    t0 = time.monotonic()
    proc = subprocess.Popen([binary, "--config", cfg, "run"], stdout=out, stderr=err, env=env)
    res = {"ok": True, "all_deleted_s": float("nan"), "longest_slice_us": None, "idle_checks_us": [],
           "busy_check_us": None, "deleted": None, "deleted_counter": None}
    try:
        try:
            while "READY=1" not in sock.recv(4096).decode().split("\n"):
                pass
        except socket.timeout:
            print("!!!!! FAILURE: the daemon sent no READY=1 within 60 s", flush=True)
            res["ok"] = False
            return res
        finally:
            sock.close()
        res["ready_s"] = time.monotonic() - t0
        end = t0 + timeout
        c = None
        while time.monotonic() < end:
            if proc.poll() is not None:
                print(f"!!!!! FAILURE: the daemon exited {proc.returncode} early", flush=True)
                res["ok"] = False
                return res
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.05)
            c = storage_counters(read_status(status_path))
            if c and c["files_deleted_total"] >= n_old:
                res["all_deleted_s"] = time.monotonic() - t0
                break
        else:
            print(f"!!!!! FAILURE: the daemon deleted {c and c['files_deleted_total']} of {n_old} "
                  f"within {timeout:.0f} s", flush=True)
            res["ok"] = False
            return res
        res["longest_slice_us"] = c["longest_slice_microseconds"]
        res["busy_check_us"] = c["last_check_microseconds"]
        # Idle checks: the pass is over, nothing is left to delete. Wait for
        # three more checks (check_every 2 s) and take each one's duration.
        seen = c["checks_total"]
        cpu0, w0 = proc_cpu(proc.pid), time.monotonic()
        end = time.monotonic() + 30
        while len(res["idle_checks_us"]) < 3 and time.monotonic() < end:
            time.sleep(0.2)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.05)
            c = storage_counters(read_status(status_path)) or c
            if c["checks_total"] > seen:
                seen = c["checks_total"]
                res["idle_checks_us"].append(c["last_check_microseconds"])
        res["idle_cpu"] = (proc_cpu(proc.pid) - cpu0, time.monotonic() - w0)
        res["longest_slice_us_after_idle"] = c["longest_slice_microseconds"]
        res["passes"] = c["retention_passes_total"]
        res["deleted_counter"] = c["files_deleted_total"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                print("!!!!! the daemon did not stop within 10 s of SIGTERM: killed", flush=True)
                proc.kill()
                proc.wait()
        res["exit"] = proc.returncode
        out.close()
        err.close()
    ok, deleted = verify(root, old, young, "edgekeeper run")
    res["ok"] = res["ok"] and ok and res["deleted_counter"] == n_old
    res["deleted"] = deleted
    return res


# ---- main --------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dirs", type=int, default=10000)
    ap.add_argument("--files", type=int, default=220000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmp", default=None,
                    help="scratch is made under this directory (default: /tmp, or /dev/shm when /tmp is mounted with discard)")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--daemon-timeout", type=float, default=600)
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)

    scratch, note = pick_scratch(args.tmp)
    if note:
        print(f"note: {note}", flush=True)
    work = tempfile.mkdtemp(prefix="edgekeeper-storage-bench-", dir=scratch)
    failed = False
    try:
        template = os.path.join(work, "template")
        root = os.path.join(work, "tree", "frames")  # every tool's fresh copy lands here
        os.makedirs(os.path.dirname(root))
        t0 = time.monotonic()
        old, young = build_template(template, args.dirs, args.files)
        mp, fstype, opts = mount_of(work)
        fstype = f"{fstype} on {mp}{', discard' if 'discard' in opts else ''}"
        print(f"tree: {args.files} files of 100 bytes over {args.dirs} leaf directories (dNNNN/eNN), "
              f"{len(old)} 48 h old, {len(young)} 1 h old, max_age {MAX_AGE} "
              f"(built in {time.monotonic() - t0:.1f} s); scratch {work} ({fstype}); {args.repeat} repeats",
              flush=True)

        cfg = os.path.join(work, "sweep.json")
        write_config(cfg, root)
        chk = subprocess.run([binary, "--config", cfg, "check"], capture_output=True, text=True)
        if chk.returncode != 0:
            raise SystemExit(f"FAILURE: edgekeeper check exits {chk.returncode}:\n{chk.stdout}{chk.stderr}")
        print(f"edgekeeper --config {cfg} check: exit 0", flush=True)

        tools = [
            Tool("find -delete", lambda r: ["find", r, "-type", "f", "-name", "*.jpg",
                                            "-mmin", f"+{MAX_AGE_MIN}", "-delete"]),
            Tool("python scandir", lambda r: [sys.executable, "-c", PY_WALK, r, str(MAX_AGE_MIN * 60)]),
            Tool("edgekeeper sweep", lambda r: [binary, "--config", cfg, "sweep", "--only", "storage"]),
        ]
        for k in range(args.repeat):
            print(f"repeat {k + 1}/{args.repeat}:", flush=True)
            # Rotate the order so no tool always runs first or last.
            for tool in tools[k % len(tools):] + tools[:k % len(tools)]:
                fresh_copy(template, root, args.files)
                if not run_tool(tool, root, work, old, young):
                    failed = True

        # The printing cost: one more sweep with stdout to a file.
        fresh_copy(template, root, args.files)
        out_path = os.path.join(work, "sweep.stdout")
        with open(out_path, "w") as out:
            p_wall, p_user, p_sys, rc = timed([binary, "--config", cfg, "sweep", "--only", "storage"], stdout=out,
                                              stderr=subprocess.DEVNULL)
        ok, _ = verify(root, old, young, "edgekeeper sweep > file")
        with open(out_path) as f:
            lines = sum(1 for line in f if line.startswith("deleted "))
        print_size = os.path.getsize(out_path)
        if not ok or rc != 0 or lines != len(old):
            print(f"!!!!! FAILURE: sweep > file: exit {rc}, {lines} 'deleted' lines for {len(old)} old files", flush=True)
            failed = True

        print("running the daemon (edgekeeper run) ...", flush=True)
        fresh_copy(template, root, args.files)
        d = run_daemon(binary, work, root, old, young, args.daemon_timeout)
        if not d["ok"]:
            failed = True

        # ---- the table ----
        print()
        print(f"{'tool':<18} {'deleted':>8} {'wall s':>8} {'user s':>8} {'sys s':>8} {'files/s':>9}   runs (wall s)")
        for t in tools:
            w = med(t.runs, 0)
            print(f"{t.name:<18} {t.deleted:>8} {w:>8.3f} {med(t.runs, 1):>8.3f} {med(t.runs, 2):>8.3f} "
                  f"{t.deleted / w:>9.0f}   {' '.join(f'{r[0]:.3f}' for r in t.runs)}")
        print(f"{'edgekeeper >file':<18} {lines:>8} {p_wall:>8.3f} {p_user:>8.3f} {p_sys:>8.3f} "
              f"{lines / p_wall:>9.0f}   (once; stdout to a file, {print_size / 2**20:.1f} MiB)")
        print("(median of the runs; wall s, and user/system CPU seconds of the process from wait4)")

        fw, fu = med(tools[0].runs, 0), med(tools[0].runs, 1)
        pw = med(tools[1].runs, 0)
        ew, eu = med(tools[2].runs, 0), med(tools[2].runs, 1)
        checks = [
            ("edgekeeper wall / find wall", ew / fw, "<= 1.05", ew / fw <= 1.05),
            ("edgekeeper wall / python wall", ew / pw, "< 1", ew / pw < 1),
            ("edgekeeper user / find user", eu / max(fu, 1e-9), "<= 0.5", eu <= 0.5 * fu),
        ]
        sweep_devnull = ew
        print(f"printing cost (stdout to a file vs /dev/null): {p_wall - sweep_devnull:+.3f} s wall "
              f"({(p_wall / sweep_devnull - 1) * 100:+.1f} %, one run against the median)")
        print()
        idle = d["idle_checks_us"]
        print("daemon (edgekeeper run, check_every 2s, status_every 1s):")
        print(f"  start to all {len(old)} old files deleted: {d['all_deleted_s']:.2f} s "
              f"({len(old) / d['all_deleted_s']:.0f} files/s) -- passes are rate-limited by design "
              f"(128 deletions per slice, then 20 ms pause: ~6,000/s at most, to spare SD cards), "
              f"so slower than the one-shot sweep is expected")
        print(f"  longest slice of a pass (loop held): {d['longest_slice_us']} µs at all-deleted, "
              f"{d.get('longest_slice_us_after_idle')} µs after the idle checks")
        print(f"  mount check during the pass: {d['busy_check_us']} µs; idle checks after the pass: "
              f"{', '.join(str(x) for x in idle) or 'none seen'} µs "
              f"({d.get('passes')} retention passes in all; daemon exit {d.get('exit')})")
        if d.get("idle_cpu"):
            cpu, span = d["idle_cpu"]
            print(f"  CPU while idle (every check queues a new retention pass over the {len(young)} files left): "
                  f"{cpu:.2f} s in {span:.1f} s ({cpu / span * 100:.0f} % of a core at check_every 2s)")
        print(f"  time to READY=1: {d.get('ready_s', float('nan')):.3f} s")
        if d["longest_slice_us"] is not None:
            ls = max(d["longest_slice_us"], d.get("longest_slice_us_after_idle") or 0)
            checks.append(("longest slice µs", ls, "< 50000", ls < 50000))
        if idle:
            checks.append(("idle mount check µs (max)", max(idle), "< 1000", max(idle) < 1000))
        else:
            checks.append(("idle mount check µs (max)", float("nan"), "< 1000", False))
        print()
        for what, value, target, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {what:<32} {value:>10.3f}   target {target}")
        if failed:
            print("\n!!!!! FAILURE: at least one run deleted the wrong files (see above)")
    finally:
        if args.keep_tmp:
            print(f"scratch kept: {work}")
        else:
            subprocess.run(["rm", "-rf", work])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
