"""Read a TOML file and turn every way it can be unreadable into one clear Problem."""

from __future__ import annotations

import os
import re
import stat

from corral.core.errors import InputError, Problem

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any

MAX_BYTES = 1 << 20  # a manifest is a page of text; refuse to slurp a disk image by mistake


def _fail(file: str, message: str) -> InputError:
    return InputError([Problem(file, (), message)])


def load(file: str) -> dict[str, Any]:
    return parse(file, read(file))


def read(file: str) -> bytes:
    """The file's bytes, or an InputError saying why it cannot be a manifest."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise _fail(file, "no such file") from None
    except IsADirectoryError:
        raise _fail(file, "is a directory, not a manifest") from None
    except OSError as exc:
        raise _fail(file, f"cannot open: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _fail(file, "is a directory, not a manifest")
        if not stat.S_ISREG(mode):
            raise _fail(file, "is not a regular file")
        raw = os.read(fd, MAX_BYTES + 1)
    except OSError as exc:
        raise _fail(file, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_BYTES:
        raise _fail(file, f"larger than {MAX_BYTES} bytes; not a manifest")
    return raw


def parse(file: str, raw: bytes) -> dict[str, Any]:
    """The TOML document in `raw` (read from `file`), or an InputError naming the line."""
    import tomllib  # not on `corral run`'s path when the manifest is the installed one (digest)

    if not raw.strip():
        raise _fail(file, "empty file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _fail(file, f"line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(file, _syntax_message(str(exc))) from None


def _syntax_message(text: str) -> str:
    """tomllib: "Invalid value (at line 3, column 9)"
    -> "line 3: TOML syntax: invalid value (column 9)"."""
    match = re.match(r"^(.*) \(at line (\d+), column (\d+)\)$", text)
    if match:
        what, line, column = match.groups()
        return f"line {line}: TOML syntax: {what[0].lower()}{what[1:]} (column {column})"
    match = re.match(r"^(.*) \(at end of document\)$", text)
    if match:
        return f"end of file: TOML syntax: {match.group(1)[0].lower()}{match.group(1)[1:]}"
    return f"TOML syntax: {text}"


def digest(raw: bytes) -> str:
    """The SHA-256 of a manifest's bytes: install records it (install.json, `manifest_sha256`)
    with the name those bytes have, so `corral run` of the same bytes knows the name without
    parsing them (cli.base.service_name)."""
    try:  # Python's builtin (no stub in typeshed): hashlib loads OpenSSL, ~2 ms, for one hash
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - Python 3.12 renamed it
        from hashlib import sha256
    return str(sha256(raw).hexdigest())
