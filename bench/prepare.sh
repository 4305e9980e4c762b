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
