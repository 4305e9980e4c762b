"""bench/servers.sh: what containment costs real servers, against plain and firejail.

nginx (a 4 KB static file over keep-alive, wrk), redis (GET and SET, redis-benchmark) and
PostgreSQL (pgbench select-only) each run three ways at once in the benchmark's own network
namespace, each on its own port and with the same binary and settings:

- corral: `corral up` of a manifest written here (bench-only manifests, not examples/);
- plain: the program run directly as an unprivileged user (nobody; postgres for PostgreSQL),
  in its own session, as a service manager would start it;
- firejail: the same user and command under `firejail --noprofile --private-dev --nonewprivs
  --seccomp` (the peer's policy of bench/run.sh, with the namespace's network), entered as
  root with only setuid/setgid kept for setpriv, which drops them with root.

Rounds interleave them: every round runs each server's client once against each variant, in a
shuffled order, so drift and other work on the machine spread over all three. The client and the
servers share the machine's CPUs (two on the reference machine), so throughput is a CPU-cost
ratio: see bench/servers.md. Reported: the median throughput and the median of each round's p99
latency, and the ratios contained/plain and firejail/plain, with the load before and after.

`--plain-cgroups all,cpu3,...` adds plain variants in cgroups of their own, no limits set: what
the cgroup itself costs, apart from the containment (plain and firejail stay in the benchmark's
cgroup, with the clients). `all`: cgroups made as corral makes a service's (launch.cgroup,
`corral/NAME/server` in every hierarchy), as a service manager that gives every service a cgroup
would; `cpuN` / `memoryN`: only cgroup v1's cpu (memory) hierarchy, N levels deep (1-3).

`--own-netns` adds the variant "corral-own" (nginx only): the same manifest with network = "own"
(docs/sandbox.md), nginx listening on all of its namespace's addresses, wrk connecting to
OWN_ADDR, an address of the benchmark's namespace (on its lo) that the service's NAT table
DNATs through the veth: what a service's own network namespace costs a real server.

CORRAL_BENCH_SKIP (docs/sandbox.md, bench-only) is passed to corral's supervisor when set, for
attribution runs: `CORRAL_BENCH_SKIP=landlock bash bench/servers.sh`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import random
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchkit as bk

VARIANTS = ("corral", "plain", "firejail")
VARIANTS_OF: dict[str, list[str]] = {}  # per server: VARIANTS and the attribution variants
# Run by root (firejail.users may not list the service users), keeping only the two
# capabilities setpriv inside needs to become the user; the uid change clears them.
FIREJAIL = ["firejail", "--noprofile", "--quiet", "--private-dev", "--caps.keep=setuid,setgid",
            "--nonewprivs", "--seccomp"]
PG = "/usr/lib/postgresql/15/bin"
PORTS = {"nginx": 18100, "redis": 18200, "postgresql": 18300}  # + the variant's index
CLIENTS = 16
OWN_ADDR = "10.214.0.1"  # --own-netns: the benchmark namespace's address wrk connects to


def port(server: str, variant: str) -> int:
    return PORTS[server] + VARIANTS_OF[server].index(variant)


HOST_OF: dict[int, str] = {}  # port -> the address its client connects to (127.0.0.1 if absent)


# -- manifests and plain command lines ---------------------------------------------------------
NGINX_CONF = """worker_processes 2;
pid /tmp/nginx-{variant}.pid;
error_log stderr;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path /tmp/nginx-{variant}-body;
    proxy_temp_path /tmp/nginx-{variant}-proxy;
    fastcgi_temp_path /tmp/nginx-{variant}-fastcgi;
    uwsgi_temp_path /tmp/nginx-{variant}-uwsgi;
    scgi_temp_path /tmp/nginx-{variant}-scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def nginx_argv(conf: str) -> list[str]:
    return ["/usr/sbin/nginx", "-e", "stderr", "-p", "/tmp/", "-c", conf, "-g", "daemon off;"]


def redis_argv(p: int) -> list[str]:
    return ["/usr/bin/redis-server", "--port", str(p), "--bind", "127.0.0.1",
            "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/tmp",
            "--daemonize", "no", "--logfile", ""]


PG_SETTINGS = ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
               "-c", "shared_buffers=64MB", "-c", "max_connections=40", "-c", "fsync=off",
               "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]


def pg_argv(data: str, p: int) -> list[str]:
    return [f"{PG}/postgres", "-D", data, "-c", f"port={p}", *PG_SETTINGS]


INITDB = ["--auth=trust", "--username=bench", "--locale=C", "--encoding=UTF8", "--no-sync"]


def write_manifest(world: bk.World, server: str, variant: str, limits: str) -> tuple[str, Path]:
    """The manifest of one contained variant (`variant` is "corral" or "corral-SKIPS");
    `limits` is the [process.*] limits line ("" for the manifest defaults)."""
    p = port(server, variant)
    index = VARIANTS_OF[server].index(variant)
    name = world.service(f"{server[0]}{index}")
    path = world.dir / f"{server}-{variant}.toml"
    if server == "nginx":
        www = world.dir / "www-src"
        conf = world.dir / f"nginx-{variant}.conf"
        listen = NGINX_CONF.format(variant=variant, port=p, root="/srv/www")
        own = variant == "corral-own"
        conf.write_text(listen.replace(f"listen 127.0.0.1:{p};", f"listen {p};") if own
                        else listen)
        network = 'network = "own"' if own else ""
        path.write_text(f'''name = "{name}"
{network}
[image]
include = ["/usr/sbin/nginx"]
add = {{ "/etc/benchnginx/nginx.conf" = "{conf}", "/srv/www/4k.bin" = "{www / '4k.bin'}" }}
delta_size = "64M"
[process.web]
command = {json.dumps(nginx_argv("/etc/benchnginx/nginx.conf"))}
listen = ["tcp/{p}"]
stop_signal = "SIGQUIT"
{limits}
[watch]
react = "log"
''')
    elif server == "redis":
        path.write_text(f'''name = "{name}"
[image]
include = ["/usr/bin/redis-server"]
delta_size = "64M"
[process.kv]
command = {json.dumps(redis_argv(p))}
listen = ["tcp/{p}"]
{limits}
[watch]
react = "log"
''')
    else:
        data = "/var/lib/pgbench/main"
        pg_limits = limits.replace("limits = {", 'limits = { memory = "1G",') if limits else \
            'limits = { memory = "1G" }'
        path.write_text(f'''name = "{name}"
[image]
include = ["{PG}/postgres", "{PG}/initdb", "/usr/lib/postgresql/15/lib",
           "/usr/share/postgresql/15", "/usr/share/zoneinfo", "/bin/sh"]
delta_size = "64M"
[process.db]
command = {json.dumps(pg_argv(data, p))}
exec = ["{PG}/postgres", "{PG}/initdb", "/bin/sh"]
listen = ["tcp/{p}"]
state_directory = ["pgbench"]
state_directory_mode = "0700"
stop_signal = "SIGINT"
environment = {{ TZ = "UTC", LANG = "C" }}
{pg_limits}
[process.db.setup]
command = {json.dumps([f"{PG}/initdb", "-D", data, *INITDB])}
creates = "{data}/PG_VERSION"
[watch]
react = "log"
''')
    return name, path


def start_contained(world: bk.World, server: str, variant: str, limits: str) -> None:
    """`corral up` of one contained variant; "corral-landlock+seccomp" runs with
    CORRAL_BENCH_SKIP=landlock,seccomp (launch/benchskip.py), and "nft" among the skips
    flushes the service's table (in the benchmark's own network namespace) after the start."""
    name, path = write_manifest(world, server, variant, limits)
    world.install(path, name)
    skips = variant.partition("-")[2].split("+") if "-" in variant else []
    world.up_without(path, name, [s for s in skips if s != "own"])  # corral-own: no skip
    if variant == "corral-own":  # `up` waited for it in the service's namespace
        HOST_OF[port(server, variant)] = OWN_ADDR
    else:
        _wait_port(world, port(server, variant), None, f"{server}-{variant}")
    status = json.loads(world.corral("status", name, "--json").stdout)
    TOPS[server, variant] = status["services"][0]["processes"][0]["pid"]


# -- starting and stopping ---------------------------------------------------------------------
def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_port(world: bk.World, p: int, proc: subprocess.Popen | None, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = (world.dir / f"{what}.log")
            tail = log.read_text()[-800:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {tail}")
        probe = subprocess.run(world.enter() + ["ss", "-Htln", f"sport = :{p}"],
                               capture_output=True, text=True)
        if probe.stdout.strip():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: nothing listening on port {p} after 60 s")


def _start_outside(world: bk.World, server: str, variant: str) -> None:
    p = port(server, variant)
    user = "postgres" if server == "postgresql" else "nobody"
    ids = ["--reuid", user, "--regid", str(pwd.getpwnam(user).pw_gid), "--init-groups"]
    if server == "nginx":
        conf = world.dir / f"nginx-{variant}.conf"
        conf.write_text(NGINX_CONF.format(variant=variant, port=p, root=world.dir / "www-src"))
        argv = nginx_argv(str(conf))
    elif server == "redis":
        argv = redis_argv(p)
    else:
        data = world.dir / f"pg-{variant}"
        data.mkdir(mode=0o700)
        shutil.chown(data, "postgres", "postgres")
        subprocess.run(["setpriv", *ids, f"{PG}/initdb", "-D", str(data), *INITDB], check=True,
                       capture_output=True, cwd="/tmp", env={"TZ": "UTC", "LANG": "C"})
        argv = pg_argv(str(data), p)
    wrap = FIREJAIL + ["--"] if variant == "firejail" else []
    full = world.enter() + [*wrap, "/usr/bin/setpriv", *ids, *argv]
    join = _cgroup_of_its_own(world, server, variant.partition("-cgroup-")[2])
    with open(world.dir / f"{server}-{variant}.log", "ab") as log:
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd="/tmp", preexec_fn=join,
                                env={"PATH": "/usr/bin:/bin", "TZ": "UTC", "LANG": "C"})
    world.cleanups.append(lambda: _stop(proc))
    _wait_port(world, p, proc, f"{server}-{variant}")
    TOPS[server, variant] = proc.pid


def _cgroup_of_its_own(world: bk.World, server: str, kind: str) -> Callable[[], None] | None:
    """For a plain-cgroup-KIND variant: make its cgroup, and return what the child runs before
    exec to join it (the server's whole tree starts there); None for no cgroup."""
    if not kind:
        return None
    if kind == "all":
        from corral.launch import cgroup  # corral's own code: the same layout and depth
        group = cgroup.Cgroup.create(world.service(f"{server[0]}cg"), "server", cgroup.Limits())
        world.cleanups.append(group.remove)  # after the server's stop (cleanups run reversed)
        return lambda: group.add(os.getpid())
    controller, depth = kind.rstrip("123"), int(kind[-1])
    top = f"/sys/fs/cgroup/{controller}"
    if not os.path.isfile(f"{top}/cgroup.procs") or os.path.isfile(f"{top}/cgroup.controllers"):
        raise SystemExit(f"bench: --plain-cgroups {kind} needs cgroup v1's {controller} "
                         f"hierarchy at {top}")
    dirs = [os.path.join(top, world.service(f"{server[0]}{kind}"), *["s", "p"][:depth - 1])]
    while len(dirs) < depth:
        dirs.insert(0, os.path.dirname(dirs[0]))
    os.makedirs(dirs[-1])
    world.cleanups.append(lambda: [os.rmdir(d) for d in reversed(dirs)])

    def join() -> None:
        with open(f"{dirs[-1]}/cgroup.procs", "w") as handle:
            handle.write(str(os.getpid()))
    return join


# -- server CPU ------------------------------------------------------------------------------
# The server's CPU time per request is the figure the rest of the machine disturbs least: on a
# busy 2-CPU machine throughput swings by tens of percent between rounds, while the CPU a
# request costs the server moves by a few (bench/servers.md). Read from /proc: utime + stime
# of the server's process tree plus what its reaped children used (cutime + cstime:
# PostgreSQL's backends, forked per connection, end up there).
TOPS: dict[tuple[str, str], int] = {}  # (server, variant) -> the pid at the top of its tree
HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(top: int) -> float:
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    total = 0
    for pid in ticks:
        at = pid
        while at > 1 and at != top:
            at = parent.get(at, 0)
        if at == top:
            total += ticks[pid]
    return total / HZ


# -- clients -----------------------------------------------------------------------------------
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise RuntimeError(f"cannot read the latency {text!r}")
    return float(match[1]) * _UNIT[match[2]]


def _client(world: bk.World, argv: list[str], cwd: str = "/tmp") -> str:
    result = subprocess.run(world.enter() + argv, capture_output=True, text=True, timeout=120,
                            cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {(result.stderr or result.stdout)[-600:]}")
    return result.stdout


def run_wrk(world: bk.World, p: int, seconds: float) -> dict[str, dict[str, float]]:
    out = _client(world, ["wrk", "-t2", f"-c{CLIENTS}", f"-d{seconds:g}s", "--latency",
                          f"http://{HOST_OF.get(p, '127.0.0.1')}:{p}/4k.bin"])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    ops = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors: {out[-400:]}")
    return {"nginx": {"rate": rps, "p99_ms": p99, "ops": ops}}


def run_redis(world: bk.World, p: int, seconds: float) -> dict[str, dict[str, float]]:
    requests = max(10000, int(seconds * 30000))  # about `seconds` per test at 60k/s
    out = _client(world, ["redis-benchmark", "-p", str(p), "-c", str(CLIENTS), "-n",
                          str(requests), "-t", "get,set", "--csv"])
    rows: dict[str, dict[str, float]] = {}
    lines = [line.replace('"', "").split(",") for line in out.strip().splitlines()]
    head = lines[0]
    for row in lines[1:]:
        fields = dict(zip(head, row, strict=False))
        rows[f"redis {fields['test']}"] = {"rate": float(fields["rps"]),
                                           "p99_ms": float(fields["p99_latency_ms"]),
                                           "ops": 2 * requests}  # CPU is measured over both
    return rows


def run_pgbench(world: bk.World, p: int, seconds: float) -> dict[str, dict[str, float]]:
    logs = world.dir / f"pglog-{p}"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    out = _client(world, [f"{PG}/pgbench", "-n", "-S", "-c", "8", "-j", "2", "-T",
                          f"{seconds:g}", "-h", "127.0.0.1", "-p", str(p), "-U", "bench",
                          "--log", "--log-prefix", str(logs / "tx"), "bench"], cwd=str(logs))
    tps = float(re.search(r"tps = ([\d.]+)", out)[1])  # type: ignore[index]
    ops = int(re.search(r"actually processed: (\d+)", out)[1])  # type: ignore[index]
    latencies = [int(line.split()[2]) / 1000 for name in glob.glob(str(logs / "tx*"))
                 for line in Path(name).read_text().splitlines()]
    return {"postgresql select": {"rate": tps, "p99_ms": bk.percentile(latencies, 99),
                                  "ops": ops}}


CLIENT: dict[str, Callable[[bk.World, int, float], dict[str, dict[str, float]]]] = {
    "nginx": run_wrk, "redis": run_redis, "postgresql": run_pgbench}


def prepare_pg(world: bk.World, variant: str) -> None:
    """pgbench's tables (scale 5, fits in shared_buffers) in the `bench` database."""
    p = port("postgresql", variant)
    for argv in ([f"{PG}/createdb", "-h", "127.0.0.1", "-p", str(p), "-U", "bench", "bench"],
                 [f"{PG}/pgbench", "-i", "-q", "-s", "5", "-h", "127.0.0.1", "-p", str(p),
                  "-U", "bench", "bench"]):
        _client(world, argv)


# -- the run -----------------------------------------------------------------------------------
def measure(world: bk.World, servers: list[str], rounds: int, seconds: float,
            limits: str, attribute: list[str], own_netns: bool = False,
            plain_cgroups: tuple[str, ...] = ()) -> dict[str, Any]:
    """`attribute`: skip sets ("landlock", "seccomp+landlock", "nft"...), each one more
    contained variant of every server, run in the same rounds."""
    www = world.dir / "www-src"
    www.mkdir()
    (www / "4k.bin").write_bytes(os.urandom(4096))
    extra = [f"corral-{a}" for a in attribute] + [f"plain-cgroup-{k}" for k in plain_cgroups]
    if own_netns:
        extra.append("corral-own")
        subprocess.run(world.enter() + ["ip", "addr", "add", f"{OWN_ADDR}/32", "dev", "lo"],
                       check=True)
    env_skip = os.environ.get("CORRAL_BENCH_SKIP", "")
    for server in servers:
        VARIANTS_OF[server] = [*VARIANTS, *extra]
        bk.progress(f"{server}: install and start, {len(VARIANTS_OF[server])} ways")
        for variant in VARIANTS_OF[server]:
            if variant.startswith("corral"):
                start_contained(world, server, variant, limits)
            else:
                _start_outside(world, server, variant)
        if server == "postgresql":
            for variant in VARIANTS_OF[server]:
                prepare_pg(world, variant)
        for variant in VARIANTS_OF[server]:  # one unreported warm-up each
            CLIENT[server](world, port(server, variant), 1)
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    rng = random.Random(13)
    for rnd in range(rounds):
        for server in servers:
            order = list(VARIANTS_OF[server])
            rng.shuffle(order)
            for variant in order:
                before = cpu_seconds(TOPS[server, variant])
                rows = CLIENT[server](world, port(server, variant), seconds)
                used = cpu_seconds(TOPS[server, variant]) - before
                for row, value in rows.items():
                    value["cpu_us"] = used * 1e6 / value["ops"]
                    samples.setdefault(row, {v: [] for v in VARIANTS_OF[server]})[variant] \
                        .append(value)
        bk.progress(f"round {rnd + 1}/{rounds}")
    results: dict[str, Any] = {}
    for row, per in samples.items():
        med = {v: {"rate": statistics.median(s["rate"] for s in per[v]),
                   "p99_ms": statistics.median(s["p99_ms"] for s in per[v]),
                   "cpu_us": statistics.median(s["cpu_us"] for s in per[v]),
                   "samples": per[v]} for v in per}
        plain = med["plain"]
        results[row] = {
            "variants": med,
            # ratio of the medians, and the median of each round's own ratio (less sensitive
            # to load that changed between rounds)
            "vs_plain": {v: m["rate"] / plain["rate"] for v, m in med.items()},
            "vs_plain_rounds": {v: statistics.median(
                a["rate"] / b["rate"] for a, b in zip(per[v], per["plain"], strict=True))
                for v in per},
            "p99_vs_plain": {v: m["p99_ms"] / plain["p99_ms"] for v, m in med.items()},
            "cpu_vs_plain": {v: m["cpu_us"] / plain["cpu_us"] for v, m in med.items()},
        }
    return {"rows": results, "rounds": rounds, "seconds": seconds, "skip": env_skip,
            "limits": limits or "(manifest defaults)"}


def table(report: dict[str, Any]) -> str:
    rows = [["server", "variant", "per s", "/plain", "(per round)", "p99 ms", "p99 /plain",
             "srv CPU us/op", "CPU /plain"]]
    for row, r in report["result"]["rows"].items():
        for n, (variant, v) in enumerate(r["variants"].items()):
            rows.append([row if n == 0 else "", variant, f"{v['rate']:.0f}",
                         f"{r['vs_plain'][variant]:.3f}", f"{r['vs_plain_rounds'][variant]:.3f}",
                         f"{v['p99_ms']:.2f}", f"{r['p99_vs_plain'][variant]:.2f}",
                         f"{v['cpu_us']:.1f}", f"{r['cpu_vs_plain'][variant]:.3f}"])
    res = report["result"]
    head = (f"servers: {res['rounds']} interleaved rounds x {res['seconds']:g} s per client run, "
            f"{CLIENTS} connections; limits: {res['limits']}"
            + (f"; CORRAL_BENCH_SKIP={res['skip']}" if res["skip"] else ""))
    noisy = ("\nthe machine had other work during the run: differences of a few points are "
             "noise" if report.get("noisy") else "")
    return f"{head}\n{bk.aligned(rows, right={2, 3, 4, 5, 6, 7, 8})}{noisy}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="length of each client run (redis: about that many requests)")
    parser.add_argument("--only", default="nginx,redis,postgresql")
    parser.add_argument("--limits", default="",
                        help='a limits line for the manifests, e.g. \'limits = { cpu = 2.0 }\'; '
                             "default: none (the manifest defaults)")
    parser.add_argument("--attribute", default="",
                        help="comma-separated skip sets, each one more contained variant: "
                             "landlock, seccomp, seccomp-main, overlay, image, cpu, cpu-group, "
                             "cpu-cgroup, memory, pids (as "
                             "CORRAL_BENCH_SKIP, docs/sandbox.md) and nft (the table flushed); "
                             "join with + to skip several in one variant")
    parser.add_argument("--own-netns", action="store_true",
                        help='one more variant, corral-own: network = "own" (nginx only)')
    parser.add_argument("--plain-cgroups", default="",
                        help="plain variants in cgroups of their own: all (as corral makes a "
                             "service's), cpu1-cpu3, memory1-memory3 (v1, that deep)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=bk.RESULTS_DIR / "servers.json")
    args = parser.parse_args()
    servers = [s for s in args.only.split(",") if s]
    if args.own_netns and servers != ["nginx"]:
        raise SystemExit("bench: --own-netns needs --only nginx")
    for kind in (k for k in args.plain_cgroups.split(",") if k):
        if kind != "all" and (kind.rstrip("123") not in ("cpu", "memory") or kind[-1] not in "123"):
            raise SystemExit(f"bench: unknown --plain-cgroups {kind!r} (all, cpu1-3, memory1-3)")
    for server in servers:
        if server not in PORTS:
            raise SystemExit(f"bench: unknown server {server!r} (nginx, redis, postgresql)")
    bk.prepare_run("corral-bsrv-", "bs")
    started = time.monotonic()
    report: dict[str, Any] = {"machine": bk.machine()}
    world = bk.World("corral-bsrv-", "bs")
    with bk.throwaway(world):
        report["result"] = measure(world, servers, args.rounds, args.seconds, args.limits,
                                   [a for a in args.attribute.split(",") if a], args.own_netns,
                                   tuple(k for k in args.plain_cgroups.split(",") if k))
    bk.end_run(report, started, args.out, args.json, table)


if __name__ == "__main__":
    main()
