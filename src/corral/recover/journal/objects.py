"""The journal's contents: chunks of files, named by their blake3, zstd-compressed, kept in
pack files.

One pack per close that stored anything (`packs/ID.pack`, the zstd frames end to end) with its
index (`packs/ID.idx`: each chunk's name, offset and length, and a checksum). Packs, not a file
per chunk: creating a file costs far more than writing a few KB into one (on this test
machine's ext4, 0.3 ms against microseconds), a 100,000-file volume would need 100,000 of them
at the start, and each would round its few bytes up to a 4 KiB block.

A pack is written under .staging/, fsynced, renamed into place, then its index: a pack without
its index is an interrupted write (garbage); a chunk listed in an index is whole. So
deduplication can trust the index, and the records that name chunks are written after flush().
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral.core.fsio import keep_reserve, write_all
from corral.recover.journal.store import CHUNK, digest, fsync_dir, point

ZSTD_LEVEL = 3  # fast; incompressible data costs zstd only a few bytes per frame
MAGIC = b"CJIX1\n"
ENTRY = struct.Struct("<32sQI")  # name (raw blake3), offset, length
REPACK_BELOW = 0.5  # sweep rewrites a pack whose live bytes fall under this share
SMALL_PACK = 1 << 20  # ...and gathers packs smaller than this into one


class Objects:
    def __init__(self, root: Path):
        self.root = root
        self.packs = root / "packs"
        self.staging = root / ".staging"
        self.index: dict[str, tuple[str, int, int]] = {}  # name -> (pack, offset, length)
        self.bad: list[str] = []  # unreadable indexes, for check
        self._loaded: set[str] = set()
        self._fd: int | None = None  # the pack being staged
        self._size = 0
        self._staged: dict[str, tuple[int, int]] = {}
        self._dropped = 0
        self._compressor: Any = None

    def create(self) -> None:
        self.packs.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.staging.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        fsync_dir(self.root)

    # -- the index of packs -----------------------------------------------------------------

    def refresh(self) -> None:
        """Take in packs another process wrote (and forget removed ones). Called under the
        journal's lock before anything is staged."""
        try:
            names = os.listdir(self.packs)
        except FileNotFoundError:
            names = []
        ids = {n[:-4] for n in names if n.endswith(".idx")}
        if self._loaded - ids:  # a sweep removed packs: start over
            self.index, self._loaded, self.bad = {}, set(), []
        for pack in sorted(ids - self._loaded):
            try:
                for name, offset, length in _read_index(self.packs / f"{pack}.idx"):
                    self.index[name] = (pack, offset, length)
            except (OSError, ValueError) as exc:
                self.bad.append(f"pack {pack}: {exc}")
            self._loaded.add(pack)

    def orphans(self) -> list[Path]:
        """Packs whose index was never written: interrupted flushes."""
        try:
            names = set(os.listdir(self.packs))
        except FileNotFoundError:
            return []
        return [self.packs / n for n in names
                if n.endswith(".pack") and n[:-5] + ".idx" not in names]

    def has(self, name: str) -> bool:
        return name in self.index or name in self._staged

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.index))

    # -- writing ----------------------------------------------------------------------------

    def stage(self, name: str, data: bytes) -> None:
        if self.has(name):
            return
        if self._compressor is None:
            import zstandard

            self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._append(name, self._compressor.compress(data))

    def _append(self, name: str, frame: bytes) -> None:
        # Every frame, before it is written: a statvfs is ~1 us, a frame's zstd ~100 times that.
        keep_reserve(self.root, len(frame), "storing the journal's copy of a volume's files")
        if self._fd is None:
            self._fd = os.open(self.staging / "pack", os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                               os.O_CLOEXEC, 0o600)
            self._size = self._dropped = 0
        write_all(self._fd, frame)
        self._staged[name] = (self._size, len(frame))
        self._size += len(frame)

    @property
    def staged(self) -> int:
        return len(self._staged)

    @property
    def staged_bytes(self) -> int:
        return self._size - self._dropped

    def keep_only(self, needed: set[str]) -> None:
        """Unstage what turned out not to be needed (a version overwritten meanwhile)."""
        for name in [n for n in self._staged if n not in needed]:
            self._dropped += self._staged.pop(name)[1]

    def flush(self) -> int:
        """Make the staged chunks durable and known; returns how many."""
        if self._fd is None:
            return 0
        if not self._staged:
            self.discard()
            return 0
        if self._dropped > self._size // 4:
            self._compact()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        point()
        entries = sorted(self._staged.items())
        body = MAGIC + b"".join(ENTRY.pack(bytes.fromhex(n), o, ln) for n, (o, ln) in entries)
        index = body + bytes.fromhex(digest(body))
        pack = digest(index)[:32]
        tmp = self.staging / "idx"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, index)
            os.fsync(fd)
        finally:
            os.close(fd)
        point()
        os.rename(self.staging / "pack", self.packs / f"{pack}.pack")
        point()
        os.rename(tmp, self.packs / f"{pack}.idx")  # the pack exists from here on
        point()
        fsync_dir(self.packs)
        for name, (offset, length) in entries:
            self.index[name] = (pack, offset, length)
        self._loaded.add(pack)
        self._staged, self._size, self._dropped = {}, 0, 0
        return len(entries)

    def _compact(self) -> None:
        """Most of the staged pack was dropped: copy the rest to a new one."""
        assert self._fd is not None
        old = os.open(self.staging / "pack", os.O_RDONLY | os.O_CLOEXEC)
        os.close(self._fd)
        os.unlink(self.staging / "pack")
        self._fd, staged = None, self._staged
        self._staged = {}
        try:
            for name, (offset, length) in staged.items():
                self._append(name, os.pread(old, length, offset))
        finally:
            os.close(old)

    def discard(self) -> None:
        """Forget what was staged (a failed close)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._staged, self._size, self._dropped = {}, 0, 0
        self.clear_staging()

    def clear_staging(self) -> None:
        for name in ("pack", "idx"):
            try:
                os.unlink(self.staging / name)
            except FileNotFoundError:
                pass

    # -- reading ----------------------------------------------------------------------------

    def frame(self, name: str) -> bytes:
        try:
            pack, offset, length = self.index[name]
        except KeyError:
            raise FileNotFoundError(f"object {name}: in no pack") from None
        fd = os.open(self.packs / f"{pack}.pack", os.O_RDONLY | os.O_CLOEXEC)
        try:
            frame = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(frame) != length:
            raise ValueError(f"object {name}: pack {pack} is truncated")
        return frame

    def read(self, name: str, verify: bool = True) -> bytes:
        import zstandard

        data = zstandard.ZstdDecompressor().decompress(self.frame(name), max_output_size=CHUNK)
        if verify and digest(data) != name:
            raise ValueError(f"object {name}: content does not match its name")
        return data

    # -- reclaiming -------------------------------------------------------------------------

    def sweep(self, keep: set[str]) -> tuple[int, int]:
        """Drop chunks nothing needs: a pack with none left is deleted; packs mostly dead, or
        small (each is a file to open), are rewritten together into one. Returns (chunks
        dropped, bytes freed). The new pack is durable before an old one goes, and an old
        one loses its index before its data: a crash anywhere loses nothing needed."""
        self.refresh()
        live: dict[str, list[str]] = {pack: [] for pack in self._loaded}
        for name, (pack, _, _) in self.index.items():
            if name in keep:
                live[pack].append(name)
        sizes = {pack: _size(self.packs / f"{pack}.pack") for pack in live}
        used = {pack: sum(self.index[n][2] for n in names) for pack, names in live.items()}
        empty = [pack for pack, names in live.items() if not names]
        thin = [pack for pack, names in live.items() if names and (
            used[pack] < sizes[pack] * REPACK_BELOW or sizes[pack] < SMALL_PACK)]
        if len(thin) == 1 and used[thin[0]] >= sizes[thin[0]] * REPACK_BELOW:
            thin = []  # one small pack, mostly alive: rewriting it gains nothing
        before = len(self.index)
        self._drop(empty)  # first: it frees room for the rewrite (the disk may be full)
        try:
            for pack in thin:
                for name in live[pack]:
                    self._append(name, self.frame(name))
            self.flush()  # the survivors' new pack, durable and indexed, before the old go
        except OSError:
            self.discard()  # no room to rewrite: the thin packs stay as they are
            thin = []
        self._drop(thin)
        new = sum(_size(self.packs / f"{p}.pack") for p in self._loaded - set(live))
        return before - len(self.index), sum(sizes[p] for p in empty + thin) - new

    def _drop(self, packs: list[str]) -> None:
        for pack in sorted(packs):
            for suffix in (".idx", ".pack"):  # the index first: a pack without one is garbage
                (self.packs / f"{pack}{suffix}").unlink(missing_ok=True)
                point()
        if packs:
            fsync_dir(self.packs)
        gone = set(packs)
        self.index = {n: v for n, v in self.index.items() if v[0] not in gone}
        self._loaded -= gone


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_index(path: Path) -> Iterator[tuple[str, int, int]]:
    data = path.read_bytes()
    body, check = data[:-32], data[-32:]
    if not body.startswith(MAGIC) or bytes.fromhex(digest(body)) != check \
            or (len(body) - len(MAGIC)) % ENTRY.size:
        raise ValueError("index damaged")
    for raw, offset, length in ENTRY.iter_unpack(body[len(MAGIC):]):
        yield raw.hex(), offset, length
