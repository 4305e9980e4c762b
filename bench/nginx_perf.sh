#!/usr/bin/env bash
# `bash bench/nginx_perf.sh [--rounds N] [--seconds S]` (as root; ~2 min): a contained nginx's
# CPU per request by perf, split by mechanism (seccomp, Landlock, nftables, the task switch),
# against plain and plain in corral's cgroups (nginx_perf.py). Installs what servers.sh does,
# and perf.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/prepare.sh
bench_prepare_servers nginx wrk linux-perf iproute2 util-linux
.venv/bin/python bench/nginx_perf.py "$@"
