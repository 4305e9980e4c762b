#!/usr/bin/env bash
# `bash bench/watch.sh [--json] [--quick] [--samples N] [--f2b-samples N] [--modes revert,log]
# [--kinds egress,refused-connect,exec,base-write] [--no-f2b] [--out FILE]`: corral's violation-to-containment
# latency per kind of violation, against fail2ban fed the same event as a log line
# (see bench/watch_latency.py and bench/watch.md). As root. Installs what it needs (Debian
# packages only when one is missing, the venv through `make venv`). Results: a table on stdout
# (or one JSON document with --json) and /tmp/corral-bench-results/watch.json.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/prepare.sh
bench_prepare fail2ban python3-pyinotify nftables iproute2 util-linux passwd

exec .venv/bin/python bench/watch_latency.py "$@"
