"""A commit racing its service (red team 2026-12-04, finding 12; issue 16 finding 10): `corral
commit` checked the delta, then copied it again from the live upper directory, so a file swapped
in between (an ELF where a harmless file was checked) reached the "clean" base unlisted.

Now check and copy are one walk over a frozen delta. Shown here by a writer that never stops
while the commit runs: the new base holds exactly the files the commit listed, each with the
content (blake3) and size it reported. Its own service (port 8086)."""

from __future__ import annotations

import json
import subprocess
import time

import blake3
import pytest

from .attack import CORRAL, started

pytestmark = pytest.mark.root

WRITER = r'''
import os, time
os.makedirs("/tmp/race", exist_ok=True)
end = time.time() + 60  # ended by the service's stop, long before
i = 0
while time.time() < end:
    with open(f"/tmp/race/f{i % 300}", "wb") as handle:  # new files, then rewritten in place
        handle.write(b"%d" % i * (1 + i % 700))
    tmp = f"/tmp/race/.swap{i}"
    with open(tmp, "wb") as handle:  # and one file replaced again and again
        handle.write(b"swap %d " % i * 500)
    os.rename(tmp, "/tmp/race/swap")
    i += 1
print("wrote", i)
'''


def test_commit_holds_exactly_what_it_checked(escape_env):
    with started(escape_env.tmp, escape_env.root, escape_env.netns, port=8086,
                 volume="/srv/race") as service:
        writer = subprocess.Popen(service.prefix() + CORRAL + [
            "exec", service.name, "app", "--", "/usr/bin/python3.11", "-I", "-c", WRITER],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.5)  # the writer is at it
            still_writing = writer.poll() is None
            # commit freezes the service, checks and copies in one walk, then restarts it on
            # the new base (which ends the writer)
            run = service.corral("commit", service.name, "--json", timeout=120)
        finally:
            writer.kill()
            out, err = writer.communicate(timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert still_writing, (out, err)  # the commit started while the writer wrote
        changes = {c["path"]: c for c in json.loads(run.stdout)["changes"]
                   if c["path"].startswith("/tmp/race/")}
        assert len(changes) > 1, changes
        base = service.base_root / "tmp" / "race"
        on_disk = {f"/tmp/race/{p.name}": p for p in base.iterdir()}
        assert set(on_disk) == set(changes), (sorted(set(on_disk) ^ set(changes)))
        for path, change in changes.items():
            data = on_disk[path].read_bytes()
            assert change["kind"] == "file", change
            assert "blake3" in change, json.dumps(change)
            assert len(data) == change.get("size", len(data)), change
            assert blake3.blake3(data).hexdigest() == change["blake3"], path
