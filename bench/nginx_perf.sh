#!/usr/bin/env bash
# `bash bench/nginx_perf.sh [--rounds N] [--seconds S]` (as root; ~2 min): a contained nginx's
# CPU per request by perf, split by mechanism (seccomp, Landlock, nftables, the task switch),
# against plain and plain in corral's cgroups (nginx_perf.py). Installs what servers.sh does,
# and perf.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/prepare.sh
POLICY=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$POLICY"
  chmod 755 "$POLICY"
  made_policy=1
fi
trap '[ "$made_policy" = 1 ] && rm -f "$POLICY"' EXIT
bench_prepare nginx wrk linux-perf iproute2 util-linux
[ "$made_policy" = 1 ] && rm -f "$POLICY"
made_policy=0
.venv/bin/python bench/nginx_perf.py "$@"
