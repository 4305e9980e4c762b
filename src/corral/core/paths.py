"""Where corral keeps state: /var/lib/corral/NAME, /run/corral/NAME and the processes' logs in
/var/log/corral/NAME, all moved by CORRAL_ROOT."""

from __future__ import annotations

import os
from pathlib import Path

# A service's state directory holds these two records (named here, below every layer that reads
# them, so each file has one name): what install made, and what `run` needs.
RECORD = "install.json"
RUNTIME = "runtime.json"


def corral_root() -> Path:
    return Path(os.environ.get("CORRAL_ROOT") or "/")


def lib_root() -> Path:
    return corral_root() / "var/lib/corral"


def run_root() -> Path:
    return corral_root() / "run/corral"


def log_root() -> Path:
    return corral_root() / "var/log/corral"


def log_dir(service: str) -> Path:
    """The processes' output, size-rotated (launch.logfile): on disk, unlike /run."""
    return log_root() / service


def lib_dir(service: str) -> Path:
    return lib_root() / service


def run_dir(service: str) -> Path:
    return run_root() / service


def escape_path(path: str) -> str:
    """A volume path as one directory name, unambiguously: "/srv/data" -> "srv-data".

    The same scheme as systemd-escape --path, so administrators recognise it: "/" becomes "-",
    and "-", "\\" and any byte outside [A-Za-z0-9:_.] become \\xNN."""
    out = []
    for i, byte in enumerate(path.strip("/").encode()):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif char.isascii() and (char.isalnum() or char in ":_") or (char == "." and i > 0):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out) or "-"
