#!/usr/bin/env bash
# `bash bench/recover.sh [--json] [--quick] [--rounds N] [--out FILE]`: how fast corral brings
# the sample service back with `corral revert` (against a plain down + up), and how fast
# `corral delta` + `corral verify` report a tampered service (against `aide --check`); see
# bench/recover_time.py and bench/recover.md. As root. Installs what it needs (Debian packages
# only when one is missing, the venv through `make venv`). Results: a table on stdout (or one
# JSON document with --json) and /tmp/corral-bench-results/recover.json.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench: must run as root (users, network namespaces, nftables, mounts)" >&2
  exit 1
fi

packages="aide nftables iproute2 util-linux passwd"
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

exec .venv/bin/python bench/recover_time.py "$@"
