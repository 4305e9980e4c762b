"""The host on a clean base, proven by booting it (`make boot-test`; minutes, so not part of
`make test`): a real Debian image built by `corral host image build`, booted in qemu from its
own kernel and initramfs, driven through the serial console.

Set CORRAL_BOOT_STORE=DIR to boot an image already built there instead of building one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hostvm import PROMPT, Guest, make_disk

HERE = Path(__file__).parent
HOST = HERE / "hostimage/host.toml"
CORRAL = shutil.which("corral") or str(Path(os.sys.executable).parent / "corral")
BENCH = HERE.parent / "bench/host-image.md"

pytestmark = pytest.mark.skipif(os.environ.get("CORRAL_BOOT_TEST") != "1",
                                reason="the boot test runs with `make boot-test`")


def _build(store: Path) -> dict:
    given = os.environ.get("CORRAL_BOOT_STORE")
    if given:
        store = Path(given)
    else:
        done = subprocess.run([CORRAL, "host", "image", "build", str(HOST), "--store",
                               str(store), "--json"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    listing = json.loads(subprocess.run([CORRAL, "host", "image", "list", "--store", str(store),
                                         "--json"], capture_output=True, text=True,
                                        check=True).stdout)
    image = listing["images"][-1] | {"store": store}
    meta = json.loads((store / str(image["version"]) / "image.json").read_text())
    return image | {"meta": meta}


class NoPrompt(AssertionError):
    pass


def _boot(guest: Guest) -> float:
    try:
        guest.expect(PROMPT, 300)
    except AssertionError as err:
        raise NoPrompt(str(err)) from None
    guest.send("stty -echo; export TERM=dumb PS1='root@corral-host:# '")
    guest.expect(PROMPT, 30)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        rc, out = guest.sh("cat /run/corral-host/services-ready")
        if rc == 0:
            return float(out.split()[1])
        time.sleep(1)
    rc, out = guest.sh("systemctl status corral-host-firewall corral-services --no-pager; "
                       "journalctl -b -u corral-host-firewall -u corral-services --no-pager "
                       "| tail -40")
    raise AssertionError("services not ready after 600 s:\n" + out)


def _start(vdir: Path, disk: Path, log: Path, timings: dict, which: str) -> tuple[Guest, float]:
    """Boot the guest and wait for its services. A boot that never reaches the login prompt
    is tried once more and the retry is reported: under TCG a guest has been seen (once, in
    CI) to fall silent after starting its services, with no kernel message; the console's
    tail of both tries is in the failure message so the next one can be diagnosed."""
    for attempt in (1, 2):
        guest = Guest(vdir / "vmlinuz", vdir / "initrd.img", disk, log)
        try:
            return guest, _boot(guest)
        except AssertionError as err:
            tail = guest.tail()
            guest.close()
            if attempt == 2 or not isinstance(err, NoPrompt):
                raise AssertionError(f"{err}\nconsole tail:\n{tail}") from None
            timings[f"{which}: retried after a boot with no login prompt"] = "yes"
            print(f"{which}: no login prompt, booting again; console tail:\n{tail}")
    raise AssertionError("unreachable")


def test_boot_read_only_root_ram_delta_revert_by_reboot(tmp_path: Path) -> None:
    image = _build(tmp_path / "store")
    vdir = image["store"] / str(image["version"])
    content = tmp_path / "disk"
    (content / "images" / str(image["version"])).mkdir(parents=True)
    for name in ("root.squashfs", "image.json", "integrity.json", "vmlinuz", "initrd.img"):
        shutil.copy2(vdir / name, content / "images" / str(image["version"]) / name)
    (content / "images/current").write_text(f"{image['version']}\n")
    disk = tmp_path / "persist.img"
    make_disk(disk, content)
    log = tmp_path / "console.log"
    timings = {}

    guest, ready = _start(vdir, disk, log, timings, "first boot")
    try:
        timings["first boot: kernel start to service ready (guest uptime)"] = ready
        timings["first boot: qemu start to service ready (host clock)"] = round(
            time.monotonic() - guest.started, 1)
        # The image is mounted read-only; / is an overlay whose upper layer is RAM.
        rc, out = guest.sh("findmnt -n -o FSTYPE,OPTIONS /run/corral-host/image")
        assert rc == 0 and out.startswith("squashfs") and "ro," in out, out
        rc, out = guest.sh("touch /run/corral-host/image/usr/x 2>&1")
        assert rc != 0 and "Read-only file system" in out, out
        rc, out = guest.sh("findmnt -n -o FSTYPE /; findmnt -n -o FSTYPE /run/corral-host/delta")
        assert out.split() == ["overlay", "tmpfs"], out
        # The host filter went in while no interface but lo was up, and it is there.
        rc, out = guest.sh("cat /run/corral-host/firewall-applied")
        links = [ln for ln in out.splitlines() if re.match(r"\d+: ", ln)]
        assert links and all(" lo:" in ln or "UP" not in ln.split(">")[0] for ln in links), out
        assert not [ln for ln in out.splitlines() if " inet " in ln and " lo " not in ln], out
        rc, out = guest.sh("nft list chain inet corral-host input | head -3")
        assert rc == 0 and "policy drop" in out, out
        rc, out = guest.sh("ip -o -4 addr show | grep -v ' lo '")
        assert rc == 0 and "inet 10.0.2." in out, "the network came up after the filter: " + out
        # The sample service runs contained and answers; a note goes to its volume.
        rc, out = guest.sh("python3 -c \"import urllib.request as u; print(u.urlopen("
                           "'http://127.0.0.1:8080/health').read().decode())\"")
        assert rc == 0 and "ok" in out, out
        rc, out = guest.sh("python3 -c \"import urllib.request as u; u.urlopen(u.Request("
                           "'http://127.0.0.1:8080/notes', data=b'kept across reboots'))\"")
        assert rc == 0, out
        rc, out = guest.sh("corral status notes --json | python3 -c 'import json,sys; "
                           "d=json.load(sys.stdin); print(json.dumps(d))'")
        assert rc == 0, out
        status = json.loads(out.strip().splitlines()[-1])
        assert "corral-notes-app" in json.dumps(status), status
        # Writes under /usr and /etc go to the RAM delta, and corral host delta sees them.
        rc, out = guest.sh("echo planted > /usr/local/bin/planted && chmod +x "
                           "/usr/local/bin/planted && echo x >> /etc/planted.conf && "
                           "echo kept > /var/log/kept-by-test && sync")
        assert rc == 0, out
        rc, out = guest.sh("corral host delta --json > /tmp/d.json; python3 -c 'import json; "
                           "d=json.load(open(\"/tmp/d.json\")); print(sorted(c[\"path\"] for c in "
                           "d[\"changes\"] if \"planted\" in c[\"path\"]), d[\"base_writes\"])'")
        assert rc == 0 and "/usr/local/bin/planted" in out and "/etc/planted.conf" in out, out
        rc, out = guest.sh("corral host image verify", timeout=300)
        assert rc == 0 and ": ok" in out, out
        guest.send("systemctl reboot")
        assert guest.wait_exit(180) == 0
    finally:
        guest.close()

    guest, ready = _start(vdir, disk, log, timings, "second boot")
    try:
        timings["second boot: kernel start to service ready (guest uptime)"] = ready
        rc, out = guest.sh("ls /usr/local/bin/planted /etc/planted.conf 2>&1")
        assert rc != 0 and out.count("No such file") == 2, out
        rc, out = guest.sh("cat /var/log/kept-by-test")
        assert rc == 0 and "kept" in out, out
        rc, out = guest.sh("python3 -c \"import urllib.request as u; print(u.urlopen("
                           "'http://127.0.0.1:8080/notes').read().decode())\"")
        assert rc == 0 and "kept across reboots" in out, out
        guest.send("systemctl poweroff")
        guest.wait_exit(180)
    finally:
        guest.close()
    _report(image["meta"], timings)


def _report(meta: dict, timings: dict) -> None:
    lines = ["# The host image boot (`make boot-test`)", "",
             "Measured by tests/test_hostimage_boot.py on the last run of `make boot-test`: "
             "qemu under TCG (`-cpu qemu64`; KVM hangs here, tests/hostvm.py), 2 vCPUs, "
             "1 GiB, the image's own kernel and initramfs, the notes sample service.", "",
             "| what | value |", "|---|---|",
             f"| image (squashfs, zstd) | {meta['size'] / (1 << 20):.1f} MiB |",
             f"| entries in the root | {meta['entries']} |",
             f"| kernel | {meta['kernel']} |",
             f"| build time | {meta['build_seconds']} s |"]
    lines += [f"| {k} | {v}{'' if isinstance(v, str) else ' s'} |" for k, v in timings.items()]
    BENCH.write_text("\n".join(lines) + "\n")
