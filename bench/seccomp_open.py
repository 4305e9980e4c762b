"""`.venv/bin/python bench/seccomp_open.py` (as root): CPU ns per open+close of a file under
corral's default seccomp filter compiled linearly (libseccomp optimize 1) and as a binary tree
(optimize 2, what launch.seccomp builds), against no filter. Each measurement runs in a forked
child (a filter cannot be unloaded); rounds interleave the three. openat is the call the kernel
cannot cache (its setuid-mode argument rules), so it runs the whole program every time.
Quoted in bench/servers.md."""

from __future__ import annotations

import os
import statistics
import time

from corral.kernel import libseccomp
from corral.launch import seccomp
from corral.plan.sandbox import SeccompPlan, default_deny

N, ROUNDS = 100_000, 9
LABELS = {0: "no filter", 1: "optimize 1 (linear)", 2: "optimize 2 (tree)"}


def one(level: int) -> float:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        if level:
            filters = seccomp.build(SeccompPlan("deny-list", tuple(default_deny())))
            filters.main.set_attr(libseccomp.load().Attr.CTL_OPTIMIZE, level)
            seccomp.load(filters)
        t0 = time.process_time_ns()
        for _ in range(N):
            os.close(os.open("/etc/hostname", os.O_RDONLY))
        os.write(w, str((time.process_time_ns() - t0) / N).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return float(out)


def main() -> None:
    samples: dict[int, list[float]] = {level: [] for level in LABELS}
    for _ in range(ROUNDS):
        for level in LABELS:
            samples[level].append(one(level))
    print(f"load {os.getloadavg()[0]:.2f}; CPU ns per open+close, {ROUNDS} rounds x {N}")
    for level, values in samples.items():
        print(f"  {LABELS[level]:20} median {statistics.median(values):6.0f}  "
              f"min {min(values):6.0f}")


if __name__ == "__main__":
    main()
