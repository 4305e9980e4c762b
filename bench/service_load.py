"""Part (c) of bench/run.sh: what containment costs a real service, not a micro-loop.

The sample service (examples/notes/notes.py, Python's http.server) answers GET /health three
ways at once in the benchmark's network namespace: contained by corral (`corral up`, the
sample's manifest without its cpu quota of 0.5, which this server at full speed would hit: the
quota would be measured rather than the containment; a manifest without `cpu` has none, as the
plain and firejail servers have none), plainly as root
(no containment), and under firejail (its policy of parts (a) and (b), with the namespace's
network). One client in the namespace sends sequential requests,
each on a new connection as http.server's HTTP/1.0 answers them: so every request pays a TCP
handshake through the service's nftables table, the server's syscalls through its seccomp
filter and its file accesses through Landlock. Rounds alternate the three in a shuffled order;
the figure is the median time per request, and corral's cost the ratio to the plain one.

`attribute` (bench/run.sh --service-attribute A,B+C) adds contained variants started with
CORRAL_BENCH_SKIP (launch.benchskip), each a service and port of its own; "nft" flushes the
variant's table instead (as bench/servers.py does): what each mechanism costs a request.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import time
from typing import Any

import benchkit as bk

PORTS = {"corral": 8080, "plain": 8081, "firejail": 8082}
LABELS = {"corral": "contained by corral", "plain": "outside, plain (root, no containment)",
          "firejail": "firejail (peer)"}
# The sample's limits without its cpu quota (see above). Runs before 2026-12-05 05:40 UTC gave
# it cpu = 1.0, the manifest default of the time, which no longer exists.
LIMITS = '{ memory = "128M", pids = 32, open_files = 256 }'
CLIENT = """import http.client, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
t0 = time.perf_counter_ns()
for _ in range(count):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    response = conn.getresponse()
    if response.status != 200 or response.read() != b"ok\\n":
        raise SystemExit(f"bad answer {response.status}")
    conn.close()
print(time.perf_counter_ns() - t0)
"""


def _wait_listening(proc: subprocess.Popen, port: int, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        if bk.listening(proc.pid, port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: nothing listening on port {port} after 20 s")


def _start_outside(world: Any, kind: str, firejail: list[str]) -> subprocess.Popen:
    data = world.dir / f"notes-{kind}"
    data.mkdir()
    argv = ["/usr/bin/python3.11", "-I", str(bk.NOTES_PY), str(PORTS[kind])]
    if kind == "firejail":  # the service needs the namespace's network: no --net=none
        argv = [opt for opt in firejail if not opt.startswith("--net")] + argv
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "NOTES_DIR": str(data)}
    # Its request log goes to a file, as corral's goes (through the supervisor) to its own.
    with open(world.dir / f"notes-{kind}.log", "ab") as log:
        proc = subprocess.Popen(world.enter() + argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    world.cleanups.append(lambda p=proc: _stop(p))
    # firejail forks the program; its sandbox shares the namespace's network, so any process
    # of it answers for the port
    _wait_listening(proc, PORTS[kind], LABELS[kind])
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _batch(world: Any, port: int, count: int) -> float:
    """Milliseconds per request over one batch of `count` sequential requests."""
    result = subprocess.run(world.enter() + ["/usr/bin/python3", "-c", CLIENT, str(port),
                                             str(count)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"client on port {port}: {result.stderr.strip()[-500:]}")
    return int(result.stdout) / 1e6 / count


def _start_contained(world: Any, suffix: str, port: int, skip: str = "") -> str:
    """`corral up` of the sample as service `suffix` on `port`; `skip`: "landlock+seccomp"
    runs with CORRAL_BENCH_SKIP=landlock,seccomp, "nft" among them flushes its table."""
    name = world.service(suffix)
    manifest = bk.notes_manifest(world.dir / f"serve-{suffix}.toml", name, port=port,
                                 limits=LIMITS)
    world.install(manifest, name)
    world.up_without(manifest, name, [s for s in skip.split("+") if s])
    return name


def measure_service(world: Any, rounds: int, requests: int, firejail: list[str],
                    attribute: tuple[str, ...] = ()) -> dict[str, Any]:
    """`firejail`: its command line up to the program (binary and policy of part (a))."""
    ports, labels = dict(PORTS), dict(LABELS)
    names = [_start_contained(world, "s", PORTS["corral"])]
    for i, skip in enumerate(attribute):  # suffixes sa, sb, ...: names stay short
        kind = f"corral-{skip}"
        ports[kind], labels[kind] = 8090 + i, f"contained by corral, without {skip}"
        names.append(_start_contained(world, "s" + chr(ord("a") + i), ports[kind], skip))
    for kind in ("plain", "firejail"):
        _start_outside(world, kind, firejail)
    samples: dict[str, list[float]] = {kind: [] for kind in ports}
    for kind in ports:  # one unreported warm-up batch each
        _batch(world, ports[kind], max(20, requests // 10))
    rng = random.Random(3)
    for rnd in range(rounds):
        order = list(ports)
        rng.shuffle(order)
        for kind in order:
            samples[kind].append(_batch(world, ports[kind], requests))
        bk.progress(f"service: {rnd + 1}/{rounds} rounds")
    incidents = [json.loads(world.corral("incidents", name, "--json").stdout)["incidents"]
                 for name in names]
    medians = {kind: statistics.median(values) for kind, values in samples.items()}
    return {
        "requests_per_batch": requests, "rounds": rounds,
        "ms_per_request": {kind: {"median": medians[kind], "samples": samples[kind],
                                  "label": labels[kind]} for kind in ports},
        "corral_vs_plain_pct": (medians["corral"] / medians["plain"] - 1) * 100,
        "firejail_vs_plain_pct": (medians["firejail"] / medians["plain"] - 1) * 100,
        "corral_vs_firejail_pct": (medians["corral"] / medians["firejail"] - 1) * 100,
        # what each skipped mechanism cost a request: corral against corral without it
        "attribution_pct": {skip: (medians["corral"] / medians[f"corral-{skip}"] - 1) * 100
                            for skip in attribute},
        "incidents_during_run": any(incidents),
    }


def service_lines(result: dict[str, Any]) -> list[str]:
    per = result["ms_per_request"]
    width = max(len(v["label"]) for v in per.values())
    out = [f"(c) a real service: the sample's GET /health, sequential, a new connection each, "
           f"ms per request ({result['rounds']} x {result['requests_per_batch']} requests each)",
           f"  {'':{width}}  {'median':>8}  {'p90':>8}"]
    for value in per.values():
        out.append(f"  {value['label']:{width}}  {value['median']:8.3f}  "
                   f"{bk.percentile(value['samples'], 90):8.3f}")
    out.append(f"  corral vs plain {result['corral_vs_plain_pct']:+.1f}%, firejail vs plain "
               f"{result['firejail_vs_plain_pct']:+.1f}%, corral vs firejail "
               f"{result['corral_vs_firejail_pct']:+.1f}% (goal for corral's cost: < 3%)")
    for skip, pct in result.get("attribution_pct", {}).items():
        out.append(f"  {skip} costs corral's request {pct:+.1f}% (corral against corral "
                   f"without it)")
    if result["incidents_during_run"]:
        out.append("  note: the watcher recorded incidents during the run (see corral incidents)")
    return out
