"""The parts of the `corral` command that need no click: the error contract (exit codes, one
line per error, no traceback), the root check, and reading a NAME|FILE argument. `entry` runs
`corral run FILE` with these alone; cli_common wraps every click subcommand in `call_handled`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from corral.core.errors import EXIT_RUNTIME, CorralError, InputError

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any


def say(message: str) -> None:
    """One message to the terminal. Messages quote what a service controls (a process's last
    log lines when `up` fails, paths of its delta): every control character is escaped, line
    by line, so no escape sequence of theirs reaches root's terminal."""
    from corral.core.errors import escape_controls

    message = "\n".join(escape_controls(line) for line in message.split("\n"))
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def call_handled(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `func`, turning corral's errors into their exit codes; anything else is a bug,
    reported in one line (CORRAL_DEBUG=1 shows the traceback)."""
    try:
        return func(*args, **kwargs)
    except CorralError as exc:
        say(str(exc) if isinstance(exc, InputError) else f"corral: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        say("corral: interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        click = sys.modules.get("click")  # its own exceptions carry usage errors and exits
        if click is not None and isinstance(exc, (click.exceptions.Exit, click.ClickException)):
            raise
        if os.environ.get("CORRAL_DEBUG"):
            raise
        say(f"corral: internal error: {type(exc).__name__}: {exc} "
            "(set CORRAL_DEBUG=1 for details; please report it)")
        sys.exit(EXIT_RUNTIME)


def need_root(what: str = "changes the host", exit_code: int = EXIT_RUNTIME) -> None:
    """The one root check and message of every command that needs root (exit 1; `exec` passes
    125, its own failure code)."""
    if os.geteuid() != 0:
        say(f"corral: this command {what} and must run as root")
        sys.exit(exit_code)
    from corral.core.tree import raise_nofile_limit

    raise_nofile_limit()  # root commands walk hostile trees (delta, commit, audit): see there


def is_file(target: str) -> bool:
    """The one NAME|FILE rule (SPEC, "NAME and FILE"): a manifest is a path, so it contains `/`
    or ends in `.toml`; any other argument is a service name. Nothing on disk is consulted, so
    the same word means the same service from any directory."""
    return "/" in target or target.endswith(".toml")


def service_name(target: str) -> str:
    """The service a NAME|FILE argument names: a NAME as it is (validated), or the name read
    from the manifest FILE (a valid manifest is not required to uninstall, a readable name is)."""
    from corral.core.errors import UsageError
    from corral.core.names import SERVICE_NAME

    if not is_file(target):
        if not SERVICE_NAME.match(target):
            raise UsageError(f"{target!r}: not a service name (a manifest FILE contains / or "
                             "ends in .toml)")
        return target
    from corral.manifest import tomlfile

    raw = tomlfile.read(target)
    name = installed_as(raw)
    if name is None:
        name = tomlfile.parse(target, raw).get("name")
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise UsageError(f"{target}: name: missing or invalid, cannot tell which service")
    return name


def installed_as(raw: bytes) -> str | None:
    """The service whose install read exactly these manifest bytes (install.json records their
    SHA-256, host.install), or None: then the caller parses them. Parsing costs `corral run`
    ~3 ms of imports (tomllib, datetime, string) that the same bytes always answer alike."""
    import json

    from corral.core.names import SERVICE_NAME
    from corral.core.paths import RECORD, lib_dir
    from corral.manifest import tomlfile

    name = _name_line(raw)
    if name is None or not SERVICE_NAME.match(name):
        return None
    try:
        fd = os.open(os.path.join(lib_dir(name), RECORD),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        record = json.loads(os.read(fd, 1 << 20))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if isinstance(record, dict) and record.get("manifest_sha256") == tomlfile.digest(raw):
        return name
    return None


def _name_line(raw: bytes) -> str | None:
    """A candidate only: the value of the first line that reads `name = "..."` (it may be in a
    multi-line string, or the file invalid): installed_as accepts it only if install recorded
    these very bytes under it. (No regular expression: compiling one is ~0.2 ms of a start.)"""
    for line in raw.splitlines():
        key, eq, value = line.partition(b"=")
        if eq and key.strip() == b"name":
            value = value.split(b"#", 1)[0].strip()
            if len(value) > 2 and value[:1] == value[-1:] == b'"':
                return value[1:-1].decode("utf-8", "replace")
            return None
    return None


def run_foreground(file: str) -> None:
    """`corral run FILE`: the service in the foreground; exits with its exit code."""
    from corral.supervise.control import run

    need_root()
    exit_now(run(service_name(file)))


def exit_now(code: int) -> None:
    """Exit once the supervisor has torn everything down: its output flushed, then os._exit,
    without the interpreter's finalization (unloading ~200 modules: ~7 ms of every `corral
    run`, bench/README.md). Nothing is left for it to do: the supervisor has removed its mounts,
    cgroups and state, corral registers no atexit hook, its log handler writes through at each
    record, and the journals' worker has been waited for in teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)
