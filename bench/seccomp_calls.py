"""`.venv/bin/python bench/seccomp_calls.py [--rounds N]` (as root): CPU ns per system call
under corral's seccomp filters, for the three kinds of call a server makes: one the kernel's
action cache answers without running any filter (getppid: its verdict does not depend on its
arguments), and two it cannot (openat and setsockopt: the main filter looks at their arguments,
for setuid modes and multicast joins). Each is measured with no filter, the quiet filter alone
(ENOSYS and the exec notification), the main filter alone and both, as a contained process has
them. Each measurement runs in a forked child (a filter cannot be unloaded); rounds shuffle all
twelve. Quoted in bench/servers.md: what seccomp costs nginx per request is these figures
times its calls (strace -c: ~7 cached calls, one openat, two setsockopt)."""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import time

from corral.launch import seccomp
from corral.plan.sandbox import SeccompPlan, default_deny

N = 200_000
FILTERS = ("none", "quiet", "main", "both")
CALLS = ("getppid", "openat", "setsockopt")


def one(filters: str, call: str) -> float:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        sock = socket.socket()
        if filters != "none":
            built = seccomp.build(SeccompPlan("deny-list", tuple(default_deny())),
                                  notify=("execve", "execveat"))
            if filters == "both":
                seccomp.load(built)
            else:
                getattr(built, filters).load()
        count = N // 2 if call == "openat" else N
        t0 = time.process_time_ns()
        if call == "openat":
            for _ in range(count):
                os.close(os.open("/etc/hostname", os.O_RDONLY))  # close: cached, ~21 ns
        elif call == "setsockopt":
            for _ in range(count):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            for _ in range(count):
                os.getppid()
        os.write(w, str((time.process_time_ns() - t0) / count).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return float(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    keys = [(f, c) for f in FILTERS for c in CALLS]
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for _ in range(args.rounds):
        random.shuffle(keys)
        for key in keys:
            samples[key].append(one(*key))
    print(f"CPU ns per call, median of {args.rounds} rounds (load {os.getloadavg()[0]:.2f})")
    print(f"{'call':<11}" + "".join(f"{f:>14}" for f in FILTERS))
    for call in CALLS:
        base = statistics.median(samples["none", call])
        cells = [f"{base:>14.0f}"]
        for name in FILTERS[1:]:
            ns = statistics.median(samples[name, call])
            cells.append(f"{ns:>8.0f} {ns - base:+5.0f}")
        print(f"{call:<11}" + "".join(cells))


if __name__ == "__main__":
    main()
