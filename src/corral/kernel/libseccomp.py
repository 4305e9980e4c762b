"""pyseccomp, imported without forking `ldconfig -p` twice.

pyseccomp finds libc and libseccomp with ctypes.util.find_library, which on Linux runs
`/sbin/ldconfig -p` in a subprocess each time: two forks and ~5 ms on every `corral run`'s
launch path. While it imports, find_library answers from the sonames Debian ships (checked by
loading them) and falls back to the real search for anything else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from types import ModuleType

SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def load() -> ModuleType:
    module = sys.modules.get("pyseccomp")
    if module is not None:
        return module
    search = ctypes.util.find_library

    def known_first(name: str) -> str | None:
        soname = SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        return search(name)

    ctypes.util.find_library = known_first
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = search
    return pyseccomp


def notify_fd(filt: object) -> int:
    """The listener descriptor of a loaded filter's NOTIFY rules (seccomp_notify_fd(3)).
    pyseccomp has no accessor for it, so this one call reaches into its filter object for the
    libseccomp context; it is the only place that does."""
    import errno

    pyseccomp = load()
    fd = pyseccomp._libseccomp.seccomp_notify_fd(filt._filter)  # type: ignore[attr-defined]  # noqa: SLF001
    if fd < 0:
        raise OSError(-fd or errno.EINVAL, "seccomp_notify_fd: no listener")
    return int(fd)
