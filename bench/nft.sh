#!/usr/bin/env bash
# `bash bench/nft.sh [--json] [--samples N] [--seconds S] [--sizes ...] [--iptables nft|legacy|both|none]`:
# connection rate through corral's per-service nftables table with 10, 1,000 and 100,000
# allow-list entries, against a linear iptables chain (see bench/nft_rate.py and bench/nft.md).
# As root. Installs what it needs (Debian packages only when one is missing, the venv through
# `make venv`). Progress goes to stderr, results to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench: must run as root (network namespaces, users, nftables)" >&2
  exit 1
fi

packages="gcc libc6-dev iproute2 util-linux nftables iptables passwd"
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

exec .venv/bin/python bench/nft_rate.py "$@"
