"""`corral host image build|list|use|verify` and `corral host delta`: the host's own read-only
root (docs/host-image.md). Only click is imported at load; the library when a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from corral.cli.base import need_root
from corral.cli.common import handled, print_json, table

json_option = click.option("--json", "as_json", is_flag=True,
                           help="One JSON object for machines (docs/cli.md).")
store_option = click.option("--store", "store_dir", metavar="DIR",
                            help="The images directory (default: the persistent disk's on a "
                                 "host booted from an image, else /var/lib/corral-host/images).")


def _store(store_dir: str | None) -> Path:
    from corral.hostimage.store import default_store

    return Path(store_dir) if store_dir else default_store()


def _audit(root: Path) -> dict[str, Any]:
    """The host audit's file and tool checks on the finished root (its sysctls and sockets
    exist only once it runs), and each service's exposure score from its manifest."""
    import os

    from corral.audit import score as audit_score
    from corral.audit.host import SYSTEM_PATH, tool_findings
    from corral.audit.walk import file_findings

    files, _stats = file_findings([str(root)])
    tools = tool_findings([str(root) + d for d in SYSTEM_PATH])
    findings = [f.to_json() for f in files + tools]
    counts = {s: sum(1 for f in findings if f["severity"] == s)
              for s in ("high", "medium", "low", "info")}
    services = []
    conf = root / "etc/corral/host/services"
    facts = audit_score.host_facts()
    for line in conf.read_text().splitlines() if conf.exists() else []:
        name, manifest = line.split(" ", 1)
        view = audit_score.view_from_manifest(os.path.join(str(root), manifest.lstrip("/")))
        services.append({"service": name, "score": audit_score.score(view, facts)["score"]})
    return {"counts": counts, "findings": findings, "services": services}


@click.group("image", context_settings={"help_option_names": ["-h", "--help"]})
def image() -> None:
    """The host's read-only root image: build, list, use (rollback), verify."""


@image.command("build")
@click.argument("host_file", metavar="HOST.toml")
@store_option
@json_option
@handled
def build_cmd(host_file: str, store_dir: str | None, as_json: bool) -> None:
    """Build the next image version from HOST.toml's [image] table (minutes: a Debian root)."""
    from corral.core.progress import wanted
    from corral.hostimage.build import build
    from corral.manifest.hostfile import load_host_file

    load_host_file(host_file)  # bad input exits 2 before the root check
    need_root("builds a Debian root with mmdebstrap")

    def say(message: str) -> None:
        if wanted(as_json):
            click.echo(f"corral: {message}", err=True)

    result = build(host_file, _store(store_dir), say, _audit)
    if as_json:
        print_json(result)
        return
    audit = result["audit"] or {"counts": {}, "services": []}
    if not result["new"]:
        click.echo(f"unchanged: identical to image {result['version']} ({result['blake3']})")
    else:
        click.echo(table([
            ("version", result["version"]), ("blake3", result["blake3"]),
            ("size", f"{result['size'] / (1 << 20):.1f} MiB"), ("kernel", result["kernel"]),
            ("services", ", ".join(result["services"]) or "none"),
            ("persist", ", ".join(result["persist"]) or "nothing"),
            ("build", f"{result['build_seconds']} s"), ("store", result["store"])]))
    counts = audit["counts"]
    click.echo("audit of the image: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for svc in audit["services"]:
        click.echo(f"  service {svc['service']}: score {svc['score']}/100")


@image.command("list")
@store_option
@json_option
@handled
def list_cmd(store_dir: str | None, as_json: bool) -> None:
    """The image versions; which one the next boot mounts, which one is running."""
    from corral.hostimage.store import listing

    result = listing(_store(store_dir))
    if as_json:
        print_json(result)
        return
    rows = [(r["version"], ("current " if r["current"] else "") + ("booted" if r["booted"]
                                                                    else ""),
             r["created_at"], r["kernel"], f"{(r['size'] or 0) / (1 << 20):.1f} MiB",
             (r["blake3"] or "")[:16]) for r in result["images"]]
    click.echo(table(rows, ["VERSION", "STATE", "CREATED", "KERNEL", "SIZE", "BLAKE3"])
               if rows else f"no images in {result['store']}")


@image.command("use")
@click.argument("version", type=int)
@store_option
@json_option
@handled
def use_cmd(version: int, store_dir: str | None, as_json: bool) -> None:
    """Boot VERSION next time (rollback: an older one)."""
    from corral.hostimage.store import use

    need_root("chooses the host's next root image")
    result = use(_store(store_dir), version)
    if as_json:
        print_json(result)
        return
    click.echo(f"the next boot mounts image {version} (was {result['previous']}); boot it "
               f"with its kernel {result['kernel']} (vmlinuz and initrd.img beside it)")


@image.command("verify")
@click.argument("version", type=int, required=False)
@store_option
@json_option
@handled
def verify_cmd(version: int | None, store_dir: str | None, as_json: bool) -> None:
    """VERSION (default: the current one) against its blake3 and integrity manifest; exit 3
    on any difference."""
    from corral.core.errors import EXIT_CHECK, UsageError
    from corral.hostimage.store import current, verify

    need_root("mounts the image read-only")
    store = _store(store_dir)
    version = version if version is not None else current(store)
    if version is None:
        raise UsageError(f"no current image in {store}: name a VERSION")
    result = verify(store, version)
    if as_json:
        print_json(result)
    elif not result["problems"]:
        click.echo(f"image {version}: ok ({result['entries']} entries)")
    else:
        for p in result["problems"]:
            click.echo(f"image {version}: {p['change']}: {p['path']} "
                       + ",".join(p.get("fields", [])))
    if result["problems"]:
        raise SystemExit(EXIT_CHECK)


@click.command("delta")
@json_option
@handled
def delta(as_json: bool) -> None:
    """What this host changed against its image since boot (the RAM delta)."""
    from corral.hostimage.delta import host_delta

    need_root("reads the whole root")
    result = host_delta()
    if as_json:
        print_json(result)
        return
    for row in result["changes"]:
        click.echo(f"{row['change']:9} {row['kind']:8} {row['path']}"
                   + ("  (sensitive)" if row["sensitive"] else ""))
    click.echo(f"{result['count']} changes against image {result['version']}; "
               f"{result['base_writes']} over files the host runs or trusts")
