"""What the UDP bind guard (kernel.bindguard) costs: socket() + bind() + close() of a UDP socket
in a cgroup with the bind program and in one without, in the same run, rounds alternated; and
what a REFUSED bind costs with the program reporting it to a ring buffer (kernel.bpfring, as the
supervisor has it, drained by a thread here) and without.

    .venv/bin/python bench/udp_bind.py [--rounds 7] [--binds 20000]

As root. Uses three throwaway cgroups under the v2 hierarchy,
corral-bench-udp-PID-{bare,guarded,silent}, removed at the end. The program runs at bind() only;
datagrams never meet it, so there is no per-packet figure to measure.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from corral.kernel import bindguard, bpfring  # noqa: E402
from corral.launch import cgroup  # noqa: E402

LOOP = """
import socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
t = time.perf_counter()
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", port))
    except PermissionError:
        pass
    s.close()
print((time.perf_counter() - t) / n * 1e9)
"""


def run_in(cg_dir: str, binds: int, port: int) -> float:
    """ns per socket+bind+close, measured by a child that joined the cgroup."""
    def join() -> None:
        with open(f"{cg_dir}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    done = subprocess.run([sys.executable, "-c", LOOP, str(binds), str(port)], check=True,
                          capture_output=True, text=True, preexec_fn=join)
    return float(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--binds", type=int, default=20000)
    args = ap.parse_args()
    v2 = cgroup.layout().v2
    if v2 is None:
        sys.exit("no cgroup v2 hierarchy")
    dirs = {k: f"{v2.mount}/corral-bench-udp-{os.getpid()}-{k}"
            for k in ("bare", "guarded", "silent")}
    ring = bpfring.Ring()
    reports, stop = [0], threading.Event()

    def drain() -> None:  # the supervisor's part: read the reports as they come
        while not stop.is_set():
            if select.select([ring], [], [], 0.1)[0]:
                reports[0] += len(ring.read())

    reader = threading.Thread(target=drain, daemon=True)
    try:
        for d in dirs.values():
            os.mkdir(d)
        # ten declared ranges: the program's longest path is its port comparisons
        ports = [(40000 + 10 * i, 40000 + 10 * i + 5) for i in range(10)]
        bindguard.attach(dirs["guarded"], ports, ring.fileno())
        bindguard.attach(dirs["silent"], ports)  # the same checks, no reports
        reader.start()
        rows = {"bare": ("bare", 40095), "guarded": ("guarded", 40095),
                "refused, reported": ("guarded", 40096), "refused, silent": ("silent", 40096)}
        results: dict[str, list[float]] = {k: [] for k in rows}
        for i in range(args.rounds):
            # port 40095: declared (last range), so both rows do the same successful bind;
            # 40096: refused, with and without the report
            for kind in (list(rows) if i % 2 else list(rows)[::-1]):
                d, port = rows[kind]
                results[kind].append(run_in(dirs[d], args.binds, port))
        med = {k: statistics.median(v) for k, v in results.items()}
        low = {k: min(v) for k, v in results.items()}
        bare, guarded = med["bare"], med["guarded"]
        print(f"socket+bind+close, UDP, median of {args.rounds} rounds x {args.binds}:")
        print(f"  no program   {bare:8.0f} ns")
        print(f"  bind guard   {guarded:8.0f} ns   ({guarded - bare:+.0f} ns, "
              f"{(guarded / bare - 1) * 100:+.1f}%)")
        print(f"  fastest round: {low['bare']:.0f} ns without, {low['guarded']:.0f} ns with")
        silent, reported = med["refused, silent"], med["refused, reported"]
        print(f"socket+refused bind+close:  {silent:.0f} ns silent, {reported:.0f} ns reported "
              f"({reported - silent:+.0f} ns); fastest {low['refused, silent']:.0f} / "
              f"{low['refused, reported']:.0f} ns")
        stop.set()
        reader.join()
        reports[0] += len(ring.read())
        print(f"  reports read: {reports[0]} of {args.rounds * args.binds} refusals "
              "(a full ring loses the rest; the incident needs one)")
    finally:
        stop.set()
        for d in dirs.values():
            if os.path.isdir(d):
                os.rmdir(d)
        ring.close()


if __name__ == "__main__":
    main()
