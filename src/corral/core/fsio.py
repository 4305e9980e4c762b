"""Files that are replaced whole: a killed corral leaves the old version or the new one, never
half of one (write a temporary file, fsync it, rename it over the old one)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)


def write_json(path: str | Path, data: Any, sort_keys: bool = True) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
