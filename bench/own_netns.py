"""What an own network namespace per service would cost a request (issue 16, "walls to add";
the design note is in docs/sandbox.md): the sample service's GET /health, each request on a new
connection (as bench/service_load.py), served by examples/notes/notes.py (plain, root: only the
network path differs between the rows) three ways, rounds alternated in a shuffled order:

- `host netns`: the server in the client's namespace, on 127.0.0.1 (corral today);
- `own netns, routed`: the server in a namespace of its own behind a veth pair, the client
  connecting to its address (10.213.0.2): the veth hop and a route;
- `own netns, DNAT`: the client connecting to an address of its own namespace (10.214.0.1, a
  on lo), DNAT'ed in nat output to the service's namespace: what a host-side port
  mapping (the service's listen ports on the host's addresses) adds on top, conntrack NAT.

    .venv/bin/python bench/own_netns.py [--rounds 9] [--requests 400]

As root. Two throwaway namespaces corral-bench-nn-PID-{h,s}, deleted at the end, also on
failure; nothing is changed in the host's own namespace.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

NOTES = Path(__file__).resolve().parent.parent / "examples/notes/notes.py"
PY = "/usr/bin/python3.11"
CLIENT = """import http.client, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter_ns()
for _ in range(count):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/health")
    response = conn.getresponse()
    if response.status != 200 or response.read() != b"ok\\n":
        raise SystemExit(f"bad answer {response.status}")
    conn.close()
print(time.perf_counter_ns() - t0)
"""
ROWS = {"host netns": ("127.0.0.1", 8081), "own netns, routed": ("10.213.0.2", 8080),
        "own netns, DNAT": ("10.214.0.1", 8080)}
NAT = """table ip corral-bench-nn {
  chain output { type nat hook output priority -100; policy accept;
    ip daddr 10.214.0.1 tcp dport 8080 dnat to 10.213.0.2:8080
  }
}"""


def sh(*args: str, input: str | None = None) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, input=input)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--requests", type=int, default=400)
    args = ap.parse_args()
    h, s = (f"corral-bench-nn-{os.getpid()}-{x}" for x in "hs")
    servers: list[subprocess.Popen] = []
    env = dict(os.environ, NOTES_DIR=f"/tmp/corral-bench-nn-{os.getpid()}")
    try:
        for ns in (h, s):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", h, "link", "add", "cb0", "type", "veth", "peer", "name", "eth0", "netns", s)
        sh("ip", "-n", h, "addr", "add", "10.213.0.1/30", "dev", "cb0")
        sh("ip", "-n", s, "addr", "add", "10.213.0.2/30", "dev", "eth0")
        for ns, dev in ((h, "cb0"), (s, "eth0")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", s, "route", "add", "default", "via", "10.213.0.1")
        sh("ip", "-n", h, "addr", "add", "10.214.0.1/32", "dev", "lo")
        sh("ip", "netns", "exec", h, "nft", "-f", "-", input=NAT)
        for ns, port in ((h, 8081), (s, 8080)):
            servers.append(subprocess.Popen(["ip", "netns", "exec", ns, PY, "-I", str(NOTES),
                                             str(port)], env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        time.sleep(1)
        times: dict[str, list[float]] = {row: [] for row in ROWS}
        for i in range(args.rounds + 1):
            order = list(ROWS)
            random.shuffle(order)
            for row in order:
                host, port = ROWS[row]
                out = subprocess.run(["ip", "netns", "exec", h, PY, "-c", CLIENT, host, str(port),
                                      str(args.requests)], check=True, capture_output=True,
                                     text=True).stdout
                if i:  # round 0 warms up
                    times[row].append(int(out) / args.requests / 1000)
        base = statistics.median(times["host netns"])
        print(f"GET /health, new connection each, median of {args.rounds} rounds x "
              f"{args.requests} (us per request):")
        for row, values in times.items():
            median = statistics.median(values)
            print(f"  {row:18} {median:7.1f}  ({(median / base - 1) * 100:+.1f}%)  "
                  f"fastest {min(values):.1f}")
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        for ns in (h, s):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["rm", "-rf", env["NOTES_DIR"]])


if __name__ == "__main__":
    sys.exit(main())
