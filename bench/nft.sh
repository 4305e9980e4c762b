#!/usr/bin/env bash
# `bash bench/nft.sh [--json] [--samples N] [--seconds S] [--sizes ...] [--iptables nft|legacy|both|none]`:
# connection rate through corral's per-service nftables table with 10, 1,000 and 100,000
# allow-list entries, against a linear iptables chain (see bench/nft_rate.py and bench/nft.md).
# As root. Installs what it needs (Debian packages only when one is missing, the venv through
# `make venv`). Progress goes to stderr, results to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/prepare.sh
bench_prepare gcc libc6-dev iproute2 util-linux nftables iptables passwd

exec .venv/bin/python bench/nft_rate.py "$@"
