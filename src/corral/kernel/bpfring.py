"""A BPF ring buffer map (BPF_MAP_TYPE_RINGBUF, 5.8+): made with the raw bpf(2) call, read
through its two mmap()ed areas, polled through its fd.

By hand for the same reason as kernel.bindguard: no BPF library is installed (libbpf's
ring_buffer__poll is C), and the protocol is small. The map's fd is readable (poll/epoll) while
records wait; a BPF program writes a record with bpf_ringbuf_output(), which wakes the reader
once it has caught up. The layout (kernel/bpf/ringbuf.c):

    offset 0          one page, read-write: consumer_pos (u64), advanced by the reader
    offset PAGE       one page, read-only: producer_pos (u64)
    offset 2 * PAGE   the data, `size` bytes, mapped twice in a row so a record never wraps

Each record is an 8-byte header (u32 length with BUSY and DISCARD bits, u32 page offset)
followed by the length's bytes, the whole rounded up to 8.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from corral.kernel.bindguard import bpf

BPF_MAP_CREATE = 0
BPF_MAP_TYPE_RINGBUF = 27
BUSY, DISCARD = 1 << 31, 1 << 30
HEADER = 8
PAGE = mmap.PAGESIZE


class Ring:
    """One ring buffer of `size` bytes (a power of two, at least a page)."""

    def __init__(self, size: int = 16 * 4096, name: bytes = b"corral_ring"):
        if size < PAGE or size & (size - 1):
            raise ValueError(f"ring size {size}: a power of two of at least {PAGE}")
        attr = ctypes.create_string_buffer(128)  # union bpf_attr; unused bytes must stay zero
        # map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node,
        # map_name[16]
        struct.pack_into("=7I16s", attr, 0, BPF_MAP_TYPE_RINGBUF, 0, 0, size, 0, 0, 0, name)
        self.fd = bpf(BPF_MAP_CREATE, attr)
        self.size, self.mask = size, size - 1
        try:
            self._consumer = mmap.mmap(self.fd, PAGE, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._data = mmap.mmap(self.fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=PAGE)
        except OSError:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def read(self, limit: int = 4096) -> list[bytes]:
        """The records written since the last read (at most `limit`: a flood cannot keep the
        caller here), oldest first; their space goes back to the writer."""
        out: list[bytes] = []
        consumer = struct.unpack_from("=Q", self._consumer, 0)[0]
        producer = struct.unpack_from("=Q", self._data, 0)[0]
        while consumer < producer and len(out) < limit:
            at = PAGE + (consumer & self.mask)
            length, _ = struct.unpack_from("=II", self._data, at)
            if length & BUSY:  # reserved, not yet written: the rest comes at the next read
                break
            size = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                out.append(self._data[at + HEADER:at + HEADER + size])
            consumer += (size + HEADER + 7) & ~7
        struct.pack_into("=Q", self._consumer, 0, consumer)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            self._consumer.close()
            self._data.close()
            os.close(self.fd)
            self.fd = -1
