#!/usr/bin/env bash
# `bash bench/journal_sqlite.sh [--mb N] [--epochs N] [--seconds S]`: the costs of row-level
# epochs of SQLite databases (bench/journal_sqlite.py); writes bench/journal_sqlite.md.
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory venv >/dev/null
.venv/bin/python bench/journal_sqlite.py "$@" | tee bench/journal_sqlite.md
