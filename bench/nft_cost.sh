#!/usr/bin/env bash
# `bash bench/nft_cost.sh [--rounds N] [--count N] [--proto tcp,udp] [--variants ...] [--json]`:
# CPU time per loopback request/response round trip with no table, with corral's per-service
# nftables table and with variants of it (see bench/nft_cost.py and bench/nft.md). As root.
# Installs what it needs (Debian packages only when one is missing, the venv through
# `make venv`). Progress goes to stderr, results to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/prepare.sh
bench_prepare gcc libc6-dev iproute2 nftables passwd

exec .venv/bin/python bench/nft_cost.py "$@"
