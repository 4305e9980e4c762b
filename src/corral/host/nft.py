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


def isolate(service: str, uids: Sequence[int], netns: str | None = None) -> None:
    """Cut every packet of these users now (the watcher's `isolate` reaction). They must be
    the service's own users: the table checks the set at the head of each process chain, so a
    user the table does not dispatch is not affected."""
    elems = sorted(set(uids))
    apply({"nftables": [{"add": {"element": {"family": "inet", "table": table_name(service),
                                             "name": "isolated", "elem": elems}}}]}, netns)


def release(service: str, netns: str | None = None) -> None:
    """Undo isolate (after a revert or at stop)."""
    apply({"nftables": [{"flush": {"set": {"family": "inet", "table": table_name(service),
                                           "name": "isolated"}}}]}, netns)


def delete_table(service: str, netns: str | None = None) -> bool:
    """Delete table inet corral-SERVICE (and nothing else); True if it existed."""
    if not table_exists(service, netns):
        return False
    table = {"family": "inet", "name": table_name(service)}
    apply({"nftables": [{"delete": {"table": table}}]}, netns)
    return True
