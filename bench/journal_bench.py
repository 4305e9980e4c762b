#!/usr/bin/env python3
"""What the persistent-state redo log (corral.recover.journal.log) costs, on this machine:

    .venv/bin/python bench/journal_bench.py [--dir DIR] [--parts acd] [--quick] [--json]

(a) throughput: a write-heavy workload (a writer process rewriting files of 4-64 KiB of
    incompressible data in a 2,000-file volume, 80% of writes to a hot tenth of the files) for
    --seconds, alone and with the journal closing an epoch every --every seconds, freezing the
    writer's cgroup around the boundary scan as the supervisor does. Ratio of the writer's
    throughput (goal >= 0.9).
(b) storage: how much the journal grew during (a) against the bytes of new content its epochs
    recorded (the "after" size of every changed file; goal <= 1.2x), apparent and on disk;
    and against everything the workload wrote (most of it overwritten within an epoch).
(c) closing an epoch in a 100,000-file volume with 1 and with 10,000 changed files, warm (the
    supervisor's long-lived Journal) and cold (a fresh process reading the state cache); and
    what starting the journal on that volume costs.
(d) excising a stretch from a 10,000-epoch log (synthetic records, written with the library's
    own encoding and hash chain, the volume made to match).

Runs as root (it makes a cgroup). Everything goes in a temporary directory under --dir (default
/var/tmp: a disk, so fsync costs what it costs), removed at the end, with the cgroup.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from corral.core.text import iso  # noqa: E402
from corral.launch import cgroup  # noqa: E402
from corral.recover.journal.config import freezer  # noqa: E402
from corral.recover.journal.journal import Journal  # noqa: E402
from corral.recover.journal.store import (  # noqa: E402
    Meta,
    digest,
    encode,
    meta_json,
    path_json,
    write_durable,
)

WRITER = r"""
import os, random, sys, time
root, files, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sys.stdin.readline()  # go: we are in the cgroup now
rng, pool = random.Random(1), os.urandom(1 << 20)
ops = written = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    i = rng.randrange(files // 10) if rng.random() < 0.8 else rng.randrange(files)
    size = rng.randint(4096, 65536)
    start = rng.randrange(len(pool) - size)
    with open(f"{root}/d{i % 20}/f{i}", "wb") as handle:
        handle.write(pool[start:start + size])
    ops += 1
    written += size
print(ops, written)
"""


def du(path: Path) -> tuple[int, int]:
    """(apparent bytes, bytes on disk) of a tree."""
    apparent = blocks = 0
    for top, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(top, name))
            apparent += st.st_size
            blocks += st.st_blocks * 512
    return apparent, blocks


def make_volume(vol: Path, files: int, size: int, dirs: int = 20) -> None:
    for d in range(dirs):
        (vol / f"d{d}").mkdir(parents=True, exist_ok=True)
    pool = os.urandom(1 << 20)
    for i in range(files):
        start = (i * 7919) % ((1 << 20) - size)
        (vol / f"d{i % dirs}/f{i}").write_bytes(pool[start:start + size] + str(i).encode())


def run_writer(vol: Path, files: int, seconds: float, group: cgroup.Cgroup,
               journal: Journal | None, every: float, spec: Any) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(vol), str(files), str(seconds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    group.add(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    closes, frozen = [], []
    started = time.monotonic()
    if journal is not None:
        freeze = freezer(spec)
        next_close = started + every
        while proc.poll() is None:
            time.sleep(max(0.0, min(next_close - time.monotonic(), 0.05)))
            if time.monotonic() >= next_close and proc.poll() is None:
                t0 = time.monotonic()
                journal.close_epoch("schedule", freeze=freeze)
                closes.append(time.monotonic() - t0)
                frozen.append(journal.last_scan["frozen_ms"])
                next_close += every
    ops, written = map(int, proc.communicate()[0].split())
    return {"ops": ops, "ops_per_s": ops / seconds, "written": written, "closes": len(closes),
            "close_s_avg": sum(closes) / len(closes) if closes else 0.0,
            "frozen_ms_avg": sum(frozen) / len(frozen) if frozen else 0.0,
            "frozen_ms_max": max(frozen) if frozen else 0.0}


def throughput_and_storage(work: Path, seconds: float, every: float,
                           rounds: int) -> dict[str, Any]:
    """Plain and journaled runs alternate, each starting with nothing dirty, and the ratio is
    the median over rounds of journaled/plain: the disk's writeback state and whatever else
    runs on the machine drift more between rounds than within one. The journal accumulates
    over its runs."""
    files = 2000
    spec = SimpleNamespace(service="jbench", processes=[SimpleNamespace(name="writer")])
    group = cgroup.Cgroup.create("jbench", "writer", cgroup.Limits())
    plain = work / "plain/volumes/v"
    make_volume(plain, files, 16 << 10)
    state = work / "journaled"
    vol = state / "volumes/v"
    make_volume(vol, files, 16 << 10)
    journal = Journal(state, "v")
    journal.ensure()
    base_apparent, base_disk = du(state / "journal")
    alone, journaled = [], []
    try:
        for i in range(rounds):
            for with_journal in (i % 2 == 1, i % 2 == 0):  # which goes first alternates too
                os.sync()
                if with_journal:
                    journaled.append(run_writer(vol, files, seconds, group, journal, every,
                                                spec))
                    journal.close_epoch("schedule")  # what was written after the last close
                else:
                    alone.append(run_writer(plain, files, seconds, group, None, every, spec))
    finally:
        group.remove()
    apparent, disk = du(state / "journal")
    recorded = sum((c["after"] or {}).get("size") or 0
                   for e in journal.log() for c in journal.diff(e["id"])["changes"])
    grown, grown_disk = apparent - base_apparent, disk - base_disk
    mean = {key: sum(r[key] for r in runs) / len(runs)
            for runs in (alone,) for key in ("ops_per_s", "written")}
    jmean = {key: sum(r[key] for r in journaled) / len(journaled)
             for key in ("ops_per_s", "written", "close_s_avg", "frozen_ms_avg")}
    jmean["frozen_ms_max"] = max(r["frozen_ms_max"] for r in journaled)
    jmean["closes"] = sum(r["closes"] for r in journaled)
    ratios = sorted(j["ops_per_s"] / a["ops_per_s"] for a, j in zip(alone, journaled, strict=True))
    return {"alone": mean, "journaled": jmean, "runs": {"alone": alone, "journaled": journaled},
            "round_ratios": ratios, "throughput_ratio": statistics.median(ratios),
            "epochs": len(journal.log()), "recorded_bytes": recorded,
            "journal_growth_bytes": grown, "journal_growth_disk_bytes": grown_disk,
            "storage_ratio": grown / recorded, "storage_ratio_disk": grown_disk / recorded,
            "storage_vs_written": grown / sum(r["written"] for r in journaled)}


def close_times(work: Path, files: int, changed: int) -> dict[str, Any]:
    state = work / "big"
    vol = state / "volumes/v"
    t0 = time.monotonic()
    make_volume(vol, files, 1000, dirs=100)
    made = time.monotonic() - t0
    time.sleep(0.2)  # older than the racy margin: the observations can be trusted
    journal = Journal(state, "v")
    t0 = time.monotonic()
    journal.ensure()
    start = time.monotonic() - t0
    out: dict[str, Any] = {"files": files, "make_volume_s": made, "start_journal_s": start}
    time.sleep(0.2)
    t0 = time.monotonic()
    journal.close_epoch("schedule")
    out["close_nothing_changed_warm_s"] = time.monotonic() - t0
    rng = random.Random(5)
    for label, count in (("1", 1), (str(changed), changed)):
        for i in rng.sample(range(files), count):
            (vol / f"d{i % 100}/f{i}").write_bytes(os.urandom(1000))
        t0 = time.monotonic()
        epoch = journal.close_epoch("schedule")
        out[f"close_{label}_changed_warm_s"] = time.monotonic() - t0
        assert journal.last_scan["changes"] == count, journal.last_scan
        for i in rng.sample(range(files), count):
            (vol / f"d{i % 100}/f{i}").write_bytes(os.urandom(1000))
        t0 = time.monotonic()
        cold = Journal(state, "v")
        cold.close_epoch("schedule")
        out[f"close_{label}_changed_cold_s"] = time.monotonic() - t0
        journal = cold
        assert epoch is not None
    out["state_cache_bytes"] = (state / "journal/v/state.cache").stat().st_size
    shutil.rmtree(state)
    return out


def synthetic_log(state: Path, epochs: int, files: int) -> None:
    """`epochs` records of 1-3 changed files each, chained like real ones; the volume is then
    written to match the last one, as if a service had done it."""
    vol = state / "volumes/v"
    vol.mkdir(parents=True)
    for i in range(files):
        (vol / f"f{i}").write_bytes(b"initial %d" % i)
    journal = Journal(state, "v")
    journal.ensure()
    head = json.loads((journal.dir / "head.json").read_bytes())
    current = {f"f{i}": b"initial %d" % i for i in range(files)}
    meta = journal._replay(head, 0)
    rng, prev, t = random.Random(9), head["hash"], 1_700_000_000.0
    records = journal.dir / "epochs"
    for epoch in range(1, epochs + 1):
        changes = []
        for path in sorted(rng.sample(sorted(current), rng.randint(1, 3))):
            data = b"epoch %d wrote %s" % (epoch, path.encode())
            name = digest(data)
            journal.objects.stage(name, data)
            after = Meta("file", 0o644, 0, 0, len(data), name, (name,), None, int(t * 1e9))
            changes.append(path_json(path) | {"change": "modified", "details": ["content"],
                                               "before": meta_json(meta[path]),
                                               "after": meta_json(after)})
            meta[path], current[path] = after, data
        record = {"id": epoch, "start": iso(t), "end": iso(t + 600), "reason": "schedule",
                  "note": None, "incidents": [], "prev": prev, "changes": changes}
        data = encode(record)
        (records / f"{epoch:08d}.json").write_bytes(data)  # synthetic: no fsync each
        prev, t = digest(data), t + 600
    journal.objects.flush()
    os.sync()
    write_durable(journal.dir / "head.json", encode(dict(head, epoch=epochs, hash=prev,
                                                         opened=iso(t))))
    for path, data in current.items():
        (vol / path).write_bytes(data)
    for path, m in meta.items():
        os.utime(vol / path, ns=(m.mtime_ns, m.mtime_ns))


def excise_times(work: Path, epochs: int) -> dict[str, Any]:
    state = work / "long"
    t0 = time.monotonic()
    synthetic_log(state, epochs, 20_000)
    out: dict[str, Any] = {"epochs": epochs, "synthesize_s": time.monotonic() - t0}
    journal = Journal(state, "v")
    t0 = time.monotonic()
    assert journal.close_epoch("schedule") is None  # the log matches the volume
    out["first_open_replay_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    assert len(journal.log()) == epochs
    out["log_s"] = time.monotonic() - t0
    middle = epochs // 2
    t0 = time.monotonic()
    result = journal.excise(middle, middle + 9, stopped=True)
    out["excise_10_in_the_middle_s"] = time.monotonic() - t0
    out["excise_changes"], out["excise_conflicts"] = len(result["changes"]), \
        len(result["conflicts"])
    t0 = time.monotonic()
    journal.excise(epochs - 4, epochs, stopped=True)
    out["excise_last_5_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    problems = journal.check()["problems"]
    out["check_s"] = time.monotonic() - t0
    assert problems == [], problems
    shutil.rmtree(state)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--parts", default="acd",
                        help="which parts to run: a (with b), c, d (default: all)")
    parser.add_argument("--every", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("journal_bench: run as root (it makes a cgroup)", file=sys.stderr)
        return 1
    files, changed, epochs = (100_000, 10_000, 10_000) if not args.quick else (5000, 500, 500)
    seconds = args.seconds if not args.quick else 4.0
    work = Path(tempfile.mkdtemp(prefix="corral-journal-bench-", dir=args.dir))
    try:
        results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "dir": args.dir,
                                               "kernel": os.uname().release,
                                               "load": os.getloadavg()[0]}}
        if "a" in args.parts:
            results["throughput"] = throughput_and_storage(work, seconds, args.every,
                                                           args.rounds)
        if "c" in args.parts:
            results["close"] = close_times(work, files, changed)
        if "d" in args.parts:
            results["excise"] = excise_times(work, epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results, seconds, args.every)
    return 0


def report(r: dict[str, Any], seconds: float, every: float) -> None:
    m = r["machine"]
    print(f"{m['cpus']} CPUs, kernel {m['kernel']}, load {m['load']:.1f} at the start, in "
          f"{m['dir']}")
    if "throughput" in r:
        report_throughput(r["throughput"], seconds, every)
    if "close" in r:
        report_close(r["close"])
    if "excise" in r:
        e = r["excise"]
        print(f"(d) {e['epochs']} epochs: first open (replay) {e['first_open_replay_s']:.2f} s, "
              f"log {e['log_s']:.2f} s, excise 10 in the middle "
              f"{e['excise_10_in_the_middle_s']:.2f} s ({e['excise_changes']} paths, "
              f"{e['excise_conflicts']} conflicts), excise the last 5 "
              f"{e['excise_last_5_s']:.2f} s, check {e['check_s']:.2f} s")


def report_throughput(t: dict[str, Any], seconds: float, every: float) -> None:
    print(f"(a) write-heavy workload, {len(t['runs']['alone'])} rounds of {seconds:g} s each way, "
          f"an epoch closed every {every:g} s:")
    print(f"    alone      {t['alone']['ops_per_s']:>9.0f} writes/s "
          f"({t['alone']['written'] / seconds / 1e6:.0f} MB/s)")
    print(f"    journaled  {t['journaled']['ops_per_s']:>9.0f} writes/s "
          f"({t['journaled']['written'] / seconds / 1e6:.0f} MB/s), {t['journaled']['closes']} "
          f"closes of {t['journaled']['close_s_avg'] * 1000:.0f} ms, frozen "
          f"{t['journaled']['frozen_ms_avg']:.0f} ms on average (max "
          f"{t['journaled']['frozen_ms_max']:.0f})")
    print(f"    ratio      {t['throughput_ratio']:.2f} (median of rounds: "
          f"{', '.join(f'{x:.2f}' for x in t['round_ratios'])})   (goal >= 0.9)")
    print(f"(b) storage: journal grew {t['journal_growth_bytes'] / 1e6:.1f} MB "
          f"({t['journal_growth_disk_bytes'] / 1e6:.1f} MB on disk) for "
          f"{t['recorded_bytes'] / 1e6:.1f} MB of new content in {t['epochs']} epochs")
    print(f"    ratio      {t['storage_ratio']:.3f} apparent, {t['storage_ratio_disk']:.3f} on "
          f"disk   (goal <= 1.2); {t['storage_vs_written']:.3f} of all bytes written")


def report_close(c: dict[str, Any]) -> None:
    print(f"(c) {c['files']} files: journal start {c['start_journal_s']:.1f} s; close with nothing "
          f"changed {c['close_nothing_changed_warm_s']:.2f} s")
    for label in [k.split("_")[1] for k in c if k.endswith("_changed_warm_s")
                  and not k.startswith("close_nothing")]:
        print(f"    close, {label:>6} changed: warm {c[f'close_{label}_changed_warm_s']:.2f} s, "
              f"cold {c[f'close_{label}_changed_cold_s']:.2f} s")
    print(f"    state cache {c['state_cache_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
