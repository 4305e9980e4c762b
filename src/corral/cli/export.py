"""`corral export systemd|kubernetes|oci NAME|FILE [--out DIR]`, `corral export ansible` and
`corral graph`: the same containment for other runners, a fleet's playbook, and a picture.

Attach with `main.add_command(export)`. Only click is imported here. Without --out a text export
is printed to stdout (several files each under a `# ==> FILE <==` line); what the target cannot
express always goes to stderr, and into --json as `lost`. Exit codes: 0 done, 2 bad input
(nothing written), 1 run-time failure."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from corral.cli.base import is_file
from corral.cli.common import handled, print_json

json_option = click.option("--json", "as_json", is_flag=True,
                           help="One JSON object: the files written (or their text) and what "
                                "the target cannot express.")
out_option = click.option("--out", "out", metavar="DIR",
                          help="Write the files into DIR (created if missing) instead of "
                               "printing them.")


def _source(target: str) -> Any:
    from corral.export.source import load_source

    return load_source(target, is_file(target))


def _out_dir(out: str) -> Path:
    from corral.core.errors import UsageError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    return path


def _emit(files: dict[str, str], lost: dict[str, list[str]], out: str | None, as_json: bool,
          extra: dict[str, Any] | None = None) -> None:
    """Write or print the files; report what is lost. The directory is checked before anything
    is written, so bad input changes nothing."""
    written: list[str] = []
    if out is not None:
        directory = _out_dir(out)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text)
            written.append(str(directory / name))
    if as_json:
        data: dict[str, Any] = {"files": written} if out is not None else {"files": files}
        print_json({**data, "lost": lost, **(extra or {})})
        return
    if out is None:
        for name, text in files.items():
            if len(files) > 1:
                click.echo(f"# ==> {name} <==")
            click.echo(text, nl=False)
    else:
        for path in written:
            click.echo(f"wrote {path}")
    for where, items in lost.items():
        click.echo(f"{where}: cannot express:", err=True)
        for item in items:
            click.echo(f"  - {item}", err=True)


@click.group("export")
def export() -> None:
    """The manifest's containment for other runners: systemd, Kubernetes, an OCI image, Ansible."""


@export.command("systemd")
@click.argument("target", metavar="NAME|FILE")
@out_option
@json_option
@handled
def export_systemd(target: str, out: str | None, as_json: bool) -> None:
    """A hardened .service unit per process (systemd alone contains it)."""
    from corral.export import systemd

    src = _source(target)
    files = systemd.export(src)
    lost = {systemd.unit_name(src.manifest, p): systemd.lost(src.manifest, p)
            for p in src.manifest.process}
    _emit(files, lost, out, as_json)




@export.command("kubernetes")
@click.argument("target", metavar="NAME|FILE")
@out_option
@json_option
@handled
def export_kubernetes(target: str, out: str | None, as_json: bool) -> None:
    """A Pod, its volume claims, a Service, a NetworkPolicy and seccomp profiles."""
    from corral.export import kubernetes

    src = _source(target)
    _emit(kubernetes.export(src), {f"{src.manifest.name}.yaml": list(kubernetes.LOST)}, out,
          as_json, {"image": kubernetes.image_ref(src)})


@export.command("oci")
@click.argument("target", metavar="NAME|FILE")
@click.option("--out", "out", metavar="DIR", default=".", show_default=True,
              help="Write the archive into DIR.")
@json_option
@handled
def export_oci(target: str, out: str, as_json: bool) -> None:
    """The installed base image as a tar archive for `podman import`."""
    from corral.export import kubernetes, oci

    src = _source(target)
    path = oci.write_archive(src, _out_dir(out))
    if as_json:
        print_json({"file": str(path), "image": kubernetes.image_ref(src)})
    else:
        click.echo(f"wrote {path}; import it with: podman import {path} "
                   f"{kubernetes.image_ref(src)}")


@click.command("graph")
@click.argument("targets", nargs=-1, metavar="[NAME|FILE]...")
@click.option("--host", "host_file", metavar="HOST.toml",
              help="Draw this host file's filter around the services (default: the one "
                   "applied here, if any).")
@click.option("--format", "fmt", type=click.Choice(["dot", "svg", "png"]), default="dot",
              show_default=True, help="svg and png are drawn by Graphviz's dot.")
@click.option("--out", "out", metavar="FILE", help="Write the picture to FILE instead of stdout.")
@handled
def graph(targets: tuple[str, ...], host_file: str | None, fmt: str, out: str | None) -> None:
    """One picture of services: processes, users, volumes, listens and connects (between
    services where they meet), the host's filter, and incidents in red."""
    from corral.core.errors import UsageError
    from corral.export import graph as draw

    if out is not None and Path(out).is_dir():
        raise UsageError(f"--out {out}: a directory; name the file to write")
    if fmt == "png" and out is None and sys.stdout.isatty():
        raise UsageError("--format png writes binary data: give --out FILE")
    services, host = draw.load([(t, is_file(t)) for t in targets],
                               host_file if host_file is not None else draw.applied_host_file())
    data = draw.render(draw.graph(services, host), fmt)
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(out).write_bytes(data)
        click.echo(f"wrote {out}")


@export.command("ansible")
@click.option("--inventory", "inventory", metavar="FILE", required=True,
              help="The Ansible inventory of the fleet (copied beside the playbook).")
@click.argument("manifests", nargs=-1, required=True, metavar="MANIFEST...")
@out_option
@json_option
@handled
def export_ansible(inventory: str, manifests: tuple[str, ...], out: str | None,
                   as_json: bool) -> None:
    """A playbook and a role that install corral and the manifests on every host, run them,
    and apply the host and router filters derived from all of them."""
    import shutil

    from corral.export import ansible

    ansible.check_inventory(inventory)
    fleet = ansible.load(list(manifests))
    files = ansible.export(fleet, inventory)
    copies = ansible.copies(fleet, inventory)
    lost = {"playbook.yml": ansible.lost(fleet)}
    if out is not None:
        directory = _out_dir(out)
        for name in files:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
        for name, source in copies.items():
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copyfile(source, target)
    elif not as_json:
        click.echo("copied only with --out DIR: " + ", ".join(copies), err=True)
    _emit(files, lost, out, as_json, {"copied": sorted(copies)})
