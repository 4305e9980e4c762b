"""The CLI's machine contract (docs/cli.md), through the real `corral` executable: every --json
prints one object of its documented shape, `service` in every object about one service, one
timestamp format; exit codes of exec and of refusals; root checks without a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import CORRAL, corral, notes_manifest, write_manifest

pytestmark = pytest.mark.root

# The one timestamp format: ISO 8601, UTC, microseconds, Z (corral.core.text.iso).
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
LOOKS_LIKE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d")


def doc(result: subprocess.CompletedProcess, code: int = 0) -> dict:
    """The one JSON object a --json command printed, checked for the parts every one shares."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert isinstance(data, dict), f"top level must be an object, got {type(data).__name__}"
    for where, text in strings(data):
        if LOOKS_LIKE_TIME.match(text):
            assert TIMESTAMP.fullmatch(text), f"{where}: {text!r} is not the one timestamp format"
    return data


def strings(value, where: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from strings(item, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def keys(data: dict, **types) -> None:
    """`data` has each key, of that type (a tuple: any of them)."""
    for key, kind in types.items():
        assert key in data, f"missing {key!r} in {sorted(data)}"
        assert isinstance(data[key], kind), f"{key}: {data[key]!r} is not {kind}"


def test_json_shapes_without_an_installed_service(tmp_path, corral_root):
    assert doc(corral("status", "--json")) == {"services": []}
    assert doc(corral("incidents", "--json")) == {"service": None, "incidents": []}
    manifest = notes_manifest(tmp_path, "tstshape")
    checked = doc(corral("check", str(manifest), "--json"))
    assert checked == {"ok": True, "files": [str(manifest)], "problems": []}
    bad = write_manifest(tmp_path, "tstbad", "[process.app]\ncommand = \"x\"\n")
    checked = doc(corral("check", str(bad), "--json"), code=2)
    assert checked["ok"] is False and checked["problems"]
    for problem in checked["problems"]:
        keys(problem, file=str, where=str, message=str)
    plan = doc(corral("plan", str(manifest), "--json"))
    keys(plan, service=str, file=str, users=list, image=dict, delta=dict)
    assert plan["service"] == "tstshape" and set(plan["delta"]) == {"kind", "bytes"}
    host = tmp_path / "host.toml"
    host.write_text('role = "server"\nmanagement = ["tcp/22@203.0.113.0/24"]\n')
    keys(doc(corral("host", "plan", str(host), "--json")), host_file=str, role=str, ruleset=dict)


def test_json_shapes_of_a_service_through_its_life(tmp_path, corral_root, netns, service_name):
    manifest = notes_manifest(tmp_path, service_name)
    manifest.write_text(manifest.read_text().replace('mode = "0750"\n',
                                                     'mode = "0750"\njournal = true\n'))
    name = service_name

    def run(*args: str, code: int = 0) -> dict:
        data = doc(corral(*args, "--json", netns=netns), code)
        assert data.get("service") == name, f"{args}: service {data.get('service')!r}"
        return data

    try:
        installed = run("install", str(manifest))
        keys(installed, changed=bool, changes=list)
        assert installed["changed"] and all(isinstance(c, str) for c in installed["changes"])
        assert run("install", str(manifest)) == {"service": name, "changed": False, "changes": []}

        started = run("up", str(manifest))
        keys(started, changed=bool, state=dict)
        assert started["changed"] is True
        assert run("up", name)["changed"] is False  # NAME and FILE: the same service

        status = doc(corral("status", name, "--json", netns=netns))
        assert list(status) == ["services"] and len(status["services"]) == 1
        svc = status["services"][0]
        keys(svc, service=str, state=str, base_version=int, delta=dict, processes=list,
             incidents=int, open_incidents=int, archives=list)
        assert svc["service"] == name and set(svc["delta"]) == {"kind", "bytes"}
        # The watcher's health: every sensor by name, and each journaled volume's.
        assert {"audit", "network", "base-write", "exec"} <= set(svc["sensors"])
        assert all(isinstance(v, str) and v for v in svc["sensors"].values())
        assert svc["journals"] == {"/srv/notes": "ok"}  # the sample journals its volume
        text = corral("status", name, netns=netns).stdout
        assert "sensors: " in text and "base-write " in text
        assert doc(corral("status", "--json", netns=netns))["services"][0]["service"] == name

        # A change in the delta: a plain file, so commit needs no --allow.
        done = corral("exec", name, "app", "--", "/usr/bin/python3.11", "-I", "-c",
                      "open('/tmp/settings', 'w').write('v=1')", netns=netns)
        assert done.returncode == 0, done.stderr
        delta = run("delta", name)
        keys(delta, base_version=int, changes=list, base_writes=list)
        settings = next(c for c in delta["changes"] if c["path"] == "/tmp/settings")
        assert settings["bytes"] == 3 and "size" not in settings

        verified = run("verify", name)
        keys(verified, base_version=int, ok=bool, entries=int, problems=list)
        assert verified["ok"] is True

        committed = run("commit", name)
        keys(committed, base_version=int, from_base_version=int, changes=list)
        assert (committed["from_base_version"], committed["base_version"]) == (1, 2)

        built = run("base", "build", name)
        keys(built, base_version=int)
        assert built["base_version"] == 3
        used = run("base", "use", name, "2")
        assert (used["base_version"], used["changed"]) == (2, False)
        listed = run("base", "list", name)
        keys(listed, versions=list)
        assert [(v["base_version"], v["current"]) for v in listed["versions"]] == \
            [(1, False), (2, True), (3, False)]
        assert all("version" not in v for v in listed["versions"])

        reverted = run("revert", name)
        keys(reverted, base_version=int, archive=str)
        archives = doc(corral("status", name, "--json", netns=netns))["services"][0]["archives"]
        assert archives and all(TIMESTAMP.fullmatch(a["created_at"]) for a in archives)

        # The redo log of the journaled volume.
        marked = run("state", "mark", name)
        keys(marked, epochs=list)
        log = run("state", "log", name)
        keys(log, volumes=list)
        assert TIMESTAMP.fullmatch(log["volumes"][0]["open_since"])
        keys(run("state", "check", name), ok=bool, volumes=list)
        keys(run("state", "commit", name), quiet_seconds=(int, float), volumes=list)

        # An incident (a record as the watcher writes it), listed, then closed.
        state_dir = corral_root / "var/lib/corral" / name
        with open(state_dir / "incidents.jsonl", "a") as handle:
            handle.write(json.dumps({"id": "i-1", "service": name, "process": "app",
                                     "tripwire": "exec", "detected_at":
                                     "2026-12-04T10:00:00.000001Z"}) + "\n")
        listed = run("incidents", name)
        assert [r["id"] for r in listed["incidents"]] == ["i-1"]
        refused = corral("commit", name, netns=netns)  # a refusal by a check: 3
        assert refused.returncode == 3 and "incident is open" in refused.stderr
        closed = run("incidents", name, "--close", "i-1")
        assert (closed["changed"], closed["closed"]) == (True, ["i-1"])
        closed_at = run("incidents", name)["incidents"][0]["closed_at"]
        assert TIMESTAMP.fullmatch(closed_at)

        stopped = run("down", name)
        assert stopped == {"service": name, "changed": True}
        assert run("down", name)["changed"] is False
    finally:
        corral("down", name, netns=netns)
        removed = corral("uninstall", name, "--purge", "--json", netns=netns)
    data = doc(removed)
    assert data["service"] == name and data["changed"] is True and data["changes"]


def test_host_apply_confirm_rollback_json(tmp_path, corral_root, netns):
    host = tmp_path / "host.toml"
    host.write_text('role = "server"\nmanagement = ["tcp/22@203.0.113.0/24"]\n')
    try:
        applied = doc(corral("host", "apply", str(host), "--confirm-timeout", "60", "--json",
                             netns=netns))
        keys(applied, table=str, host_file=str, applied_at=str, rollback_at=str, chained=bool)
        confirmed = doc(corral("host", "confirm", str(host), "--json", netns=netns))
        keys(confirmed, table=str, host_file=str, confirmed_at=str, guard_was_running=bool)
        rolled = doc(corral("host", "rollback", str(host), "--json", netns=netns))
        keys(rolled, table=str, host_file=(str, type(None)), saved_at=str)
    finally:
        pending = corral_root / "var/lib/corral/host/pending.json"
        if pending.exists():  # no guard of ours may outlive the test
            record = json.loads(pending.read_text())
            cmdline = Path(f"/proc/{record['guard_pid']}/cmdline")
            if cmdline.exists() and record["token"].encode() in cmdline.read_bytes():
                os.kill(record["guard_pid"], signal.SIGKILL)
        subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "nft", "delete", "table",
                        "inet", "corral-host"], capture_output=True)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize("args", [
    ["state", "mark", "tstnobody"], ["state", "excise", "tstnobody", "--from", "1"],
    ["state", "commit", "tstnobody"], ["state", "check", "tstnobody"],
    ["down", "tstnobody"], ["base", "build", "tstnobody"],
])
def test_mutators_refuse_non_root_with_one_message(tmp_path, args):
    env = dict(os.environ, CORRAL_ROOT=str(tmp_path))
    env.pop("CORRAL_DEBUG", None)
    result = subprocess.run(NOBODY + CORRAL + args, capture_output=True, text=True, env=env,
                            cwd="/", timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert re.fullmatch(r"corral: this command .+ and must run as root\n", result.stderr)


def test_exec_failures_of_its_own_are_125(tmp_path):
    env = dict(os.environ, CORRAL_ROOT=str(tmp_path))
    env.pop("CORRAL_DEBUG", None)
    for argv in (NOBODY + CORRAL + ["exec", "tstnobody", "app", "--", "true"],  # not root
                 CORRAL + ["exec", "tstnobody", "app", "--", "true"],          # not installed
                 CORRAL + ["exec", "tstnobody"]):                               # usage
        result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/")
        assert result.returncode == 125, (argv, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr
    help_text = subprocess.run(CORRAL + ["exec", "--help"], capture_output=True, text=True).stdout
    assert "125" in help_text and "126" in help_text and "127" in help_text
