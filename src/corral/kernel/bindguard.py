"""A cgroup BPF program on bind(): which UDP ports the sockets of a cgroup may bind.

Landlock (ABI 7 included) has bind rules for TCP only, and nftables cannot stop a bind at all (at
input it does not even see a UDP datagram's receiving socket). So a contained process could bind
another service's declared UDP port, with SO_REUSEADDR/SO_REUSEPORT take its datagrams, or hold
it while that service is down so it cannot start. The kernel's BPF_CGROUP_INET4_BIND and
INET6_BIND hooks run in inet_bind() for every socket created in the cgroup (or below it), before
the port is taken, and whatever the socket options: the program below answers EPERM (return 0)
unless the port is 0 (the kernel picks one) or one of the listed ports.

The program is hand-assembled (a dozen instructions on the path of an allowed bind) and loaded
with the raw bpf(2) call: no BPF library or compiler is installed, and none is needed for this.
Given a ring buffer (kernel.bpfring), a refused bind also writes a report there (who, which
port, when) for the supervisor's `listen` incident: only the refusing path pays for it.

It checks UDP and UDP-Lite sockets only (UDP-Lite ports are a namespace of their own, checked
the same way); TCP is Landlock's. Its cost is paid at bind() only, never per packet.

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
_STX_W, _STX_H, _STX_DW = 0x63, 0x6B, 0x7B  # *(size *)(dst + off) = src
_ST_DW = 0x7A  # *(u64 *)(dst + off) = imm
_LD_IMM64 = 0x18  # two slots; with src 1 (BPF_PSEUDO_MAP_FD) the imm is a map's fd
_END_BE = 0xDC  # dst = htobe<imm>(dst): on a little-endian host, a byte swap
_MOV64_K, _MOV64_X, _ADD64_K = 0xB7, 0xBF, 0x07
_JEQ_K, _JNE_K, _JLT_K, _JLE_K = 0x15, 0x55, 0xA5, 0xB5
_CALL, _EXIT = 0x85, 0x95
R0, R1, R2, R3, R4, R6, R7, R10 = 0, 1, 2, 3, 4, 6, 7, 10
# helpers (enum bpf_func_id) a cgroup sock_addr program may call
_KTIME_GET_NS, _PID_TGID, _UID_GID, _COMM, _RINGBUF_OUTPUT = 5, 14, 15, 16, 130
CTX_FAMILY, CTX_IP4, CTX_IP6 = 0, 4, 8  # user_family, user_ip4, user_ip6[4]

# A refused bind's report in the ring buffer (kernel.bpfring), REPORT.size bytes:
# pid_tgid (pid in the high half, as the initial PID namespace numbers it), uid_gid (uid in the
# low half), CLOCK_MONOTONIC ns, port, protocol, address family, 2 pad bytes, the address
# (16 bytes; IPv4 in the first 4), the task's comm.
REPORT = struct.Struct("=QQQHHH2x16s16s")


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


def _report(ring_fd: int, attach_type: int) -> list[tuple[int, int, int, int, int]]:
    """The deny path's report: the record built on the stack, then bpf_ringbuf_output. It
    runs after the checks, so a bind that is allowed costs not one instruction more. On entry
    r1 is the context, r2 the port; a full ring loses the record, never changes the answer."""
    code = [(_MOV64_X, R6, R1, 0, 0), (_MOV64_X, R7, R2, 0, 0),
            (_ST_DW, R10, 0, -40, 0), (_ST_DW, R10, 0, -32, 0), (_ST_DW, R10, 0, -24, 0)]
    for helper, slot in ((_PID_TGID, -64), (_UID_GID, -56), (_KTIME_GET_NS, -48)):
        code += [(_CALL, 0, 0, 0, helper), (_STX_DW, R10, R0, slot, 0)]
    code.append((_STX_H, R10, R7, -40, 0))
    for field, slot in ((CTX_PROTOCOL, -38), (CTX_FAMILY, -36)):
        code += [(_LDX_W, R2, R6, field, 0), (_STX_H, R10, R2, slot, 0)]
    words = 1 if attach_type == BPF_CGROUP_INET4_BIND else 4
    base = CTX_IP4 if attach_type == BPF_CGROUP_INET4_BIND else CTX_IP6
    for i in range(words):
        code += [(_LDX_W, R2, R6, base + 4 * i, 0), (_STX_W, R10, R2, -32 + 4 * i, 0)]
    code += [(_MOV64_X, R1, R10, 0, 0), (_ADD64_K, R1, 0, 0, -16), (_MOV64_K, R2, 0, 0, 16),
             (_CALL, 0, 0, 0, _COMM),
             (_LD_IMM64, R1, 1, 0, ring_fd), (0, 0, 0, 0, 0),
             (_MOV64_X, R2, R10, 0, 0), (_ADD64_K, R2, 0, 0, -REPORT.size),
             (_MOV64_K, R3, 0, 0, REPORT.size), (_MOV64_K, R4, 0, 0, 0),
             (_CALL, 0, 0, 0, _RINGBUF_OUTPUT)]
    return code


def program(ports: Iterable[tuple[int, int]], ring_fd: int | None = None,
            attach_type: int = BPF_CGROUP_INET4_BIND) -> bytes:
    """The bind program allowing `ports` (inclusive ranges) and 0 to UDP and UDP-Lite sockets:
    a pure function of its arguments, so the same plan always loads the same program. With
    `ring_fd` (a kernel.bpfring map) each refused bind is reported there."""
    ranges = sorted(set(ports))
    for first, last in ranges:
        if not 0 <= first <= last <= 65535:
            raise ValueError(f"bad port range {first}-{last}")
    code: list[tuple[int, int, int, int, int, str | None]] = []  # op, dst, src, off, imm, to
    labels: dict[str, int] = {}

    def emit(op: int, dst: int = 0, src: int = 0, value: int = 0, to: str | None = None) -> None:
        code.append((op, dst, src, value if op == _LDX_W else 0, 0 if op == _LDX_W else value,
                     to))

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
    if ring_fd is not None:
        code += [(*insn, None) for insn in _report(ring_fd, attach_type)]
    emit(_MOV64_K, R0, value=0)  # deny: bind() fails with EPERM
    emit(_EXIT)
    labels["allow"] = len(code)
    emit(_MOV64_K, R0, value=1)
    emit(_EXIT)
    out = b""
    for pc, (op, dst, src, off, imm, to) in enumerate(code):
        out += _insn(op, dst, src, labels[to] - pc - 1 if to else off, imm)
    return out


def bpf(cmd: int, attr: ctypes.Array) -> int:
    """The raw bpf(2) call with a filled-in union bpf_attr; the fd or 0, OSError on failure."""
    return check(libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_long(cmd), attr,
                              ctypes.c_long(ctypes.sizeof(attr))), "bpf")


def load(insns: bytes, attach_type: int) -> int:
    """Load the program for one hook; returns its fd. The verifier's log is in the error."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)  # ENOSPC if the log outgrows it
    attr = ctypes.create_string_buffer(128)  # union bpf_attr; unused bytes must stay zero
    struct.pack_into("=IIQQIIQII16sII", attr, 0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                     len(insns) // 8, ctypes.addressof(code), ctypes.addressof(license_),
                     1, len(log), ctypes.addressof(log), 0, 0, b"corral_bind", 0, attach_type)
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        text = log.value.decode(errors="replace").strip()
        raise OSError(exc.errno, f"{exc.strerror}{': ' + text[-300:] if text else ''}") from None


def attach(cgroup_dir: str, ports: Iterable[tuple[int, int]],
           ring_fd: int | None = None) -> None:
    """Attach the bind program for `ports` to a cgroup v2 directory, IPv4 and IPv6 hooks,
    replacing any program attached there before (no flags: one program, which a descendant
    cgroup cannot override), reporting refusals to the ring buffer `ring_fd` if given. The
    attachment lives as long as the cgroup (and keeps the ring alive); our fds are closed."""
    cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for attach_type in ATTACH_TYPES:
            prog = load(program(ports, ring_fd, attach_type), attach_type)
            try:
                attr = ctypes.create_string_buffer(32)
                struct.pack_into("=IIII", attr, 0, cg, prog, attach_type, 0)
                bpf(BPF_PROG_ATTACH, attr)
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
        bpf(BPF_PROG_QUERY, attr)  # prog_ids NULL: the kernel fills in only the count
        return struct.unpack_from("=I", attr, 24)[0]  # prog_cnt after attach_flags, prog_ids
    finally:
        os.close(cg)
