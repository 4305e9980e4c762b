"""`corral enable|disable NAME`: a systemd unit that starts the service under corral at boot.

The unit only runs corral: `corral run NAME` is its main process (the supervisor in the
foreground), so systemd sees the service's life, restarts it when it fails, and stops it with
`corral down`, which gives each process its own stop signal and timeout. KillMode=mixed: systemd's
SIGTERM goes to the supervisor alone, never straight to the contained processes (PostgreSQL
would take it for a "smart" shutdown); whatever is left at the end gets SIGKILL.

Enabling is what `systemctl enable` does for `WantedBy=multi-user.target`: a symlink in
multi-user.target.wants. Done by hand so that it works without systemd as PID 1 (and in a
throwaway CORRAL_ROOT). The directory is /etc/systemd/system, or CORRAL_SYSTEMD_DIR, or
CORRAL_ROOT/etc/systemd/system when CORRAL_ROOT is set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from corral.core.fsio import write_text
from corral.core.paths import corral_root

WANTS = "multi-user.target.wants"
STOP_MARGIN = 30  # seconds beyond the slowest process's stop_timeout for `corral down` itself


def unit_dir() -> Path:
    return Path(os.environ.get("CORRAL_SYSTEMD_DIR") or Path(corral_root(), "etc/systemd/system"))


def unit_name(service: str) -> str:
    return f"corral-{service}.service"


def corral_command() -> list[str]:
    """The corral that runs now: its executable next to this Python (a venv), else the module."""
    exe = os.path.join(os.path.dirname(sys.executable), "corral")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "corral.cli.entry"]


def render(service: str, stop_timeout: float) -> str:
    import shlex  # writing a unit (install), not reading one on the launch path

    corral = " ".join(shlex.quote(part) for part in corral_command())
    env = ""
    if os.environ.get("CORRAL_ROOT"):
        env = f"Environment=CORRAL_ROOT={shlex.quote(os.environ['CORRAL_ROOT'])}\n"
    return f"""# Made by `corral enable {service}`; `corral disable {service}` removes it.
[Unit]
Description=corral: contained service {service}
Wants=network-online.target
After=network-online.target nftables.service
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=simple
{env}ExecStart={corral} run {service}
ExecReload={corral} reload {service}
ExecStop={corral} down {service}
KillMode=mixed
TimeoutStopSec={int(stop_timeout) + STOP_MARGIN}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def enable(service: str, stop_timeout: float) -> bool:
    """Write the unit and its wants link; True if anything changed."""
    directory = unit_dir()
    path = directory / unit_name(service)
    text = render(service, stop_timeout)
    changed = False
    if not path.exists() or path.read_text() != text:
        directory.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
        changed = True
    link = directory / WANTS / unit_name(service)
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
        changed = True
    return changed


def disable(service: str) -> bool:
    """Remove the wants link and the unit (only corral's own); True if anything was there."""
    directory = unit_dir()
    changed = False
    link = directory / WANTS / unit_name(service)
    if link.is_symlink():
        link.unlink()
        changed = True
    path = directory / unit_name(service)
    if path.is_file() and path.read_text().startswith("# Made by `corral enable"):
        path.unlink()
        changed = True
    return changed


def is_enabled(service: str) -> bool:
    return (unit_dir() / WANTS / unit_name(service)).is_symlink()
