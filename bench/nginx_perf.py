"""bench/nginx_perf.sh: where a contained nginx's extra CPU per request goes, by perf.

nginx (servers.py's configuration: 2 workers, a 4 KB file over keep-alive) runs contained by
corral, plain, and plain in cgroups made by corral's own code (servers.py's `plain-cgroup-all`:
what the cgroup alone costs). Each round runs wrk against each variant in turn, one at a time,
while `perf record -F FREQ -p WORKERS` samples that variant's two workers; the samples (CPU
time, by kernel or nginx symbol) divided by the requests wrk made give microseconds per
request. Reported: the total, and the symbols of each mechanism summed (seccomp's entry and
filters, Landlock's hooks, nftables' evaluation, the scheduler's task switch), per variant.
Sequential, not interleaved with other clients: perf needs the variant alone on the CPUs.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import benchkit as bk
import servers

VARIANTS = ("corral", "plain", "plain-cgroup-all")
# A mechanism's kernel symbols: what only it runs (plain has a little of the nft and switch
# ones too: the benchmark namespace's conntrack, every task switch).
MECHANISMS = {
    "seccomp": ("seccomp", "syscall_trace_enter", "0xffffffffc0"),  # the last: JIT'ed filters
    "landlock": ("landlock", "is_access_to_paths", "find_rule", "hook_file_open"),
    "nftables": ("nft_", "jhash"),
    "task switch": ("finish_task_switch",),
}


def workers(top: int) -> list[str]:
    """The nginx worker processes under `top` (its master, or corral's process)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit() or not Path(f"/proc/{entry}/cmdline").read_text().startswith(
                    "nginx: worker"):
                continue
            at = int(entry)
            while at > 1:
                at = int(Path(f"/proc/{at}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if at == top:
                    found.append(entry)
                    break
        except OSError:
            continue
    return found


def cpu_us(data: str, frequency: int) -> dict[str, float]:
    """Microseconds of CPU by symbol in a perf recording (samples / frequency)."""
    out = subprocess.run(["perf", "report", "-i", data, "--sort", "sym", "--stdio", "-q",
                          "-F", "sample,sym"], capture_output=True, text=True, check=True).stdout
    samples: collections.Counter[str] = collections.Counter()
    for line in out.splitlines():
        if match := re.match(r"\s*(\d+)\s+\[.\]\s+(\S+)", line):
            samples[match[2]] += int(match[1])
    return {sym: n / frequency * 1e6 for sym, n in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="each wrk run")
    parser.add_argument("--frequency", type=int, default=2999, help="perf samples per second")
    args = parser.parse_args()
    bk.prepare_run("corral-bngx-", "bn")
    world = bk.World("corral-bngx-", "bn")
    started = time.monotonic()
    totals: dict[str, collections.Counter[str]] = {v: collections.Counter() for v in VARIANTS}
    requests = dict.fromkeys(VARIANTS, 0)
    with bk.throwaway(world):
        www = world.dir / "www-src"
        www.mkdir()
        (www / "4k.bin").write_bytes(os.urandom(4096))
        servers.VARIANTS_OF["nginx"] = list(VARIANTS)
        servers.start_contained(world, "nginx", "corral", "")
        for variant in VARIANTS[1:]:
            servers._start_outside(world, "nginx", variant)
        for variant in VARIANTS:  # one unreported warm-up each
            servers.run_wrk(world, servers.port("nginx", variant), 2)
        for rnd in range(args.rounds):
            for variant in VARIANTS:
                data = str(world.dir / f"perf-{variant}-{rnd}.data")
                perf = subprocess.Popen(
                    ["perf", "record", "-q", "-F", str(args.frequency), "-o", data, "-p",
                     ",".join(workers(servers.TOPS["nginx", variant]))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)  # perf attached before the load starts
                made = servers.run_wrk(world, servers.port("nginx", variant),
                                       args.seconds)["nginx"]["ops"]
                perf.send_signal(2)
                perf.wait()
                for sym, us in cpu_us(data, args.frequency).items():
                    totals[variant][sym] += us
                requests[variant] += int(made)
            bk.progress(f"round {rnd + 1}/{args.rounds}")
    rows = [["us per request", *VARIANTS]]
    per = {v: {s: us / requests[v] for s, us in totals[v].items()} for v in VARIANTS}
    rows.append(["all of the workers' CPU", *(f"{sum(per[v].values()):.2f}" for v in VARIANTS)])
    for name, patterns in MECHANISMS.items():
        shares = (sum(us for s, us in per[v].items() if any(p in s for p in patterns))
                  for v in VARIANTS)
        rows.append([name, *(f"{share:.3f}" for share in shares)])
    rows.append(["requests", *(str(requests[v]) for v in VARIANTS)])
    print(bk.aligned(rows, right={1, 2, 3}))
    print(f"{time.monotonic() - started:.0f} s, {args.rounds} rounds x {args.seconds:g} s, "
          f"perf -F {args.frequency}")


if __name__ == "__main__":
    sys.exit(main())
