#!/usr/bin/env bash
# `bash bench/overlay_opts.sh [ROUNDS] [ITERS]` (as root; ~1-2 min): what corral's overlay root
# costs a file lookup, an open+read, an open+sendfile and a read of an open file, against the
# same directory plainly and through a read-only bind mount, and whether overlay mount options
# change it (issue 13). Everything happens in a throwaway mount namespace (unshare -m) over a
# temporary directory on the file system of /var/tmp (the base's, ext4 here), removed at the end.
# The overlay is mounted as launch/mnt.py's prepare_service_root does: lowerdir, upperdir and
# workdir as /proc/self/fd/N, upper and work on a tmpfs (the delta), plus the options under test.
# The loop devices of the image mounts are freed when the namespace's mounts go (autoclear).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-15}
ITERS=${2:-100000}
work=$(mktemp -d /var/tmp/corral-bench-ovl-XXXXXX)
trap 'rm -rf "$work"' EXIT
gcc -O2 -Wall -o "$work/overlay_opts" bench/overlay_opts.c
mkdir -p "$work/base/srv/www"
head -c 4096 /dev/urandom >"$work/base/srv/www/4k.bin"
chmod -R a+rX "$work/base"
chmod 755 "$work"
# name=options (after the lowerdir/upperdir/workdir triple)
VARIANTS=(
  "corral="
  "index_off=index=off"
  "xino_off=xino=off"
  "xino_auto=xino=auto"
  "redirect_off=redirect_dir=off"
  "metacopy_off=metacopy=off"
  "uuid_off=uuid=off"
  "uuid_null=uuid=null"
  "volatile=volatile"
  "all_off=index=off,xino=off,redirect_dir=off,metacopy=off,uuid=off,volatile"
)
# The base as a read-only file system of its own (the plan in servers.md): a squashfs image as
# `corral host image` builds one, and an erofs image when mkfs.erofs is installed (erofs-utils).
images=()
if command -v mksquashfs >/dev/null; then
  mksquashfs "$work/base" "$work/base.sqfs" -comp zstd -noappend -quiet -no-progress >/dev/null
  images+=("squashfs=$work/base.sqfs")
fi
if command -v mkfs.erofs >/dev/null; then
  mkfs.erofs "$work/base.erofs" "$work/base" >/dev/null 2>&1
  images+=("erofs=$work/base.erofs")
fi
export IMAGES_STR="${images[*]}"
export work ROUNDS ITERS
export VARIANTS_STR="${VARIANTS[*]}"
unshare -m --propagation private bash -euo pipefail -c '
  mkdir -p "$work/mnt/plain" "$work/delta"
  mount -t tmpfs -o size=16m,mode=0700 corral-delta "$work/delta"
  dirs=("$work/base")
  mount --bind "$work/base" "$work/mnt/plain"
  mount -o remount,bind,ro "$work/mnt/plain"
  dirs+=("$work/mnt/plain")
  for im in $IMAGES_STR; do
    name=${im%%=*}
    mkdir -p "$work/mnt/$name"
    mount -o loop,ro,nosuid,nodev -t "$name" "${im#*=}" "$work/mnt/$name"
    dirs+=("$work/mnt/$name")
  done
  for v in $VARIANTS_STR; do
    name=${v%%=*}; opts=${v#*=}
    mkdir -p "$work/delta/$name/upper" "$work/delta/$name/work" "$work/mnt/$name"
    exec {lo}<"$work/base" {up}<"$work/delta/$name/upper" {wk}<"$work/delta/$name/work"
    o="lowerdir=/proc/self/fd/$lo,upperdir=/proc/self/fd/$up,workdir=/proc/self/fd/$wk"
    [ -n "$opts" ] && o="$o,$opts"
    mount -t overlay -o "nosuid,nodev,$o" corral-root "$work/mnt/$name"
    exec {lo}<&- {up}<&- {wk}<&-
    dirs+=("$work/mnt/$name")
  done
  chmod 711 "$work/mnt"
  grep " $work/mnt/" /proc/self/mountinfo | sed "s|$work|WORK|g" >&2
  "$work/overlay_opts" "$ROUNDS" "$ITERS" srv/www/4k.bin "${dirs[@]}"
' | sed "s|$work/mnt/||; s|$work/base|direct|" | column -t -N variant,loop,median_ns,min_ns
