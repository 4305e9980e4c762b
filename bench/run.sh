#!/usr/bin/env bash
# `make bench` / `bash bench/run.sh [--json] [--quick] [--no-disk] [--repeats N] ...`:
# corral's start-up and run-time costs on this machine, against bwrap and firejail.
# As root. Installs what it needs (Debian packages only when one is missing, the venv through
# `make venv`); every option is passed to bench/runtime.py (see `bash bench/run.sh --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench: must run as root (corral run, network namespaces, mounts)" >&2
  exit 1
fi

# Installed only when one is missing, so a second run needs no network (like `make system`).
# Progress goes to stderr, so `--json` output on stdout stays one JSON document.
packages="bubblewrap firejail gcc libc6-dev iproute2 util-linux"
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

exec .venv/bin/python bench/runtime.py "$@"
