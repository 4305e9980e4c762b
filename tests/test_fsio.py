"""core.fsio: whole-file replacement, durable or only atomic."""

from __future__ import annotations

import subprocess
import sys

import pytest

from corral.core import fsio


def fsyncs_of(call: str, path) -> int:
    """The fsync calls `fsio.CALL(path, b"new")` makes in a fresh interpreter, by strace."""
    trace = path.parent / f"{call}.strace"
    subprocess.run(["strace", "-f", "-e", "trace=fsync,fdatasync", "-o", str(trace),
                    sys.executable, "-c",
                    f"from corral.core import fsio; fsio.{call}({str(path)!r}, b'new')"],
                   check=True, capture_output=True, timeout=60)
    return sum(1 for line in trace.read_text().splitlines() if "fsync(" in line)


def test_write_atomic_replaces_without_syncing_and_write_durable_syncs(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    assert fsyncs_of("write_atomic", target) == 0
    assert target.read_bytes() == b"new"
    target.write_bytes(b"old")
    assert fsyncs_of("write_durable", target) == 2  # the file, then its folder
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".strace") == [
        "state.json"]  # no tmp left


def test_json_state_is_written_atomically_and_a_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.json"
    fsio.write_json(target, {"phase": "running"}, durable=False)
    assert target.read_text() == '{\n  "phase": "running"\n}\n'
    with pytest.raises(TypeError):
        fsio.write_json(target, {"phase": object()}, durable=False)
    assert target.read_text() == '{\n  "phase": "running"\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
