#!/usr/bin/env bash
# `bash bench/recover.sh [--json] [--quick] [--rounds N] [--out FILE]`: how fast corral brings
# the sample service back with `corral revert` (against a plain down + up), and how fast
# `corral delta` + `corral verify` report a tampered service (against `aide --check`); see
# bench/recover_time.py and bench/recover.md. As root. Installs what it needs (Debian packages
# only when one is missing, the venv through `make venv`). Results: a table on stdout (or one
# JSON document with --json) and /tmp/corral-bench-results/recover.json.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/prepare.sh
bench_prepare aide nftables iproute2 util-linux passwd

exec .venv/bin/python bench/recover_time.py "$@"
