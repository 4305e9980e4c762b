"""`corral audit`: every planted sharp object is found, and the score orders a contained service
above a careless one (and agrees with systemd-analyze on that).

Nothing here touches the host's own files: sharp objects are planted in tmp_path, listeners run
in a throwaway network namespace, services are installed under a throwaway CORRAL_ROOT. The
host audit's library function takes `roots` (the CLI walks /), `path_dirs` and `proc_sys`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NOTES_PY, corral, notes_manifest, remove_test_users, write_manifest
from corral.audit import host as audit
from corral.audit import net as audit_net
from corral.audit.checks import _endpoint_exposure
from corral.audit.image import Entry, image_findings, resolve_in
from corral.audit.walk import file_findings

DATA = Path(__file__).parent / "data" / "audit"
root = pytest.mark.root


def audit_cli(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    """`corral audit ...`; until cli.py registers the command, its module runs it the same way."""
    from corral.cli import main as cli

    if "audit" in cli.main.commands:
        return corral("audit", *args, netns=netns)
    argv = [sys.executable, "-m", "corral.cli.audit", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_DEBUG"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def ids(findings) -> set[str]:
    return {f["id"] if isinstance(f, dict) else f.id for f in findings}


# -- host: files ---------------------------------------------------------------------------------

@root
def test_file_walk_finds_every_planted_object(tmp_path):
    tree = tmp_path / "tree"
    mounts: list[Path] = []
    try:
        (tree / "bin").mkdir(parents=True)
        setuid = tree / "bin" / "true-setuid"
        shutil.copy2("/usr/bin/true", setuid)
        os.chmod(setuid, 0o4755)                                  # root-owned setuid copy
        setgid = tree / "bin" / "true-setgid"
        shutil.copy2("/usr/bin/true", setgid)
        os.chmod(setgid, 0o2755)
        (tree / "open").mkdir()
        os.chmod(tree / "open", 0o777)                            # no sticky bit
        (tree / "scratch").mkdir()
        os.chmod(tree / "scratch", 0o1777)                        # sticky: fine
        (tree / "open" / "note").write_text("x")
        os.chmod(tree / "open" / "note", 0o666)                   # world-writable file
        hostile = os.fsencode(tree) + b"/evil\n\x1b[31m\xff"
        with open(hostile, "wb"):
            pass
        os.chmod(hostile, 0o4755)
        (tree / "usrbin").symlink_to("/usr/bin")                  # never followed
        (tree / "loop").symlink_to("loop")
        # A tmpfs inside is walked (planted objects in /tmp-like mounts); a proc is not.
        for name, fstype in (("tmpfs", "tmpfs"), ("proc", "proc")):
            (tree / name).mkdir()
            subprocess.run(["mount", "-t", fstype, fstype, str(tree / name)], check=True)
            mounts.append(tree / name)
        in_tmpfs = tree / "tmpfs" / "planted"
        shutil.copy2("/usr/bin/true", in_tmpfs)
        os.chmod(in_tmpfs, 0o6755)

        found, stats = file_findings([str(tree)])
        by_id = {f.id: f for f in found}
        assert f"host.setuid.{setuid}" in by_id
        assert by_id[f"host.setuid.{setuid}"].severity == "high"    # outside system dirs
        assert by_id[f"host.setuid.{setuid}"].detail["root_owned"] is True
        assert f"host.setgid.{setgid}" in by_id
        assert f"host.world-writable-dir.{tree}/open" in by_id
        assert f"host.world-writable-file.{tree}/open/note" in by_id
        assert f"host.setuid.{in_tmpfs}" in by_id
        assert f"host.setuid.{tree}/evil\\x0a\\x1b[31m\\xff" in by_id   # one printable line
        assert not any("scratch" in i or "usrbin" in i for i in by_id)
        assert not any(i.startswith("host.setuid./usr/bin") for i in by_id)
        assert f"{tree}/proc (proc)" in stats.skipped
        assert not any(f"{tree}/proc/" in i for i in by_id)
        assert len(found) == 6
        json.dumps([f.to_json() for f in found])
    finally:
        for mount in mounts:
            subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)


def test_file_walk_is_bounded(tmp_path):
    deep = tmp_path
    for i in range(5):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    found, stats = file_findings([str(tmp_path)], time_limit=1e-9)
    assert stats.stopped_at is not None
    assert "host.walk.incomplete" in ids(found)


# -- host: tools, sysctls, firewall ---------------------------------------------------------------

def test_tools_on_path(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, mode in (("nc", 0o755), ("x86_64-linux-gnu-gcc-12", 0o755), ("perl", 0o755),
                       ("curl", 0o644), ("bash", 0o755), ("ls", 0o755)):
        (bindir / name).write_text("#!/bin/sh\n")
        os.chmod(bindir / name, mode)
    (bindir / "gcc").symlink_to("x86_64-linux-gnu-gcc-12")
    os.link(bindir / "perl", bindir / "perl5.36.0")
    found = {f.id: f for f in audit.tool_findings([str(bindir)])}
    assert set(found) == {"host.tool.nc", "host.tool.gcc", "host.tool.perl"}
    assert found["host.tool.gcc"].detail["names"] == ["gcc", "x86_64-linux-gnu-gcc-12"]
    assert found["host.tool.perl"].detail["names"] == ["perl", "perl5.36.0"]    # hard link
    assert found["host.tool.perl"].severity == "info"
    assert found["host.tool.nc"].detail["category"] == "network-tool"


def test_sysctls(tmp_path):
    values = {"kernel/kptr_restrict": "0", "kernel/dmesg_restrict": "1",
              "fs/protected_symlinks": "1", "user/max_user_namespaces": "100"}
    for name, value in values.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(value + "\n")
    found = {f.id: f for f in audit.sysctl_findings(str(tmp_path))}
    assert found["host.sysctl.kernel.kptr_restrict"].severity == "medium"
    assert "host.sysctl.kernel.dmesg_restrict" not in found
    assert "host.sysctl.fs.protected_symlinks" not in found
    assert found["host.sysctl.kernel.yama.ptrace_scope"].severity == "medium"   # no Yama
    assert found["host.sysctl.fs.protected_fifos"].detail["value"] is None       # missing
    assert found["host.sysctl.user-namespaces"].severity == "medium"


def test_firewall_state_from_rulesets():
    def chain(family, hook, policy):
        return {"chain": {"family": family, "table": "t", "name": hook, "type": "filter",
                          "hook": hook, "prio": 0, "policy": policy}}

    def rule(family, hook, expr):
        return {"rule": {"family": family, "table": "t", "chain": hook, "expr": expr}}

    state = audit_net.firewall_state({"nftables": [chain("inet", "input", "drop")]})
    assert state["input_default_deny"] and not state["output_default_deny"]
    state = audit_net.firewall_state({"nftables": [chain("ip", "input", "drop")]})
    assert not state["input_default_deny"] and state["input_families"] == ["ip"]
    final_drop = [rule("inet", "input", [{"counter": None}, {"drop": None}])]
    state = audit_net.firewall_state({"nftables": [chain("inet", "input", "accept")] + final_drop})
    assert state["input_default_deny"]
    conditional = [rule("inet", "input", [{"match": {"op": "==", "left": {"meta": {"key": "iif"}},
                                                     "right": 1}}, {"drop": None}])]
    state = audit_net.firewall_state({"nftables": [chain("inet", "input", "accept")] + conditional})
    assert not state["input_default_deny"]
    assert ids(audit_net.firewall_findings(state)) == {"host.firewall.input",
                                                       "host.firewall.output"}


def test_proc_net_addresses():
    from corral.kernel.procnet import address_text

    assert address_text("0100007F") == "127.0.0.1"
    assert address_text("00000000000000000000000001000000") == "::1"
    assert address_text("0000000000000000FFFF00000100007F") == "127.0.0.1"


# -- host: listeners in a throwaway network namespace --------------------------------------------

LISTENER = """
import os, socket, sys, time
tcp = socket.socket()
tcp.bind(("0.0.0.0", int(sys.argv[1])))
tcp.listen()
os.setgid(65534); os.setuid(65534)       # the UDP socket belongs to nobody
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", int(sys.argv[2])))
print(os.getpid(), flush=True)
time.sleep(300)
"""


@root
def test_listeners_and_firewall_in_netns(netns, tmp_path):
    tcp_port, udp_port = 40000 + secrets.randbelow(5000), 45000 + secrets.randbelow(5000)
    planted = tmp_path / "planted"
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", LISTENER,
                             str(tcp_port), str(udp_port)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        found = {f.id: f for f in audit_net.listener_findings(pid)[0]}
        tcp = found[f"host.listen.tcp.0.0.0.0:{tcp_port}"]
        assert tcp.severity == "high" and tcp.detail["user"] == "root"
        assert tcp.detail["contained"] is False
        assert [p["pid"] for p in tcp.detail["processes"]] == [pid]
        udp = found[f"host.listen.udp.127.0.0.1:{udp_port}"]
        assert udp.severity == "low" and udp.detail["uid"] == 65534
        assert len(found) == 2                     # the namespace holds nothing else

        assert not audit_net.firewall_state(net_pid=pid)["input_default_deny"]
        # The CLI in the same namespace: listeners, planted files, an open firewall.
        planted.mkdir()
        shutil.copy2("/usr/bin/true", planted / "sharp")
        os.chmod(planted / "sharp", 0o4755)
        result = audit_cli("--host", "--root", str(planted), "--json", "--time-limit", "60",
                           netns=netns)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        found_ids = ids(report["host"]["findings"])
        assert {f"host.listen.tcp.0.0.0.0:{tcp_port}", f"host.listen.udp.127.0.0.1:{udp_port}",
                f"host.setuid.{planted}/sharp", "host.firewall.input"} <= found_ids
        assert report["host"]["walk"]["entries"] == 1
        assert audit_cli("--host", "--root", str(planted), "--json", "--fail-under", "0",
                         netns=netns).returncode == 3              # high findings remain
        # A default-deny input chain closes the firewall finding.
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], check=True, text=True,
                       input="table inet t {\n chain input {\n"
                             "  type filter hook input priority 0; policy drop;\n }\n}\n")
        state = audit_net.firewall_state(net_pid=pid)
        assert state["input_default_deny"] and not state["output_default_deny"]
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(planted, ignore_errors=True)


# -- images ----------------------------------------------------------------------------------------

def test_resolve_in_image():
    links = {"/bin": "usr/bin", "/usr/bin/gcc": "gcc-12", "/usr/bin/sh": "/bin/dash",
             "/loop": "/loop"}
    assert resolve_in("/bin/gcc", links) == "/usr/bin/gcc-12"
    assert resolve_in("/usr/bin/sh", links) == "/usr/bin/dash"
    assert resolve_in("/loop/x", links).endswith("/x")             # loops end, no hang


def test_image_findings_on_paper():
    entries = {"/usr": Entry("dir", 0o755), "/usr/bin": Entry("dir", 0o755),
               "/bin": Entry("symlink", 0o777, target="usr/bin"),
               "/usr/bin/python3.11": Entry("file", 0o755),
               "/usr/bin/python3": Entry("symlink", 0o777, target="python3.11"),
               "/usr/bin/perl": Entry("file", 0o755), "/usr/bin/dash": Entry("file", 0o755),
               "/usr/bin/sh": Entry("symlink", 0o777, target="dash"),
               "/usr/bin/helper": Entry("file", 0o755),        # an innocent name...
               "/usr/bin/nc": Entry("symlink", 0o777, target="helper"),  # ...called as nc
               "/tmp": Entry("dir", 0o1777), "/data": Entry("dir", 0o777),
               "/dev/mem": Entry("chardev", 0o640), "/usr/bin/su": Entry("file", 0o4755)}
    found = {f.id: f for f in image_findings(entries, ["/usr/bin/python3"], used=None)}
    assert set(found) == {"image.interpreter./usr/bin/perl", "image.shell./usr/bin/dash",
                          "image.network-tool./usr/bin/helper", "image.world-writable-dir./data",
                          "image.device./dev/mem", "image.setuid./usr/bin/su", "image.learn"}
    used = ["/usr/bin/python3", "/usr/bin/perl"]
    unused = {f.id: f for f in image_findings(entries, ["/usr/bin/python3"], used)}["image.unused"]
    assert ("/usr/bin/dash" in unused.detail["paths"]
            and "/usr/bin/perl" not in unused.detail["paths"])


def _careless_manifest(directory: Path, name: str) -> Path:
    return write_manifest(directory, name, f"""
[image]
include = ["/usr/bin/python3.11", "/usr/lib/python3.11", "/usr/bin/gcc", "/bin/bash",
           "/usr/bin/perl"]
add = {{ "/opt/notes/notes.py" = "{NOTES_PY}" }}
delta = "disk"
[[volume]]
path = "/srv/notes"
owner = "app"
mode = "0755"
[process.app]
command = ["/usr/bin/python3.11", "-I", "/opt/notes/notes.py", "8080"]
capabilities = ["NET_ADMIN", "DAC_OVERRIDE"]
listen = ["tcp/8080"]
connect = ["tcp/1-65535"]
limits = {{ memory = "64G", pids = 100000 }}
[watch]
react = "log"
tripwires = ["egress"]
""")


@root
@pytest.mark.skipif(not (os.path.exists("/usr/bin/gcc") and os.path.exists("/usr/bin/perl")),
                    reason="needs gcc and perl on the host to copy into an image")
def test_image_audit_and_scores_of_installed_services(tmp_path, corral_root, netns,
                                                      service_name):
    clean_name = "tst" + secrets.token_hex(3)
    careless = _careless_manifest(tmp_path, service_name)
    clean = notes_manifest(tmp_path, clean_name)
    try:
        corral("install", str(careless), netns=netns, check=True)
        corral("install", str(clean), netns=netns, check=True)

        result = audit_cli("--image", service_name, "--json", netns=netns)
        assert result.returncode == 0, result.stderr
        image = {f["id"]: f for f in json.loads(result.stdout)["image"]["findings"]}
        assert "image.shell./usr/bin/bash" in image
        compiler = [f for i, f in image.items() if i.startswith("image.compiler.")]
        assert compiler and "/usr/bin/gcc" in compiler[0]["detail"]["names"]
        assert compiler[0]["severity"] == "high"
        assert "image.interpreter./usr/bin/perl" in image
        assert not any("python3" in i for i in image)              # what the process runs
        assert "image.learn" in image                              # "no learn data"
        clean_image = json.loads(audit_cli("--image", clean_name, "--json",
                                           netns=netns).stdout)["image"]["findings"]
        assert ids(clean_image) == {"image.learn"}

        # Plant what install never leaves in a base: a setuid file and a device node.
        base = json.loads((corral_root / "var/lib/corral" / service_name / "runtime.json")
                          .read_text())["base_version"]
        base_root = corral_root / "var/lib/corral" / service_name / "base" / str(base) / "root"
        shutil.copy2("/usr/bin/true", base_root / "usr/bin/planted")
        os.chmod(base_root / "usr/bin/planted", 0o4755)
        os.mknod(base_root / "dev/mem", 0o600 | stat.S_IFCHR, os.makedev(1, 1))
        (corral_root / "var/lib/corral" / service_name / "learn.json").write_text(
            json.dumps({"app": {"used": ["/usr/bin/python3.11", "/opt/notes/notes.py"]}}))
        result = audit_cli("--image", service_name, "--json", "--fail-under", "0", netns=netns)
        assert result.returncode == 3                              # high findings
        image = ids(json.loads(result.stdout)["image"]["findings"])
        assert {"image.setuid./usr/bin/planted", "image.device./dev/mem",
                "image.unused"} <= image and "image.learn" not in image

        scores = {}
        for name in (service_name, clean_name):
            result = audit_cli(name, "--json", netns=netns)
            assert result.returncode == 0, result.stderr
            scores[name] = json.loads(result.stdout)["services"][0]
        assert scores[clean_name]["score"] > scores[service_name]["score"]
        checks = {c["id"]: c for c in scores[service_name]["checks"]}
        assert checks["image.minimal"]["status"] == "fail"
        assert checks["egress.allowlist"]["status"] == "fail"     # connect without address
        assert checks["watch.react"]["status"] == "fail"
        assert scores[service_name]["notes"] == []                # the manifest was matched
        middle = (scores[clean_name]["score"] + scores[service_name]["score"]) // 2
        assert audit_cli(service_name, "--fail-under", str(middle), netns=netns).returncode == 3
        assert audit_cli(clean_name, "--fail-under", str(middle), netns=netns).returncode == 0
        every = json.loads(audit_cli("--json", netns=netns).stdout)["services"]
        assert {s["service"] for s in every} == {service_name, clean_name}
        text = audit_cli(netns=netns).stdout                      # for people: a summary
        assert re.search(rf"^{clean_name}\s+{scores[clean_name]['score']}\s", text, re.M)
        text = audit_cli(service_name, "--image", service_name, netns=netns).stdout
        assert f"image of {service_name}: " in text and "/usr/bin/bash" in text
        assert re.search(r"^  image\.minimal\s+10\s+fail\s", text, re.M)
        assert audit_cli("tstnosuch", netns=netns).returncode == 2
    finally:
        for name in (service_name, clean_name):
            corral("uninstall", name, "--purge", netns=netns)
        remove_test_users(clean_name)  # the fixture removes service_name's


# -- the score -------------------------------------------------------------------------------------

def test_egress_exposure_orders_by_width():
    widths = ["tcp/443@127.0.0.1/32", "tcp/443@10.0.0.5/32", "tcp/443@10.0.0.0/24",
              "tcp/443@10.0.0.0/8", "tcp/443", "tcp/1-65535"]
    exposures = [_endpoint_exposure(w) for w in widths]
    assert exposures == sorted(exposures) and exposures[0] == 0 and exposures[-1] == 1


def _score(*args: str) -> dict:
    result = audit_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"][0]


@pytest.mark.skipif(not os.path.exists("/usr/bin/gcc"), reason="needs gcc on the host")
def test_score_of_manifests_and_policy(tmp_path):
    contained = _score(str(DATA / "contained.toml"))
    careless = _score(str(DATA / "careless.toml"))
    assert contained["score"] > careless["score"]
    for result in (contained, careless):                     # the points lost add up
        lost = sum(c["lost"] for c in result["checks"])
        assert abs(100 - lost - result["score"]) <= 1
    policy = tmp_path / "policy.toml"
    policy.write_text('skip = ["watch.react", "host.firewall"]\nignore = ["image.learn"]\n'
                      '[weights]\n"image.minimal" = 0\n"caps.dangerous" = 50\n')
    weighted = _score(str(DATA / "careless.toml"), "--policy", str(policy))
    checks = {c["id"]: c for c in weighted["checks"]}
    assert checks["watch.react"]["status"] == "skipped"
    assert checks["caps.dangerous"]["weight"] == 50
    assert weighted["score"] != careless["score"]
    policy.write_text('[weights]\nnope = 1\n[severity]\n"host.*" = "critical"\n')
    result = audit_cli(str(DATA / "careless.toml"), "--policy", str(policy))
    assert result.returncode == 2
    assert f"{policy}: weights.nope: unknown check" in result.stderr
    assert f'{policy}: severity."host.*": expected one of' in result.stderr


def _systemd_exposure(unit: Path) -> float | None:
    try:
        result = subprocess.run(["systemd-analyze", "security", "--offline=true", unit.name],
                                cwd=unit.parent, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    return float(match.group(1)) if match else None


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.skipif(not os.path.exists("/usr/bin/gcc"), reason="needs gcc on the host")
def test_systemd_analyze_agrees_on_the_order(tmp_path):
    units = {}
    for name in ("contained", "careless"):
        shutil.copy(DATA / f"{name}.service", tmp_path)
        units[name] = _systemd_exposure(tmp_path / f"{name}.service")
    if None in units.values():
        pytest.skip("systemd-analyze security --offline=true does not work here")
    ours = {name: _score(str(DATA / f"{name}.toml"))["score"] for name in units}
    # systemd: exposure 0 (safe) .. 10 (unsafe); corral: score 0 .. 100 (contained).
    assert units["contained"] < units["careless"]
    assert ours["contained"] > ours["careless"]
