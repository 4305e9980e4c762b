"""CORRAL_BENCH_SKIP: a benchmark-only switch that turns containment mechanisms off, one at a
time, so that bench/servers.sh can say what each one costs (attribution). Never for production:
it weakens the containment it names, so the supervisor says so in `status` and its log.

`CORRAL_BENCH_SKIP=landlock,seccomp` in the environment of `corral up`/`run` (the supervisor
inherits it). Names:

- `landlock`: no Landlock ruleset;
- `seccomp`: neither seccomp filter (and so no exec notification: the `exec` tripwire is off);
- `seccomp-main`: only the main (logged) filter is skipped; the quiet one (clone3's ENOSYS, the
  exec notification) stays;
- `overlay`: the root is a read-only bind mount of the base instead of the overlay of base and
  delta, with an empty tmpfs on /tmp and on each writable path (what the service writes there
  is not in the delta; `corral delta` sees nothing);
- `image`: the root is one overlay of the delta on the whole base, as before the base had a
  read-only image (launch.imageroot): what reading base files through overlayfs costs;
- `cpu`, `memory`, `pids`: no such cgroup limit (the cgroup itself stays);
- `cpu-group`: the highest cpu weight instead of the default;
- `cpu-cgroup`: the processes stay in the supervisor's cgroup of the cpu hierarchy, as in no
  cpu cgroup of their own (cgroup v1 only): what scheduling the service as one group costs;
- `pidns`, `ipcns`, `utsns`, `cgroupns`: the process stays in the host's namespace of that
  kind (one by one, for their cost at launch and at run time). What would then act on the
  host's namespace is skipped with it: the hostname (utsns) and vm.memfd_noexec, which is per
  PID namespace (pidns). The mount namespace has no switch: the service's root is built in it.

An unknown name is an error, so that a typo does not measure the full containment under the
name of a lighter one. The per-service nftables table is not a launch mechanism: the benchmark
deletes it itself (`nft`, in its own network namespace).
"""

from __future__ import annotations

import os

NAMESPACES = ("pidns", "ipcns", "utsns", "cgroupns")
KNOWN = frozenset({"landlock", "seccomp", "seccomp-main", "overlay", "image", "cpu", "cpu-group",
                   "cpu-cgroup",
                   "memory", "pids", *NAMESPACES})
VARIABLE = "CORRAL_BENCH_SKIP"


def skipped() -> frozenset[str]:
    """The mechanisms the environment asks to skip; ValueError for an unknown name."""
    names = frozenset(n.strip() for n in os.environ.get(VARIABLE, "").split(",") if n.strip())
    if unknown := names - KNOWN:
        raise ValueError(f"{VARIABLE}: unknown mechanism(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(KNOWN))})")
    return names


def skips(mechanism: str) -> bool:
    assert mechanism in KNOWN, mechanism  # a caller's typo, not the user's
    return mechanism in skipped()
