"""What every `corral` subcommand shares: the error contract (exit codes, one line per error,
no traceback) and JSON output. Imports only click, so command modules can use it at load."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from .errors import EXIT_RUNTIME, CorralError, InputError


def _fail(exc: CorralError) -> None:
    click.echo(str(exc) if isinstance(exc, InputError) else f"corral: {exc}", err=True)
    sys.exit(exc.exit_code)


def handled(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn corral's errors into their exit codes; anything else is a bug, reported in one line
    (CORRAL_DEBUG=1 shows the traceback)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CorralError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            click.echo("corral: interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("CORRAL_DEBUG"):
                raise
            click.echo(f"corral: internal error: {type(exc).__name__}: {exc} "
                       "(set CORRAL_DEBUG=1 for details; please report it)", err=True)
            sys.exit(EXIT_RUNTIME)

    return wrapper


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))
