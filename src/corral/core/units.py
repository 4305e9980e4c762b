"""Human units in manifests: sizes ("64M") and durations ("10m", "24h")."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^([0-9]+)([KMGT]?)$")
_SIZE_FACTOR = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION = re.compile(r"^([0-9]+)(s|m|h|d)$")
_DURATION_FACTOR = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(raw: object) -> int:
    """Bytes from an integer or "64M"-style string (binary multiples, like cgroup and tmpfs)."""
    if isinstance(raw, bool):
        raise ValueError("expected a size like \"64M\"")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str):
        match = _SIZE.match(raw.strip().upper())
        if not match:
            raise ValueError(f'"{raw}": expected a size like "64M" (K, M, G or T)')
        value = int(match.group(1)) * _SIZE_FACTOR[match.group(2)]
    else:
        raise ValueError('expected a size like "64M"')
    if value <= 0:
        raise ValueError(f'"{raw}": size must be positive')
    return value


def parse_duration(raw: object) -> int:
    """Seconds from "90s", "10m", "24h" or "7d"."""
    if not isinstance(raw, str):
        raise ValueError('expected a duration like "10m" (s, m, h or d)')
    match = _DURATION.match(raw.strip())
    if not match:
        raise ValueError(f'"{raw}": expected a duration like "10m" (s, m, h or d)')
    value = int(match.group(1)) * _DURATION_FACTOR[match.group(2)]
    if value <= 0:
        raise ValueError(f'"{raw}": duration must be positive')
    return value
