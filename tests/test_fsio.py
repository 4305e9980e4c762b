"""core.fsio: whole-file replacement, durable or only atomic."""

from __future__ import annotations

import os

import pytest

from corral.core import fsio


def test_write_atomic_replaces_without_syncing(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    fsio.write_atomic(target, b"new", mode=0o640)
    assert target.read_bytes() == b"new" and synced == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no tmp left
    fsio.write_durable(target, b"newer")
    assert target.read_bytes() == b"newer" and len(synced) == 2  # the file, then its folder


def test_json_state_is_written_atomically_and_a_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.json"
    fsio.write_json(target, {"phase": "running"}, durable=False)
    assert target.read_text() == '{\n  "phase": "running"\n}\n'
    with pytest.raises(TypeError):
        fsio.write_json(target, {"phase": object()}, durable=False)
    assert target.read_text() == '{\n  "phase": "running"\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
