"""Fixtures of the escape corpus: ONE contained sample service for the whole package (starting
one takes a few seconds; the attempts themselves are batched into a few `corral exec` runs), in
its own network namespace and CORRAL_ROOT, removed at the end even when tests fail."""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import throwaway_root

from .attack import Contained, file_state, started, tree_state


@dataclass
class Env:
    root: Path  # CORRAL_ROOT
    netns: str
    tmp: Path  # manifests and other test files


@pytest.fixture(scope="package")
def escape_env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the escape corpus needs root (real users, nftables, mounts)")
    netns = "corral-t-" + secrets.token_hex(4)
    with throwaway_root(tmp_path_factory, "escapes") as (tmp, root):
        subprocess.run(["ip", "netns", "add", netns], check=True)
        try:
            subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
            yield Env(root, netns, tmp)
        finally:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


@dataclass
class AtStart:
    """What the attacks must not change, recorded once the service is up, before any attack."""
    base: dict  # tree_state of the service's base image on disk
    host_python: tuple  # file_state of the host's /usr/bin/python3.11
    host_stdlib_os: tuple  # ... and of its /usr/lib/python3.11/os.py
    app_pid: int


@pytest.fixture(scope="package")
def svc(escape_env) -> Contained:
    """The sample notes service, contained exactly as the `notes` fixture has it."""
    with started(escape_env.tmp, escape_env.root, escape_env.netns) as service:
        service.at_start = AtStart(
            base=tree_state(service.base_root),
            host_python=file_state("/usr/bin/python3.11"),
            host_stdlib_os=file_state("/usr/lib/python3.11/os.py"),
            app_pid=service.app()["pid"],
        )
        yield service


@pytest.fixture(scope="package")
def victim():
    """A host process (root, outside every namespace of the service) the attacker goes for."""
    proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
