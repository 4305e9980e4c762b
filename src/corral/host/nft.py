"""Talking to nft: apply, check and list corral's tables, and the watcher's isolate reaction.

nft is driven through its JSON input on stdin, one transaction per call (`nft -j -f -`), as
foomuuri does; the rules themselves are computed, purely, in corral.plan.nft_rules.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from corral.plan.nft_rules import table_name

NFT = "nft"


class NftError(Exception):
    """nft failed; the message carries its stderr."""


def run(args: list[str], netns: str | None, stdin: str | None = None) -> str:
    """nft in our network namespace, in a named one (`ip netns`), or in the one pinned at a path
    (a service's own, host.netns)."""
    if netns is None:
        cmd = [NFT, *args]
    elif netns.startswith("/"):
        cmd = ["nsenter", f"--net={netns}", NFT, *args]
    else:
        cmd = ["ip", "netns", "exec", netns, NFT, *args]
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise NftError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def apply(ruleset: dict, netns: str | None = None) -> None:
    """Apply a JSON ruleset as one transaction (`nft -j -f -`), optionally inside `netns`."""
    run(["-j", "-f", "-"], netns, json.dumps(ruleset))


def check(ruleset: dict, netns: str | None = None) -> None:
    """Like apply, but nft only checks the ruleset against the kernel (`-c`), changing nothing."""
    run(["-c", "-j", "-f", "-"], netns, json.dumps(ruleset))


def table_exists(service: str, netns: str | None = None) -> bool:
    # Parse the table list instead of matching nft's wording for "No such file or directory".
    listing = json.loads(run(["-j", "list", "tables", "inet"], netns) or '{"nftables": []}')
    name = table_name(service)
    return any(item.get("table", {}).get("name") == name for item in listing["nftables"])


ISOLATED = "isolated"  # the comment of an isolation's rules


def isolate(service: str, processes: Sequence[str], netns: str | None = None) -> None:
    """Cut every packet of these processes' users now (the watcher's `isolate` reaction): a
    `counter drop` rule at the head of each one's chain (proc-P), replies too, in one
    transaction that also removes an earlier isolation's rules (isolating twice does not stack
    them). A process with no chain in the table is an error: nothing is changed then."""
    cmds = [_delete(service, rule) for rule in _isolation(service, netns)]
    cmds += [_isolating(service, f"proc-{process}") for process in sorted(set(processes))]
    apply({"nftables": cmds}, netns)


def release(service: str, netns: str | None = None) -> None:
    """Undo isolate (after a revert or at stop); nothing to do when the service is not
    isolated."""
    if cmds := [_delete(service, rule) for rule in _isolation(service, netns)]:
        apply({"nftables": cmds}, netns)


def apply_service_table(service: str, ruleset: dict, exists: bool,
                        netns: str | None = None) -> None:
    """Apply a service's table (plan.nft_rules.service_ruleset), which makes it anew, keeping an
    isolation in force: the drop rules of the isolated chains are inserted again in the same
    transaction. An install that changes the table must not release what the watcher cut.
    `exists`: whether the table is there now (the caller has looked: `table_exists`)."""
    chains = {c["add"]["chain"]["name"] for c in ruleset["nftables"] if "chain" in c.get("add", {})}
    kept = [] if not exists else [
        _isolating(service, rule["chain"]) for rule in _isolation(service, netns)
        if rule["chain"] in chains]
    apply({"nftables": [*ruleset["nftables"], *kept]}, netns)


def _isolating(service: str, chain: str) -> dict:
    return {"insert": {"rule": {"family": "inet", "table": table_name(service), "chain": chain,
                                "comment": ISOLATED, "expr": [{"counter": None}, {"drop": None}]}}}


def _delete(service: str, rule: dict) -> dict:
    return {"delete": {"rule": {"family": "inet", "table": table_name(service),
                                "chain": rule["chain"], "handle": rule["handle"]}}}


def _isolation(service: str, netns: str | None) -> list[dict]:
    """The table's isolation rules, found by their comment in a terse listing (`-t`: without
    the sets' elements, which may be many)."""
    listing = json.loads(run(["-t", "-j", "list", "table", "inet", table_name(service)], netns))
    return [rule for item in listing["nftables"]
            if (rule := item.get("rule")) and rule.get("comment") == ISOLATED]


def delete_table(service: str, netns: str | None = None) -> bool:
    """Delete table inet corral-SERVICE (and nothing else); True if it existed."""
    if not table_exists(service, netns):
        return False
    table = {"family": "inet", "name": table_name(service)}
    apply({"nftables": [{"delete": {"table": table}}]}, netns)
    return True
