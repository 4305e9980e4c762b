"""`corral learn --out FILE [--name NAME] [--duration S] -- CMD...`: run CMD under observation
and write the minimal manifest it needs. Registered in cli.py with main.add_command(learn)."""

from __future__ import annotations

import sys

import click

from corral.cli.base import need_root
from corral.cli.common import handled, print_json
from corral.core.errors import EXIT_CHECK, InputError, Problem
from corral.core.fsio import write_text


def _env_pair(_ctx, _param, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r}: expected NAME=VALUE")
        out[key] = val
    return out


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the learned manifest.")
@click.option("--name", default=None, help="Service name (default: the program's basename).")
@click.option("--process", "process", default="app", show_default=True,
              help="Name of the [process.NAME] table.")
@click.option("--duration", type=float, default=None,
              help="Stop observing after S seconds (default: until the program exits or "
                   "corral gets SIGINT/SIGTERM).")
@click.option("--env", "environment", multiple=True, callback=_env_pair, metavar="NAME=VALUE",
              help="Environment of the program while learning, written to the manifest "
                   "(LANG=C.UTF-8 unless given); nothing else is passed on.")
@click.option("--user", "user", default=None, metavar="NAME",
              help="Run the program as this host user (never root); default: a throwaway uid.")
@click.option("--writable", "writable", multiple=True, metavar="DIR",
              help="A directory the program's user gets in the throwaway view (created and "
                   "owned there only; the host's stays as it is).")
@click.option("--json", "as_json", is_flag=True,
              help="Report what was learned as one JSON object (docs/cli.md).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handled
def learn(out: str, name: str | None, process: str, duration: float | None,
          environment: dict[str, str], user: str | None, writable: tuple[str, ...],
          as_json: bool, command: tuple[str, ...]) -> None:
    """Run CMD under observation (strace) while you exercise it, and write the minimal manifest
    it needs. Stop it with Ctrl-C (or SIGTERM), --duration, or let it exit. Exit code 3 when it
    did something containment can never allow (the manifest is written anyway, with the reason)."""
    from corral.learn.trace import learn as do_learn
    from corral.manifest.model import parse_manifest

    need_root("traces any program and its binds")
    learned = do_learn(list(command), name=name, process=process, duration=duration,
                       environment=environment, user=user, writable=list(writable))
    # What is written must pass `corral check`.
    import tomllib

    try:
        parse_manifest(out, tomllib.loads(learned.text))  # raises InputError: exit 2
    except tomllib.TOMLDecodeError as exc:  # a bug in the writer, never the user's input
        raise InputError([Problem(out, (), f"learned manifest is not TOML: {exc}")]) from None
    # Atomic: an interrupted write never leaves half a manifest where a good one was.
    write_text(out, learned.text)
    obs = learned.observed
    if as_json:
        print_json({"service": tomllib.loads(learned.text).get("name"), "file": out,
                    "process": process, "exit_status": learned.exit_status,
                    "include": learned.include,
                    "listen": sorted(f"{proto}/{port}" for proto, port in obs.listen),
                    "connect": sorted(f"{proto}/{port}@{addr}" for proto, port, addr
                                      in obs.connect),
                    "syscalls": sorted(obs.syscalls), "violations": learned.violations})
    else:
        click.echo(f"wrote {out}: {len(learned.include)} includes, "
                   f"{len(obs.listen)} listen, {len(obs.connect)} connect, "
                   f"{len(obs.syscalls)} system calls seen", err=True)
    for violation in learned.violations:  # on stderr with --json too: a person may be watching
        click.echo(f"corral: violation during learn: {violation}", err=True)
    if learned.violations:
        sys.exit(EXIT_CHECK)
