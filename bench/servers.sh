#!/usr/bin/env bash
# `bash bench/servers.sh [--json] [--rounds N] [--seconds S] [--only nginx,redis,postgresql]`:
# nginx, redis and PostgreSQL each run three ways at once (contained by corral, plain, under
# firejail), measured in interleaved rounds; medians, p99 and the ratios to plain (servers.py).
# As root. Installs what it needs. The packages' own services must not start (a host's real
# nginx/redis/postgresql are never touched): a policy-rc.d that refuses every start is put in
# place for the install when the machine has none, and removed after.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/prepare.sh
bench_prepare_servers nginx wrk redis-server redis-tools postgresql firejail iproute2 util-linux

.venv/bin/python bench/servers.py "$@"
