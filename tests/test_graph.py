"""`corral graph`: the dot text against golden files (the sample; a fleet with a router, a
connect that meets another service's listen, and incidents), valid SVG through the real `dot`,
the SVG committed in docs/ kept current, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import CORRAL, EXAMPLES, REPO

GOLDEN = Path(__file__).parent / "golden" / "graph"
DATA = Path(__file__).parent / "data" / "graph"
NOTES = str(EXAMPLES / "notes" / "notes.toml")
FIXED_ROOT = "/nonexistent-corral-graph"  # nothing installed, no incident, no applied filter
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz not installed")


def graph(*args: str, root: str = FIXED_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*CORRAL, "graph", *args], capture_output=True, timeout=120,
                          env={**os.environ, "CORRAL_ROOT": root})


def check_golden(name: str, text: str) -> None:
    if os.environ.get("CORRAL_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text()


def test_notes_golden():
    result = graph(NOTES)
    assert result.returncode == 0, result.stderr
    check_golden("notes.dot", result.stdout.decode())


@pytest.fixture
def fleet_root(tmp_path):
    """A throwaway CORRAL_ROOT holding only an incident log for tstweb (nothing installed)."""
    state = tmp_path / "var/lib/corral/tstweb"
    state.mkdir(parents=True)
    records = [{"id": "a", "process": "web", "tripwire": "egress", "count": 3, "closed_at": None},
               {"id": "b", "process": "web", "tripwire": "exec"},
               {"id": "b", "type": "close", "closed_at": "2026-01-01T00:00:00.000000Z"}]
    (state / "incidents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(tmp_path)


def test_fleet_golden(fleet_root):
    result = graph(str(DATA / "tstweb.toml"), "--host", str(DATA / "router.toml"),
                   root=fleet_root)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    check_golden("fleet.dot", text)
    # web -> db: a connect that meets another service's listen is an arrow between them
    assert '"p:tstweb/web" -> "p:tstdb/db"' in text
    assert "incidents: 4 (1 open)" in text and "egress x3" in text
    assert 'subgraph "cluster_lan0"' in text  # the router's LAN holds the service it lists


@needs_dot
def test_svg_is_valid(tmp_path):
    out = tmp_path / "notes.svg"
    result = graph(NOTES, "--format", "svg", "--out", str(out))
    assert result.returncode == 0, result.stderr
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "user corral-notes-app" in texts and "tcp/8080" in texts
    printed = graph(NOTES, "--format", "svg")
    assert printed.stdout == out.read_bytes()


@needs_dot
def test_docs_svg_is_current(tmp_path):
    """docs/notes-graph.svg is this command's output for the sample (regenerated with
    CORRAL_UPDATE_GOLDEN=1)."""
    docs = REPO / "docs" / "notes-graph.svg"
    result = graph(NOTES, "--format", "svg")
    assert result.returncode == 0
    if os.environ.get("CORRAL_UPDATE_GOLDEN") == "1":
        docs.write_bytes(result.stdout)
    assert docs.read_bytes() == result.stdout


def test_bad_input_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "tstbad"\n[process.app]\ncommand = "not a list"\n')
    cases = [["nosuchsvc"], [str(bad)], [str(tmp_path / "missing.toml")],
             [NOTES, "--format", "gif"], [NOTES, "--out", str(tmp_path)],
             [NOTES, "--host", str(bad)], []]
    for args in cases:
        result = graph(*args)
        assert result.returncode == 2, (args, result)
        assert b"Traceback" not in result.stderr and result.stdout == b""
