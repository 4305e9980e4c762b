"""`corral reload`, `corral enable|disable` and `corral logs`: the service's production life."""

from __future__ import annotations

import json
import subprocess

import click

from corral.cli.base import need_root, service_name
from corral.cli.common import handled, print_json

json_option = click.option("--json", "as_json", is_flag=True,
                           help="One JSON object for machines (docs/cli.md).")


@click.command()
@click.argument("name", metavar="NAME|FILE")
@click.argument("process", required=False)
@json_option
@handled
def reload(name: str, process: str | None, as_json: bool) -> None:
    """Re-read configuration without a restart: each process's reload, and the installed
    connect/listen sets re-applied atomically."""
    from corral.core.errors import RuntimeFailure
    from corral.supervise.reload_client import request

    need_root()
    result = request(service_name(name), process)
    failed = [p for p in result["processes"] if p.get("exit_code") not in (None, 0)]
    if result["firewall"] != "refilled" or failed:
        why = [result["firewall"]] if result["firewall"] != "refilled" else []
        why += [f"process {p['process']}: reload command exited with code {p['exit_code']} "
                "(its output is in corral logs)" for p in failed]
        raise RuntimeFailure(f"{result['service']}: reload: " + "; ".join(why))
    if as_json:
        print_json(result)
        return
    for p in result["processes"]:
        line = f"{result['service']}/{p['process']}: {p['action']}"
        if p["restart_needed"]:
            line += (f"; changed since it started: {', '.join(p['restart_needed'])} (applied at "
                     f"the next start: corral revert {result['service']})")
        click.echo(line)
    click.echo(f"{result['service']}: firewall sets {result['firewall']}")


def _daemon_reload() -> None:
    """Tell a running systemd about the unit; nothing to do where systemd is not PID 1."""
    import os

    from corral.host.unit import unit_dir

    if os.path.isdir("/run/systemd/system") and str(unit_dir()) == "/etc/systemd/system":
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=60)


@click.command()
@click.argument("name", metavar="NAME|FILE")
@json_option
@handled
def enable(name: str, as_json: bool) -> None:
    """Start the service at boot: a systemd unit that runs it under corral."""
    from corral.host import unit
    from corral.supervise.control import spec_of

    need_root()
    spec = spec_of(service_name(name))
    changed = unit.enable(spec.service, max(float(p.stop_timeout) for p in spec.processes))
    _daemon_reload()
    path = str(unit.unit_dir() / unit.unit_name(spec.service))
    if as_json:
        print_json({"service": spec.service, "changed": changed, "unit": path, "enabled": True})
    else:
        click.echo(f"{spec.service}: {'enabled' if changed else 'already enabled'} ({path})")


@click.command()
@click.argument("name", metavar="NAME|FILE")
@json_option
@handled
def disable(name: str, as_json: bool) -> None:
    """Do not start the service at boot any more (removes the unit)."""
    from corral.host import unit

    need_root()
    service = service_name(name)
    changed = unit.disable(service)
    _daemon_reload()
    if as_json:
        print_json({"service": service, "changed": changed, "enabled": False})
    else:
        click.echo(f"{service}: {'disabled' if changed else 'was not enabled'}")


@click.command()
@click.argument("name", metavar="NAME|FILE")
@click.argument("process", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--since", metavar="TIME", help="ISO time or an age: 10m, 2h, 1d.")
@click.option("--timeout", type=float, hidden=True, help="Stop following after S seconds.")
@json_option
@handled
def logs(name: str, process: str | None, follow: bool, since: str | None,
         timeout: float | None, as_json: bool) -> None:
    """The processes' output (stdout and stderr), from /var/log/corral/NAME."""
    from corral.core.errors import UsageError
    from corral.supervise import logs as reader
    from corral.supervise.control import spec_of

    spec = spec_of(service_name(name))
    names = [p.name for p in spec.processes]
    if process is not None and process not in names:
        raise UsageError(f"{spec.service}: no process {process!r} (processes: "
                         f"{', '.join(names)})")
    chosen = [process] if process else names
    after = reader.since_time(since) if since else None
    lines = reader.read(spec.logs, chosen, after)
    if as_json and not follow:
        print_json({"service": spec.service, "lines": lines})
        return

    def show(line: dict) -> None:
        if as_json:  # a stream, as `host events --json`: one object per line
            click.echo(json.dumps({"service": spec.service} | line))
        else:
            click.echo(f"{line['at']} {line['process']}| {line['text']}")

    for line in lines:
        show(line)
    if follow:
        for line in reader.follow(spec.logs, chosen, timeout):
            show(line)
