#!/usr/bin/env bash
# `make demo`: corral's main job on the sample "notes" service, step by step, for real.
# It runs in its own network namespace and state directory (.demo/), so the host's firewall and
# /var/lib stay as they are; the users it creates are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
CORRAL=.venv/bin/corral
MANIFEST=examples/notes/notes.toml
NETNS=corral-demo
export CORRAL_ROOT="$PWD/.demo"

bold() { if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi; }
# Only the network namespace: `ip netns exec` would also remount /sys and hide the cgroups.
in_ns() { nsenter --net="/run/netns/$NETNS" "$@"; }

cleanup() {
  in_ns "$CORRAL" uninstall notes --purge >/dev/null 2>&1 || true
  ip netns del "$NETNS" 2>/dev/null || true
}
cleanup  # a previous run that was interrupted leaves nothing behind either
trap cleanup EXIT
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
# A route out, so that packets to other hosts reach the firewall instead of "unreachable".
ip -n "$NETNS" link add corral-demo0 type veth peer name corral-demo1
ip -n "$NETNS" link set corral-demo1 up
ip -n "$NETNS" addr add 192.0.2.1/24 dev corral-demo0
ip -n "$NETNS" link set corral-demo0 up

bold "1. The vendor's containment section: $MANIFEST"
sed -n '1,40p' "$MANIFEST"

bold "2. corral check: the manifest is valid (silence means yes)"
$CORRAL check "$MANIFEST" && echo "ok"
bold "   ...and a broken one is refused with the key and the reason (exit 2)"
broken=$(mktemp --suffix=.toml)
sed -e 's|connect = \[\]|connect = ["tcp/99999@10.0.0.5", "udp/53@dns.example"]|' \
    -e 's|owner = "app"|owner = "db"|' "$MANIFEST" > "$broken"
$CORRAL check "$broken" || echo "(exit $?)"
rm -f "$broken"

bold "3. corral plan: users, base image (ELF closure, nothing executed), firewall, sandbox"
$CORRAL plan "$MANIFEST"

bold "4. corral install: users, base image, volume, nftables table (one transaction)"
cp /etc/passwd /tmp/corral-demo-passwd.before
in_ns "$CORRAL" install "$MANIFEST"
bold "   installed again: idempotent"
in_ns "$CORRAL" install "$MANIFEST"
getent passwd corral-notes-app
bold "   the base has no sharp objects: no shell, no other programs"
ls "$CORRAL_ROOT/var/lib/corral/notes/base/1/root/usr/bin/"
bold "   the service's own table (per-user egress, declared listens, anti-spoofing)"
in_ns nft list table inet corral-notes

bold "5. corral up: the service runs contained (own user, minimal root, no capabilities)"
in_ns "$CORRAL" up "$MANIFEST"
in_ns "$CORRAL" status notes
bold "   it serves requests, and keeps its notes on its volume"
in_ns python3 - <<'PY'
import urllib.request as u
print(u.urlopen(u.Request("http://127.0.0.1:8080/notes", data=b"hello from the demo"), timeout=5).read().decode().strip())
print(u.urlopen("http://127.0.0.1:8080/notes", timeout=5).read().decode().strip())
PY

bold "6. An attacker who owns the service tries to break out (corral exec runs their code inside)"
# A database only the host may reach, on loopback: the contained service must not get to it.
in_ns python3 -c 'import socket,time; s=socket.socket(); s.bind(("127.0.0.1", 5432)); s.listen(); time.sleep(60)' &
db=$!
sleep 0.3
in_ns "$CORRAL" exec notes app -- /usr/bin/python3.11 -I -c '
import ctypes, os, socket
def attempt(what, fn):
    try:
        result = fn()
        print(f"  ESCAPED   {what}: {result}")
    except OSError as exc:
        print(f"  contained {what}: {exc.strerror}")
print(f"  running as uid {os.getuid()}, pid {os.getpid()} in its own PID namespace")
attempt("read /etc/shadow", lambda: open("/etc/shadow").read())
attempt("run a shell", lambda: os.execv("/bin/sh", ["sh"]))
attempt("trojan the base: write /usr/bin/python3.11", lambda: open("/usr/bin/python3.11", "ab"))
attempt("see host processes", lambda: [p for p in os.listdir("/proc") if p.isdigit() and p not in ("1", str(os.getpid()))] or (_ for _ in ()).throw(OSError(3, "only its own PID namespace is visible")))
attempt("learn the host'"'"'s paths from its mount table", lambda: [l.split()[3] for l in open("/proc/self/mountinfo") if "/var/lib/corral" in l] or (_ for _ in ()).throw(OSError(2, "no host path in /proc/self/mountinfo")))
import sys; sys.stdout.flush()
# Last: Landlock refuses the connect before any packet exists, and its audit record is an
# egress incident; react = revert kills this session, so nothing after it would print.
attempt("reach the host-only database on 127.0.0.1:5432", lambda: socket.create_connection(("127.0.0.1", 5432), timeout=2))
' || true
kill $db 2>/dev/null || true
bold "   even a refused connect is an incident (Landlock's audit record): the watcher reverted"
for _ in $(seq 50); do  # back from the clean base
  in_ns "$CORRAL" status notes --json | grep -q '"reverts": 1' && \
    in_ns "$CORRAL" status notes --json | grep -q '"state": "running"' && break
  sleep 0.1
done
in_ns "$CORRAL" incidents notes

bold "7. The worm: it drops a copy of itself and tries to spread. The watcher pulls the plug"
in_ns "$CORRAL" exec notes app -- /usr/bin/python3.11 -u -I -c '
import socket, time
open("/tmp/worm.py", "w").write("# the worm")
print("  worm: dropped /tmp/worm.py; spreading to 192.0.2.10:161 over UDP...")
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"infect", ("192.0.2.10", 161))
except OSError as exc:
    print(f"  worm: {exc.strerror}")
time.sleep(5)
print("  worm: still alive?!")
' || true
sleep 0.5
in_ns "$CORRAL" incidents notes
bold "   back from the clean base: the worm's file is gone (archived), the notes are kept"
in_ns "$CORRAL" status notes
in_ns "$CORRAL" delta notes
in_ns python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:8080/notes", timeout=5).read().decode().strip())'

bold "   corral graph: the service, its user, volume and flows, with the incident in red"
in_ns "$CORRAL" graph notes --format svg --out "$CORRAL_ROOT/notes-graph.svg"

bold "8. Running anything but the declared program trips the exec wire (even through ld.so)"
in_ns "$CORRAL" exec notes app -- /usr/bin/python3.11 -I -c '
import os, shutil
shutil.copy("/usr/bin/python3.11", "/tmp/tool")
try:
    os.execv("/lib64/ld-linux-x86-64.so.2", ["ld.so", "/tmp/tool"])
except OSError as exc:
    print(f"  exec refused: {exc.strerror}")
' || true
sleep 0.5
in_ns "$CORRAL" incidents notes | tail -1
bold "   corral verify: the base on disk is intact"
in_ns "$CORRAL" verify notes
bold "   and a manual revert, for good measure (the archive keeps the delta for forensics)"
in_ns "$CORRAL" revert notes --reason "demo"

bold "   A flood: writing until the disk is full ends at the delta's own size (32M), not the host's"
in_ns "$CORRAL" exec notes app -- /usr/bin/python3.11 -I -c '
written = 0
try:
    with open("/tmp/flood", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
            f.flush()
            written += 1
except OSError as exc:
    print(f"  flood: stopped after {written} MiB: {exc.strerror}")
' || true
for _ in $(seq 50); do in_ns "$CORRAL" incidents notes | tail -1 | grep -q flood && break; sleep 0.1; done
in_ns "$CORRAL" incidents notes | tail -1
for _ in $(seq 50); do in_ns python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:8080/health", timeout=1)' 2>/dev/null && break; sleep 0.1; done

bold "9. The redo log: an attack in the MIDDLE of the volume's history, dug out"
post() { in_ns python3 -c 'import sys, urllib.request as u; u.urlopen(u.Request("http://127.0.0.1:8080/notes", data=sys.argv[1].encode()), timeout=5).read()' "$1"; }
post "good note before the attack"
echo "  closed epoch $(in_ns "$CORRAL" state mark notes --note "good so far")"
echo "  the attacker corrupts the notes and plants a backdoor in the volume, then is caught:"
in_ns "$CORRAL" exec notes app -- /usr/bin/python3.11 -u -I -c '
import socket, time
open("/srv/notes/notes.jsonl", "a").write("{\"text\": \"CORRUPTED BY THE ATTACKER\"}\n")
open("/srv/notes/backdoor.py", "w").write("# the attacker was here")
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("192.0.2.10", 4444))
except OSError as exc:
    print(f"  attacker: {exc.strerror}")
time.sleep(5)
' || true
sleep 0.5
post "good note after the attack"
echo "  closed epoch $(in_ns "$CORRAL" state mark notes --note "more good work")"
in_ns "$CORRAL" state log notes
bad=$(in_ns "$CORRAL" state log notes --json | python3 -c 'import json, sys; epochs = json.load(sys.stdin)["volumes"][0]["epochs"]; print([e["id"] for e in epochs if e.get("incidents")][-1])')
bold "   excise epoch $bad (the attack's stretch) while the service runs: a dry run first"
in_ns "$CORRAL" state excise notes --from "$bad" --to "$bad" --dry-run
bold "   then for real: frozen, excised line by line, restarted; later good work is kept"
in_ns "$CORRAL" state excise notes --from "$bad" --to "$bad"
ls "$CORRAL_ROOT/var/lib/corral/notes/volumes/srv-notes/"
for _ in $(seq 50); do in_ns python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:8080/notes", timeout=1)' 2>/dev/null && break; sleep 0.1; done
in_ns python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:8080/notes", timeout=5).read().decode().strip())'
in_ns "$CORRAL" state check notes

bold "10. After corral down: no process, delta, mount or cgroup is left; the volume stays"
in_ns "$CORRAL" down notes
in_ns "$CORRAL" status notes

bold "11. corral uninstall --purge: the host is as it was"
in_ns "$CORRAL" uninstall notes --purge
cmp /etc/passwd /tmp/corral-demo-passwd.before && echo "/etc/passwd byte-identical"
rm -f /tmp/corral-demo-passwd.before
if in_ns nft list tables | grep -q corral-; then echo "a corral table is left!"; exit 1; else echo "no corral table left"; fi
