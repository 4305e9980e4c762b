"""What the UDP bind guard (kernel.bindguard) costs: socket() + bind() + close() of a UDP socket
in a cgroup with the bind program and in one without, in the same run, rounds alternated.

    .venv/bin/python bench/udp_bind.py [--rounds 7] [--binds 20000]

As root. Uses two throwaway cgroups under the v2 hierarchy, corral-bench-udp-PID-{bare,guarded},
removed at the end. The program runs at bind() only; datagrams never meet it, so there is no
per-packet figure to measure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from corral.kernel import bindguard  # noqa: E402
from corral.launch import cgroup  # noqa: E402

LOOP = """
import socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
t = time.perf_counter()
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
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
    dirs = {k: f"{v2.mount}/corral-bench-udp-{os.getpid()}-{k}" for k in ("bare", "guarded")}
    try:
        for d in dirs.values():
            os.mkdir(d)
        # ten declared ranges: the program's longest path is its port comparisons
        bindguard.attach(dirs["guarded"], [(40000 + 10 * i, 40000 + 10 * i + 5) for i in range(10)])
        results: dict[str, list[float]] = {k: [] for k in dirs}
        for i in range(args.rounds):
            # port 40095: declared (last range), so both rows do the same successful bind
            for kind in (("bare", "guarded") if i % 2 else ("guarded", "bare")):
                results[kind].append(run_in(dirs[kind], args.binds, 40095))
        bare, guarded = (statistics.median(results[k]) for k in ("bare", "guarded"))
        low = {k: min(v) for k, v in results.items()}
        print(f"socket+bind+close, UDP, median of {args.rounds} rounds x {args.binds}:")
        print(f"  no program   {bare:8.0f} ns")
        print(f"  bind guard   {guarded:8.0f} ns   ({guarded - bare:+.0f} ns, "
              f"{(guarded / bare - 1) * 100:+.1f}%)")
        print(f"  fastest round: {low['bare']:.0f} ns without, {low['guarded']:.0f} ns with")
    finally:
        for d in dirs.values():
            if os.path.isdir(d):
                os.rmdir(d)


if __name__ == "__main__":
    main()
