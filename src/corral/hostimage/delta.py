"""`corral host delta`: what the running host changed against its image since boot.

The upper layer of the root overlay (the RAM delta) is walked against the mounted image with
the same hostile-safe walker and the same change records as a service's delta: anything on the
host may have written there, including an intruder who planted symlinks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corral.core import tree
from corral.core.errors import RuntimeFailure
from corral.hostimage.store import booted, host_run
from corral.recover.delta import base_writes, changes


def layers() -> tuple[Path, Path]:
    run = host_run()
    upper, image = run / "delta/upper", run / "image"
    if booted() is None or not upper.is_dir() or not image.is_dir():
        raise RuntimeFailure(f"this host was not booted from a corral image ({run} has no "
                             "version, delta/upper and image): nothing to compare")
    return upper, image


def host_delta() -> dict[str, Any]:
    upper, image = layers()
    with tree.directory(str(upper)) as up, tree.directory(str(image)) as base:
        found = changes(up, base)
    rows = [c.to_json() | {"sensitive": c.sensitive} for c in found]
    return {"version": booted(), "upper": str(upper), "image": str(image),
            "changes": rows, "count": len(rows), "base_writes": len(base_writes(found))}
