"""`corral host plan|apply|confirm|rollback HOST.toml`: parses arguments, calls `hostfw`, prints.

Only click is imported here; the library is imported when a subcommand runs, so registering the
group costs `corral` nothing at start-up. Errors follow the spec's exit codes: 2 for a bad host
file (`FILE: key.path: message`) or usage, 1 for a failure at run time.
"""

from __future__ import annotations

from typing import Any

import click

from corral.cli.base import need_root
from corral.cli.common import handled, print_json, table

json_option = click.option("--json", "as_json", is_flag=True,
                           help="One JSON object for machines (docs/cli.md).")


def _need_root() -> None:
    need_root("changes the host's firewall")


def _warn(plan: Any) -> None:
    from corral.host.firewall import warnings

    for line in warnings(plan):
        click.echo(f"corral: warning: {line}", err=True)


def _plan_text(plan: Any) -> str:
    spec = plan.spec
    rows: list[tuple[str, str]] = [
        ("host file", plan.host_file), ("role", spec.role),
        ("table", "inet corral-host: prerouting (anti-spoofing), input, output, forward"),
        ("management", ", ".join(_from(e) for e in spec.management) or "none (console only)"),
        ("anti-spoofing", ("reverse path, own source address"
                           + (", bogon sources from upstream" if spec.role == "router" else ""))
         if spec.anti_spoofing else "off"),
    ]
    for svc in spec.installed:
        rows.append((f"service {svc.name}",
                     f"in {', '.join(map(str, svc.listen)) or '-'}; "
                     f"out {', '.join(map(str, svc.connect)) or '-'}"))
    rows.append(("allow_out", ", ".join(map(str, spec.allow_out)) or "none"))
    rows.append(("input", "management, lo, ND/MLD, established, ping (rate-limited), "
                          "services' listens"))
    rows.append(("output", "lo, ND/MLD, management replies, established, allow_out, "
                           "services' connects"))
    if spec.role == "router":
        for lan in spec.lans:
            names = ", ".join(s.name for s in lan.services) or "no services"
            listen = sorted({str(p) for s in lan.services for p in s.listen})
            connect = sorted({str(e) for s in lan.services for e in s.connect})
            rows.append((f"lan {lan.interface}", f"{', '.join(lan.prefixes)} ({names})"))
            rows.append(("  forward in", ", ".join(listen) or "-"))
            rows.append(("  forward out", ", ".join(connect) or "-"))
    else:
        rows.append(("forward", "nothing"))
    rows.append(("dropped", "logged to NFLOG group 3079, prefix \"corral host CHAIN\""))
    return table(rows)


def _from(ep: Any) -> str:
    return f"{ep.ports} from {ep.network or 'anywhere'}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def host() -> None:
    """Host and router filters: the host's own table inet corral-host, built from HOST.toml and
    the services' manifests. `apply` rolls itself back unless `confirm` comes in time."""


@host.command("plan")
@click.argument("host_file", metavar="HOST.toml")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (with the nft ruleset).")
@handled
def plan_cmd(host_file: str, as_json: bool) -> None:
    """Show the table that apply would install; changes nothing."""
    from corral.host.firewall import plan_host

    plan = plan_host(host_file)
    _warn(plan)
    print_json(plan.to_json()) if as_json else click.echo(_plan_text(plan))


@host.command("apply")
@click.argument("host_file", metavar="HOST.toml")
@click.option("--confirm-timeout", type=click.FloatRange(min=0, min_open=True), default=60,
              show_default=True, metavar="SECONDS",
              help="Roll back to the previous table unless `corral host confirm` comes in time.")
@json_option
@handled
def apply_cmd(host_file: str, confirm_timeout: float, as_json: bool) -> None:
    """Apply the table atomically; it rolls back by itself unless confirmed within the timeout.
    Applying again while one is pending keeps the older saved state and restarts the timer."""
    from corral.host.firewall import apply, plan_host

    plan = plan_host(host_file)
    _need_root()
    _warn(plan)
    result = apply(plan, confirm_timeout)
    if as_json:
        print_json(result)
        return
    click.echo(f"{result['table']}: applied {result['host_file']} (role {result['role']})")
    if result["chained"]:
        click.echo("an earlier apply was still pending: it is replaced, and the rollback still "
                   "returns to the state saved before it")
    click.echo(f"rolls back at {result['rollback_at']} (in {confirm_timeout:g} s) unless you run: "
               f"corral host confirm {host_file}")


@host.command("confirm")
@click.argument("host_file", metavar="HOST.toml")
@json_option
@handled
def confirm_cmd(host_file: str, as_json: bool) -> None:
    """Keep the applied table: cancel the pending rollback."""
    from corral.host.firewall import confirm

    _need_root()
    result = confirm(host_file)
    if as_json:
        print_json(result)
        return
    click.echo(f"{result['table']}: confirmed {result['host_file']} (role {result['role']}, "
               f"applied at {result['applied_at']}); the rollback due at "
               f"{result['rollback_at_cancelled']} is cancelled")
    if not result["guard_was_running"]:
        click.echo("note: the rollback guard was not running any more "
                   "(killed, or the host rebooted)")


@host.command("rollback")
@click.argument("host_file", metavar="HOST.toml")
@json_option
@handled
def rollback_cmd(host_file: str, as_json: bool) -> None:
    """Restore now the table as it was before the last apply (confirmed or not)."""
    from corral.host.firewall import rollback

    _need_root()
    result = rollback(host_file)
    if as_json:
        print_json(result)
        return
    click.echo(f"{result['table']}: {result['message']} (state saved at {result['saved_at']})")


if __name__ == "__main__":
    host(prog_name="corral host")
