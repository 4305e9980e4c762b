#!/usr/bin/env bash
# Run lynis and `corral audit --host` on this host and print which sharp objects each reports.
#
#   bench/lynis_compare.sh [--no-plant] [CORRAL-AUDIT-OPTIONS...]     (as root)
#
# By default a few sharp objects are planted first, in a fresh 0700 directory under /tmp that no
# other user can reach (a root-owned setuid copy of /usr/bin/true, a world-writable directory
# without the sticky bit, a world-writable file), to show which tool finds planted ones. They
# are removed on exit, whatever happens. Extra options go to corral audit, e.g. --skip DIR.
# lynis writes its log and report into the same temporary directory, not /var/log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

[ "$(id -u)" = 0 ] || { echo "lynis_compare: run as root" >&2; exit 1; }
command -v lynis >/dev/null || { echo "lynis_compare: lynis is not installed (apt-get install -y lynis)" >&2; exit 1; }

plant=1
if [ "${1:-}" = "--no-plant" ]; then plant=0; shift; fi

work=$(mktemp -d /tmp/corral-lynis.XXXXXX)
trap 'rm -rf "$work"' EXIT

if [ "$plant" = 1 ]; then
    mkdir "$work/planted" "$work/planted/open-dir"
    cp /usr/bin/true "$work/planted/setuid-true"
    chmod 4755 "$work/planted/setuid-true"
    chmod 0777 "$work/planted/open-dir"
    : > "$work/planted/open-file"
    chmod 0666 "$work/planted/open-file"
fi

# `corral audit`, through the main CLI once it registers the command, else its own module.
if "$PY" -c 'import sys; from corral.cli.main import main; sys.exit("audit" not in main.commands)'; then
    audit=("$PY" -m corral.cli.main audit)
else
    audit=("$PY" -m corral.cli.audit)
fi

echo "running lynis (about a minute)..." >&2
start=$(date +%s.%N)
lynis audit system --quick --no-colors --logfile "$work/lynis.log" \
    --report-file "$work/lynis-report.dat" > "$work/lynis.out" 2>&1 || true
lynis_s=$(echo "$(date +%s.%N) - $start" | bc)

echo "running corral audit --host..." >&2
start=$(date +%s.%N)
"${audit[@]}" --host --json "$@" > "$work/corral.json"
corral_s=$(echo "$(date +%s.%N) - $start" | bc)

planted=()
if [ "$plant" = 1 ]; then planted=(--planted "$work/planted"); fi
"$PY" bench/lynis_compare.py "$work/lynis-report.dat" "$work/corral.json" "${planted[@]}"
printf '\ntime: lynis %.1f s, corral audit --host %.1f s\n' "$lynis_s" "$corral_s"
