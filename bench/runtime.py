#!/usr/bin/env python3
"""corral's benchmark: what containment costs at start-up and at run time, on this machine.

    bash bench/run.sh [--json] [--repeats N] [--quick] [--no-disk] [--out FILE]

(a) start-to-exit of /usr/bin/true under `corral run`, bwrap and firejail, all entering the same
    throwaway network namespace the same way (`nsenter --net=/run/netns/NS` by default, see
    --netns-wrapper), with context rows (bare true, python3 -c pass, both netns wrappers alone,
    corral's Python start-up); ratios corral/bwrap and corral/firejail.
(b) run-time overhead of the containment on a syscall-heavy and a file-heavy loop (bench/loop.c,
    compiled here with gcc): the program's own timing inside `corral run` versus the same
    binary run directly, on a file system of the same kind as the inside's /tmp (a tmpfs: the
    image root binds the delta's upper/tmp there; an overlay on tmpfs before, and with
    --baseline-src), with the other kind as context.
(c) a real service's cost: the sample's requests contained, plain and under firejail
    (bench/service_load.py).

Everything runs in a throwaway CORRAL_ROOT and network namespace; all it creates (netns, users,
state, mounts, temp dir) is removed in `finally`, and a previous run that was killed is cleaned
up at the next start. See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402
from service_load import measure_service, service_lines  # noqa: E402

BENCH = bk.REPO / "bench"
CORRAL, VENV_PY, TMP = bk.CORRAL, bk.VENV_PY, bk.TMP
# temp dir /tmp/corral-bench-PID, netns corral-bench-PID, services cbPIDt, cbPIDl and cbPIDs
PREFIX, TAG = "corral-bench-", "cb"
RESULTS = bk.RESULTS_DIR / "latest.json"
GOAL_PCT = 5.0  # issue 13, item 5: the run-time loops under +5% over like with like
# corral's Python start-up, measured on its own: `corral run` is run once with a hook that
# records every module it imported (RECORD_IMPORTS), then the context row imports exactly those
# modules and exits (IMPORT_ALL), which also includes the interpreter's start and finalization.
RECORD_IMPORTS = """import json, os, sys
out, manifest = sys.argv[1:3]
def record():
    with open(out, "w") as handle:
        handle.write(json.dumps(sorted(sys.modules)))
me, real_exit = os.getpid(), os._exit
def exit_now(code):  # `corral run` ends with os._exit (cli.base.exit_now): no atexit hook runs
    if os.getpid() == me:
        record()
    real_exit(code)
os._exit = exit_now
sys.argv = ["corral", "run", manifest]
from corral.cli.entry import main
try:
    main()
finally:
    record()
"""
IMPORT_ALL = """import importlib, json, sys
for name in json.load(open(sys.argv[1])):
    try:
        importlib.import_module(name)
    except Exception:
        pass
"""
# Attribution of part (b): corral's own Landlock code (launch.landlock.restrict) applies the
# loop service's real ruleset (its runtime.json: the same rules, handled rights, ABI, scopes),
# its /tmp grant moved to the outside directory like the inside's /tmp, then execs the loop (the
# rules are passed as JSON: the state directory is root's, the shim may run as uid 65534).
CORRAL_LANDLOCK = """import json, os, sys
from corral.launch.landlock import restrict
from corral.plan.sandbox import LandlockPlan
rules, tmp, loop, *argv = sys.argv[1:]
spec = json.loads(rules)
def moved(paths):
    return tuple(tmp if p == "/tmp" else p for p in paths)
restrict(LandlockPlan(read_exec=tuple(spec["read_exec"]) + (loop,),
                      read_only=moved(spec["read_only"]), read_write=moved(spec["read_write"]),
                      tcp_bind=tuple(spec["tcp_bind"]), tcp_connect=tuple(spec["tcp_connect"]),
                      scoped=tuple(spec["scoped"])))
os.execv(loop, [loop, *argv])
"""
UNPRIVILEGED = 65534  # nobody, for bwrap's --uid/--gid
# The peer's policy closest to corral's, in (a) and (b): its default seccomp filter, no
# capabilities, no_new_privs, its own /dev and no network.
FIREJAIL_POLICY = ["--noprofile", "--quiet", "--private-dev", "--caps.drop=all", "--nonewprivs",
                   "--seccomp", "--net=none"]


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise SystemExit(f"bench: {name} not found (bench/run.sh installs what it needs)")
    return path


# -- statistics ------------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": statistics.median(values),
            "p90": bk.percentile(values, 90), "min": min(values), "max": max(values)}


# -- the throwaway world ---------------------------------------------------------------------
class World(bk.World):
    """benchkit's world, entering the netns the way --netns-wrapper says, by absolute paths
    (the launchers are started with posix_spawn, which does not search PATH)."""

    def __init__(self, wrapper: str = "nsenter", run_on_disk: bool = False):
        super().__init__(PREFIX, TAG)
        self.wrapper = wrapper
        self.run_on_disk = run_on_disk

    def create(self) -> None:
        """As benchkit's, with CORRAL_ROOT/run a tmpfs, as /run is on a host: corral's run-time
        state (state.json, written durably four times in a `run` of true) would otherwise wait
        for the disk under the temp dir (8 fsyncs, 3-32 ms a run on this ext4 /tmp, perf trace
        -s). --run-on-disk keeps it there (how runs before 2026-12-05 04:50 UTC measured).
        destroy unmounts it with everything else under the temp dir."""
        super().create()
        if not self.run_on_disk:
            run = self.root / "run"
            run.mkdir(mode=0o755)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m",
                            "corral-bench-run", str(run)], check=True)

    def enter(self, wrapper: str | None = None) -> list[str]:
        """The prefix that runs a command in the netns. `ip netns exec` also gives the command
        a new mount namespace with a fresh /sys, where the host's cgroup mounts are not seen;
        nsenter --net changes the network namespace only."""
        if (wrapper or self.wrapper) == "ip":
            return [tool("ip"), "netns", "exec", self.netns]
        return [tool("nsenter"), f"--net=/run/netns/{self.netns}"]


# -- building the workloads ------------------------------------------------------------------
def write_manifests(world: World, loop_bin: Path,
                    args: argparse.Namespace) -> tuple[Path, Path]:
    true_toml = world.dir / "true.toml"
    true_toml.write_text(f'''name = "{world.service("t")}"
[image]
include = ["/usr/bin/true"]
[process.main]
command = ["/usr/bin/true"]
''')
    loop_toml = world.dir / "loop.toml"
    loop_toml.write_text(f'''name = "{world.service("l")}"
[image]
add = {{ "/opt/bench/loop" = "{loop_bin}" }}
delta = "tmpfs"
delta_size = "512M"
[process.main]
command = ["/opt/bench/loop", "{args.syscalls}", "{args.files}", "/tmp", "{args.loop_reps}"]
limits = {{ memory = "1G" }}
''')
    # The same service with every tripwire but base-write: its sensor (fanotify on the delta)
    # does not run, for the attribution row "inside, without the base-write tripwire".
    quiet = loop_toml.read_text().replace(world.service("l"), world.service("q"), 1)
    (world.dir / "loop-nobw.toml").write_text(
        quiet + '[watch]\ntripwires = ["egress", "listen", "exec", "setuid", "ptrace", '
        '"spoof", "flood"]\n')
    return true_toml, loop_toml


def compile_loop(world: World) -> Path:
    out = world.dir / "loop"
    # Static: the image gets just this file (no loader, no libc to copy), and the very same
    # binary runs outside.
    subprocess.run([tool("gcc"), "-O2", "-Wall", "-static", "-o", str(out),
                    str(BENCH / "loop.c")], check=True)
    return out


# -- (a) start-to-exit -----------------------------------------------------------------------
@dataclass
class Launcher:
    key: str
    label: str
    argv: list[str]
    context: bool = False  # a reference row, not one of the compared tools
    env: dict[str, str] | None = None  # extra environment (the baseline's PYTHONPATH)


RETRIES: list[dict[str, str]] = []  # runs that failed once and passed when run again


def once_more(what: str, run, *args):
    """Run; on a failure, note it and run once more (a second failure is fatal)."""
    try:
        return run(*args)
    except RuntimeError as exc:
        RETRIES.append({"what": what, "error": str(exc)[-600:]})
        bk.warn(f"{what} failed, running it again: {str(exc)[-300:]}")
        return run(*args)


def timed_spawn(argv: list[str], env: dict[str, str], log_fd: int) -> float:
    """Milliseconds from posix_spawn to the reaped exit; output goes to the log."""
    actions = [(os.POSIX_SPAWN_DUP2, log_fd, 1), (os.POSIX_SPAWN_DUP2, log_fd, 2)]
    t0 = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    _, status = os.waitpid(pid, 0)
    elapsed = (time.perf_counter_ns() - t0) / 1e6
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {os.waitstatus_to_exitcode(status)}")
    return elapsed


def record_imports(world: World, true_toml: Path) -> Path:
    """The modules one `corral run` of the true service imports, as a JSON list in a file."""
    out = world.dir / "run-imports.json"
    # The first start after an install compiles the service's seccomp filters into its cache
    # (launch.bpf), importing libseccomp's binding; every later start, like those measured,
    # reads them. Record a later one.
    world.corral("run", str(true_toml))
    result = subprocess.run(world.enter() + [str(VENV_PY), "-c", RECORD_IMPORTS, str(out),
                                             str(true_toml)],
                            capture_output=True, text=True, env=world.env(), timeout=120)
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(f"corral run (recording its imports) failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-800:]}")
    return out


def launchers(world: World, true_toml: Path, baseline: Path | None = None,
              attribute: tuple[str, ...] = ()) -> list[Launcher]:
    ns = world.enter()
    imports = record_imports(world, true_toml)
    w = "ip netns exec NS" if world.wrapper == "ip" else "nsenter --net NS"
    base = str(world.base_root(world.service("t")))
    bwrap = [tool("bwrap"), "--ro-bind", base, "/", "--proc", "/proc", "--dev", "/dev",
             "--tmpfs", "/tmp", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv",
             "--cap-drop", "ALL"]
    bwrap_user = bwrap + ["--unshare-user", "--uid", str(UNPRIVILEGED), "--gid",
                          str(UNPRIVILEGED)]
    firejail = [tool("firejail"), *FIREJAIL_POLICY]
    true = "/usr/bin/true"
    extra = []
    # Bytecode written first for corral's sources (and the baseline's): under
    # PYTHONDONTWRITEBYTECODE, or with sources newer than their .pyc, every start would
    # compile them anew (~30 ms, measured as launch time by mistake before).
    sources = [bk.REPO / "src" / "corral"] + ([baseline] if baseline is not None else [])
    subprocess.run([str(VENV_PY), "-m", "compileall", "-q", *map(str, sources)], check=True)
    if baseline is not None:
        # Another checkout's corral (its src/ first on the path, same venv): the before of a
        # change, measured in the same rounds as the after. Its own copy of the service: two
        # versions whose seccomp cache keys differ would recompile the service's cached
        # filters (launch.bpf) at every start, each for the other (~10 ms and libseccomp's
        # imports added to both rows, as every --baseline-src run before 2026-12-05 08:00).
        twin = world.dir / "true-baseline.toml"
        twin.write_text(true_toml.read_text().replace(world.service("t"), world.service("b"), 1))
        world.install(twin, world.service("b"))
        extra.append(Launcher("corral-baseline", f"{w} corral run (baseline {baseline})",
                              ns + [str(CORRAL), "run", str(twin)], context=True,
                              env={"PYTHONPATH": str(baseline)}))
    for skip in attribute:
        # Attribution (launch.benchskip, bench-only): the same start without these mechanisms.
        extra.append(Launcher(f"corral-skip-{skip}", f"{w} corral run, without {skip}",
                              ns + [str(CORRAL), "run", str(true_toml)], context=True,
                              env={"CORRAL_BENCH_SKIP": skip.replace("+", ",")}))
    return extra + [
        Launcher("true", "/usr/bin/true (bare)", [true], context=True),
        Launcher("python", "python3 -c pass", ["/usr/bin/python3", "-c", "pass"], context=True),
        Launcher("corral-python", "corral's Python start-up: the imports of run, no launch",
                 [str(VENV_PY), "-c", IMPORT_ALL, str(imports)], context=True),
        Launcher("ip-netns", "ip netns exec NS true", world.enter("ip") + [true],
                 context=True),
        Launcher("nsenter", "nsenter --net NS true", world.enter("nsenter") + [true],
                 context=True),
        Launcher("bwrap", f"{w} bwrap (root, caps dropped)", ns + bwrap + [true]),
        Launcher("bwrap-user", f"{w} bwrap (userns, uid 65534)", ns + bwrap_user + [true]),
        Launcher("firejail", f"{w} firejail", ns + firejail + [true]),
        Launcher("corral", f"{w} corral run", ns + [str(CORRAL), "run", str(true_toml)]),
    ]


def measure_startup(world: World, rows: list[Launcher], repeats: int,
                    warmup: int) -> dict[str, list[float]]:
    """Round-robin: each round runs every launcher once, in a shuffled order, so drift and
    noise spread evenly over all of them."""
    env = world.env()
    samples: dict[str, list[float]] = {row.key: [] for row in rows}
    log_fd = os.open(world.dir / "startup.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    rng = random.Random(1)
    try:
        for rnd in range(warmup + repeats):
            order = rows[:]
            rng.shuffle(order)
            for row in order:
                try:
                    elapsed = once_more(row.label, timed_spawn, row.argv,
                                        env | (row.env or {}), log_fd)
                except RuntimeError as exc:
                    tail = (world.dir / "startup.log").read_text()[-800:]
                    raise RuntimeError(f"{row.label}: {exc}\n{tail}") from None
                if rnd >= warmup:
                    samples[row.key].append(elapsed)
            if rnd >= warmup and (rnd - warmup + 1) % 10 == 0:
                bk.progress(f"start-up: {rnd - warmup + 1}/{repeats} rounds")
    finally:
        os.close(log_fd)
    return samples


# -- (b) run-time overhead -------------------------------------------------------------------
LINE = re.compile(r"(?:^|\| )(syscall|files) (\d+) (\d+)$")
FS_LINE = re.compile(r"(?:^|\| )fs (\S+)$")
WORKS = ("syscall", "files")


def parse_loop(output: str) -> dict[str, list[float]]:
    """{"syscall": [wall ms...], "syscall_cpu": [cpu ms...], "files": ..., "files_cpu": ...}
    from the program's lines (`corral run` prefixes them with "PROCESS| ")."""
    found: dict[str, list[float]] = {k: [] for w in WORKS for k in (w, f"{w}_cpu")}
    for line in output.splitlines():
        match = LINE.search(line.strip())
        if match:
            found[match.group(1)].append(int(match.group(2)) / 1e6)
            found[f"{match.group(1)}_cpu"].append(int(match.group(3)) / 1e6)
    return found


def run_loop(argv: list[str], env: dict[str, str], expect: dict[str, int],
             fs: list[str] | None = None) -> dict[str, list[float]]:
    """The loop's measurements; `fs` receives the kind of its directory's file system."""
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    found = parse_loop(result.stdout)
    if fs is not None:
        fs += [m.group(1) for line in result.stdout.splitlines()
               if (m := FS_LINE.search(line.strip()))]
    counts = {work: len(found[work]) for work in expect}
    if result.returncode != 0 or counts != expect:
        raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}, results "
                           f"{counts} (wanted {expect}): "
                           f"{(result.stderr or result.stdout).strip()[-800:]}")
    return found


def prepare_places(world: World) -> dict[str, Path]:
    """Outside directories to compare with the inside's /tmp (an overlay on the tmpfs delta):
    a tmpfs, an overlay whose upper layer is on a tmpfs (like corral's delta), and the host's
    /tmp (whatever file system it is on)."""
    tmpfs = world.dir / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512M,mode=1777", "bench-tmpfs",
                    str(tmpfs)], check=True)
    layers = world.dir / "ovl-layers"
    layers.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512M", "bench-ovl", str(layers)],
                   check=True)
    lower, merged = world.dir / "ovl-lower", world.dir / "ovl-merged"
    (lower / "tmp").mkdir(parents=True)
    os.chmod(lower / "tmp", 0o1777)
    merged.mkdir()
    for sub in ("upper", "work"):
        (layers / sub).mkdir()
    subprocess.run(["mount", "-t", "overlay", "-o", f"lowerdir={lower},upperdir={layers}/upper,"
                    f"workdir={layers}/work", "bench-ovl", str(merged)], check=True)
    host = world.dir / "host-tmp"
    host.mkdir()
    return {"tmpfs": tmpfs, "overlay": merged / "tmp", "host": host}




def fs_type(path: Path) -> str:
    result = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)],
                            capture_output=True, text=True)
    return result.stdout.strip() or "?"


def measure_runtime(world: World, loop_bin: Path, loop_toml: Path, places: dict[str, Path],
                    args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Alternate inside and outside invocations (shuffled per round); each invocation does one
    unreported warm-up round and `reps` measured rounds of its loops."""
    reps, nsys, nfiles = args.loop_reps, str(args.syscalls), str(args.files)
    world.install(loop_toml, world.service("l"))
    env = world.env()
    loop = str(loop_bin)
    both = {"syscall": reps, "files": reps}
    files_only = {"files": reps}
    # What the inside's /tmp is (one unreported run, a warm-up too): the attribution rows run
    # on the same kind of place outside, and the goal compares with it.
    seen: list[str] = []
    once_more("loop inside (its /tmp)", run_loop, world.enter() + [str(CORRAL), "run",
              str(loop_toml)], env, both, seen)
    like = seen[-1] if seen and seen[-1] in ("tmpfs", "overlay") else "overlay"
    args.inside_fs = seen[-1] if seen else "?"
    args.like = like
    place = str(places[like])
    spec = json.loads((world.state_dir(world.service("l")) / "runtime.json").read_text())
    rules = json.dumps(spec["processes"][0]["landlock"])
    corral_landlock = [str(VENV_PY), "-c", CORRAL_LANDLOCK, rules, place,
                       loop, "0", nfiles, place, str(reps)]
    setpriv = [tool("setpriv"), f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}",
               "--clear-groups"]
    kinds = {  # argv, results expected
        "inside": (world.enter() + [str(CORRAL), "run", str(loop_toml)], both),
        "tmpfs": ([loop, nsys, nfiles, str(places["tmpfs"]), str(reps)], both),
        "overlay": ([loop, nsys, nfiles, str(places["overlay"]), str(reps)], both),
        # attribution: the cost of having any seccomp filter at all
        "seccomp": ([loop, nsys, "0", str(places["tmpfs"]), str(reps), "seccomp"],
                    {"syscall": reps}),
        # attribution: Landlock's checks on the file loop, on the place like the inside's /tmp
        "landlock": ([loop, "0", nfiles, place, str(reps), "landlock"], {"files": reps}),
        # attribution: the same place as an unprivileged user (as inside), not root: the
        # kernel's permission checks take longer paths for a user without privileges
        "user": ([tool("setpriv"), f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}",
                  "--clear-groups", loop, "0", nfiles, place, str(reps)], {"files": reps}),
        # the peer: both loops under firejail (its seccomp filter, no capabilities), the files
        # on the same place
        "firejail": ([tool("firejail"), *FIREJAIL_POLICY, loop, nsys, nfiles, place,
                      str(reps)], both),
        # attribution with corral's real Landlock ruleset (applied by its own code), as root
        # and as the unprivileged user: the two file-system ingredients together, outside
        "landlock-corral": (corral_landlock, files_only),
        "user-landlock": (setpriv + corral_landlock, files_only),
    }
    envs: dict[str, dict[str, str]] = {}
    if args.baseline_src is not None:
        # the before of a change, inside, in the same rounds (as in part (a))
        kinds["inside-baseline"] = (world.enter() + [str(CORRAL), "run", str(loop_toml)], both)
        envs["inside-baseline"] = {"PYTHONPATH": str(args.baseline_src)}
    if args.loop_attribute:
        # inside, without one ingredient at a time (launch.benchskip; "base-write": the
        # manifest leaves that tripwire out, so its fanotify sensor does not run)
        nobw = world.dir / "loop-nobw.toml"
        world.install(nobw, world.service("q"))
        for skip in args.loop_attribute.split(","):
            names = skip.split("+")
            manifest = nobw if "base-write" in names else loop_toml
            rest = ",".join(n for n in names if n != "base-write")
            kinds[f"inside-{skip}"] = (world.enter() + [str(CORRAL), "run", str(manifest)],
                                       both)
            envs[f"inside-{skip}"] = {"CORRAL_BENCH_SKIP": rest}
    samples = {kind: {k: [] for w in WORKS for k in (w, f"{w}_cpu")} for kind in kinds}
    fs_of: dict[str, list[str]] = {kind: [] for kind in kinds}
    rng = random.Random(2)
    for rnd in range(args.loop_rounds):
        order = list(kinds)
        rng.shuffle(order)
        for kind in order:
            argv, expect = kinds[kind]
            found = once_more(f"loop {kind}", run_loop, argv, env | envs.get(kind, {}), expect,
                              fs_of[kind])
            for work in expect:
                samples[kind][work].extend(found[work])
                samples[kind][f"{work}_cpu"].extend(found[f"{work}_cpu"])
        bk.progress(f"run time: {rnd + 1}/{args.loop_rounds} rounds")
    # Each row's directory's file system as the loop saw it (the inside's and the baseline's
    # /tmp: which corral made it).
    args.fs_of = {kind: sorted(set(found)) for kind, found in fs_of.items() if found}
    if not args.no_disk:
        # The host's /tmp is on disk here, much slower: one run, no warm-up, context only.
        bk.progress("run time: host /tmp (context)")
        samples["host"] = run_loop([loop, "0", nfiles, str(places["host"]), "1", "nowarm"],
                                   env, {"files": 1})
    return samples


# -- report ----------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpu": cpu, "cpus": str(os.cpu_count()),
            "python": first(["/usr/bin/python3", "--version"]),
            "bwrap": first([tool("bwrap"), "--version"]),
            "firejail": first([tool("firejail"), "--version"]),
            "gcc": first([tool("gcc"), "--version"]),
            "tmp_fs": fs_type(TMP)}


def build_report(args, rows, startup, runtime, places) -> dict:
    st = {row.key: {"label": row.label, "context": row.context, "argv": row.argv,
                    **summary(startup[row.key]), "samples_ms": startup[row.key]}
          for row in rows}
    ratios: dict[str, float] = {}
    derived: dict[str, float] = {}
    if st:  # not with --runtime-only
        corral = st["corral"]["median"]
        ratios = {f"corral/{k}": corral / st[k]["median"] for k in ("bwrap", "bwrap-user",
                                                                     "firejail")}
        # What `corral run` costs beyond its own Python start-up: the containment work itself.
        # Like with like: each tool's own work, without the wrapper (and corral's Python start-up).
        wrapper = st["ip-netns" if args.netns_wrapper == "ip" else "nsenter"]["median"]
        python = st["corral-python"]["median"]
        derived = {"corral_minus_python_ms": corral - python,
                   "corral_minus_python_and_wrapper_ms": corral - python - wrapper,
                   "bwrap_minus_wrapper_ms": st["bwrap"]["median"] - wrapper,
                   "bwrap_userns_minus_wrapper_ms": st["bwrap-user"]["median"] - wrapper,
                   "firejail_minus_wrapper_ms": st["firejail"]["median"] - wrapper}
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "config": {"netns_wrapper": args.netns_wrapper, "repeats": args.repeats,
                   "warmup": args.warmup, "syscalls": args.syscalls, "files": args.files,
                   "loop_rounds": args.loop_rounds, "loop_reps": args.loop_reps,
                   "inside_tmp": getattr(args, "inside_fs", None),
                   "like_with_like": getattr(args, "like", None),
                   "fs_of_rows": getattr(args, "fs_of", None),
                   "startup_only": args.startup_only, "runtime_only": args.runtime_only,
                   "service_only": args.service_only,
                   "run_state": "disk (temp dir)" if args.run_on_disk else "tmpfs"},
        "startup_ms": st,
        "ratios": ratios,
        "derived_ms": derived,
        "retries": RETRIES,
    }
    if runtime is not None:
        report.update(runtime_report(args, runtime, places))
    return report


def runtime_report(args, runtime, places) -> dict:
    run = {}
    like = getattr(args, "like", "overlay")
    fs_of = getattr(args, "fs_of", {})
    inside_kinds = tuple(k for k in runtime if k.startswith("inside-"))
    for work, label, outside_kinds in (
            ("syscall", f"{args.syscalls:,} x getppid", ("tmpfs", "seccomp", "firejail",
                                                          *inside_kinds)),
            ("files", f"{args.files:,} files create/write/read/unlink",
             ("tmpfs", "overlay", "landlock", "landlock-corral", "user", "user-landlock",
              "firejail", "host", *inside_kinds))):
        ins = runtime["inside"]
        inside = {**summary(ins[work]), "cpu_median": statistics.median(ins[f"{work}_cpu"]),
                  "samples_ms": ins[work], "cpu_samples_ms": ins[f"{work}_cpu"]}
        entry = {"label": label, "inside": inside, "outside": {}}
        for kind in outside_kinds:
            got = runtime.get(kind, {})
            if not got.get(work):
                continue
            out = {**summary(got[work]), "cpu_median": statistics.median(got[f"{work}_cpu"])}
            entry["outside"][kind] = {
                **out, "samples_ms": got[work], "cpu_samples_ms": got[f"{work}_cpu"],
                "fs": "-" if work == "syscall" and kind != "tmpfs"
                else ",".join(fs_of.get(kind, ())) or fs_type(places.get(kind, TMP)),
                "overhead_pct": (inside["median"] / out["median"] - 1) * 100,
                "overhead_cpu_pct": (inside["cpu_median"] / out["cpu_median"] - 1) * 100,
                "context": kind not in ("tmpfs", "overlay")}
        run[work] = entry
    out_of = {work: run[work]["outside"] for work in run}

    def extra(work: str, kind: str, base: str) -> dict[str, float]:
        a, b = out_of[work][kind], out_of[work][base]
        return {"wall": (a["median"] / b["median"] - 1) * 100,
                "cpu": (a["cpu_median"] / b["cpu_median"] - 1) * 100}

    attribution = {  # outside, what one ingredient alone adds (on the place like the inside)
        "any_seccomp_filter_on_syscall_loop_pct": extra("syscall", "seccomp", "tmpfs"),
        "landlock_on_files_loop_pct": extra("files", "landlock", like),
        "corral_landlock_on_files_loop_pct": extra("files", "landlock-corral", like),
        "user_and_corral_landlock_on_files_loop_pct": extra("files", "user-landlock", like),
        "unprivileged_user_on_files_loop_pct": extra("files", "user", like),
        "overlay_vs_tmpfs_on_files_loop_pct": extra("files", "overlay", "tmpfs"),
        # the peer's own run-time cost, measured the same way as corral's
        "firejail_on_syscall_loop_pct": extra("syscall", "firejail", "tmpfs"),
        "firejail_on_files_loop_pct": extra("files", "firejail", like)}
    # The goal is judged like with like: the syscall loop against the same binary outside,
    # the files loop against the same kind of file system outside as the inside's /tmp is
    # (`like`: a tmpfs, the delta's upper/tmp bound by the image root; an overlay on tmpfs
    # where corral makes one); on the elapsed time, and also shown on CPU time.
    judged = {"syscall": out_of["syscall"]["tmpfs"]["overhead_pct"],
              "files": out_of["files"][like]["overhead_pct"]}
    judged_cpu = {"syscall": out_of["syscall"]["tmpfs"]["overhead_cpu_pct"],
                  "files": out_of["files"][like]["overhead_cpu_pct"]}
    return {
        "runtime_ms": run,
        "attribution_pct": attribution,
        "goal": {"overhead_pct_max": GOAL_PCT, "overhead_pct": judged,
                 "overhead_cpu_pct": judged_cpu, "files_like": like,
                 "met": all(v < GOAL_PCT for v in judged.values())},
    }


def table(report: dict) -> str:
    out = []
    m, cfg = report["machine"], report["config"]
    out.append(f"corral benchmark - {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}; "
               f"host /tmp is {m['tmp_fs']}")
    st = report["startup_ms"]
    if st:  # not with --runtime-only
        out.append("")
        out.append(f"(a) start-to-exit of /usr/bin/true, ms ({cfg['repeats']} runs each, after "
                   f"{cfg['warmup']} warm-up rounds)")
        width = max(len(v["label"]) for v in st.values())
        out.append(f"  {'':{width}}  {'median':>8}  {'p90':>8}  {'min':>8}")
        for entry in st.values():
            out.append(f"  {entry['label']:{width}}  {entry['median']:8.2f}  {entry['p90']:8.2f}  "
                       f"{entry['min']:8.2f}")
        r, d = report["ratios"], report["derived_ms"]
        out.append(f"  corral/bwrap {r['corral/bwrap']:.1f}x, corral/bwrap(userns) "
                   f"{r['corral/bwrap-user']:.1f}x, corral/firejail {r['corral/firejail']:.1f}x "
                   f"(medians)")
        out.append(f"  without the wrapper (and corral's Python start-up): corral "
                   f"{d['corral_minus_python_and_wrapper_ms']:.1f} ms, bwrap "
                   f"{d['bwrap_minus_wrapper_ms']:.1f} ms, bwrap(userns) "
                   f"{d['bwrap_userns_minus_wrapper_ms']:.1f} ms, firejail "
                   f"{d['firejail_minus_wrapper_ms']:.1f} ms")
    if "runtime_ms" in report:
        out += runtime_table(report)
    for retry in report["retries"]:
        out.append(f"  note: {retry['what']} failed once and was run again: "
                   f"{retry['error'][-200:]}")
    load = m.get("loadavg_before"), m.get("loadavg_after")
    out.append(f"  load average (1 min) before/after: {load[0]} / {load[1]} "
               f"(other work on the machine makes the numbers noisier)")
    return "\n".join(out)


def runtime_table(report: dict) -> list[str]:
    """Part (b) of the table."""
    cfg = report["config"]
    out = [""]
    out.append(f"(b) run time inside corral vs the same static binary outside: the program's own "
               f"timing, ms ({cfg['loop_rounds']} x {cfg['loop_reps']} runs each)")
    like = report["goal"].get("files_like", "overlay")
    same = "same tmpfs" if like == "tmpfs" else "same overlay"
    where_of = {"tmpfs": "outside", "overlay": "outside, /tmp-like overlay on tmpfs",
                "seccomp": "outside + 1-insn allow-all seccomp filter",
                "landlock": f"outside, {same} + Landlock ruleset",
                "user": f"outside, {same}, as uid 65534",
                "landlock-corral": f"outside, {same} + corral's Landlock ruleset",
                "user-landlock": f"outside, {same}, uid 65534 + corral's ruleset",
                "firejail": "firejail (peer: seccomp, no caps)",
                "host": "outside, host /tmp"}
    inside_tmp = {"tmpfs": "inside, /tmp = bind of the tmpfs delta's upper/tmp",
                  "overlay": "inside, /tmp = overlay on tmpfs delta"}.get(
                      cfg.get("inside_tmp"), f"inside, /tmp = {cfg.get('inside_tmp')}")
    rows = []
    for work, entry in report["runtime_ms"].items():
        i = entry["inside"]
        rows.append((entry["label"], "inside" if work == "syscall" else inside_tmp, i, "", ""))
        for kind, o in entry["outside"].items():
            where = where_of.get(kind) or f"inside, without {kind.removeprefix('inside-')}"
            if kind == "inside-baseline":
                where = "inside, baseline (--baseline-src)"
                if work == "files":
                    where += f", /tmp = {o['fs']}"
            if kind == "tmpfs" and work == "files":
                where = "outside, tmpfs" + (" (like with like)" if like == "tmpfs" else "")
            if kind == "overlay" and work == "files" and like == "overlay":
                where += " (like with like)"
            if kind == "firejail" and work == "files":
                where += f", {same}"
            if kind == "host":
                where += f" ({o['fs']}; n={o['n']}, context)"
            rows.append(("", where, o, f"{o['overhead_pct']:+.1f}%",
                         f"{o['overhead_cpu_pct']:+.1f}%"))
    w0 = max(len(row[0]) for row in rows)
    w1 = max(len(row[1]) for row in rows)
    out.append(f"  {'workload':{w0}}  {'where':{w1}}  {'median':>8}  {'p90':>8}  "
               f"{'inside is':>9}  {'cpu med':>8}  {'inside is':>9}")
    for label, where, stats, pct, cpu_pct in rows:
        out.append(f"  {label:{w0}}  {where:{w1}}  {stats['median']:8.1f}  {stats['p90']:8.1f}"
                   f"  {pct:>9}  {stats['cpu_median']:8.1f}  {cpu_pct:>9}")
    goal, att = report["goal"], report["attribution_pct"]
    g, gc = goal["overhead_pct"], goal["overhead_cpu_pct"]
    out.append(f"  goal: overhead < {goal['overhead_pct_max']:.0f}% (medians of elapsed time): "
               f"{'met' if goal['met'] else 'NOT met'}"
               + (" (unreliable: the machine was busy, run again when it is idle)"
                  if report.get("noisy") else ""))

    def pair(key: str) -> str:
        return f"{att[key]['wall']:+.1f}% (cpu {att[key]['cpu']:+.1f}%)"

    out.append(f"    syscall loop {g['syscall']:+.1f}% (cpu {gc['syscall']:+.1f}%); any seccomp "
               f"filter alone, outside: {pair('any_seccomp_filter_on_syscall_loop_pct')}")
    out.append(f"    files loop vs the {same} {g['files']:+.1f}% (cpu {gc['files']:+.1f}%);"
               f" outside, Landlock alone: {pair('landlock_on_files_loop_pct')}, an "
               f"unprivileged user alone: {pair('unprivileged_user_on_files_loop_pct')}")
    out.append(f"    corral's own ruleset: {pair('corral_landlock_on_files_loop_pct')}, with the "
               f"unprivileged user: {pair('user_and_corral_landlock_on_files_loop_pct')}")
    out.append(f"    (the overlay itself vs plain tmpfs: "
               f"{pair('overlay_vs_tmpfs_on_files_loop_pct')})")
    out.append(f"    the peer, firejail, costs the syscall loop "
               f"{pair('firejail_on_syscall_loop_pct')} and the files loop "
               f"{pair('firejail_on_files_loop_pct')} (vs the {same})")
    return out


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--repeats", type=int, default=30, help="start-up runs per row (30)")
    parser.add_argument("--warmup", type=int, default=3, help="start-up warm-up rounds (3)")
    parser.add_argument("--syscalls", type=int, default=2_000_000, help="getppid calls (2M)")
    parser.add_argument("--files", type=int, default=20_000, help="files per round (20000)")
    parser.add_argument("--loop-rounds", type=int, default=4,
                        help="invocations of the loops per place (4)")
    parser.add_argument("--loop-reps", type=int, default=3,
                        help="measured rounds per invocation (3)")
    parser.add_argument("--netns-wrapper", choices=("nsenter", "ip"), default="nsenter",
                        help="how every launcher enters the netns: nsenter --net (default) or "
                        "ip netns exec (a new mount namespace and /sys, without the host's "
                        "cgroup mounts)")
    parser.add_argument("--no-disk", action="store_true",
                        help="skip the context run on the host's /tmp (slow on disk)")
    parser.add_argument("--service-rounds", type=int, default=8,
                        help="rounds of requests per server in part (c) (8)")
    parser.add_argument("--requests", type=int, default=500,
                        help="sequential requests per round and server in part (c) (500)")
    parser.add_argument("--startup-only", action="store_true",
                        help="part (a) only: start-to-exit, without the run-time loops and "
                        "the service (about a minute)")
    parser.add_argument("--service-only", action="store_true",
                        help="part (c) alone (with --service-attribute: what each mechanism "
                        "costs the sample's request)")
    parser.add_argument("--runtime-only", action="store_true",
                        help="part (b) only: the run-time loops, without the start-up rows and "
                        "the service (about 3 minutes)")
    parser.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                        help="add a row: `corral run` with DIR (another checkout's src/, e.g. "
                        "from `git archive`) first on PYTHONPATH, in the same rounds (to (a), "
                        "and to (b) as an inside row)")
    parser.add_argument("--attribute", default="", metavar="A,B+C",
                        help="add rows to (a): `corral run` with CORRAL_BENCH_SKIP=A, then B,C "
                        "(docs/sandbox.md), e.g. pidns,ipcns,utsns,cgroupns,seccomp,landlock")
    parser.add_argument("--service-attribute", default="", metavar="A,B+C",
                        help="part (c): also the sample contained without these mechanisms "
                        "(CORRAL_BENCH_SKIP names, or nft: its table flushed), e.g. "
                        "cpu-cgroup,seccomp,landlock,nft")
    parser.add_argument("--loop-attribute", default="", metavar="A,B+C",
                        help="add rows to (b): the loop service run with CORRAL_BENCH_SKIP=A, "
                        "then B,C (docs/sandbox.md; `base-write`: without that tripwire's "
                        "sensor), e.g. landlock,seccomp,base-write")
    parser.add_argument("--run-on-disk", action="store_true",
                        help="keep CORRAL_ROOT/run under the temp dir instead of a tmpfs (as "
                        "/run is on a host): how runs before 2026-12-05 measured")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few repeats")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file ({RESULTS})")
    args = parser.parse_args(argv)
    if args.startup_only + args.runtime_only + args.service_only > 1:
        parser.error("--startup-only, --runtime-only and --service-only exclude each other")
    if args.quick:
        args.repeats, args.warmup, args.loop_rounds, args.loop_reps = 5, 1, 2, 2
        args.files = min(args.files, 5000)
        args.service_rounds, args.requests = 2, 100
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    bk.prepare_run(PREFIX, TAG)
    world = World(wrapper=args.netns_wrapper, run_on_disk=args.run_on_disk)
    started = time.monotonic()
    load_before = round(os.getloadavg()[0], 2)
    with bk.throwaway(world):
        loop_bin = compile_loop(world)
        true_toml, loop_toml = write_manifests(world, loop_bin, args)
        rows: list[Launcher] = []
        startup: dict[str, list[float]] = {}
        if not args.runtime_only and not args.service_only:
            bk.progress("installing the benchmark services")
            world.install(true_toml, world.service("t"))
            rows = launchers(world, true_toml, args.baseline_src,
                             tuple(filter(None, args.attribute.split(","))))
            bk.progress(f"start-up: {args.warmup} warm-up + {args.repeats} rounds of "
                        f"{len(rows)} rows")
            startup = measure_startup(world, rows, args.repeats, args.warmup)
        if args.startup_only:
            report = build_report(args, rows, startup, None, None)
        elif args.service_only:
            report = build_report(args, rows, startup, None, None)
            report["service"] = measure_service(
                world, args.service_rounds, args.requests, [tool("firejail"), *FIREJAIL_POLICY],
                tuple(a for a in args.service_attribute.split(",") if a))
        else:
            places = prepare_places(world)
            runtime = measure_runtime(world, loop_bin, loop_toml, places, args)
            report = build_report(args, rows, startup, runtime, places)
            if not args.runtime_only:
                report["service"] = measure_service(
                    world, args.service_rounds, args.requests,
                    [tool("firejail"), *FIREJAIL_POLICY],
                    tuple(a for a in args.service_attribute.split(",") if a))
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["machine"]["loadavg_before"] = load_before
    bk.note_load(report)
    service = "\n".join(service_lines(report["service"])) + "\n\n" if "service" in report else ""
    bk.publish(report, args.out, args.json, lambda: (
        f"{table(report)}\n\n{service}{report['elapsed_s']:.0f} s; results in {args.out}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
