"""fanotify through ctypes: init, mark, and the event records of FAN_REPORT_DFID_NAME.

Hand-written because no maintained Python binding exists (the PyPI `fanotify` packages are
unmaintained C extensions without the FID report modes). The calls go through the one libc
handle and errno check of kernel.syscalls. No policy here: what an event means is watch's.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator

from corral.core.record import record
from corral.kernel.syscalls import check, libc

FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_DIR_FID, FAN_REPORT_NAME = 0x400, 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_MARK_ADD, FAN_MARK_FLUSH, FAN_MARK_FILESYSTEM = 0x1, 0x80, 0x100
FAN_MARK_IGNORED_SURV_MODIFY, FAN_MARK_IGNORE = 0x40, 0x400  # FAN_MARK_IGNORE: Linux 6.0

FAN_MODIFY, FAN_ATTRIB, FAN_CLOSE_WRITE = 0x2, 0x4, 0x8
FAN_MOVED_FROM, FAN_MOVED_TO, FAN_CREATE, FAN_DELETE = 0x40, 0x80, 0x100, 0x200
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD, FAN_ONDIR = 0x08000000, 0x40000000

FAN_EVENT_INFO_TYPE_DFID_NAME = 2
_META = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata (24 bytes)
_INFO = struct.Struct("=BBH")  # struct fanotify_event_info_header
_FSID = 8  # __kernel_fsid_t, before the file handle in a FID info record

libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_char_p]
libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


@record(frozen=True)
class Event:
    mask: int
    pid: int
    handle: bytes | None  # the parent directory's struct file_handle, as the kernel wrote it
    name: bytes | None  # the entry's name in that directory ("." for the directory itself)


def init(flags: int) -> int:
    return check(libc.fanotify_init(flags | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY),
                 "fanotify_init")


def mark(fd: int, flags: int, mask: int, path: str) -> None:
    check(libc.fanotify_mark(fd, FAN_MARK_ADD | flags, mask, -1, os.fsencode(path)),
          f"fanotify_mark {path}")


def ignore(fd: int, directory_fd: int, mask: int) -> None:
    """Events of `mask` on the open directory `directory_fd` (with FAN_EVENT_ON_CHILD: on its
    entries too) no longer reach the group, whatever other mark reports them; the ignore mark
    goes with the directory's inode, or with unmark_all(fd, 0)."""
    check(libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY,
                             mask, directory_fd, None), "fanotify_mark ignore")


def unmark_all(fd: int, flags: int) -> None:
    """Remove every mark of the kind `flags` names (FAN_MARK_FILESYSTEM, ...) from the group.
    The kernel frees removed marks after an SRCU grace period, on a worker of its own; closing
    the group waits for that (~5-13 ms measured), so a group whose marks went a few ms earlier
    closes at once."""
    check(libc.fanotify_mark(fd, FAN_MARK_FLUSH | flags, 0, -1, None), "fanotify_mark flush")


def parse(data: bytes) -> Iterator[Event]:
    """The events in one read()'s buffer."""
    offset = 0
    while offset + _META.size <= len(data):
        length, _, _, meta_len, mask, fd, pid = _META.unpack_from(data, offset)
        if length < _META.size:
            return
        if fd >= 0:  # not in FID mode; never expected, but a descriptor must not leak
            os.close(fd)
        handle = name = None
        info = offset + meta_len
        while info + _INFO.size <= offset + length:
            kind, _, info_len = _INFO.unpack_from(data, info)
            if info_len < _INFO.size:
                break
            if kind == FAN_EVENT_INFO_TYPE_DFID_NAME:
                at = info + _INFO.size + _FSID
                size = struct.unpack_from("=I", data, at)[0]
                end = at + 8 + size  # handle_bytes, handle_type, f_handle
                handle = data[at:end]
                name = data[end:info + info_len].split(b"\0", 1)[0]
            info += info_len
        yield Event(mask, pid, handle, name)
        offset += length


def open_by_handle(mount_fd: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """A descriptor of the object `handle` names (needs CAP_DAC_READ_SEARCH)."""
    return check(libc.open_by_handle_at(mount_fd, handle, flags | os.O_CLOEXEC),
                 "open_by_handle_at")
