#!/usr/bin/env python3
"""corral's recovery: (a) how long `corral revert` takes to bring the sample service back
(processes running, declared ports listening) against a plain restart, with an empty delta and
with a non-trivial one; (b) how long corral takes to report a tampered service (`corral delta`
+ `corral verify`) against `aide --check` on the same trees.

    bash bench/recover.sh [--json] [--rounds N] [--quick] [--out FILE]

Everything runs in a throwaway CORRAL_ROOT and network namespace (every CLI call enters only
the network namespace, with nsenter --net), with the sample "notes" service (the same
containment as examples/notes) under a benchmark name.

(a) Each round runs these four in a shuffled order (every one starts and ends with the service
    up and a fresh delta):
    - revert, empty delta: `corral revert NAME`, which returns when the processes run and the
      declared ports listen again;
    - revert, big delta: first (untimed) 1,000 files of 1 KiB and one 50 MiB file of random
      bytes are written in /tmp inside with `corral exec`; then `corral revert NAME`, which
      also archives that delta (zstd) before it throws it away;
    - restart, empty delta: `corral down NAME` + `corral up FILE` (up also returns when the
      ports listen);
    - restart, big delta: the same delta first, then down + up (a restart throws the delta
      away without archiving it).
    The ratio revert/restart of the medians is the result (goal under 1.5x). Where the time
    goes is read from corral's own time stamps: the archive's directory name (archiving
    started) and its meta.json mtime (archiving done), the process's started_at in state.json.
(b) The base's copy of /usr/bin/python3.11 gets bytes appended (a trojaned binary planted
    from the host side) and a file appears in the delta (/tmp/payload.py, written inside);
    then, each round in a shuffled order: `corral delta NAME --json` (reports the file),
    `corral verify NAME --json` (reports the binary; exit 3), and `aide --check` with its own
    configuration and database under the temp dir, whose rules cover the same two trees (the
    base root and the delta's upper layer) with the attributes corral's verify compares
    (type, permissions, owner, group, size, link target, and a hash: sha256); its database is
    made by `aide --init` before the tampering, untimed. Page caches are warm for both.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402

PREFIX, TAG = "corral-brecover-", "cr"
RESULTS = bk.RESULTS_DIR / "recover.json"
PORT = 8080
PY311 = "/usr/bin/python3.11"
GOAL_REVERT_RATIO = 1.5

POPULATE = r"""
import os
os.makedirs("/tmp/bench", exist_ok=True)
for i in range(int(os.environ.get("FILES", "1000"))):
    with open("/tmp/bench/small%04d" % i, "wb") as f:
        f.write(os.urandom(1024))
with open("/tmp/bench/big.bin", "wb") as f:
    for _ in range(int(os.environ.get("MIB", "50"))):
        f.write(os.urandom(1 << 20))
print("ok")
"""

HEALTH = ("import urllib.request as u, sys; "
          "sys.stdout.write(u.urlopen('http://127.0.0.1:%d/health', timeout=5).read().decode())")


def populate(world: bk.World, name: str, files: int, mib: int) -> None:
    code = POPULATE.replace('os.environ.get("FILES", "1000")', str(files)) \
        .replace('os.environ.get("MIB", "50")', str(mib))
    result = world.corral("exec", name, "app", "--", PY311, "-I", "-c", code, check=False)
    if result.returncode != 0 or "ok" not in result.stdout:
        raise RuntimeError(f"writing the delta failed: {result.stderr.strip()[-500:]}")


def health(world: bk.World) -> None:
    result = subprocess.run(world.enter() + [str(bk.VENV_PY), "-c", HEALTH % PORT],
                            capture_output=True, text=True, timeout=30)
    if result.stdout != "ok\n":
        raise RuntimeError(f"the service does not answer after the operation: "
                           f"{result.stderr.strip()[-300:]}")


def latest_archive(world: bk.World, name: str) -> tuple[float, float] | None:
    """(archiving started, archiving done) of the newest archive, from corral's own stamps."""
    archives = world.state_dir(name) / "archives"
    done = sorted(p for p in archives.iterdir() if not p.name.startswith(".")) \
        if archives.is_dir() else []
    if not done:
        return None
    path = done[-1]
    stamp = path.name.split("-", 1)[0]  # 20250101T120000123456Z
    start = calendar.timegm(time.strptime(stamp[:15], "%Y%m%dT%H%M%S"))
    start += int(stamp[15:21]) / 1e6
    return start, (path / "meta.json").stat().st_mtime


def started_at(world: bk.World, name: str) -> float | None:
    app = (world.read_state(name).get("processes") or {}).get("app") or {}
    return bk.parse_iso(app.get("started_at"))


def op_revert(world: bk.World, name: str, manifest: Path) -> dict[str, float]:
    t0 = time.time()
    wall, _ = world.timed_corral("revert", name)
    t1 = time.time()
    stamps = latest_archive(world, name)
    start = started_at(world, name)
    out = {"wall_ms": wall}
    if stamps and start and t0 <= stamps[0] <= t1:
        out.update({
            "cli_and_stop_ms": (stamps[0] - t0) * 1000,
            "archive_ms": (stamps[1] - stamps[0]) * 1000,
            "remount_and_launch_ms": (start - stamps[1]) * 1000,
            "app_ready_ms": (t1 - start) * 1000})
    return out


def op_restart(world: bk.World, name: str, manifest: Path) -> dict[str, float]:
    down, _ = world.timed_corral("down", name)
    t0 = time.time()
    up, _ = world.timed_corral("up", str(manifest))
    t1 = time.time()
    start = started_at(world, name)
    out = {"wall_ms": down + up, "down_ms": down, "up_ms": up}
    if start and t0 <= start <= t1:
        out.update({"up_to_launch_ms": (start - t0) * 1000, "app_ready_ms": (t1 - start) * 1000})
    return out


OPS = {"revert, empty delta": (op_revert, False),
       "revert, big delta": (op_revert, True),
       "restart, empty delta": (op_restart, False),
       "restart, big delta": (op_restart, True)}


def measure_recovery(world: bk.World, name: str, manifest: Path, rounds: int,
                     files: int, mib: int, ops: dict[str, Any] = OPS,
                     what: str = "recovery") -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in ops}
    rng = random.Random(1600)
    # One unmeasured round first: caches, the first archive directory, the first zstd import.
    for key in [None] * 1 + list(range(rounds)):
        order = list(ops)
        rng.shuffle(order)
        for label in order:
            func, big = ops[label]
            if big:
                populate(world, name, files, mib)
            result = func(world, name, manifest)
            health(world)
            if key is not None:
                samples[label].append(result)
        if key is not None:
            bk.progress(f"{what}: round {key + 1}/{rounds}")
    out: dict[str, Any] = {}
    for label, got in samples.items():
        row: dict[str, Any] = {"n": len(got)}
        for metric in sorted({m for s in got for m in s}):
            values = [s[metric] for s in got if metric in s]
            row[metric] = bk.stats(values, 1)
        row["samples"] = [{k: round(v, 1) for k, v in s.items()} for s in got]
        out[label] = row
    return out


def measure_shipped(world: bk.World, rounds: int) -> dict[str, Any]:
    """Context: examples/notes/notes.toml itself (under a benchmark name), whose volume is
    journaled (a revert also closes the journal's epoch) and whose delta is a 32M tmpfs (too
    small for the big delta): revert and restart with an empty delta."""
    name = world.service("j")
    text = (bk.REPO / "examples/notes/notes.toml").read_text()
    text = text.replace('name = "notes"', f'name = "{name}"', 1).replace(
        '= "notes.py"', f'= "{bk.NOTES_PY}"', 1)
    manifest = world.dir / f"{name}.toml"
    manifest.write_text(text)
    try:
        world.install(manifest, name)
        world.corral("up", str(manifest))
        rows = measure_recovery(world, name, manifest, rounds, 0, 0,
                                {k: OPS[k] for k in ("revert, empty delta",
                                                     "restart, empty delta")},
                                "examples/notes as shipped")
        world.corral("down", name)
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        bk.warn(f"examples/notes as shipped: {exc}")
        return {"error": str(exc)[-800:]}
    return {"manifest": "examples/notes/notes.toml", "rows": rows}


# -- (b) tamper detection --------------------------------------------------------------------
def aide_config(world: bk.World, name: str) -> tuple[Path, Path, list[Path]]:
    top = world.dir / "aide"
    top.mkdir(exist_ok=True)
    trees = [world.base_root(name), world.run_dir(name) / "delta" / "upper"]
    conf = top / "aide.conf"
    # The attributes corral's verify compares: type, permissions, owner, group, size, link
    # target and a content hash (corral: blake3; aide has none, sha256 is its usual one).
    lines = [f"database_in=file:{top / 'aide.db'}",
             f"database_out=file:{top / 'aide.db.new'}",
             "gzip_dbout=no", "report_url=stdout", "log_level=error",
             "Bench = ftype+p+u+g+s+l+sha256"]
    lines += [f"{tree} Bench" for tree in trees]
    conf.write_text("\n".join(lines) + "\n")
    return conf, top, trees


def aide(conf: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    result = subprocess.run(["aide", f"--config={conf}", *args], capture_output=True, text=True,
                            timeout=600)
    return (time.perf_counter() - t0) * 1000, result


def measure_tamper(world: bk.World, name: str, rounds: int) -> dict[str, Any]:
    conf, top, trees = aide_config(world, name)
    bk.progress("aide --init (untimed)")
    init_ms, result = aide(conf, "--init")
    if result.returncode != 0:
        raise RuntimeError(f"aide --init failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout)[-800:]}")
    os.rename(top / "aide.db.new", top / "aide.db")
    entries = sum(1 for _ in (trees[0]).rglob("*"))
    size = sum(p.lstat().st_size for p in trees[0].rglob("*") if p.is_file() and
               not p.is_symlink())
    # The tampering: a trojaned binary in the base (from the host side) and a dropped file in
    # the delta (from inside).
    target = trees[0] / "usr/bin/python3.11"
    with open(target, "ab") as handle:
        handle.write(b"\x00trojan" * 64)
    result = world.corral("exec", name, "app", "--", PY311, "-I", "-c",
                          "open('/tmp/payload.py', 'w').write('import os  # dropped')",
                          check=False)
    if result.returncode != 0:
        raise RuntimeError(f"writing into the delta failed: {result.stderr[-300:]}")
    samples: dict[str, list[float]] = {"corral delta": [], "corral verify": [],
                                       "aide --check": []}
    found: dict[str, bool] = {}
    rng = random.Random(80)
    for round_ in range(-1, rounds):  # round -1: unmeasured warm-up
        order = list(samples)
        rng.shuffle(order)
        for label in order:
            if label == "corral delta":
                ms, out = world.timed_corral("delta", name, "--json")
                ok = "/tmp/payload.py" in {c["path"] for c in json.loads(out)["changes"]}
            elif label == "corral verify":
                ms, out = world.timed_corral("verify", name, "--json", ok=(3,))
                ok = "/usr/bin/python3.11" in {p["path"] for p in json.loads(out)["problems"]}
            else:
                ms, result = aide(conf, "--check")
                # Exit code bits: 1 added, 2 removed, 4 changed.
                ok = result.returncode & 5 == 5 and "python3.11" in result.stdout \
                    and "payload.py" in result.stdout
                if result.returncode >= 14:
                    raise RuntimeError(f"aide --check failed ({result.returncode}): "
                                       f"{result.stderr[-500:]}")
            found[label] = found.get(label, True) and ok
            if round_ >= 0:
                samples[label].append(ms)
        if round_ >= 0:
            bk.progress(f"tamper detection: round {round_ + 1}/{rounds}")
    pairs = [d + v for d, v in zip(samples["corral delta"], samples["corral verify"], strict=True)]
    return {"base_entries": entries, "base_bytes": size, "aide_init_ms": round(init_ms, 1),
            "found": found, "rows": {k: bk.stats(v, 1) for k, v in samples.items()},
            "corral delta + verify": bk.stats(pairs, 1),
            "samples_ms": {k: [round(x, 1) for x in v] for k, v in samples.items()}}


def measure_floor(world: bk.World, name: str, rounds: int) -> dict[str, Any]:
    """What a CLI call costs before it does anything: the interpreter with corral.cli.main (click),
    then with corral.cli.report too, which `corral delta` imports even for --json (it pulls in
    corral.plan.service, corral.manifest.model with pydantic, and corral.plan.closure); and
    verify's own work, in-process."""
    def wall(argv: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(world.enter() + argv, check=True, capture_output=True, env=world.env(),
                       timeout=60)
        return (time.perf_counter() - t0) * 1000

    py = str(bk.VENV_PY)
    variants = {"python -c 'import corral.cli.main'": [py, "-c", "import corral.cli.main"],
                "python -c 'import corral.cli.main, corral.cli.report'":
                    [py, "-c", "import corral.cli.main, corral.cli.report"],
                "corral --version": [str(bk.CORRAL), "--version"]}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for label, argv in variants.items():
            samples[label].append(wall(argv))
    code = ("import time, json, os; t0 = time.perf_counter()\n"
            "from corral.host.base import verify; from corral.host.runtime import read\n"
            "t1 = time.perf_counter(); spec = read(os.environ['SVC'])\n"
            "from pathlib import Path\n"
            "r = verify(Path(spec.state), spec.base_version); t2 = time.perf_counter()\n"
            "print(json.dumps({'import_ms': (t1 - t0) * 1000, 'verify_ms': (t2 - t1) * 1000}))")
    inproc: dict[str, list[float]] = {"import_ms": [], "verify_ms": []}
    for _ in range(rounds):
        result = subprocess.run([py, "-c", code], capture_output=True, text=True,
                                env=world.env() | {"SVC": name}, timeout=120, check=True)
        for k, v in json.loads(result.stdout).items():
            inproc[k].append(v)
    return {"cli": {k: bk.stats(v, 1) for k, v in samples.items()},
            "verify_in_process": {k: bk.stats(v, 1) for k, v in inproc.items()}}


# -- report ----------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def recovery_rows(rec: dict[str, Any], suffix: str = "") -> str:
    rows = [["operation", "n", "p50", "p90", "max", "stop+cli", "archive", "launch",
             "app ready"]]
    for label, row in rec.items():
        w = row["wall_ms"]
        if label.startswith("revert"):
            parts = [row.get("cli_and_stop_ms", {}).get("p50"),
                     row.get("archive_ms", {}).get("p50"),
                     row.get("remount_and_launch_ms", {}).get("p50"),
                     row.get("app_ready_ms", {}).get("p50")]
        else:
            parts = [row.get("down_ms", {}).get("p50"), None,
                     row.get("up_to_launch_ms", {}).get("p50"),
                     row.get("app_ready_ms", {}).get("p50")]
        rows.append([label + suffix, str(row["n"]), fmt(w["p50"]), fmt(w["p90"]),
                     fmt(w["max"]), *map(fmt, parts)])
    return bk.aligned(rows)


def table(report: dict[str, Any]) -> str:
    rec = report["recovery"]
    out = ["corral recover: (a) back to ready after a revert vs a plain restart, ms "
           "(wall time of the CLI calls)", ""]
    out.append(recovery_rows(rec))
    out.append("")
    out.append("phases (p50 each, from corral's time stamps). revert: stop+cli = CLI start, "
               "signal, kill, reap;")
    out.append("archive = delta -> zstd tar + fsync; launch = unmount, clear the delta, "
               "overlay, start the process;")
    out.append("app ready = the program's own start until its port listens (+ the CLI's "
               "poll and exit).")
    out.append("restart: stop+cli = `corral down`; launch = `corral up` until the process "
               "started (CLI, supervisor,")
    out.append("mounts, cgroups, sensors, launch); app ready as above.")
    for kind in ("empty", "big"):
        ratio = report["ratios"][f"revert/restart, {kind} delta"]
        verdict = "met" if ratio < GOAL_REVERT_RATIO else "NOT met"
        out.append(f"revert / restart, {kind} delta: {ratio:.2f}x (goal < "
                   f"{GOAL_REVERT_RATIO}x: {verdict})")
    shipped = report.get("shipped_sample")
    if shipped and shipped.get("rows"):
        out += ["", "context: examples/notes/notes.toml as shipped (its volume is journaled: "
                "a revert also closes an epoch):"]
        out.append(recovery_rows(shipped["rows"], " [shipped]"))
    elif shipped:
        out += ["", f"context: examples/notes as shipped failed: {shipped['error'][-200:]}"]
    tam = report["tamper"]
    out += ["", f"(b) tamper detection on the base ({tam['base_entries']} entries, "
            f"{tam['base_bytes'] / 1e6:.0f} MB) and the delta, ms (wall time)", ""]
    rows = [["command", "n", "p50", "p90", "max", "found it"]]
    for label in ("corral delta", "corral verify", "corral delta + verify", "aide --check"):
        row = tam["rows"].get(label) or tam[label]
        found = tam["found"].get(label, tam["found"].get("corral delta", False) and
                                 tam["found"].get("corral verify", False))
        rows.append([label, str(row["n"]), fmt(row["p50"]), fmt(row["p90"]), fmt(row["max"]),
                     "yes" if found else "NO"])
    out.append(bk.aligned(rows, right={1, 2, 3, 4}))
    ratio = report["ratios"]["(corral delta + verify) / aide --check"]
    out.append("")
    out.append(f"(corral delta + verify) / aide --check: {ratio:.2f}x (p50; below 1 is "
               f"corral faster)")
    floor = report["floor"]
    cli = {k: v["p50"] for k, v in floor["cli"].items()}
    out.append("")
    out.append("context (p50, ms): " + "; ".join(f"{k}: {v:.0f}" for k, v in cli.items()))
    out.append(f"verify in-process: imports {floor['verify_in_process']['import_ms']['p50']:.0f}"
               f" + walk and blake3 {floor['verify_in_process']['verify_ms']['p50']:.0f}; "
               f"aide --init took {tam['aide_init_ms']:.0f} (untimed in the table)")
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/recover.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (15)")
    parser.add_argument("--files", type=int, default=1000, help="small files in the big delta")
    parser.add_argument("--mib", type=int, default=50, help="MiB of random data in it (50)")
    parser.add_argument("--no-shipped", action="store_true",
                        help="skip the context rows of examples/notes/notes.toml as shipped")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file ({RESULTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 3
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    bk.prepare_run(PREFIX, TAG)
    world = bk.World(PREFIX, TAG)
    machine = bk.machine()
    started = time.monotonic()
    with bk.throwaway(world):
        name = world.service("s")
        manifest = bk.notes_manifest(world.dir / f"{name}.toml", name, port=PORT)
        bk.progress(f"installing {name}")
        world.install(manifest, name)
        world.corral("up", str(manifest))
        recovery = measure_recovery(world, name, manifest, args.rounds, args.files, args.mib)
        floor = measure_floor(world, name, args.rounds)
        tamper = measure_tamper(world, name, args.rounds)
        world.corral("down", name)
        shipped = None if args.no_shipped else measure_shipped(world, args.rounds)
    med = {k: v["wall_ms"]["p50"] for k, v in recovery.items()}
    aide_p50 = tamper["rows"]["aide --check"]["p50"]
    report: dict[str, Any] = {
        "benchmark": "recover: revert vs restart; tamper detection vs aide",
        "machine": machine,
        "params": {"rounds": args.rounds, "delta_files": args.files, "delta_mib": args.mib,
                   "aide": (lambda r: (r.stdout + r.stderr).strip().splitlines()[:1])(
                    subprocess.run(["aide", "--version"], capture_output=True, text=True))},
        "recovery": recovery, "shipped_sample": shipped,
        "floor": floor, "tamper": tamper,
        "ratios": {
            "revert/restart, empty delta": round(med["revert, empty delta"]
                                                 / med["restart, empty delta"], 3),
            "revert/restart, big delta": round(med["revert, big delta"]
                                               / med["restart, big delta"], 3),
            "(corral delta + verify) / aide --check": round(
                tamper["corral delta + verify"]["p50"] / aide_p50, 3)}}
    bk.end_run(report, started, args.out, args.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
