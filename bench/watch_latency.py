#!/usr/bin/env python3
"""corral's watcher: how long from a violating act inside a contained service to the moment
the reaction had taken effect, per kind of violation; and fail2ban fed the same event as a log
line, from the append to the ban in nftables.

    bash bench/watch.sh [--json] [--samples N] [--f2b-samples N] [--modes revert,log]
                        [--kinds egress,refused-connect,exec,base-write] [--no-f2b]
                        [--quick] [--out FILE]

The sample "notes" service (same containment as examples/notes) runs in a throwaway
CORRAL_ROOT and network namespace; the attacker's code runs inside it with
`corral exec NAME app -- /usr/bin/python3.11 -I -c CODE`, entering only the network namespace
(nsenter --net). Kinds of violation:

- egress: a UDP sendto to 127.0.0.1:4444, which the manifest does not declare (the service's
  nftables table drops it and logs it to the service's NFLOG group);
- refused-connect: a TCP connect to 127.0.0.1:4445, not declared: Landlock refuses it (EACCES)
  before any packet exists; its audit record (LANDLOCK_ACCESS) is the sensor;
- exec: execv of the dynamic loader /lib64/ld-linux-x86-64.so.2, which is in the image (it is
  python's interpreter) but not in the exec list (seccomp user notification refuses it);
- base-write: an append to a world-writable base file under a `writable` path (a careless
  vendor file shipped with image.add), seen by the supervisor's delta poll.

Reactions ("modes"):

- revert (the default reaction, the one that matters): one attacker process per violation; the
  watcher kills every process of the service, archives the delta and restarts from the base.
  More than 5 reverts in 300 s and the next incident kills the service for good, so every 6th
  violation is a `kill` and the benchmark starts the service again (`corral down` + `up`).
  Samples are taken until every kind has N with reaction `revert`; the `kill` ones are reported
  on their own row.
- log: one long-lived attacker does one violation of each kind every --period seconds
  (more than the 2 s in which repeats of a tripwire by one process join the open incident).

Per violation:

- act->contained (the headline): from the attacker's own clock read just before the violating
  system call to the incident's `contained_at` (revert/kill: every process of the service is
  gone, the cgroup is empty; log: the incident is decided). Same clock (CLOCK_REALTIME).
- corral latency_ms: what corral records, from its own idea of the act (the kernel's timestamp
  where there is one: a file's mtime for base-write; the NFLOG or notification receive time
  for egress and exec, which is after the act) to containment.
- attacker dead (revert/kill): when the benchmark, outside, sees the attacker's pidfd signal its
  exit: an independent check that the reaction took effect.
- record written (log): when the benchmark, outside, sees the incident line appear in
  incidents.jsonl (inotify).

fail2ban (Debian's, v1.0) gets the equivalent event, "... corral-bench egress denied uid=...
src=IP ...", appended as one line to a log file it watches (pyinotify backend, the fastest it
has), with a jail of maxretry 1 whose action is Debian's nftables-allports with a table of our
own (inet bench-f2b) in the throwaway netns; `nft monitor` in that netns timestamps each
element as it lands in the set (the ban in effect). fail2ban-server runs in the foreground with
its own configuration, socket, pid file, database and log under the temp dir.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402

PREFIX, TAG = "corral-bwatch-", "cw"
RESULTS = bk.RESULTS_DIR / "watch.json"
PY311 = "/usr/bin/python3.11"
KINDS = ("egress", "refused-connect", "exec", "base-write")
# The tripwire each kind trips; refused-connect's is told from a packet's egress by its detail.
TRIPWIRE = {"refused-connect": "egress"}
CARELESS = "/opt/notes/careless"
F2B_TABLE = "bench-f2b"
F2B_JAIL = "corral-bench"
GOAL_P50, GOAL_P99, GOAL_RATIO = 20.0, 100.0, 10.0
JITTER = 0.25  # seconds: random delay before each act (one delta-poll period)

# The violating act of each kind, shared by both attackers below: act(kind, path) says what
# became of it ("sent", "ran", "written", or "errnoN"); path is the file base-write appends to.
# The socket is made before the act, so that the act is the sendto alone.
ACT = r"""
import os, socket, sys, time
w = lambda s: os.write(1, s.encode())
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # still unconnected after a refusal


def act(kind, path):
    if kind == "egress":
        try:
            s.sendto(b"x", ("127.0.0.1", 4444)); return "sent"
        except OSError as e:
            return "errno%d" % e.errno
    if kind == "refused-connect":
        try:
            t.connect(("127.0.0.1", 4445)); return "connected"
        except OSError as e:
            return "errno%d" % e.errno
    if kind == "exec":
        try:
            os.execv("/lib64/ld-linux-x86-64.so.2", ["ld.so", "--version"]); return "ran"
        except OSError as e:
            return "errno%d" % e.errno
    fd = os.open(path, os.O_WRONLY | os.O_APPEND); os.write(fd, b"# backdoor\n"); os.close(fd)
    return "written"
"""

# One violation, then wait to be killed. t0 is written before the act: the process may be
# gone before it could write anything after it.
ATTACK_ONE = ACT + r"""
kind, target = sys.argv[1], sys.argv[2]
w("ready\n")
sys.stdin.readline()
w("t0 %.6f\n" % time.time())
r = act(kind, target)
w("act %.6f %s\n" % (time.time(), r))
time.sleep(30)
w("survived\n")
"""

# One violation of each kind every `period` seconds, staggered, each up to `jitter` seconds
# late (at random, so that no act keeps the same phase against the supervisor's 0.25 s delta
# poll); never killed (react = log).
ATTACK_LOOP = ACT + r"""
import random
kinds, n, period = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])
careless, jitter = sys.argv[4], float(sys.argv[5])
w("ready\n")
sys.stdin.readline()
start = time.time() + 0.3
for i in range(n):
    for j, kind in enumerate(kinds):
        delay = start + i * period + j * period / len(kinds) + random.uniform(0, jitter) \
            - time.time()
        if delay > 0:
            time.sleep(delay)
        path = "%s/f%d.py" % (careless, i)
        t0 = time.time()
        r = act(kind, path)
        w("act %s %d %.6f %.6f %s\n" % (kind, i, t0, time.time(), r))
w("done\n")
"""


# -- small helpers ---------------------------------------------------------------------------
class Lines:
    """Lines from a pipe, with a timeout."""

    def __init__(self, stream):
        self.fd = stream.fileno()
        self.buf = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
            self.buf += chunk
        if b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            return line.decode(errors="replace")
        if self.buf:
            line, self.buf = self.buf, b""
            return line.decode(errors="replace")
        return None

    def rest(self, timeout: float) -> list[str]:
        out = []
        while (line := self.readline(timeout)) is not None:
            out.append(line)
        return out


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def find_attacker(root: int) -> int | None:
    """The host pid of the attacker's interpreter under `corral exec` (nsenter execs corral,
    which forks a holder, which forks the command)."""
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if handle.read().startswith(PY311.encode() + b"\0-I\0-c\0"):
                    return pid
        except OSError:
            continue
    return None


def incident_lines(world: bk.World, name: str) -> list[dict[str, Any]]:
    """The incident records as written (not updates or closes): for synchronising only; the
    numbers come from `corral incidents NAME --json`."""
    try:
        text = (world.state_dir(name) / "incidents.jsonl").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") is None and "id" in record:
            out.append(record)
    return out


def kind_of(record: dict[str, Any]) -> str:
    """The benchmark's kind of an incident: its tripwire, or refused-connect for an egress
    Landlock refused (no packet)."""
    if record.get("tripwire") == "egress" and \
            (record.get("detail") or {}).get("refused_by") == "landlock":
        return "refused-connect"
    return str(record.get("tripwire"))


def incidents_cli(world: bk.World, name: str) -> dict[str, dict[str, Any]]:
    records = json.loads(world.corral("incidents", name, "--json").stdout)["incidents"]
    return {r["id"]: r for r in records}


class RecordWatcher(threading.Thread):
    """When each incident line appears in incidents.jsonl, seen from outside with inotify."""

    IN_MODIFY, IN_CREATE = 0x2, 0x100

    def __init__(self, state_dir: Path):
        super().__init__(daemon=True)
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(state_dir),
                                  self.IN_MODIFY | self.IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {state_dir}")
        self.path = state_dir / "incidents.jsonl"
        self.offset, self.partial = 0, b""
        self.seen: dict[str, float] = {}
        self.stop_r, self.stop_w = os.pipe()

    def run(self) -> None:
        while True:
            ready = select.select([self.fd, self.stop_r], [], [])[0]
            now = time.time()
            if self.fd in ready:
                os.read(self.fd, 65536)
                self._read_new(now)
            if self.stop_r in ready:
                return

    def _read_new(self, now: float) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        self.partial += data
        while b"\n" in self.partial:
            line, self.partial = self.partial.split(b"\n", 1)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("type") is None and "id" in record:
                self.seen.setdefault(record["id"], now)

    def stop(self) -> None:
        os.write(self.stop_w, b"x")
        self.join(5)
        for fd in (self.fd, self.stop_r, self.stop_w):
            os.close(fd)


def careless_dir(world: bk.World, count: int) -> Path:
    """World-writable vendor files, shipped into the image with image.add (a careless base)."""
    path = world.dir / "careless"
    path.mkdir(exist_ok=True)
    for i in range(count):
        f = path / f"f{i}.py"
        f.write_text(f"SETTING_{i} = False\n")
        f.chmod(0o666)
    return path


def start_service(world: bk.World, suffix: str, react: str, port: int, files: int) -> tuple[
        str, Path]:
    name = world.service(suffix)
    careless = careless_dir(world, files)
    manifest = bk.notes_manifest(world.dir / f"{name}.toml", name, port=port, react=react,
                                 app_extra=f'writable = ["{CARELESS}"]',
                                 add={CARELESS: str(careless)})
    bk.progress(f"installing {name} (react = {react})")
    world.install(manifest, name)
    world.corral("up", str(manifest))
    return name, manifest


# -- revert mode -----------------------------------------------------------------------------
def one_violation(world: bk.World, name: str, kind: str, rng: random.Random) -> dict[str, Any]:
    target = f"{CARELESS}/f0.py"
    proc = subprocess.Popen(world.argv("exec", name, "app", "--", PY311, "-I", "-c",
                                       ATTACK_ONE, kind, target),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=world.env())
    out = Lines(proc.stdout)
    sample: dict[str, Any] = {"kind": kind}
    pidfd = -1
    try:
        if out.readline(30) != "ready":
            raise RuntimeError("the attacker did not start")
        pid = find_attacker(proc.pid)
        if pid is None:
            raise RuntimeError("the attacker's process was not found")
        pidfd = os.pidfd_open(pid)
        time.sleep(rng.uniform(0, JITTER))  # no fixed phase against the 0.25 s delta poll
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        if select.select([pidfd], [], [], 15)[0]:
            sample["dead_at"] = time.time()
        lines = out.rest(15)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    for line in lines:
        parts = line.split()
        if parts[:1] == ["t0"]:
            sample["t0"] = float(parts[1])
        elif parts[:1] == ["act"]:
            sample["after_act"], sample["result"] = float(parts[1]), parts[2]
        elif parts[:1] == ["survived"]:
            sample["survived"] = True
    if "t0" not in sample:
        raise RuntimeError(f"{kind}: no act time from the attacker: {lines} {stderr[-300:]}")
    return sample


def wait_recovered(world: bk.World, name: str, manifest: Path, port: int, before_reverts: int,
                   count_before: int, timeout: float = 30) -> tuple[dict[str, Any], bool]:
    """Wait for the incident and for the service to be back (revert), or start it again after
    a `kill` (the revert limit). Returns the incident line and whether it was restarted."""
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        lines = incident_lines(world, name)
        if len(lines) > count_before:
            record = lines[count_before]
            break
        time.sleep(0.005)
    if record is None:
        raise RuntimeError(f"{name}: no incident within {timeout:.0f}s")
    while time.monotonic() < deadline:
        state = world.read_state(name)
        app = (state.get("processes") or {}).get("app") or {}
        if state.get("phase") in ("killed", "stopped", "failed", "exited") or \
                (record.get("reaction") == "kill" and state.get("phase") != "running"):
            world.corral("down", name)
            world.corral("up", str(manifest))
            return record, True
        if state.get("phase") == "running" and state.get("reverts", 0) > before_reverts and \
                app.get("state") == "running" and app.get("pid") and \
                bk.listening(app["pid"], port):
            return record, False
        time.sleep(0.005)
    raise RuntimeError(f"{name}: not back within {timeout:.0f}s after incident {record['id']}")


def revert_mode(world: bk.World, kinds: list[str], n: int, port: int) -> dict[str, Any]:
    name, manifest = start_service(world, "r", "revert", port, 1)
    rng = random.Random(20251123)
    revert_counts = {k: 0 for k in kinds}
    samples: list[dict[str, Any]] = []
    restarts = rounds = 0
    started = time.monotonic()
    while any(revert_counts[k] < n for k in kinds):
        order = [k for k in kinds if revert_counts[k] < n]
        rng.shuffle(order)  # spreads drift, and which kind the every-6th `kill` falls on
        for kind in order:
            before = world.read_state(name).get("reverts", 0)
            count_before = len(incident_lines(world, name))
            sample = one_violation(world, name, kind, rng)
            record, restarted = wait_recovered(world, name, manifest, port, before, count_before)
            restarts += restarted
            sample["incident"] = record["id"]
            if kind_of(record) == kind and record.get("reaction") == "revert":
                revert_counts[kind] += 1
            samples.append(sample)
        rounds += 1
        done = sum(min(c, n) for c in revert_counts.values())
        if rounds % 10 == 0:
            bk.progress(f"revert mode: {done}/{n * len(kinds)} revert samples "
                        f"({len(samples)} violations, {restarts} restarts after a kill, "
                        f"{time.monotonic() - started:.0f} s)")
    records = incidents_cli(world, name)
    world.corral("down", name)
    return summarise(samples, records, "revert", elapsed=time.monotonic() - started,
                     extra={"restarts_after_kill": restarts, "service": name})


# -- log mode --------------------------------------------------------------------------------
def log_mode(world: bk.World, kinds: list[str], n: int, period: float,
             port: int) -> dict[str, Any]:
    name, _ = start_service(world, "l", "log", port, n)
    recorder = RecordWatcher(world.state_dir(name))
    recorder.start()
    started = time.monotonic()
    proc = subprocess.Popen(world.argv("exec", name, "app", "--", PY311, "-I", "-c",
                                       ATTACK_LOOP, ",".join(kinds), str(n), str(period),
                                       CARELESS, str(JITTER)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=world.env())
    out = Lines(proc.stdout)
    samples: list[dict[str, Any]] = []
    try:
        if out.readline(30) != "ready":
            raise RuntimeError(f"log mode: the attacker did not start: "
                               f"{proc.stderr.read().decode()[-300:] if proc.poll() else ''}")
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        bk.progress(f"log mode: {n} rounds of {len(kinds)} violations, one every "
                    f"{period / len(kinds):.2f} s (about {n * period / 60:.1f} min)")
        while True:
            line = out.readline(period * 3 + 30)
            if line is None:
                raise RuntimeError("log mode: the attacker stopped answering")
            parts = line.split()
            if parts[:1] == ["done"]:
                break
            if parts[:1] == ["act"]:
                samples.append({"kind": parts[1], "round": int(parts[2]),
                                "t0": float(parts[3]), "after_act": float(parts[4]),
                                "result": parts[5]})
                if parts[1] == kinds[-1] and int(parts[2]) % 20 == 19:
                    bk.progress(f"log mode: round {int(parts[2]) + 1}/{n}")
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    time.sleep(1.0)  # the last base-write is seen at the next delta poll
    recorder.stop()
    records = incidents_cli(world, name)
    # Match each act to its incident: per tripwire, in order of time.
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(records.values(), key=lambda r: r["detected_at"]):
        by_kind.setdefault(kind_of(record), []).append(record)
    for kind in kinds:
        acts = sorted((s for s in samples if s["kind"] == kind), key=lambda s: s["t0"])
        pool = by_kind.get(kind, [])
        j = 0
        for i, sample in enumerate(acts):
            nxt = acts[i + 1]["t0"] if i + 1 < len(acts) else float("inf")
            while j < len(pool) and bk.parse_iso(pool[j]["detected_at"]) < sample["t0"] - 0.01:
                j += 1
            if j < len(pool) and bk.parse_iso(pool[j]["detected_at"]) < nxt:
                sample["incident"] = pool[j]["id"]
                sample["recorded_at"] = recorder.seen.get(pool[j]["id"])
                j += 1
    world.corral("down", name)
    return summarise(samples, records, "log", elapsed=time.monotonic() - started,
                     extra={"period_s": period, "service": name})


# -- summaries -------------------------------------------------------------------------------
def summarise(samples: list[dict[str, Any]], records: dict[str, dict[str, Any]], mode: str,
              elapsed: float, extra: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    unmatched = 0
    for sample in samples:
        record = records.get(sample.get("incident", ""))
        if record is None:
            unmatched += 1
            continue
        contained = bk.parse_iso(record.get("contained_at"))
        detected = bk.parse_iso(record.get("detected_at"))
        sample.update({
            "tripwire": kind_of(record), "reaction": record["reaction"],
            "count": record.get("count", 1),
            "act_to_detected_ms": round((detected - sample["t0"]) * 1000, 3),
            "act_to_contained_ms": round((contained - sample["t0"]) * 1000, 3),
            "corral_latency_ms": record.get("latency_ms"),
        })
        if sample.get("dead_at"):
            sample["act_to_dead_ms"] = round((sample["dead_at"] - sample["t0"]) * 1000, 3)
        if sample.get("recorded_at"):
            sample["act_to_recorded_ms"] = round((sample["recorded_at"] - sample["t0"]) * 1000,
                                                 3)
        key = f"{sample['kind']}/{record['reaction']}"
        rows.setdefault(key, {"kind": sample["kind"], "reaction": record["reaction"],
                              "samples": []})["samples"].append(sample)
    for row in rows.values():
        got = row["samples"]
        row["n"] = len(got)
        row["wrong_tripwire"] = sum(1 for s in got if s["tripwire"] != s["kind"])
        row["coalesced"] = sum(1 for s in got if s["count"] > 1)
        row["results"] = sorted({s.get("result", "?") for s in got})
        for metric in ("act_to_contained_ms", "corral_latency_ms", "act_to_detected_ms",
                       "act_to_dead_ms", "act_to_recorded_ms"):
            values = [s[metric] for s in got if s.get(metric) is not None]
            if values:
                row[metric] = bk.stats(values)
    return {"mode": mode, "violations": len(samples), "unmatched": unmatched,
            "elapsed_s": round(elapsed, 1), **extra, "rows": rows}


# -- fail2ban --------------------------------------------------------------------------------
def f2b_config(world: bk.World) -> dict[str, Path]:
    top = world.dir / "f2b"
    conf = top / "conf"
    for sub in ("action.d", "filter.d"):
        (conf / sub).mkdir(parents=True, exist_ok=True)
    for name in ("nftables.conf", "nftables-allports.conf"):
        (conf / "action.d" / name).write_text(Path("/etc/fail2ban/action.d", name).read_text())
    paths = {"conf": conf, "sock": top / "f2b.sock", "pid": top / "f2b.pid",
             "db": top / "f2b.sqlite3", "log": top / "fail2ban.log",
             "events": top / "events.log", "out": top / "server.out"}
    (conf / "fail2ban.conf").write_text(f"""[Definition]
loglevel = INFO
logtarget = {paths['log']}
syslogsocket = auto
socket = {paths['sock']}
pidfile = {paths['pid']}
dbfile = {paths['db']}
dbpurgeage = 1d
dbmaxmatches = 10
allowipv6 = auto
""")
    (conf / "filter.d" / "corral-bench.conf").write_text(r"""[Definition]
failregex = ^\s*corral-bench egress denied uid=\d+ src=<HOST> dst=\S+ dport=\d+$
""")
    (conf / "jail.conf").write_text(f"""[DEFAULT]
allowipv6 = auto
[{F2B_JAIL}]
enabled = true
filter = corral-bench
logpath = {paths['events']}
backend = pyinotify
maxretry = 1
findtime = 1h
bantime = 1d
action = nftables-allports[name=bench, table={F2B_TABLE}, chain=input]
""")
    paths["events"].write_text("")
    return paths


def f2b_line(t: float, ip: str) -> bytes:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"
    return f"{stamp} corral-bench egress denied uid=993 src={ip} dst=127.0.0.1 dport=4444\n" \
        .encode()


class BanMonitor(threading.Thread):
    """`nft monitor elements` in the netns: when each address lands in the ban set."""

    def __init__(self, world: bk.World):
        super().__init__(daemon=True)
        self.proc = subprocess.Popen(world.enter() + ["nft", "monitor", "elements"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()

    def run(self) -> None:
        for line in self.proc.stdout:
            now = time.time()
            if line.startswith("add element") and F2B_TABLE in line:
                body = line[line.find("{") + 1:line.rfind("}")]
                with self.cond:
                    for ip in re.findall(r"\d+\.\d+\.\d+\.\d+", body):
                        self.seen.setdefault(ip, now)
                    self.cond.notify_all()

    def wait_for(self, ip: str, timeout: float) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: ip in self.seen, timeout)
            return self.seen.get(ip)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fail2ban_peer(world: bk.World, n: int, gap: float) -> dict[str, Any]:
    paths = f2b_config(world)
    client = ["fail2ban-client", "-c", str(paths["conf"]), "-s", str(paths["sock"])]
    out = open(paths["out"], "wb")
    server = subprocess.Popen(world.enter() + [
        "fail2ban-server", "-f", "-x", "-c", str(paths["conf"]), "-s", str(paths["sock"]),
        "-p", str(paths["pid"])], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        start_new_session=True)
    monitor = BanMonitor(world)

    def stop_fail2ban() -> None:
        if server.poll() is None:
            subprocess.run(client + ["stop"], capture_output=True, timeout=60)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        out.close()
        monitor.stop()
        # The jail's stop deletes its set and table; if it could not, we do: only our table,
        # and only in our own netns.
        listed = subprocess.run(world.enter() + ["nft", "list", "table", "inet", F2B_TABLE],
                                capture_output=True)
        if listed.returncode == 0:
            subprocess.run(world.enter() + ["nft", "delete", "table", "inet", F2B_TABLE],
                           capture_output=True)

    world.cleanups.append(stop_fail2ban)
    monitor.start()
    deadline = time.monotonic() + 60
    while subprocess.run(client + ["status", F2B_JAIL], capture_output=True).returncode != 0:
        if server.poll() is not None or time.monotonic() > deadline:
            log = paths["log"].read_text()[-500:] if paths["log"].exists() else ""
            raise RuntimeError(f"fail2ban-server did not start: "
                               f"{paths['out'].read_text()[-500:]} {log}")
        time.sleep(0.2)
    version = subprocess.run(["fail2ban-server", "-V"], capture_output=True,
                             text=True).stdout.strip()
    events = os.open(paths["events"], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    rng = random.Random(3079)
    samples: list[float | None] = []
    try:
        def append(ip: str) -> float:
            t = time.time()
            os.write(events, f2b_line(t, ip))
            return t

        bk.progress("fail2ban: warming up (the first ban creates its table, chain and set)")
        for i in range(3):
            ip = f"10.76.0.{i + 1}"
            append(ip)
            if monitor.wait_for(ip, 30) is None:
                raise RuntimeError(f"fail2ban did not ban the warm-up address {ip}: "
                                   f"{paths['log'].read_text()[-800:]}")
        started = time.monotonic()
        for i in range(n):
            ip = f"10.77.{i // 250}.{i % 250 + 1}"
            t = append(ip)
            banned = monitor.wait_for(ip, 30)
            samples.append(None if banned is None else (banned - t) * 1000)
            if i % 25 == 24:
                bk.progress(f"fail2ban: {i + 1}/{n} bans ({time.monotonic() - started:.0f} s)")
            time.sleep(rng.uniform(0, gap))  # spread the appends over fail2ban's cycles
        elapsed = time.monotonic() - started
    finally:
        os.close(events)
    last = f"10.77.{(n - 1) // 250}.{(n - 1) % 250 + 1}"
    listed = subprocess.run(world.enter() + ["nft", "list", "set", "inet", F2B_TABLE,
                                             "addr-set-bench"], capture_output=True, text=True)
    got = [s for s in samples if s is not None]
    return {"version": version, "n": len(got), "missed": len(samples) - len(got),
            "append_to_ban_ms": bk.stats(got), "last_ban_listed": last in listed.stdout,
            "elapsed_s": round(elapsed, 1), "gap_max_s": gap,
            "samples_ms": [round(s, 3) if s is not None else None for s in samples]}


# -- report ----------------------------------------------------------------------------------
def build_report(args: argparse.Namespace, modes: dict[str, Any],
                 f2b: dict[str, Any] | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "benchmark": "watch: violation -> containment latency", "machine": bk.machine(),
        "params": {"samples": args.samples, "f2b_samples": args.f2b_samples,
                   "period_s": args.period, "kinds": args.kinds, "modes": args.modes},
        "corral": modes, "fail2ban": f2b, "goals": {}, "ratios": {}}
    for mode in modes.values():
        for key, row in mode["rows"].items():
            metric = row.get("act_to_contained_ms")
            if not metric:
                continue
            label = f"{mode['mode']}:{key}"
            if row["kind"] in ("egress", "refused-connect", "exec") and \
                    row["reaction"] == mode["mode"]:
                report["goals"][label] = {
                    "p50": metric["p50"], "p99": metric["p99"],
                    "met": metric["p50"] < GOAL_P50 and metric["p99"] < GOAL_P99}
            if f2b and f2b["n"] and row["reaction"] == mode["mode"]:
                peer = f2b["append_to_ban_ms"]
                report["ratios"][label] = {
                    "p50": round(peer["p50"] / max(metric["p50"], 1e-6), 1),
                    "p99": round(peer["p99"] / max(metric["p99"], 1e-6), 1)}
    return report


def fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    head = ["mode", "kind", "reaction", "n", "p50", "p99", "max", "det p50", "det p99",
            "own p50", "own p99", "dead p50", "dead p99", "rec p50", "rec p99"]
    rows = [head]
    for mode in report["corral"].values():
        for key in sorted(mode["rows"], key=lambda k: (KINDS.index(mode["rows"][k]["kind"]),
                                                       mode["rows"][k]["reaction"])):
            row = mode["rows"][key]
            m = row.get("act_to_contained_ms", {})
            cells = [mode["mode"], row["kind"], row["reaction"], str(row["n"]),
                     fmt(m.get("p50")), fmt(m.get("p99")), fmt(m.get("max"))]
            for metric in ("act_to_detected_ms", "corral_latency_ms", "act_to_dead_ms",
                           "act_to_recorded_ms"):
                got = row.get(metric, {})
                cells += [fmt(got.get("p50")), fmt(got.get("p99"))]
            rows.append(cells)
    f2b = report.get("fail2ban")
    if f2b and f2b["n"]:
        m = f2b["append_to_ban_ms"]
        rows.append(["fail2ban", "log line", "nft ban", str(m["n"]), fmt(m["p50"]),
                     fmt(m["p99"]), fmt(m["max"])] + [""] * 8)
    out = ["corral watch: from the violating act to the reaction in effect, in ms "
           "(nearest-rank percentiles)", "", bk.aligned(rows, right=set(range(3, len(head))))]
    out.append("")
    out.append("p50/p99/max: act -> contained (the attacker's clock just before the act -> the "
               "incident's contained_at);")
    out.append("det: act -> detected_at; own: corral's own latency_ms (from its idea of the "
               "act); dead: act -> the attacker's")
    out.append("exit seen from outside (pidfd); rec: act -> the incident line seen in "
               "incidents.jsonl (inotify).")
    out.append("fail2ban: line appended to its log -> address in the nft set (nft monitor).")
    if report["goals"]:
        out.append("")
        for label, goal in report["goals"].items():
            out.append(f"goal {label}: p50 {goal['p50']:.1f} < {GOAL_P50:.0f} ms and p99 "
                       f"{goal['p99']:.1f} < {GOAL_P99:.0f} ms: "
                       f"{'met' if goal['met'] else 'NOT met'}")
    if report["ratios"]:
        out.append("")
        for label, ratio in report["ratios"].items():
            verdict = "met" if ratio["p50"] >= GOAL_RATIO else "NOT met"
            out.append(f"fail2ban / corral {label}: p50 {ratio['p50']:.1f}x, p99 "
                       f"{ratio['p99']:.1f}x (goal >= {GOAL_RATIO:.0f}x at p50: {verdict})")
    if f2b and f2b.get("missed"):
        out.append(f"fail2ban: {f2b['missed']} lines not banned within 30 s")
    for mode in report["corral"].values():
        if mode["unmatched"]:
            out.append(f"{mode['mode']}: {mode['unmatched']} violations without an incident")
        for row in mode["rows"].values():
            if row["coalesced"] or row["wrong_tripwire"]:
                out.append(f"{mode['mode']} {row['kind']}: {row['coalesced']} coalesced, "
                           f"{row['wrong_tripwire']} with another tripwire")
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/watch.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--samples", type=int, default=200,
                        help="violations per kind and mode (200; revert: reverts per kind)")
    parser.add_argument("--f2b-samples", type=int, default=200, help="fail2ban bans (200)")
    parser.add_argument("--f2b-gap", type=float, default=2.0,
                        help="random pause of up to this many seconds between fail2ban lines "
                        "(2.0: about one cycle of fail2ban's 0.2-2 s polling of its queue)")
    parser.add_argument("--period", type=float, default=2.6,
                        help="log mode: seconds between repeats of one tripwire (2.6; with "
                        "the random 0.25 s delay and the 0.25 s delta poll, repeats stay more "
                        "than 2 s apart)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--modes", default="revert,log")
    parser.add_argument("--no-f2b", action="store_true", help="skip fail2ban")
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 samples each")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file ({RESULTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.f2b_samples = 12, 12
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.kinds) - set(KINDS) or set(args.modes) - {"revert", "log"}:
        parser.error(f"kinds: {', '.join(KINDS)}; modes: revert, log")
    if args.period <= 2.0 + 2 * JITTER:
        parser.error(f"--period must be more than {2.0 + 2 * JITTER} s (corral coalesces "
                     "repeats within 2 s)")
    if {"egress", "refused-connect"} <= set(args.kinds):
        # One tripwire (egress) for both: in log mode their acts must be more than 2 s (plus
        # the jitters) apart as well, so they go opposite each other in the round, and the
        # round grows until they are.
        rest = [k for k in args.kinds if k not in ("egress", "refused-connect")]
        count = len(rest) + 2
        gap = count // 2
        args.kinds = ["egress"] + rest[:gap - 1] + ["refused-connect"] + rest[gap - 1:]
        args.period = max(args.period, (2.0 + 2 * JITTER) * count / min(gap, count - gap) + 0.2)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    bk.prepare_run(PREFIX, TAG)
    world = bk.World(PREFIX, TAG)
    machine = bk.machine()
    started = time.monotonic()
    with bk.throwaway(world):
        modes: dict[str, Any] = {}
        if "revert" in args.modes:
            modes["revert"] = revert_mode(world, args.kinds, args.samples, 8082)
        if "log" in args.modes:
            modes["log"] = log_mode(world, args.kinds, args.samples, args.period, 8081)
        f2b = None if args.no_f2b else fail2ban_peer(world, args.f2b_samples, args.f2b_gap)
        report = build_report(args, modes, f2b)
    report["machine"] = machine
    bk.end_run(report, started, args.out, args.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
