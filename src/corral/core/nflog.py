"""The NFLOG groups and snapshot length that corral's nftables rules (plan.nft_rules,
plan.host_rules) and their reader (watch.nflog, in each supervisor) agree on, on their own:
the supervisor's start needs them without the nftables planner (~1 ms of imports on the
launch path, bench/README.md)."""

import zlib

# NFLOG group that denied packets are copied to; the watcher binds this group. It is an arbitrary
# fixed 16-bit number (rules and watcher agree without configuration), kept away from the small
# groups (0, 1, 2) that ulogd and most examples use.
NFLOG_GROUP = 3079  # the host table's group (corral host events)
NFLOG_SERVICE_BASE, NFLOG_SERVICE_SPAN = 3100, 20000
# Copy only the headers (IPv6 40 + TCP with options 60) to the log, never the payload.
LOG_SNAPLEN = 128


def nflog_group(service: str) -> int:
    """Each service logs to its own NFLOG group: the kernel allows one listener per group, and
    that listener is the service's own watcher. Derived from the name, so the plan stays pure;
    install refuses two installed services that would share one."""
    return NFLOG_SERVICE_BASE + zlib.crc32(service.encode()) % NFLOG_SERVICE_SPAN
