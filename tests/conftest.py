"""Shared fixtures. Tests run as root against the real kernel, in a throwaway CORRAL_ROOT and
their own network namespaces, with service names that start with "tst" (users corral-tst*-*);
everything they create is removed even when they fail."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CORRAL = [sys.executable, "-m", "corral.cli"]
TEST_PREFIX = "corral-tst"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="corral's tests need root (real users, nftables, mounts)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "root: needs root and the real kernel")


def remove_test_users() -> None:
    """Remove users and groups a crashed test left: only corral-tst* carrying corral's marker."""
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(TEST_PREFIX) and entry.pw_gecos.startswith("corral service"):
            subprocess.run(["userdel", entry.pw_name], capture_output=True)


@pytest.fixture
def corral_root(tmp_path, monkeypatch):
    root = tmp_path / "corral-root"
    root.mkdir()
    monkeypatch.setenv("CORRAL_ROOT", str(root))
    yield root


@pytest.fixture
def service_name():
    name = "tst" + secrets.token_hex(3)
    yield name
    remove_test_users()


@pytest.fixture
def netns():
    name = "corral-t-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def corral(*args: str, netns: str | None = None, check: bool = False,
           env: dict[str, str] | None = None, cwd: str | None = None,
           input: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI (in `netns` if given) and return its result."""
    argv = list(CORRAL) + list(args)
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.pop("CORRAL_DEBUG", None)
    result = subprocess.run(argv, capture_output=True, text=True, env=full_env, cwd=cwd,
                            input=input, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"corral {' '.join(args)} -> {result.returncode}\n"
                             f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def write_manifest(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(f'name = "{name}"\n' + body)
    return path
