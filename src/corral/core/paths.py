"""Where corral keeps state: /var/lib/corral/NAME, /run/corral/NAME and the processes' logs in
/var/log/corral/NAME, all moved by CORRAL_ROOT.

Plain strings, not pathlib: pathlib (with urllib.parse and ipaddress, which it imports) costs
`corral run` ~2 ms of a ~40 ms start (bench/README.md, "Launch time"), and the launch path only
joins and opens paths. Commands off the launch path wrap them in a Path where that reads better."""

from __future__ import annotations

import os

# A service's state directory holds these two records (named here, below every layer that reads
# them, so each file has one name): what install made, and what `run` needs.
RECORD = "install.json"
RUNTIME = "runtime.json"


def corral_root() -> str:
    return (os.environ.get("CORRAL_ROOT") or "/").rstrip("/") or "/"


def lib_root() -> str:
    return os.path.join(corral_root(), "var/lib/corral")


def run_root() -> str:
    return os.path.join(corral_root(), "run/corral")


def log_root() -> str:
    return os.path.join(corral_root(), "var/log/corral")


def log_dir(service: str) -> str:
    """The processes' output, size-rotated (launch.logfile): on disk, unlike /run."""
    return os.path.join(log_root(), service)


def lib_dir(service: str) -> str:
    return os.path.join(lib_root(), service)


def run_dir(service: str) -> str:
    return os.path.join(run_root(), service)


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
