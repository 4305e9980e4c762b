#!/usr/bin/env python3
"""What the per-service nftables table costs per packet: a loopback request/response ping-pong
whose server socket belongs to a contained user, with no table, with corral's table and with
variants of it, in the same interleaved rounds.

    bash bench/nft_cost.sh [--rounds N] [--count N] [--proto tcp,udp] [--size BYTES]
                           [--variants a,b,...] [--json]

Lab: one throwaway network namespace (loopback only) and one system user (the "server"). The
table is corral's, `service_ruleset()` of a service whose process runs as that user and listens
on the ping-pong port (plus a few other ports, like a real manifest), applied with
`nftables.apply()` in the namespace. bench/nft_pingpong.c runs both ends in one thread: the
server's socket is created and accepted as the user, so every reply it sends is dispatched by
`meta skuid` to its process chain, exactly as a contained server's replies are; the client's
socket is root's and leaves on the vmap miss. One round trip: one client packet, one server
packet (TCP_NODELAY; the replies carry the ACKs). Figure: the process's CPU time per round trip
(no blocking, no wake-ups: the whole path of both packets runs in that thread).

Variants (each is one full table, swapped in between samples; every round runs each variant once,
in a rotated order; the median of the rounds is reported, with its difference to `conntrack`):
  none        no table at all, and so no conntrack in the namespace
  conntrack   no service table; conntrack on (as in every variant below: a table whose only
              chain has no hook holds a `ct state` rule, so no rule is on any packet's path):
              the baseline of the differences
  hook-only   corral's table with an empty output chain (policy accept): the base chain alone
  dispatch    corral's output chain (the vmap) into a process chain that only accepts
  corral      the table service_ruleset() generates now (whatever this checkout's plan does)
  interval    corral's table with `flags interval` on every connect and listen set (pipapo)
  hash        corral's table with no interval flag on them (hash; valid: exact elements only)
  hash-lookup-first, hash-state-first
              `hash` with the reply fast path's matches reordered: the set lookup before the ct
              matches; `ct state` before `ct direction`
  hash-isolated-set
              `hash` with the isolated check corral had until 2026-12-05 (a set of isolated uids
              looked up at the head of each process chain on every packet; isolation is now a
              drop rule inserted only when it happens, host.nft.isolate)
  hash-isolated-in-output
              `hash-isolated-set` with the check in the output chain, before the vmap (where it
              was before that): every user's packets pay the lookup, not only the service's
  ct-only, lookup-hash, lookup-interval
              `dispatch` whose process chain holds one rule: the fast path's ct matches alone;
              its set lookup alone, with a hash or an interval set (parts, not equivalents)
  baseline    with --baseline-src DIR: the table another checkout's corral generates
Before and after the rounds, a check: a UDP reply from an undeclared port is dropped (EPERM) under
every variant that carries corral's process chain.
"""

from __future__ import annotations

import argparse
import copy
import json
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from benchkit import progress, sh, sweep_stale  # noqa: E402  (bench/: the script's own directory)
from corral.core.netspec import Endpoint, parse_ports  # noqa: E402
from corral.host import nft  # noqa: E402
from corral.plan.nft_rules import ProcessFlows, service_ruleset  # noqa: E402

PREFIX = "corral-nftc"            # netns corral-nftc-PID, temp dir, user corral-nftcPID-app
MARK = "corral nft bench"         # GECOS of our user: only those are ever deleted
PORT, CLOSED_PORT = 9000, 9001
CT_TABLE = "nftc-conntrack"       # in our own namespace only
VARIANTS = ("none", "conntrack", "hook-only", "dispatch", "corral", "interval", "hash",
            "hash-lookup-first", "hash-state-first", "hash-isolated-set", "hash-isolated-in-output",
            "ct-only", "lookup-hash", "lookup-interval")
FILTERED = ("corral", "interval", "hash", "hash-lookup-first", "hash-state-first",
            "hash-isolated-set", "hash-isolated-in-output", "baseline")


# ---------------------------------------------------------------- the tables

def flows(user: str) -> list[ProcessFlows]:
    """A web server's declaration: the ping-pong port among a few, one upstream."""
    listen = tuple(parse_ports(s) for s in (f"tcp/{PORT}", f"udp/{PORT}", "tcp/443", "udp/53"))
    return [ProcessFlows("app", user, listen, (Endpoint("tcp", 5432, 5432, "10.0.0.5/32"),))]


# The same flows built by another checkout's corral (its src/ first on the path), for
# --baseline-src: that tree's table, measured in the same rounds as this one's.
_BASELINE = """
import json, sys
from corral.core.netspec import Endpoint, parse_ports
from corral.plan.nft_rules import ProcessFlows, service_ruleset
service, user, port = sys.argv[1], sys.argv[2], sys.argv[3]
listen = tuple(parse_ports(s) for s in (f"tcp/{port}", f"udp/{port}", "tcp/443", "udp/53"))
flows = [ProcessFlows("app", user, listen, (Endpoint("tcp", 5432, 5432, "10.0.0.5/32"),))]
print(json.dumps(service_ruleset(service, flows)))
"""


def baseline_ruleset(src: Path, service: str, user: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", _BASELINE, service, user, str(PORT)], env=env,
                         capture_output=True, text=True, check=True, cwd="/").stdout
    return json.loads(out)


def _set_objects(ruleset: dict):
    for cmd in ruleset["nftables"]:
        obj = cmd.get("add", {}).get("set")
        if obj is not None and obj["name"] != "isolated":
            yield obj


def _rules(ruleset: dict, chain: str):
    for cmd in ruleset["nftables"]:
        obj = cmd.get("add", {}).get("rule")
        if obj is not None and obj["chain"] == chain:
            yield cmd, obj


def _fast_path(ruleset: dict) -> list:
    """The expressions of the reply fast path: the process chain's first rule with `ct state`."""
    return next(obj["expr"] for _, obj in _rules(ruleset, "proc-app")
                if any(_is_ct(e, "state") for e in obj["expr"]))


def _is_ct(expr: dict, key: str) -> bool:
    return expr.get("match", {}).get("left") == {"ct": {"key": key}}


def variant_ruleset(variant: str, service: str, user: str) -> dict | None:
    if variant == "none":
        return None
    if variant == "conntrack":
        return {"nftables": []}
    ruleset = copy.deepcopy(service_ruleset(service, flows(user)))
    if variant == "hook-only":
        ruleset["nftables"] = [c for c in ruleset["nftables"] if "rule" not in c.get("add", {})]
        return ruleset
    if variant in ("dispatch", "ct-only", "lookup-hash", "lookup-interval"):
        fast = _fast_path(ruleset)
        keep = {"dispatch": [], "ct-only": [e for e in fast if "ct" in e.get("match", {}).get(
            "left", {})]}.get(variant, [e for e in fast if "concat" in e.get("match", {}).get(
                "left", {})])
        ruleset["nftables"] = [c for c in ruleset["nftables"]
                               if c.get("add", {}).get("rule", {}).get("chain") != "proc-app"]
        ruleset["nftables"].append({"add": {"rule": {"family": "inet",
                                                     "table": f"corral-{service}",
                                                     "chain": "proc-app",
                                                     "expr": keep + [{"accept": None}]}}})
        for obj in _set_objects(ruleset):
            if variant == "lookup-hash":
                obj.pop("flags", None)
            elif variant == "lookup-interval":
                obj["flags"] = ["interval"]
        return ruleset
    if variant == "corral":
        return ruleset
    for obj in _set_objects(ruleset):
        if variant == "interval":
            obj["flags"] = ["interval"]
        else:
            obj.pop("flags", None)
            for elem in obj.get("elem", []):
                if any(isinstance(part, dict) for part in elem["concat"]):
                    raise ValueError(f"{obj['name']} holds a range or prefix: no hash variant")
    if variant == "hash-lookup-first":
        expr = _fast_path(ruleset)
        expr[:] = [e for e in expr if not _is_ct(e, "direction") and not _is_ct(e, "state")][:-1] \
            + [e for e in expr if _is_ct(e, "direction") or _is_ct(e, "state")] + [expr[-1]]
    elif variant == "hash-state-first":
        expr = _fast_path(ruleset)
        expr[:] = ([e for e in expr if _is_ct(e, "state")]
                   + [e for e in expr if _is_ct(e, "direction")]
                   + [e for e in expr if not _is_ct(e, "direction") and not _is_ct(e, "state")])
    elif variant in ("hash-isolated-set", "hash-isolated-in-output"):
        # The set (empty: nobody isolated) and its check, in the chain the variant names, ahead
        # of that chain's first rule
        cmds, base = ruleset["nftables"], {"family": "inet", "table": f"corral-{service}"}
        cmds.insert(next(i for i, c in enumerate(cmds) if "chain" in c.get("add", {})),
                    {"add": {"set": {**base, "name": "isolated", "type": "uid"}}})
        chain = "output" if variant == "hash-isolated-in-output" else "proc-app"
        check = {"add": {"rule": {**base, "chain": chain, "comment": "isolated", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": "@isolated"}},
            {"counter": None}, {"drop": None}]}}}
        cmds.insert(next(i for i, c in enumerate(cmds)
                         if c.get("add", {}).get("rule", {}).get("chain") == chain), check)
    elif variant not in ("interval", "hash"):
        raise ValueError(f"unknown variant {variant}")
    return ruleset


# ---------------------------------------------------------------- the lab

class Lab:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ns = f"{PREFIX}-{self.pid}"
        self.service = f"nftc{self.pid}"
        self.user = f"corral-{self.service}-app"
        self.tmp: Path | None = None
        self.have_ns = self.have_user = False

    def create(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.pid}-"))
        sh("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
           "--comment", MARK, self.user)
        self.have_user = True
        sh("ip", "netns", "add", self.ns)
        self.have_ns = True
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        binary = self.tmp / "nft_pingpong"
        sh("gcc", "-O2", "-Wall", "-o", str(binary), str(HERE / "nft_pingpong.c"))
        return binary

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    baseline: dict | None = None

    def load(self, variant: str) -> None:
        """The variant's table alone, plus (but for `none`) a table that turns conntrack on
        without any rule on the path, so that every variant is compared with conntrack on,
        as on a host where anything uses it (corral's own table does)."""
        nft.delete_table(self.service, netns=self.ns)
        ruleset = (self.baseline if variant == "baseline"
                   else variant_ruleset(variant, self.service, self.user))
        if ruleset is None:
            sh("ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", CT_TABLE,
               check=False)
            return
        table = {"family": "inet", "name": CT_TABLE}
        base = {"family": "inet", "table": CT_TABLE}
        ct_on = [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}},
                 {"add": {"chain": {**base, "name": "unhooked"}}},
                 {"add": {"rule": {**base, "chain": "unhooked", "expr": [
                     {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                "right": "established"}}, {"accept": None}]}}}]
        nft.apply({"nftables": ct_on + ruleset["nftables"]}, netns=self.ns)

    def pingpong(self, binary: Path, proto: str, port: int, warmup: int, count: int,
                 size: int) -> tuple[int, int, int] | str:
        proc = subprocess.run(["ip", "netns", "exec", self.ns, str(binary), proto, str(self.uid),
                               str(port), str(warmup), str(count), str(size)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return proc.stderr.strip()
        rounds, cpu, wall = (int(x) for x in proc.stdout.split())
        return rounds, cpu, wall

    def destroy(self) -> None:
        if self.have_ns:
            sh("ip", "netns", "del", self.ns, check=False)
        if self.have_user:
            sh("userdel", self.user, check=False)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def check_drops(lab: Lab, binary: Path, variants: list[str]) -> None:
    """Under each filtering variant the declared port answers and an undeclared one cannot."""
    for variant in variants:
        lab.load(variant)
        ok = lab.pingpong(binary, "udp", PORT, 0, 10, 64)
        denied = lab.pingpong(binary, "udp", CLOSED_PORT, 0, 10, 64)
        expect_denied = variant in FILTERED
        if isinstance(ok, str) or (expect_denied and "Operation not permitted" not in str(denied)):
            raise RuntimeError(f"{variant}: declared port -> {ok!r}, undeclared -> {denied!r}")


def tcp_segments(lab: Lab) -> int:
    text = sh("ip", "netns", "exec", lab.ns, "cat", "/proc/net/snmp")
    lines = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutSegs")])


# ---------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds (default 15)")
    parser.add_argument("--count", type=int, default=100_000,
                        help="round trips per sample (default 100,000)")
    parser.add_argument("--warmup", type=int, default=10_000, help="round trips before each")
    parser.add_argument("--proto", default="tcp,udp")
    parser.add_argument("--size", type=int, default=64, help="bytes each way (default 64)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--baseline-src", type=Path, metavar="DIR",
                        help="also measure the table of another checkout's corral (DIR: its src/,"
                             " e.g. from `git archive COMMIT src | tar -x -C /tmp/x`): variant "
                             "`baseline`, in the same rounds")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if args.baseline_src:
        variants.append("baseline")
    protos = args.proto.split(",")
    if os.geteuid() != 0:
        print("bench: must run as root (network namespaces, users, nftables)", file=sys.stderr)
        return 1
    unknown = [v for v in variants if v not in VARIANTS + ("baseline",)] + [p for p in protos
                                                             if p not in ("tcp", "udp")]
    if unknown or args.rounds < 1 or args.count < 1:
        parser.error(f"unknown variant or protocol {unknown}, or rounds/count < 1")
    if "conntrack" not in variants:
        variants.insert(0, "conntrack")

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    sweep_stale(PREFIX, "nft_cost", r"corral-nftc(\d+)-app", MARK)
    lab = Lab()
    samples: dict[str, dict[str, list[float]]] = {p: {v: [] for v in variants} for p in protos}
    load = os.getloadavg()
    started = time.monotonic()
    try:
        binary = lab.create()
        if args.baseline_src:
            lab.baseline = baseline_ruleset(args.baseline_src.resolve(), lab.service, lab.user)
        check_drops(lab, binary, variants)
        lab.load("corral")
        before = tcp_segments(lab)
        lab.pingpong(binary, "tcp", PORT, 0, 10_000, args.size)
        segments = (tcp_segments(lab) - before) / 10_000
        for round_ in range(args.rounds):
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                lab.load(variant)
                for proto in protos:
                    out = lab.pingpong(binary, proto, PORT, args.warmup, args.count, args.size)
                    if isinstance(out, str):
                        raise RuntimeError(f"{variant} {proto}: {out}")
                    samples[proto][variant].append(out[1] / out[0])
            progress(f"round {round_ + 1}/{args.rounds}: " + "; ".join(
                f"{p} " + " ".join(f"{v} {samples[p][v][-1]:.0f}" for v in variants)
                for p in protos))
        check_drops(lab, binary, variants)
    finally:
        lab.destroy()

    report: dict = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                                "nft": sh("nft", "--version").strip(),
                                "load_before": [round(x, 2) for x in load],
                                "load_after": [round(x, 2) for x in os.getloadavg()]},
                    "method": {"rounds": args.rounds, "count": args.count, "warmup": args.warmup,
                               "size": args.size, "tcp_segments_per_round_trip":
                               round(segments, 3)},
                    "wall_s": round(time.monotonic() - started, 1), "results": {}}
    for proto in protos:
        base = statistics.median(samples[proto]["conntrack"])
        rows = report["results"][proto] = {}
        for variant in variants:
            values = samples[proto][variant]
            # The difference of each round's pair, then its median: a round's variants ran
            # within seconds of each other, so drift of the machine cancels out.
            diffs = [v - b for v, b in zip(values, samples[proto]["conntrack"], strict=True)]
            q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
            rows[variant] = {"ns_per_round_trip": round(statistics.median(values), 1),
                             "minus_conntrack_ns": round(statistics.median(values) - base, 1),
                             "paired_diff_ns": round(statistics.median(diffs), 1),
                             "paired_diff_iqr_ns": [round(q[0], 1), round(q[2], 1)],
                             "samples": [round(v, 1) for v in values]}
            if "baseline" in samples[proto] and variant != "baseline":
                rows[variant]["paired_vs_baseline_ns"] = round(statistics.median(
                    [v - b for v, b in zip(values, samples[proto]["baseline"], strict=True)]), 1)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"loopback ping-pong, {args.size} B each way, {args.count:,} round trips x "
          f"{args.rounds} rounds; {m['kernel']}, {m['cpus']} CPUs, {m['nft']}; load "
          f"{m['load_before'][0]} -> {m['load_after'][0]}; TCP segments per round trip "
          f"{report['method']['tcp_segments_per_round_trip']}")
    for proto in protos:
        print(f"{proto}: CPU ns per round trip (median), and per-round difference to conntrack"
              " (median, IQR)" + ("; to baseline (median)" if "baseline" in variants else ""))
        for variant, row in report["results"][proto].items():
            iqr = row["paired_diff_iqr_ns"]
            print(f"  {variant:<20} {row['ns_per_round_trip']:>8.1f}  "
                  f"{row['paired_diff_ns']:>+7.1f}  [{iqr[0]:+.1f}, {iqr[1]:+.1f}]"
                  + (f"  {row['paired_vs_baseline_ns']:+.1f}" if "paired_vs_baseline_ns" in row
                     else ""))
    print(f"wall time {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
