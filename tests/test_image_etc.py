"""The basics of /etc in every closure image: a stock libc resolves localhost and its own host
name from /etc/hosts, never by a DNS packet (which the egress tripwire would report), and
resolvers are declared in the manifest."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import CORRAL, Service, corral, in_netns, write_manifest

pytestmark = pytest.mark.root

RESOLVE = ("import socket; a = socket.getaddrinfo('localhost', 80); f = socket.getfqdn(); "
           "print(sorted({x[4][0] for x in a}), f, open('/etc/nsswitch.conf').read().split())")


def incidents(svc: Service) -> list[dict]:
    return json.loads(svc.corral("incidents", svc.name, "--json", check=True).stdout)["incidents"]


def egress_drops(svc: Service) -> int:
    out = subprocess.run(in_netns(svc.netns) + ["nft", "-j", "list", "table", "inet",
                                                f"corral-{svc.name}"],
                         capture_output=True, text=True, check=True).stdout
    return sum(item["counter"]["packets"] for item in json.loads(out)["nftables"]
               if "counter" in item and item["counter"]["name"] == "egress")


@pytest.fixture
def python_service(tmp_path, service_name, start_service):
    """A stock `python3 -m http.server` contained, default tripwires, react = revert."""

    def start(top: str = "") -> Service:
        manifest = write_manifest(tmp_path, service_name, f"""{top}
[image]
include = ["/usr/bin/python3.11", "/usr/lib/python3.11"]
[process.app]
command = ["/usr/bin/python3.11", "-m", "http.server", "8080", "--directory", "/tmp"]
listen = ["tcp/8080"]
environment = {{ LANG = "C.UTF-8" }}
""")
        return start_service(manifest)

    return start


def test_localhost_and_the_own_name_resolve_without_dns(python_service):
    svc = python_service()
    code = subprocess.run(in_netns(svc.netns) + CORRAL + [
        "exec", svc.name, "app", "--", "/usr/bin/python3.11", "-I", "-c", RESOLVE],
        capture_output=True, text=True, timeout=60)
    assert code.returncode == 0, code.stderr
    addresses, fqdn, _ = code.stdout.split(" ", 2)
    assert addresses == "['127.0.0.1']" and fqdn == svc.name  # getfqdn(): the hostname
    assert "'hosts:', 'files', 'networks:'" in code.stdout  # no dns: nothing declared
    time.sleep(1.0)
    assert incidents(svc) == [] and egress_drops(svc) == 0
    # The stock server (its bind calls getfqdn too) serves and stays up, with zero incidents.
    body = subprocess.run(in_netns(svc.netns) + ["python3", "-c", (
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/', timeout=5)"
        ".status)")], capture_output=True, text=True, timeout=30)
    assert body.stdout.strip() == "200", body.stderr
    status = svc.status()
    assert status["state"] == "running" and status["reverts"] == 0
    assert incidents(svc) == []


def test_the_image_carries_hosts_nsswitch_locale_and_zone(tmp_path, corral_root, netns,
                                                          service_name):
    manifest = write_manifest(tmp_path, service_name, """resolvers = ["192.0.2.53", "2001:db8::53"]
[image]
include = ["/usr/bin/true"]
[process.app]
command = ["/usr/bin/true"]
environment = { LC_ALL = "C.UTF-8" }
""")
    plan = json.loads(corral("plan", str(manifest), "--json", check=True).stdout)
    generated = plan["image"]["generated"]
    assert generated["/etc/resolv.conf"] == "nameserver 192.0.2.53\nnameserver 2001:db8::53\n"
    assert "hosts:      files dns\n" in generated["/etc/nsswitch.conf"]
    assert f"127.0.1.1\t{service_name}\n" in generated["/etc/hosts"]
    rules = json.dumps(plan["nftables"])
    assert "192.0.2.53" in rules and "2001:db8::53" in rules
    assert plan["sandbox"][0]["landlock"]["tcp_connect"] == [53]
    try:
        corral("install", str(manifest), netns=netns, check=True)
        root = corral_root / "var/lib/corral" / service_name / "base/1/root"
        assert (root / "etc/resolv.conf").read_text().startswith("nameserver 192.0.2.53")
        assert (root / "usr/lib/locale/C.utf8/LC_CTYPE").is_file()
        host_zone = open("/etc/localtime", "rb").read()
        assert (root / "etc/localtime").read_bytes() == host_zone
    finally:
        corral("uninstall", service_name, "--purge", netns=netns)


def test_no_resolvers_no_resolv_conf_no_locale_unless_asked(tmp_path, corral_root):
    manifest = write_manifest(tmp_path, "tstetc", """
[image]
include = ["/usr/bin/true"]
[process.app]
command = ["/usr/bin/true"]
""")
    plan = json.loads(corral("plan", str(manifest), "--json", check=True).stdout)
    assert "/etc/resolv.conf" not in plan["image"]["generated"]
    assert "hosts:      files\n" in plan["image"]["generated"]["/etc/nsswitch.conf"]
    assert not any(e["path"].startswith("/usr/lib/locale") for e in plan["image"]["entries"])


def test_a_resolver_must_be_an_address(tmp_path, corral_root):
    manifest = write_manifest(tmp_path, "tstetc", """resolvers = ["dns.example"]
[process.app]
command = ["/usr/bin/true"]
""")
    result = corral("check", str(manifest))
    assert result.returncode == 2
    assert result.stderr.strip() == (f'{manifest}: resolvers[0]: "dns.example": not an IP '
                                     "address (a resolver is never a host name)")
