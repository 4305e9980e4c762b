#!/usr/bin/env bash
# `bash bench/watch.sh [--json] [--quick] [--samples N] [--f2b-samples N] [--modes revert,log]
# [--kinds egress,exec,base-write] [--no-f2b] [--out FILE]`: corral's violation-to-containment
# latency per kind of violation, against fail2ban fed the same event as a log line
# (see bench/watch_latency.py and bench/watch.md). As root. Installs what it needs (Debian
# packages only when one is missing, the venv through `make venv`). Results: a table on stdout
# (or one JSON document with --json) and /tmp/corral-bench-results/watch.json.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench: must run as root (users, network namespaces, nftables, mounts)" >&2
  exit 1
fi

# python3-pyinotify gives fail2ban its fastest log backend (inotify instead of polling).
packages="fail2ban python3-pyinotify nftables iproute2 util-linux passwd"
missing=$(for p in $packages; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
done)
if [ -n "$missing" ]; then
  echo "bench: installing Debian packages:" $missing >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y --no-install-recommends $missing ||
    { apt-get update && apt-get install -y --no-install-recommends $missing; }; } >&2
fi
make --no-print-directory -s venv >&2

exec .venv/bin/python bench/watch_latency.py "$@"
