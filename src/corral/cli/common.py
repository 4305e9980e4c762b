"""What every `corral` click subcommand shares: the error contract (cli_base) as a decorator,
and JSON output. Imports only click, so command modules can use it at load."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from corral.cli.base import call_handled


def handled(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn corral's errors into their exit codes (cli_base.call_handled)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return call_handled(func, *args, **kwargs)

    return wrapper


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))
