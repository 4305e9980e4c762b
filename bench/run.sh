#!/usr/bin/env bash
# `make bench` / `bash bench/run.sh [--json] [--quick] [--no-disk] [--repeats N] ...`:
# corral's start-up and run-time costs on this machine, against bwrap and firejail.
# As root. Installs what it needs (Debian packages only when one is missing, the venv through
# `make venv`); every option is passed to bench/runtime.py (see `bash bench/run.sh --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/prepare.sh
bench_prepare bubblewrap firejail gcc libc6-dev iproute2 util-linux

exec .venv/bin/python bench/runtime.py "$@"
