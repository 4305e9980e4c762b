"""`corral check`: validate manifests and host files, collecting every problem of every file."""

from __future__ import annotations

from collections.abc import Iterable

from corral.core.errors import InputError, Problem
from corral.manifest import tomlfile
from corral.manifest.hostfile import is_host_file, parse_host_file
from corral.manifest.model import parse_manifest


def check_file(file: str) -> list[Problem]:
    try:
        data = tomlfile.load(file)
        if is_host_file(data):
            parse_host_file(file, data)
        else:
            parse_manifest(file, data)
    except InputError as exc:
        return exc.problems
    return []


def check_files(files: Iterable[str]) -> list[Problem]:
    return [problem for file in files for problem in check_file(file)]
