"""What a process does with a signal, read from /proc/PID/status."""

from __future__ import annotations

import signal


def handles(pid: int, sig: int) -> bool:
    """Does the process catch `sig` (SigCgt)? A PID namespace's init ignores any signal it does
    not catch, so sending one it does not handle would only wait out a timeout. SIGKILL always
    takes effect."""
    if sig == signal.SIGKILL:
        return True
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except OSError:
        pass
    return False
