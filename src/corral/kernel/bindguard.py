"""A cgroup BPF program on bind(): which UDP ports the sockets of a cgroup may bind.

Landlock (ABI 7 included) has bind rules for TCP only, and nftables cannot stop a bind at all (at
input it does not even see a UDP datagram's receiving socket). So a contained process could bind
another service's declared UDP port, with SO_REUSEADDR/SO_REUSEPORT take its datagrams, or hold
it while that service is down so it cannot start. The kernel's BPF_CGROUP_INET4_BIND and
INET6_BIND hooks run in inet_bind() for every socket created in the cgroup (or below it), before
the port is taken, and whatever the socket options: the program below answers EPERM (return 0)
unless the port is 0 (the kernel picks one) or one of the listed ports.

The program is hand-assembled (a dozen instructions, no maps, no helpers) and loaded with the raw
bpf(2) call: no BPF library or compiler is installed, and none is needed for this. It checks UDP
and UDP-Lite sockets only (UDP-Lite ports are a namespace of their own, checked the same way);
TCP is Landlock's. Its cost is paid at bind() only, never per packet.

No policy here: which ports is the caller's business (launch.cgroup).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable

from corral.kernel.syscalls import check, libc

SYS_BPF = 321  # x86_64
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_QUERY = 5, 8, 16
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_INET4_BIND, BPF_CGROUP_INET6_BIND = 8, 9
ATTACH_TYPES = (BPF_CGROUP_INET4_BIND, BPF_CGROUP_INET6_BIND)
IPPROTO_UDP, IPPROTO_UDPLITE = 17, 136

# struct bpf_sock_addr, the program's context: offsets of the fields it reads.
CTX_USER_PORT = 24  # __u32 holding the __be16 port
CTX_PROTOCOL = 36

# eBPF opcodes (include/uapi/linux/bpf.h, bpf_common.h)
_LDX_W = 0x61  # dst = *(u32 *)(src + off)
_END_BE = 0xDC  # dst = htobe<imm>(dst): on a little-endian host, a byte swap
_MOV64_K = 0xB7
_JEQ_K, _JNE_K, _JLT_K, _JLE_K = 0x15, 0x55, 0xA5, 0xB5
_EXIT = 0x95
R0, R1, R2 = 0, 1, 2


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


def program(ports: Iterable[tuple[int, int]]) -> bytes:
    """The bind program allowing `ports` (inclusive ranges) and 0 to UDP and UDP-Lite sockets:
    a pure function of the ranges, so the same plan always loads the same program."""
    ranges = sorted(set(ports))
    for first, last in ranges:
        if not 0 <= first <= last <= 65535:
            raise ValueError(f"bad port range {first}-{last}")
    code: list[tuple[int, int, int, int, str | None]] = []  # (op, dst, src, off/imm, jump to)
    labels: dict[str, int] = {}

    def emit(op: int, dst: int = 0, src: int = 0, value: int = 0, to: str | None = None) -> None:
        code.append((op, dst, src, value, to))

    emit(_LDX_W, R2, R1, CTX_PROTOCOL)
    emit(_JEQ_K, R2, value=IPPROTO_UDP, to="port")
    emit(_JNE_K, R2, value=IPPROTO_UDPLITE, to="allow")  # not UDP: TCP is Landlock's
    labels["port"] = len(code)
    emit(_LDX_W, R2, R1, CTX_USER_PORT)
    emit(_END_BE, R2, value=16)
    emit(_JEQ_K, R2, value=0, to="allow")
    for i, (first, last) in enumerate(ranges):
        if first == last:
            emit(_JEQ_K, R2, value=first, to="allow")
        else:
            emit(_JLT_K, R2, value=first, to=f"next{i}")
            emit(_JLE_K, R2, value=last, to="allow")
            labels[f"next{i}"] = len(code)
    emit(_MOV64_K, R0, value=0)  # deny: bind() fails with EPERM
    emit(_EXIT)
    labels["allow"] = len(code)
    emit(_MOV64_K, R0, value=1)
    emit(_EXIT)
    out = b""
    for pc, (op, dst, src, value, to) in enumerate(code):
        if op == _LDX_W:  # the value is the load's offset
            out += _insn(op, dst, src, off=value)
        else:
            out += _insn(op, dst, src, off=labels[to] - pc - 1 if to else 0, imm=value)
    return out


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    return check(libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_long(cmd), attr,
                              ctypes.c_long(ctypes.sizeof(attr))), "bpf")


def load(insns: bytes, attach_type: int) -> int:
    """Load the program for one hook; returns its fd. The verifier's log is in the error."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)  # union bpf_attr; unused bytes must stay zero
    struct.pack_into("=IIQQIIQII16sII", attr, 0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                     len(insns) // 8, ctypes.addressof(code), ctypes.addressof(license_),
                     1, len(log), ctypes.addressof(log), 0, 0, b"corral_bind", 0, attach_type)
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        text = log.value.decode(errors="replace").strip()
        raise OSError(exc.errno, f"{exc.strerror}{': ' + text[-300:] if text else ''}") from None


def attach(cgroup_dir: str, ports: Iterable[tuple[int, int]]) -> None:
    """Attach the bind program for `ports` to a cgroup v2 directory, IPv4 and IPv6 hooks,
    replacing any program attached there before (no flags: one program, which a descendant
    cgroup cannot override). The attachment lives as long as the cgroup; our fds are closed."""
    insns = program(ports)
    cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for attach_type in ATTACH_TYPES:
            prog = load(insns, attach_type)
            try:
                attr = ctypes.create_string_buffer(32)
                struct.pack_into("=IIII", attr, 0, cg, prog, attach_type, 0)
                _bpf(BPF_PROG_ATTACH, attr)
            finally:
                os.close(prog)
    finally:
        os.close(cg)


def attached(cgroup_dir: str, attach_type: int) -> int:
    """How many programs are attached to the cgroup itself at this hook (BPF_PROG_QUERY)."""
    cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        attr = ctypes.create_string_buffer(64)
        struct.pack_into("=IIII", attr, 0, cg, attach_type, 0, 0)
        _bpf(BPF_PROG_QUERY, attr)  # prog_ids NULL: the kernel fills in only the count
        return struct.unpack_from("=I", attr, 24)[0]  # prog_cnt after attach_flags, prog_ids
    finally:
        os.close(cg)
