"""Escape by holes (red team 2026-12-04, findings 3 and 12; issue 16): a sparse file costs the
service nothing (an 8 EiB file of holes in /tmp takes no block of its delta) and used to cost
root everything: `corral delta` and the revert's archive hashed zeros for decades (the revert
gave up after 30 s with the service down and status saying "running"), and `corral commit`
wrote a 4 GiB file of holes out as 4 GiB of zeros, until the disk was full.

Now every pass over a delta reads data only (SEEK_DATA/SEEK_HOLE) and within a budget; the
archive keeps a sparse file's extents and a bounded prefix of its data, and says so in its
meta; commit copies sparse files sparsely and refuses what it cannot copy within its bound.

The host's disk is checked before and after: nothing here may write more than a few MiB.
Its own service (port 8084): it is reverted and committed."""

from __future__ import annotations

import json
import os
import time

import pytest

from .attack import returned, started

pytestmark = pytest.mark.root

HOLEY = 256 << 20  # logical bytes; 4 KiB of data at 128 MiB

ATTACK = r'''
@attempt("huge")
def _():
    fd = os.open("/tmp/huge", os.O_CREAT | os.O_WRONLY, 0o644)
    os.ftruncate(fd, 2**63 - 1)
    os.close(fd)
    return os.stat("/tmp/huge").st_blocks

@attempt("holey")
def _():
    fd = os.open("/tmp/holey", os.O_CREAT | os.O_WRONLY, 0o644)
    os.pwrite(fd, b"X" * 4096, PARAMS["holey"] // 2)
    os.ftruncate(fd, PARAMS["holey"])
    os.close(fd)
    return os.stat("/tmp/holey").st_blocks

@attempt("small")
def _():
    with open("/tmp/small", "wb") as handle:
        handle.write(os.urandom(100_000))
    return 100_000
'''


def used_bytes(path) -> int:
    """Bytes allocated under `path` (this test's CORRAL_ROOT): the host's disk is shared with
    other tests running now, so its df is too noisy to tell a few MiB."""
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
            except OSError:
                pass
    return total


@pytest.fixture(scope="module")
def sparse(escape_env):
    with started(escape_env.tmp, escape_env.root, escape_env.netns, port=8084,
                 volume="/srv/sparse") as service:
        results = service.attack(ATTACK, {"holey": HOLEY})
        yield service, results


def timed(service, *args, timeout=60):
    start = time.monotonic()
    run = service.corral(*args, timeout=timeout)
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.stderr
    return run, time.monotonic() - start


def test_the_files_cost_the_service_nothing(sparse):
    _, results = sparse
    assert returned(results, "huge") == 0
    assert returned(results, "holey") <= 64  # 512-byte blocks: the 4 KiB of data


def test_delta_lists_them_quickly(sparse):
    service, _ = sparse
    run, took = timed(service, "delta", service.name, "--json")
    assert run.returncode == 0, run.stderr
    paths = {c["path"] for c in json.loads(run.stdout)["changes"]}
    assert {"/tmp/huge", "/tmp/holey", "/tmp/small"} <= paths
    assert took < 20


def test_commit_refuses_the_8_eib_file_quickly_and_writes_nothing(sparse):
    service, _ = sparse
    before = used_bytes(service.root)
    run, took = timed(service, "commit", service.name)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "/tmp/huge" in run.stderr and "larger than one commit copies" in run.stderr
    assert took < 30
    assert used_bytes(service.root) - before < 64 << 20
    assert service.status()["state"] == "running" and service.serving()  # thawed


def test_revert_is_bounded_and_says_what_it_cut(sparse):
    service, _ = sparse
    before = used_bytes(service.root)
    run, took = timed(service, "revert", service.name, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert took < 30
    log = service.root / "run/corral" / service.name / "supervisor.log"
    assert "archiving the delta failed" not in log.read_text(), log.read_text()[-2000:]
    archives = sorted((service.state_dir / "archives").iterdir())
    meta = json.loads((archives[-1] / "meta.json").read_text())
    assert {"/tmp/huge", "/tmp/holey"} <= set(meta["truncated"]["files_cut"])
    assert "/tmp/small" not in meta["truncated"]["files_cut"]
    assert (archives[-1] / "delta.tar.zst").stat().st_size < 1 << 20
    assert used_bytes(service.root) - before < 64 << 20
    assert service.status()["state"] == "running" and service.serving()


def test_commit_copies_a_sparse_file_sparsely(sparse):
    service, _ = sparse
    holey_only = ATTACK[ATTACK.index('@attempt("holey")'):]  # the delta is fresh: no huge
    results = service.attack(holey_only, {"holey": HOLEY})
    assert returned(results, "holey") <= 64
    run, took = timed(service, "commit", service.name, "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    assert took < 30
    copied = service.base_root / "tmp" / "holey"
    st = copied.stat()
    assert st.st_size == HOLEY and st.st_blocks * 512 < 1 << 20
    with open(copied, "rb") as handle:
        handle.seek(HOLEY // 2)
        assert handle.read(4096) == b"X" * 4096
