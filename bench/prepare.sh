# Sourced by the bench/*.sh scripts: `bench_prepare PACKAGE...` checks for root, installs the
# Debian packages that are missing (and only those, so a second run needs no network), and the
# venv through `make venv`. Output goes to stderr; stdout stays the benchmark's.
bench_prepare() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench: must run as root (users, network namespaces, nftables, mounts)" >&2
    exit 1
  fi
  local missing p
  missing=$(for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
  done)
  if [ -n "$missing" ]; then
    echo "bench: installing Debian packages:" $missing >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y --no-install-recommends $missing ||
      { apt-get update && apt-get install -y --no-install-recommends $missing; }; } >&2
  fi
  make --no-print-directory -s venv >&2
}

# `bench_prepare_servers PACKAGE...`: bench_prepare for packages that ship a service (nginx,
# redis, postgresql), none of which may start: a policy-rc.d that refuses every start is put in
# place for the install when the machine has none, and removed after (also on failure). A
# host's real nginx/redis/postgresql are never touched.
bench_prepare_servers() {
  local policy=/usr/sbin/policy-rc.d made=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made=1
  fi
  # shellcheck disable=SC2064  # expanded now: the trap must remove this very file
  [ "$made" = 1 ] && trap "rm -f '$policy'" EXIT
  bench_prepare "$@"
  if [ "$made" = 1 ]; then
    rm -f "$policy"
    trap - EXIT
  fi
}
