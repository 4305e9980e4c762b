"""The manifest contract: the spec's example is accepted; every broken rule is reported as
`FILE: key.path: message`, exit 2, and nothing else ever comes out (no traceback)."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES, corral
from corral.core.errors import InputError
from corral.manifest.check import check_file
from corral.manifest.model import load_manifest, parse_manifest

SPEC_EXAMPLE = Path(__file__).parent / "data" / "spec-example.toml"


def spec_data() -> dict:
    return tomllib.loads(SPEC_EXAMPLE.read_text())


def problems(data: dict) -> list[str]:
    try:
        parse_manifest("web.toml", data)
    except InputError as exc:
        return [str(p) for p in exc.problems]
    return []


def test_spec_example_is_accepted():
    m = load_manifest(str(SPEC_EXAMPLE))
    assert m.name == "web"
    app = m.process["app"]
    assert [str(c) for c in app.connect] == ["udp/53@127.0.0.53/32", "tcp/5432@10.0.0.5/32"]
    assert app.limits.memory == 256 << 20 and app.limits.cpu == 0.5
    assert m.volume[0].mode == 0o750 and m.volume[0].epoch == 600
    assert m.user_of("app") == "corral-web-app"


def test_sample_manifest_is_accepted():
    assert check_file(str(EXAMPLES / "notes" / "notes.toml")) == []


def test_defaults_of_a_minimal_manifest():
    m = parse_manifest("m.toml", {"name": "m", "process": {"app": {"command": ["/bin/true"]}}})
    assert m.image.source == "closure" and m.image.delta == "tmpfs"
    assert m.image.delta_size == 64 << 20
    assert m.process["app"].executables == ["/bin/true"]
    assert m.watch.react == "revert" and len(m.watch.tripwires) == 8
    assert m.process["app"].syscalls == "default"
    # No CPU quota unless asked (a quota throttles a multi-worker server on an idle machine):
    # the cgroup's default weight applies, and the exports say no quota either.
    assert m.process["app"].limits.cpu is None


def mutate(path: list, value) -> dict:
    data = spec_data()
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


CASES = [
    (["process", "app", "connect", 1], "tcp/99999@10.0.0.5",
     'web.toml: process.app.connect[1]: "tcp/99999@10.0.0.5": port out of range (1-65535)'),
    (["process", "app", "connect", 0], "udp/53@dns.example",
     'web.toml: process.app.connect[0]: "udp/53@dns.example": '
     '"dns.example" is not an IP address or prefix'),
    (["process", "app", "connect", 0], "tcp/5@10.0.0.5/24",
     'web.toml: process.app.connect[0]: "tcp/5@10.0.0.5/24": '
     'prefix "10.0.0.5/24" has host bits set'),
    (["process", "app", "listen", 0], "sctp/80",
     'web.toml: process.app.listen[0]: "sctp/80": unknown protocol "sctp" (tcp or udp)'),
    (["process", "app", "listen", 0], "tcp/80",
     'web.toml: process.app.listen[0]: "tcp/80": '
     'ports below 1024 need capabilities = ["NET_BIND_SERVICE"]'),
    (["process", "app", "capabilities"], ["NET_BIND_SERVICES"],
     'web.toml: process.app.capabilities[0]: "NET_BIND_SERVICES": unknown capability'),
    (["process", "app", "exec", 0], "/usr/bin/../../bin/sh",
     'web.toml: process.app.exec[0]: "/usr/bin/../../bin/sh": ".." is not allowed in a path'),
    (["process", "app", "writable"], ["var/cache"],
     'web.toml: process.app.writable[0]: "var/cache": path must be absolute'),
    (["volume", 0, "owner"], "db",
     'web.toml: volume[0].owner: "db": no such process (processes: app)'),
    (["volume", 0, "path"], "/proc/self",
     'web.toml: volume[0].path: "/proc/self": '
     'cannot be a volume (/, /proc, /dev and /sys are not)'),
    (["volume", 0, "mode"], "0777",
     'web.toml: volume[0].mode: "0777": a volume must not be writable by others'),
    (["volume", 0, "mode"], 750,
     'web.toml: volume[0].mode: "750": expected an octal mode string like "0750"'),
    (["volume", 0, "epoch"], "10 minutes",
     'web.toml: volume[0].epoch: "10 minutes": expected a duration like "10m" (s, m, h or d)'),
    (["volume", 0, "size"], "4M",
     'web.toml: volume[0].size: "4M": a file system of its own is 8M to 16T'),
    (["volume", 0, "size"], "lots",
     'web.toml: volume[0].size: "lots": expected a size like "64M" (K, M, G or T)'),
    (["volume", 0, "size"], "32T",
     'web.toml: volume[0].size: "32T": a file system of its own is 8M to 16T'),
    (["image", "delta"], "zram",
     'web.toml: image.delta: "zram": expected "tmpfs" or "disk"'),
    (["image", "delta_size"], "lots",
     'web.toml: image.delta_size: "lots": expected a size like "64M" (K, M, G or T)'),
    (["image", "from"], "relative/root",
     'web.toml: image.from: "relative/root": path must be absolute'),
    (["process", "app", "limits", "pids"], 0,
     "web.toml: process.app.limits.pids: 0: must be positive"),
    (["process", "app", "limits", "cpu"], "half",
     "web.toml: process.app.limits.cpu: expected a number, got a string"),
    (["process", "app", "limits", "swap"], "1G",
     "web.toml: process.app.limits.swap: unknown key"),
    (["process", "app", "syscalls"], "all",
     'web.toml: process.app.syscalls: "all": expected "default" or a list'),
    (["process", "app", "syscalls"], ["read", "frobnicate"],
     'web.toml: process.app.syscalls[1]: "frobnicate": unknown system call'),
    (["process", "app", "environment"], {"BAD-NAME": "x"},
     'web.toml: process.app.environment.BAD-NAME: "BAD-NAME": '
     'not a valid environment variable name'),
    (["process", "app", "command"], [],
     "web.toml: process.app.command: must not be empty"),
    (["process", "app", "command"], ["python3", "-V"],
     'web.toml: process.app.command[0]: "python3": the program must be an absolute path'),
    (["process", "app", "exec"], ["/usr/bin/env"],
     'web.toml: process.app.exec: does not include command[0] "/usr/bin/python3"'),
    (["watch", "react"], "panic",
     'web.toml: watch.react: "panic": expected "log", "isolate", "kill" or "revert"'),
    (["watch", "tripwires", 0], "coffee",
     'web.toml: watch.tripwires[0]: "coffee": '
     'expected "egress", "listen", "exec", "base-write", "setuid", "ptrace", "spoof" or "flood"'),
    (["name"], "Web_Server",
     'web.toml: name: "Web_Server": a name is 1-16 characters: a-z first, then a-z, 0-9 or "-"'),
    (["name"], KeyError, "web.toml: name: required key is missing"),
    (["process"], {}, "web.toml: process: at least one [process.NAME] table is required"),
    (["colour"], "blue", "web.toml: colour: unknown key"),
]


@pytest.mark.parametrize("path,value,expected", CASES, ids=[c[2].split(": ")[1] for c in CASES])
def test_each_rule_names_the_key_and_the_reason(path, value, expected):
    assert expected in problems(mutate(path, value))


def test_process_names_and_shared_listens():
    data = spec_data()
    data["process"]["Worker_1"] = copy.deepcopy(data["process"]["app"])
    data["process"]["db"] = copy.deepcopy(data["process"]["app"])
    found = problems(data)
    assert ('web.toml: process.Worker_1: "Worker_1": a process name is 1-8 characters: '
            'a-z first, then a-z or 0-9') in found
    assert ('web.toml: process.db.listen[0]: "tcp/8080": tcp/8080 is already declared by '
            'process "app"') in found


def test_reserved_process_name():
    data = spec_data()
    data["process"]["tasks"] = copy.deepcopy(data["process"]["app"])
    data["process"]["tasks"]["listen"] = []
    assert problems(data) == ['web.toml: process.tasks: "tasks": reserved (a cgroup v1 control '
                              'file has this name)']


def test_overlapping_volumes():
    data = spec_data()
    data["volume"].append({"path": "/srv/data/sub", "owner": "app"})
    assert ('web.toml: volume[1].path: "/srv/data/sub": overlaps volume[0] "/srv/data"'
            in problems(data))


def test_sizes_of_file_systems_of_their_own():
    data = spec_data()
    data["volume"][0]["size"] = "512M"
    data.setdefault("image", {})["delta"] = "disk"
    assert problems(data) == []
    assert parse_manifest("web.toml", data).volume[0].size == 512 << 20
    data["image"]["delta_size"] = "1M"  # fine for a tmpfs, too small for an ext4 of its own
    assert problems(data) == ["web.toml: image.delta_size: 1048576: a disk delta is a file "
                              "system of its own: 8M to 16T"]


def test_bad_volume_size_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "web.toml"
    path.write_text(SPEC_EXAMPLE.read_text().replace('mode = "0750"',
                                                      'mode = "0750"\nsize = "-5M"', 1))
    result = corral("check", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f'{path}: volume[0].size: "-5M": expected a size like')
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"   \n\n", "empty file"),
    (b'name = "web"\n\xff\xfe = 1\n', "line 2: not valid UTF-8 (byte 0xff)"),
    (b'name = "web"\n[process.app\ncommand = []\n', "line 2: TOML syntax:"),
    (b'name = "web"\nname = "again"\n', "line 2: TOML syntax:"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "web.toml"
    path.write_bytes(content)
    result = corral("check", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}: {message}")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_missing_file_and_directory(tmp_path):
    result = corral("check", str(tmp_path / "nope.toml"), str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{tmp_path / 'nope.toml'}: no such file",
                                          f"{tmp_path}: is a directory, not a manifest"]


def test_check_prints_nothing_for_a_good_manifest():
    result = corral("check", str(SPEC_EXAMPLE), str(EXAMPLES / "notes" / "notes.toml"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# -- property tests: whatever the input, the outcome is "valid" or a clean list of problems --

toml_scalars = st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=30), st.booleans(),
                         st.floats(allow_nan=False), st.lists(st.text(max_size=10), max_size=3))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


ALL_PATHS = [p for p in _paths(spec_data()) if p]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), toml_scalars | st.just(KeyError)),
                min_size=1, max_size=4))
def test_mutated_manifests_are_valid_or_cleanly_rejected(mutations):
    data = spec_data()
    for path, value in mutations:
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            if value is KeyError:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        parse_manifest("web.toml", data)
    except InputError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert str(problem).startswith("web.toml: ") and "\n" not in problem.message
            assert problem.message and "Traceback" not in problem.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "m.toml"
    path.write_bytes(blob)
    for problem in check_file(str(path)):
        assert str(problem).startswith(f"{path}: ")


@settings(max_examples=15, deadline=None)
@given(st.binary(max_size=200) | st.sampled_from([SPEC_EXAMPLE.read_bytes()[:n] for n in
                                                  range(0, 1200, 97)]))
def test_cli_exit_code_is_0_or_2(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("cli") / "m.toml"
    path.write_bytes(blob)
    result = corral("check", str(path))
    assert result.returncode in (0, 2), result.stderr
    assert "Traceback" not in result.stderr
    if result.returncode == 2:
        assert all(line.startswith(f"{path}: ") for line in result.stderr.splitlines())
