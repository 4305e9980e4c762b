"""Text for people and for JSON: one escaping of hostile bytes (paths a service wrote)."""

from __future__ import annotations

import time


def show(path: bytes) -> str:
    """A path as text that is always one printable line and valid JSON: invalid UTF-8 bytes
    and control characters become \\xNN escapes, and a backslash itself is doubled."""
    out = []
    text = path.decode("utf-8", "surrogateescape")
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        else:
            out.append(char)
    return "".join(out)


def iso(ts: float) -> str:
    """UTC, microseconds: the one timestamp format of corral's records and JSON."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def parse_iso(text: str) -> float:
    from datetime import UTC, datetime  # readers of records only, not the launch path

    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC).timestamp()
