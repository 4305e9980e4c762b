"""`corral audit [NAME|FILE] [--host] [--image NAME] [--json] [--fail-under N] [--policy FILE]`:
sharp objects on the host and in an image, and each service's exposure score.

Attach with `main.add_command(audit)`. Only click is imported here; the library is imported
when the command runs. Exit codes: 0 done; 2 bad usage, an unknown service or a bad policy
file; 3 with --fail-under N when a score is below N or a high finding remains; 1 run-time failure.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from corral.cli.common import handled

# Keyword arguments of click.style.
SEVERITY_STYLE: dict[str, dict[str, Any]] = {
    "high": {"fg": "red", "bold": True}, "medium": {"fg": "yellow"}, "low": {"fg": "cyan"},
    "info": {"dim": True}}
STATUS_STYLE: dict[str, dict[str, Any]] = {
    "pass": {"fg": "green"}, "partial": {"fg": "yellow"}, "fail": {"fg": "red"},
    "n/a": {"dim": True}, "skipped": {"dim": True}}


_handled = handled  # the same error contract as every other subcommand

def _is_file(target: str) -> bool:
    return os.sep in target or target.endswith(".toml") or os.path.isfile(target)


def _service(target: str) -> str:
    from corral.core.errors import UsageError
    from corral.core.names import SERVICE_NAME

    if not SERVICE_NAME.match(target):
        raise UsageError(f'"{target}": not a service name or a manifest file')
    return target


def _style(text: str, style: dict[str, Any], colour: bool) -> str:
    return click.style(text, **style) if colour else text


def _table(rows: list[list[str]], styles: list[dict[str, Any] | None], colour: bool,
           indent: str = "") -> list[str]:
    """Aligned columns; the last one is free. `styles[i]` colours row i's first cell."""
    from corral.core.errors import escape_controls

    rows = [[escape_controls(c) for c in row] for row in rows]
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(rows[0]) - 1)]
    out = []
    for row, style in zip(rows, styles):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
        if style:
            cells[0] = _style(cells[0], style, colour)
        out.append(indent + "  ".join(cells).rstrip())
    return out


def _findings_text(title: str, findings: list[Any], verbose: bool, colour: bool) -> list[str]:
    from corral.audit.findings import SEVERITIES, WHY_FIX

    counts = {s: sum(f.severity == s for f in findings) for s in reversed(SEVERITIES)}
    lines = [f"{title}: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    shown = [f for f in findings if verbose or f.severity != "info"]
    if shown:
        rows = [["SEVERITY", "KIND", "WHERE", "WHAT"]] + [[f.severity, f.kind, f.where, f.what]
                                                          for f in shown]
        styles: list[dict[str, Any] | None] = [None]
        styles += [SEVERITY_STYLE[f.severity] for f in shown]
        lines += _table(rows, styles, colour, "  ")
        lines.append("  why it matters, and the fix:")
        for kind in dict.fromkeys(f.kind for f in shown):
            if kind in WHY_FIX:
                why, fix = WHY_FIX[kind]
                lines.append(f"    {kind}: {why}. Fix: {fix}.")
    if counts["info"] and not verbose:
        lines.append(f"  ({counts['info']} info findings not shown: -v or --json lists them)")
    return lines


def _score_text(result: dict[str, Any], colour: bool) -> list[str]:
    source = "installed" if result["source"] == "installed" else f"manifest {result['source']}"
    lines = [f"{result['service']}: exposure score {result['score']}/100 "
             f"(100 = fully contained; {source})"]
    rows = [["CHECK", "WEIGHT", "RESULT", "LOST", "WHY"]]
    styles: list[dict[str, Any] | None] = [None]
    for c in result["checks"]:
        rows.append([c["id"], f"{c['weight']:g}".rjust(6), c["status"],
                     f"{c['lost']:.1f}".rjust(4), c["reason"]])
        styles.append(None)
    body = _table(rows, styles, False, "  ")
    for i, c in enumerate(result["checks"], start=1):  # colour the RESULT cell only
        if colour:
            body[i] = body[i].replace(f"  {c['status']} ", "  " + _style(
                c["status"], STATUS_STYLE[c["status"]], True) + " ", 1)
    return lines + body + [f"  note: {n}" for n in result["notes"]]


@click.command("audit")
@click.argument("target", required=False, metavar="[NAME|FILE]")
@click.option("--host", "host", is_flag=True,
              help="Audit the host: setuid and world-writable files, listeners, services "
                   "outside corral, tools on PATH, sysctls, the firewall.")
@click.option("--image", "image", metavar="NAME|FILE",
              help="Sharp objects in a service's base image (or in a manifest's planned one).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for machines (CI).")
@click.option("--fail-under", type=click.IntRange(0, 100), metavar="N",
              help="Exit 3 if a score is below N or a high finding remains.")
@click.option("--policy", metavar="FILE", help="TOML: check weights, skipped checks, ignored "
                                               "or re-rated findings (docs/audit.md).")
@click.option("--root", "roots", multiple=True, metavar="DIR",
              help="With --host: walk DIR instead of / for the file checks (repeatable).")
@click.option("--skip", "skip_paths", multiple=True, metavar="DIR",
              help="With --host: do not walk into DIR (repeatable).")
@click.option("--time-limit", type=click.FloatRange(min=1), default=600, show_default=True,
              metavar="SECONDS", help="With --host: stop the file walk after this long.")
@click.option("-v", "--verbose", is_flag=True, help="Also show info findings.")
@_handled
def audit(target: str | None, host: bool, image: str | None, as_json: bool,
          fail_under: int | None, policy: str | None, roots: tuple[str, ...],
          skip_paths: tuple[str, ...], time_limit: float, verbose: bool) -> None:
    """Sharp objects and an exposure score 0-100 (100 = fully contained).

    NAME scores an installed service check by check, FILE a manifest (before install); with
    no argument and no --host/--image, every installed service is scored.
    """
    from corral.audit import score as audit_score
    from corral.core.progress import wanted

    rules = audit_score.load_policy(policy)
    report: dict[str, Any] = {}
    colour = not as_json and sys.stdout.isatty()
    lines: list[str] = []
    if host:
        from corral.audit.host import host_audit

        result = host_audit(roots or ("/",), skip_paths=skip_paths, time_limit=time_limit,
                            show_progress=wanted(as_json))
        result["findings"] = rules.findings(result["findings"])
        report["host"] = result
        lines += _findings_text("host", result["findings"], verbose, colour)
    if image:
        from corral.audit.findings import sort_findings
        from corral.audit.image import image_audit, plan_image_findings

        if _is_file(image):
            from corral.manifest.model import load_manifest
            from corral.plan.service import plan_service

            result = {"service": None, "manifest": image, "findings": sort_findings(
                plan_image_findings(plan_service(image, load_manifest(image))))}
        else:
            result = image_audit(_service(image))
        result["findings"] = rules.findings(result["findings"])
        report["image"] = result
        lines += [""] * bool(lines) + _findings_text(
            f"image of {result['service'] or image}", result["findings"], verbose, colour)
    if target or not (host or image):
        facts = audit_score.host_facts()
        if target:
            names = [target]
        else:
            names = audit_score.installed_services()
            if not names:
                lines.append("no installed services to score (corral audit --host audits the host)")
        scores = []
        for name in names:
            view = audit_score.view_from_manifest(name) if _is_file(name) else \
                audit_score.view_from_installed(_service(name))
            scores.append(audit_score.score(view, facts, rules))
        report["services"] = scores
        if target:
            lines += [""] * bool(lines) + _score_text(scores[0], colour)
        elif scores:
            rows = [["SERVICE", "SCORE", "WORST CHECK"]] + [
                [s["service"], str(s["score"]).rjust(5),
                 max(s["checks"], key=lambda c: c["lost"])["id"] if s["score"] < 100 else "-"]
                for s in scores]
            lines += [""] * bool(lines) + _table(rows, [None] * len(rows), False)
    failures = _failures(report, fail_under)
    if fail_under is not None:
        report["fail_under"], report["failures"] = fail_under, failures
    if as_json:
        click.echo(json.dumps(_json(report), indent=2))
    else:
        click.echo("\n".join(lines))
        for failure in failures:
            click.echo(f"corral: audit: {failure}", err=True)
    if failures:
        from corral.core.errors import EXIT_CHECK

        sys.exit(EXIT_CHECK)


def _failures(report: dict[str, Any], fail_under: int | None) -> list[str]:
    if fail_under is None:
        return []
    out = [f"{s['service']} scores {s['score']}, below {fail_under}"
           for s in report.get("services", []) if s["score"] < fail_under]
    for section in ("host", "image"):
        high = [f.id for f in report.get(section, {}).get("findings", []) if f.severity == "high"]
        if high:
            out.append(f"{section}: {len(high)} high finding(s), e.g. {high[0]}")
    return out


def _json(report: dict[str, Any]) -> dict[str, Any]:
    out = dict(report)
    for section in ("host", "image"):
        if section in out:
            out[section] = dict(out[section], findings=[f.to_json() for f in out[section]["findings"]])
    return out


if __name__ == "__main__":
    audit()
