"""`corral audit [NAME|FILE] [--host] [--image NAME] [--json] [--fail-under N] [--policy FILE]`:
sharp objects on the host and in an image, and each service's exposure score.

Attach with `main.add_command(audit)`. Only click is imported here; the library is imported
when the command runs. Exit codes: 0 done; 2 bad usage, an unknown service or a bad policy
file; 3 with --fail-under N when a score is below N or a high finding remains; 1 run-time failure.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from corral.cli.base import is_file, service_name
from corral.cli.common import handled, print_json, table

# rich styles, drawn on a terminal only (cli.common.table)
SEVERITY_STYLE = {"high": "bold red", "medium": "yellow", "low": "cyan", "info": "dim"}
STATUS_STYLE = {"pass": "green", "partial": "yellow", "fail": "red", "n/a": "dim",
                "skipped": "dim"}


def _findings_text(title: str, findings: list[Any], verbose: bool) -> list[str]:
    from corral.audit.findings import SEVERITIES, WHY_FIX

    counts = {s: sum(f.severity == s for f in findings) for s in reversed(SEVERITIES)}
    lines = [f"{title}: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    shown = [f for f in findings if verbose or f.severity != "info"]
    if shown:
        lines.append(table([[f.severity, f.kind, f.where, f.what] for f in shown],
                           ["SEVERITY", "KIND", "WHERE", "WHAT"],
                           styles=[[SEVERITY_STYLE[f.severity]] for f in shown], indent=2))
        lines.append("  why it matters, and the fix:")
        for kind in dict.fromkeys(f.kind for f in shown):
            if kind in WHY_FIX:
                why, fix = WHY_FIX[kind]
                lines.append(f"    {kind}: {why}. Fix: {fix}.")
    if counts["info"] and not verbose:
        lines.append(f"  ({counts['info']} info findings not shown: -v or --json lists them)")
    return lines


def _score_text(result: dict[str, Any]) -> list[str]:
    source = "installed" if result["source"] == "installed" else f"manifest {result['source']}"
    lines = [f"{result['service']}: exposure score {result['score']}/100 "
             f"(100 = fully contained; {source})"]
    body = table([[c["id"], f"{c['weight']:g}", c["status"], f"{c['lost']:.1f}", c["reason"]]
                  for c in result["checks"]], ["CHECK", "WEIGHT", "RESULT", "LOST", "WHY"],
                 right=[1, 3], styles=[[None, None, STATUS_STYLE[c["status"]]]
                                       for c in result["checks"]], indent=2)
    return lines + [body] + [f"  note: {n}" for n in result["notes"]]


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
@handled
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
    lines: list[str] = []
    if host:
        from corral.audit.host import host_audit

        result = host_audit(roots or ("/",), skip_paths=skip_paths, time_limit=time_limit,
                            show_progress=wanted(as_json))
        result["findings"] = rules.findings(result["findings"])
        report["host"] = result
        lines += _findings_text("host", result["findings"], verbose)
    if image:
        from corral.audit.findings import sort_findings
        from corral.audit.image import image_audit, plan_image_findings

        if is_file(image):
            from corral.manifest.model import load_manifest
            from corral.plan.service import plan_service

            result = {"service": None, "manifest": image, "findings": sort_findings(
                plan_image_findings(plan_service(image, load_manifest(image))))}
        else:
            result = image_audit(service_name(image))
        result["findings"] = rules.findings(result["findings"])
        report["image"] = result
        lines += [""] * bool(lines) + _findings_text(
            f"image of {result['service'] or image}", result["findings"], verbose)
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
            view = audit_score.view_from_manifest(name) if is_file(name) else \
                audit_score.view_from_installed(service_name(name))
            scores.append(audit_score.score(view, facts, rules))
        report["services"] = scores
        if target:
            lines += [""] * bool(lines) + _score_text(scores[0])
        elif scores:
            lines += [""] * bool(lines) + [table(
                [[s["service"], s["score"],
                  max(s["checks"], key=lambda c: c["lost"])["id"] if s["score"] < 100 else "-"]
                 for s in scores], ["SERVICE", "SCORE", "WORST CHECK"], right=[1])]
    failures = _failures(report, fail_under)
    if fail_under is not None:
        report["fail_under"], report["failures"] = fail_under, failures
    if as_json:
        print_json(_json(report))
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
            found = [f.to_json() for f in out[section]["findings"]]
            out[section] = dict(out[section], findings=found)
    return out


if __name__ == "__main__":
    audit()
