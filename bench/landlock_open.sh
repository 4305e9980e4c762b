#!/usr/bin/env bash
# `bash bench/landlock_open.sh [ROUNDS] [ITERS]` (~30 s): what Landlock adds to an open+close of
# a read-only file, with the rule on the file, on its directory and on /usr, without and with
# truncate granted by the rule (launch/landlock.py: a read-only rule gets truncate where every
# mount beneath it is read-only). Median ns per open over ROUNDS shuffled rounds; nothing is
# mounted or written, each case runs in its own process (a Landlock domain cannot be undone).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-7}
ITERS=${2:-200000}
FILE=/usr/lib/x86_64-linux-gnu/libc.so.6
FILE=$(readlink -f "$FILE")  # the rule and the walk are on the real file
work=$(mktemp -d /tmp/corral-bench-llopen-XXXXXX)
trap 'rm -rf "$work"' EXIT
gcc -O2 -Wall -o "$work/landlock_open" bench/landlock_open.c
CASES=("none $FILE" "read $FILE" "read+truncate $FILE" "read $(dirname "$FILE")"
       "read+truncate $(dirname "$FILE")" "read /usr" "read+truncate /usr")
for ((r = 0; r < ROUNDS; r++)); do
  for c in $(seq 0 $((${#CASES[@]} - 1)) | shuf); do
    set -- ${CASES[$c]}
    echo "$c $("$work/landlock_open" "$1" "$2" "$FILE" "$ITERS")"
  done
done >"$work/out"
echo "open+close of $FILE, ns (median of $ROUNDS rounds x $ITERS), load $(cut -d' ' -f1 /proc/loadavg)"
for c in $(seq 0 $((${#CASES[@]} - 1))); do
  med=$(awk -v c="$c" '$1 == c {print $2}' "$work/out" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '  %-58s %6s\n' "${CASES[$c]}" "$med"
done
