#!/usr/bin/env python3
"""Does the length of a process's allow-list slow its connections? corral's nftables sets versus a
linear iptables chain, on this machine.

    bash bench/nft.sh [--json] [--samples N] [--seconds S] [--sizes 10,1000,100000]
                      [--iptables nft|legacy|both|none]

Lab: netns MAIN (veth 10.78.0.1) <-> netns PEER (10.78.0.2, a C server accepting on :9000).
One system user per size; each user's allow-list holds SIZE connect entries: SIZE-1 others
(tcp/20000,20002,...@10.200.x.y/32, 100 ports per address) and the declared destination
tcp/9000@10.78.0.2, which the client's traffic matches.

- nft: one corral service table per user, built by corral.plan.nft_rules.service_ruleset and applied
  with corral.host.nft.apply (`nft -j -f -`), all three loaded at once (a packet also passes the
  other tables' dispatch, the same small cost for every size).
- iptables: the same entries as a linear chain per user, one rule per entry
  (-d ADDR -p tcp --dport P -m owner --uid-owner UID -j ACCEPT), the declared destination last,
  then DROP; OUTPUT jumps to it by `-m owner --uid-owner UID -m conntrack --ctdir ORIGINAL`
  (conntrack on, as corral's `ct direction` turns it on).

Traffic: bench/nft_connect.c as the user, connect+close (RST) in a loop to 10.78.0.2:9000: each
connection sends SYN, ACK and RST through MAIN's output hook, over the veth to a real listener.
Samples of --seconds each (after a 0.3 s warm-up), sizes interleaved in rotating order; the
median connections/s per size and its ratio to the 10-entry case are reported. Also: the time to
build and to apply (median of 3) corral's table of the largest size, and iptables-restore's time.

Everything (netns, users, temp dir with the compiled client) is removed in `finally`, and what a
killed run left (names carry its pid) is removed at the next start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from benchkit import progress, sh, sweep_stale  # noqa: E402  (bench/: the script's own directory)
from corral.core.netspec import Endpoint  # noqa: E402
from corral.host import nft  # noqa: E402
from corral.plan.nft_rules import ProcessFlows, service_ruleset  # noqa: E402

PREFIX = "corral-nftb"            # netns corral-nftb-PID[-p], temp dir, users corral-nftbPIDsI-app
MARK = "corral nft bench"         # GECOS of our users: only those are ever deleted
MAIN_ADDR, PEER_ADDR, PORT, CLOSED_PORT = "10.78.0.1", "10.78.0.2", 9000, 9001
WARMUP = 0.3


# ---------------------------------------------------------------- allow-lists

def others(n: int) -> list[tuple[str, int]]:
    """n undeclared-for-this-traffic (address, port) pairs: 100 ports per /32 address."""
    out = []
    for i in range(math.ceil(n / 100)):
        addr = f"10.200.{i >> 8}.{i & 255}"
        out += [(addr, 20000 + 2 * j) for j in range(min(100, n - 100 * i))]
    return out


def nft_flows(user: str, size: int) -> list[ProcessFlows]:
    eps = [Endpoint("tcp", port, port, f"{addr}/32") for addr, port in others(size - 1)]
    eps.append(Endpoint("tcp", PORT, PORT, f"{PEER_ADDR}/32"))
    return [ProcessFlows("app", user, (), tuple(eps))]


def iptables_rules(chain: str, uid: int, size: int) -> str:
    owner = f"-m owner --uid-owner {uid}"
    lines = ["*filter", f":{chain} - [0:0]",
             f"-A OUTPUT {owner} -m conntrack --ctdir ORIGINAL -j {chain}"]
    lines += [f"-A {chain} -d {addr}/32 -p tcp -m tcp --dport {port} {owner} -j ACCEPT"
              for addr, port in others(size - 1)]
    lines += [f"-A {chain} -d {PEER_ADDR}/32 -p tcp -m tcp --dport {PORT} {owner} -j ACCEPT",
              f"-A {chain} {owner} -j DROP", "COMMIT", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the lab

@dataclass
class Lab:
    pid: int = field(default_factory=os.getpid)
    users: dict[int, str] = field(default_factory=dict)     # size -> user name
    namespaces: list[str] = field(default_factory=list)
    tmp: Path | None = None
    server: subprocess.Popen | None = None

    @property
    def ns(self) -> str:
        return f"{PREFIX}-{self.pid}"

    @property
    def peer(self) -> str:
        return f"{PREFIX}-{self.pid}-p"

    def service(self, index: int) -> str:
        return f"nftb{self.pid}s{index}"

    def create(self, sizes: list[int]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.pid}-"))
        self.tmp.chmod(0o755)                 # the test users run the client from here
        for index, size in enumerate(sizes):
            name = f"corral-{self.service(index)}-app"
            sh("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
               "--comment", MARK, name)
            self.users[size] = name
        for ns in (self.ns, self.peer):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
           "netns", self.peer)
        for ns, dev, addr in ((self.ns, "v0", MAIN_ADDR), (self.peer, "v1", PEER_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # Many short connections: all ephemeral ports, and closed conntrack entries gone fast.
        sh("ip", "netns", "exec", self.ns, "sysctl", "-qw",
           "net.ipv4.ip_local_port_range=1024 65000")

    def conntrack_sysctls(self) -> None:
        # Per-netns, present once conntrack is loaded (the first table with `ct` loads it).
        for key in ("tcp_timeout_close", "tcp_timeout_time_wait", "tcp_timeout_syn_sent"):
            sh("ip", "netns", "exec", self.ns, "sysctl", "-qw",
               f"net.netfilter.nf_conntrack_{key}=2", check=False)

    def compile(self) -> Path:
        binary = self.tmp / "nft_connect"
        sh("gcc", "-O2", "-Wall", "-o", str(binary), str(HERE / "nft_connect.c"))
        binary.chmod(0o755)
        return binary

    def start_server(self, binary: Path) -> None:
        self.server = subprocess.Popen(["ip", "netns", "exec", self.peer, str(binary), "server",
                                        PEER_ADDR, str(PORT)], stdout=subprocess.PIPE, text=True)
        if self.server.stdout.readline().strip() != "ready":
            raise RuntimeError("the server did not start")

    def as_user(self, size: int, *argv: str) -> list[str]:
        pw = pwd.getpwnam(self.users[size])
        return ["ip", "netns", "exec", self.ns, "setpriv", "--reuid", str(pw.pw_uid),
                "--regid", str(pw.pw_gid), "--clear-groups", *argv]

    def destroy(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait(timeout=10)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        for name in self.users.values():
            sh("userdel", name, check=False)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- measuring

def probe(lab: Lab, binary: Path, size: int, port: int) -> str:
    return sh(*lab.as_user(size, str(binary), "probe", PEER_ADDR, str(port))).strip()


def check_paths(lab: Lab, binary: Path, sizes: list[int], what: str) -> None:
    """The declared destination connects, an undeclared port of the same host does not."""
    for size in sizes:
        ok, closed = probe(lab, binary, size, PORT), probe(lab, binary, size, CLOSED_PORT)
        if ok != "ok" or closed not in ("EPERM", "timeout"):
            raise RuntimeError(f"{what}, {size} entries: declared -> {ok}, undeclared -> {closed} "
                               "(expected ok and EPERM/timeout)")


def measure(lab: Lab, binary: Path, sizes: list[int], samples: int, seconds: float,
            what: str) -> dict[int, dict[str, list[float]]]:
    """Per size: "wall" connections per second and "cpu" connections per CPU-second of the
    client (its user+system time, which includes the softirq work done in its context: the
    whole path on a veth). The CPU figure leaves out time spent waiting for a CPU, so it is
    the steadier one on a busy machine."""
    rates: dict[int, dict[str, list[float]]] = {size: {"wall": [], "cpu": []} for size in sizes}
    for round_ in range(samples):
        order = sizes[round_ % len(sizes):] + sizes[:round_ % len(sizes)]
        for size in order:
            out = sh(*lab.as_user(size, str(binary), "client", PEER_ADDR, str(PORT),
                                  str(WARMUP), str(seconds)), timeout=seconds * 4 + 30)
            count, elapsed_ns, errors, cpu_ns = (int(x) for x in out.split())
            if errors:
                raise RuntimeError(f"{what}, {size} entries: {errors} connects failed")
            rates[size]["wall"].append(count / (elapsed_ns / 1e9))
            rates[size]["cpu"].append(count / (max(cpu_ns, 1) / 1e9))
        progress(f"{what}: round {round_ + 1}/{samples}: "
                 + ", ".join(f"{s}: {rates[s]['wall'][-1]:,.0f}/s "
                             f"({rates[s]['cpu'][-1]:,.0f}/CPU-s)"
                             for s in sizes))
    return rates


def summarize(rates: dict[int, dict[str, list[float]]]) -> list[dict]:
    smallest = min(rates)
    base = {kind: statistics.median(rates[smallest][kind]) for kind in ("wall", "cpu")}
    rows = []
    for size, r in sorted(rates.items()):
        row: dict = {"entries": size}
        for kind in ("wall", "cpu"):
            med = statistics.median(r[kind])
            row[kind] = {
                "median": round(med),
                "min": round(min(r[kind])),
                "max": round(max(r[kind])),
                "ratio": round(med / base[kind], 3),
                "samples": [round(x) for x in r[kind]],
            }
        rows.append(row)
    return rows


def without_intervals(ruleset: dict) -> dict:
    """The same table with plain (hash) sets: no interval flag. Valid only because every element
    here is one address and one port; corral does not generate this (an experiment)."""
    for cmd in ruleset["nftables"]:
        obj = cmd.get("add", {}).get("set")
        if obj is not None:
            obj.pop("flags", None)
    return ruleset


def run_nft(lab: Lab, binary: Path, sizes: list[int], samples: int, seconds: float,
            hash_sets: bool = False) -> dict:
    what = "nft-hash" if hash_sets else "nft"
    applied: dict[int, dict] = {}
    for index, size in enumerate(sizes):
        start = time.perf_counter()
        ruleset = service_ruleset(lab.service(index), nft_flows(lab.users[size], size))
        built = time.perf_counter() - start
        if hash_sets:
            ruleset = without_intervals(ruleset)
        doc = json.dumps(ruleset)
        times = []
        for _ in range(3 if size == max(sizes) else 1):  # re-applying replaces the table
            start = time.perf_counter()
            nft.apply(ruleset, netns=lab.ns)
            times.append(time.perf_counter() - start)
        applied[size] = {"build_s": round(built, 3), "apply_s": round(statistics.median(times), 3),
                         "apply_samples_s": [round(t, 3) for t in times], "json_bytes": len(doc)}
        progress(f"{what}: {size} entries: built in {built:.2f} s, applied in "
                 f"{statistics.median(times):.2f} s (median of {len(times)})")
    lab.conntrack_sysctls()
    check_paths(lab, binary, sizes, what)
    rates = measure(lab, binary, sizes, samples, seconds, what)
    check_paths(lab, binary, sizes, what)
    for index, _ in enumerate(sizes):
        nft.delete_table(lab.service(index), netns=lab.ns)
    return {"rows": summarize(rates), "apply": applied}


def run_iptables(lab: Lab, binary: Path, sizes: list[int], samples: int, seconds: float,
                 variant: str) -> dict:
    restore = shutil.which(f"iptables-{variant}-restore")
    cmd = shutil.which(f"iptables-{variant}")
    if not restore or not cmd:
        raise RuntimeError(f"iptables-{variant} is not installed (apt-get install iptables)")
    version = sh(cmd, "--version").strip()
    applied = {}
    try:
        for index, size in enumerate(sizes):
            pw = pwd.getpwnam(lab.users[size])
            text = iptables_rules(f"nftb-s{index}", pw.pw_uid, size)
            start = time.perf_counter()
            sh("ip", "netns", "exec", lab.ns, restore, "--noflush", input=text, timeout=600)
            applied[size] = {"apply_s": round(time.perf_counter() - start, 3)}
            progress(f"iptables-{variant}: {size} entries: "
                     f"restored in {applied[size]['apply_s']:.2f} s")
        lab.conntrack_sysctls()
        check_paths(lab, binary, sizes, f"iptables-{variant}")
        rates = measure(lab, binary, sizes, samples, seconds, f"iptables-{variant}")
    finally:
        # Flush our rules only (the netns is ours; nothing else is in its filter table).
        sh("ip", "netns", "exec", lab.ns, cmd, "-F", "OUTPUT", check=False)
        for index, _ in enumerate(sizes):
            sh("ip", "netns", "exec", lab.ns, cmd, "-F", f"nftb-s{index}", check=False)
            sh("ip", "netns", "exec", lab.ns, cmd, "-X", f"nftb-s{index}", check=False)
        if variant == "nft":
            sh("ip", "netns", "exec", lab.ns, "nft", "delete", "table", "ip", "filter", check=False)
    return {"rows": summarize(rates), "apply": applied, "version": version}


# ---------------------------------------------------------------- report

def table(title: str, result: dict) -> str:
    lines = [title, f"  {'entries':>8}  {'conn/s':>8}  {'min-max':>15}  {'ratio':>6}  "
                    f"{'conn/CPU-s':>10}  {'ratio':>6}  {'apply':>7}"]
    for row in result["rows"]:
        wall, cpu = row["wall"], row["cpu"]
        apply = result["apply"].get(row["entries"], {}).get("apply_s")
        spread = f"{wall['min']:,}-{wall['max']:,}"
        lines.append(f"  {row['entries']:>8,}  {wall['median']:>8,}  {spread:>15}  "
                     f"{wall['ratio']:>6.3f}  "
                     f"{cpu['median']:>10,}  {cpu['ratio']:>6.3f}  "
                     f"{'' if apply is None else f'{apply:.2f} s':>7}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--samples", type=int, default=5, help="samples per size (default 5)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per sample (default 1)")
    parser.add_argument("--sizes", default="10,1000,100000",
                        help="allow-list sizes, smallest first")
    parser.add_argument("--iptables", choices=["nft", "legacy", "both", "none"], default="nft",
                        help="which iptables to compare with (default nft: Debian's iptables)")
    parser.add_argument("--hash-variant", action="store_true",
                        help="also measure the same tables with plain hash sets (no interval "
                             "flag): an experiment, not what corral generates")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if os.geteuid() != 0:
        print("bench: must run as root (network namespaces, users, nftables)", file=sys.stderr)
        return 1
    if min(sizes) < 1 or args.samples < 1 or args.seconds <= 0:
        parser.error("sizes, samples and seconds must be positive")
    variants = {"both": ["nft", "legacy"], "none": []}.get(args.iptables, [args.iptables])

    def terminate(signum, frame):          # run the `finally` below on SIGTERM/SIGHUP too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    sweep_stale(PREFIX, "nft_rate", r"corral-nftb(\d+)s\d+-app", MARK)
    lab = Lab()
    started = time.monotonic()
    report: dict = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                                "nft": sh("nft", "--version").strip()},
                    "method": {"samples": args.samples, "seconds": args.seconds, "warmup_s": WARMUP,
                               "sizes": sizes}}
    try:
        progress(f"setting up netns {lab.ns}, {len(sizes)} users")
        lab.create(sizes)
        binary = lab.compile()
        lab.start_server(binary)
        report["nft"] = run_nft(lab, binary, sizes, args.samples, args.seconds)
        if args.hash_variant:
            report["nft-hash"] = run_nft(lab, binary, sizes, args.samples, args.seconds,
                                         hash_sets=True)
        for variant in variants:
            report[f"iptables-{variant}"] = run_iptables(lab, binary, sizes, args.samples,
                                                         args.seconds, variant)
    finally:
        lab.destroy()
    report["wall_s"] = round(time.monotonic() - started, 1)

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"TCP connect+close rate as a contained user, {m['kernel']}, {m['cpus']} CPUs, "
          f"{m['nft']}; "
          f"median of {args.samples} x {args.seconds:g} s")
    print(table("corral service table (nft sets):", report["nft"]))
    largest = report["nft"]["apply"][max(sizes)]
    print(f"  table of {max(sizes):,} entries: built in {largest['build_s']:.2f} s "
          "(service_ruleset), "
          f"applied in {largest['apply_s']:.2f} s (nft -j -f, median of "
          f"{len(largest['apply_samples_s'])}), {largest['json_bytes'] / 1e6:.1f} MB of JSON")
    if "nft-hash" in report:
        print(table("experiment: the same tables with hash sets (no interval flag; not corral's):",
                    report["nft-hash"]))
    for variant in variants:
        result = report[f"iptables-{variant}"]
        print(table(f"linear chain, {result['version']} (apply = iptables-restore):", result))
    print(f"wall time {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
