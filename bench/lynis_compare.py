"""Compare what lynis and `corral audit --host` report as sharp objects on one host.

    python bench/lynis_compare.py LYNIS-REPORT.dat CORRAL-AUDIT.json [--planted DIR]

Reads lynis's machine report (--report-file) and corral's JSON, maps both onto the same
(category, object) pairs, and prints one aligned table with a yes/- per tool, then a summary
per category. Objects under --planted DIR are marked, to show which tool finds planted ones.
bench/lynis_compare.sh runs both tools and calls this.
"""

from __future__ import annotations

import argparse
import json
import re
import sys


def _endpoint(proto: str, text: str) -> str:
    address, _, port = text.rpartition(":")
    return f"{proto} {address.strip('[]') or '*'}:{port}"


def lynis_items(report: str) -> dict[tuple[str, str], str]:
    """(category, object) -> lynis's words for it."""
    items: dict[tuple[str, str], str] = {}
    with open(report, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    for line in lines:
        key, _, value = line.partition("=")
        if key in ("binaries_suid_count", "binaries_sgid_count"):
            for path in value.split():
                items[("setuid/setgid", path)] = key.split("_")[1]
        elif key == "network_listen[]":
            parts = value.split("|")  # raw,ss,v1|tcp|0.0.0.0:2024||
            if len(parts) >= 3:
                items[("listener", _endpoint(parts[1], parts[2]))] = "network_listen"
        elif key == "compiler_world_executable[]":
            items[("compiler", value)] = "HRDN-7222 world-executable compiler"
        elif key == "details[]" and value.startswith("KRNL-6000|sysctl|"):
            match = re.search(r"field:([^;]+);prefval:([^;]*);value:([^;]*);", value)
            if match:
                name, wanted, now = match.groups()
                items[("sysctl", name)] = f"{now}, profile wants {wanted}"
        elif key == "warning[]" and value.startswith("FIRE-"):
            items[("firewall", "inbound not default-deny")] = value.split("|")[1]
        elif key == "firewall_empty_ruleset" and value == "1":
            items.setdefault(("firewall", "inbound not default-deny"), "empty ruleset")
    return items


def corral_items(report: str) -> dict[tuple[str, str], str]:
    with open(report) as handle:
        findings = json.load(handle)["host"]["findings"]
    items: dict[tuple[str, str], str] = {}
    for f in findings:
        kind, where, words = f["kind"], f["where"], f"{f['severity']}"
        if kind == "setuid":
            items[("setuid/setgid", where)] = words
        elif kind == "listen":
            proto, _, endpoint = where.partition(" ")
            items[("listener", _endpoint(proto, endpoint))] = words
        elif kind == "tool":
            category = f["detail"]["category"].replace("-", " ")
            items[(category, where)] = words
        elif kind == "sysctl":
            name = f["id"].removeprefix("host.sysctl.")
            items[("sysctl", name)] = words
        elif f["id"] == "host.firewall.input":
            items[("firewall", "inbound not default-deny")] = words
        elif f["id"] == "host.firewall.output":
            items[("firewall", "outbound not default-deny")] = words
        elif kind in ("world-writable-dir", "world-writable-file", "daemon"):
            items[(kind, where)] = words
    return items


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lynis_report")
    parser.add_argument("corral_json")
    parser.add_argument("--planted", help="directory whose objects were planted on purpose")
    args = parser.parse_args(argv)
    lynis, corral = lynis_items(args.lynis_report), corral_items(args.corral_json)
    rows = [["CATEGORY", "OBJECT", "LYNIS", "CORRAL"]]
    for key in sorted(set(lynis) | set(corral)):
        category, obj = key
        if args.planted and obj.startswith(args.planted.rstrip("/") + "/"):
            obj = f"{obj}  (planted)"
        rows.append([category, obj, "yes" if key in lynis else "-",
                     f"yes ({corral[key]})" if key in corral else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    print()
    print(f"{'CATEGORY':<22}{'LYNIS':>6}{'CORRAL':>8}{'BOTH':>6}")
    for category in sorted({c for c, _ in set(lynis) | set(corral)}):
        in_l = {o for c, o in lynis if c == category}
        in_c = {o for c, o in corral if c == category}
        print(f"{category:<22}{len(in_l):>6}{len(in_c):>8}{len(in_l & in_c):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
