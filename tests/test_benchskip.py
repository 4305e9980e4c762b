"""CORRAL_BENCH_SKIP (launch/benchskip.py): bench-only, off unless set, typos refused; the
namespaces one by one, without touching the host's."""

import os
import socket

import pytest

from conftest import corral, write_manifest
from corral.launch import benchskip


def test_nothing_skipped_by_default(monkeypatch):
    monkeypatch.delenv("CORRAL_BENCH_SKIP", raising=False)
    assert benchskip.skipped() == frozenset()
    assert not any(benchskip.skips(name) for name in benchskip.KNOWN)


def test_names_are_read_and_typos_refused(monkeypatch):
    monkeypatch.setenv("CORRAL_BENCH_SKIP", " landlock, overlay ,")
    assert benchskip.skipped() == {"landlock", "overlay"}
    assert benchskip.skips("landlock") and not benchskip.skips("seccomp")
    # a typo must not silently measure the full containment under a lighter name
    monkeypatch.setenv("CORRAL_BENCH_SKIP", "landlok")
    with pytest.raises(ValueError, match="landlok"):
        benchskip.skipped()


NS_KINDS = ("pid", "ipc", "uts", "cgroup", "mnt")


def _namespaces_inside(tmp_path, netns, service_name, skip: str | None) -> dict[str, str]:
    """The namespaces a contained process is in (`corral run` of readlink), by kind."""
    links = ", ".join(f'"/proc/self/ns/{kind}"' for kind in NS_KINDS)
    manifest = write_manifest(tmp_path, service_name, f"""
[image]
include = ["/usr/bin/readlink"]
[process.main]
command = ["/usr/bin/readlink", {links}]
""")
    corral("install", str(manifest), netns=netns, check=True)
    try:
        result = corral("run", str(manifest), netns=netns,
                        env={"CORRAL_BENCH_SKIP": skip} if skip else None)
        assert result.returncode == 0, result.stderr
        shown = [line.removeprefix("main| ") for line in result.stdout.splitlines()
                 if line.startswith("main| ")]
        return {link.split(":", 1)[0]: link for link in shown}
    finally:
        corral("uninstall", service_name, "--purge", netns=netns)


def test_namespaces_are_skipped_one_by_one_and_leave_the_host_alone(tmp_path, corral_root,
                                                                    netns, service_name):
    host = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in NS_KINDS}
    hostname = socket.gethostname()
    with open("/proc/sys/vm/memfd_noexec") as handle:
        memfd_noexec = handle.read()
    contained = _namespaces_inside(tmp_path, netns, service_name, None)
    assert set(contained) == set(NS_KINDS)
    assert [kind for kind in NS_KINDS if contained[kind] == host[kind]] == []
    skipped = _namespaces_inside(tmp_path, netns, service_name, "pidns,ipcns,utsns,cgroupns")
    assert [kind for kind in NS_KINDS if skipped[kind] == host[kind]] == [
        "pid", "ipc", "uts", "cgroup"]  # the mount namespace is never skipped
    assert socket.gethostname() == hostname  # not renamed to the service's name
    with open("/proc/sys/vm/memfd_noexec") as handle:
        assert handle.read() == memfd_noexec
    only_uts = _namespaces_inside(tmp_path, netns, service_name, "utsns")
    assert [kind for kind in NS_KINDS if only_uts[kind] == host[kind]] == ["uts"]
