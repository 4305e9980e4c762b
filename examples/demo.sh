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
in_ns() { ip netns exec "$NETNS" "$@"; }

cleanup() {
  in_ns "$CORRAL" uninstall notes --purge >/dev/null 2>&1 || true
  ip netns del "$NETNS" 2>/dev/null || true
}
cleanup  # a previous run that was interrupted leaves nothing behind either
trap cleanup EXIT
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up

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

bold "5. corral uninstall --purge: the host is as it was"
in_ns "$CORRAL" uninstall notes --purge
cmp /etc/passwd /tmp/corral-demo-passwd.before && echo "/etc/passwd byte-identical"
rm -f /tmp/corral-demo-passwd.before
if in_ns nft list tables | grep -q corral-; then echo "a corral table is left!"; exit 1; else echo "no corral table left"; fi
