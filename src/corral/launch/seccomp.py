"""Compile a `SeccompPlan` into a libseccomp filter (in the supervisor) and load it (in the child).

The filter, for the native architecture only (x86_64 here):

- deny-list: everything is allowed except the plan's calls (the deny action, EPERM), `clone`
  with any namespace flag and `ioctl` TIOCSTI/TIOCLINUX (terminal injection);
- allow-list: everything is denied except the plan's calls and `ALWAYS_ALLOWED`; a listed
  `clone` or `ioctl` keeps the same argument restrictions as in the deny-list;
- in both: `plan.enosys` (clone3) gets ENOSYS so glibc falls back to `clone`, whose flags we
  can check; a call made through another ABI (i386 `int 0x80`, x32 numbers with bit 0x40000000)
  kills the process. libseccomp 2.5.4 emits that x32 check itself in a native x86_64 filter
  (nr >= 0x40000000 and != -1 -> bad-arch action), so no extra rule is needed;
- denials are logged (SECCOMP_FILTER_FLAG_LOG): audit records of type SECCOMP for the watcher.

Two filters are stacked (`Filters`): the plan in `main`, logged, and in `quiet` what happens all
the time and must not reach the audit log: clone3's ENOSYS (glibc tries clone3 for every new
thread) and the user notification of execve (the exec sensor answers those itself). In one
logged filter each thread a service started cost an audit record, formatted by the kernel,
queued to kauditd, printed (rate-limited) to the kernel log and parsed by the supervisor: a
third of the sample service's request rate (bench/run.sh, part (c)).

pyseccomp is imported inside the functions: corral's CLI must start without loading libseccomp.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass
from typing import Any

from corral.kernel import libseccomp
from corral.kernel import syscalls as kernel
from corral.plan.sandbox import CLONE_NAMESPACE_FLAGS, SeccompPlan

TIOCSTI = 0x5412  # push a byte into a terminal's input: keystroke injection into the owner's shell
TIOCLINUX = 0x541C  # virtual-console selection paste: the same injection on a VT
TTY_INJECTION = (TIOCSTI, TIOCLINUX)
LOW32 = 0xFFFFFFFF  # ioctl's cmd is an unsigned int: the kernel ignores the upper 32 bits

# Allowed whatever an allow-list says, since the child itself still has to get to the program:
# execve (launch uses execve; execvpe is execve in a loop), exit/exit_group (a clean exit, of
# the child if execve fails and of the program's threads), write (launch reports a failed
# execve through its error pipe; without it the supervisor would think the program started)
# and rt_sigreturn (returning from any signal handler: without it a signal arriving between
# load and execve crashes the child with SIGSEGV). What the program needs after execve (the
# dynamic loader's mmap, openat, ...) is the allow-list's business.
# sendmsg and close: the launcher hands the exec listener to the supervisor after the load.
ALWAYS_ALLOWED = ("close", "execve", "exit", "exit_group", "rt_sigreturn", "sendmsg", "write")

_FIXED_ACTIONS = {"kill-process": "KILL_PROCESS", "kill-thread": "KILL_THREAD", "trap": "TRAP",
                  "log": "LOG", "allow": "ALLOW"}


def action(spec: str) -> int:
    """libseccomp action of a plan string: "errno:EPERM" (or "errno:1"), "kill-process", ..."""
    pyseccomp = libseccomp.load()

    kind, _, arg = spec.partition(":")
    if kind == "errno":
        code = int(arg) if arg.isdigit() else getattr(errno, arg, None)
        if isinstance(code, int):
            return pyseccomp.ERRNO(code)
    elif kind in _FIXED_ACTIONS and not arg:
        return getattr(pyseccomp, _FIXED_ACTIONS[kind])
    raise ValueError(f"unknown seccomp action {spec!r}")


def _number(name: str) -> int | None:
    """The native syscall number, or None for a call libseccomp does not know on this arch
    (those are skipped: a plan written for another architecture or kernel must still load)."""
    pyseccomp = libseccomp.load()

    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    return nr if nr >= 0 else None  # -1: unknown; below: a pseudo number for another arch


def resolves(name: str) -> bool:
    """Whether the call is known on this arch (a rule for it is in the program)."""
    return _number(name) is not None


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]


def not_in_low32(values: tuple[int, ...]) -> list[tuple[int, int]]:
    """(mask, datum) pairs, one per rule, whose union is "low 32 bits not in values".

    libseccomp has no masked "not equal", and NE compares all 64 bits (so 0x1_00005412 would
    pass it while the kernel runs TIOCSTI). So cover the complement with MASKED_EQ rules: one
    per bit on which all the values agree (any value differing there is none of them), plus
    each exact value that agrees on those bits and is not one of them."""
    diff = 0
    for v in values:
        diff |= v ^ values[0]
    common = values[0] & ~diff & LOW32
    pairs = [(bit, ~common & bit) for bit in _bits(LOW32 & ~diff)]
    for chosen in itertools.product((0, 1), repeat=len(_bits(diff))):
        v = common | sum(b for b, c in zip(_bits(diff), chosen, strict=True) if c)
        if v not in values:
            pairs.append((LOW32, v))
    return pairs


# Setting a setuid/setgid bit is the `setuid` tripwire: denied (and so logged for the watcher)
# wherever the kernel reads a mode, and only there. chmod/mkdir/mknod/creat always read theirs:
# (syscall, index of its mode argument).
MODE_ARGUMENT = (("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("fchmodat2", 2), ("creat", 1),
                 ("mkdir", 1), ("mkdirat", 2), ("mknod", 1), ("mknodat", 2))
# open/openat read the mode only when they may create (the kernel's WILL_CREATE: O_CREAT or
# __O_TMPFILE); otherwise the register is whatever the caller left there, and jemalloc's raw
# open(path, O_RDONLY) leaves garbage with S_ISUID set in it (redis-server tripped at every
# start). (syscall, index of flags, index of mode)
CREATE_MODE_ARGUMENT = (("open", 1, 2), ("openat", 2, 3))
CREATING_FLAGS = (0o100, 0o20000000)  # O_CREAT, __O_TMPFILE (O_TMPFILE is it | O_DIRECTORY)
SETID_BITS = (0o4000, 0o2000)


# Multicast joins, refused unless the plan allows multicast: a joined group's address leaves
# the host in the kernel's IGMP/MLD reports, which no socket owns (so no `meta skuid` rule
# matches them). (setsockopt level, its join options); IPV6_JOIN_ANYCAST joins the address's
# solicited-node group, which reports too.
SOL_IP, SOL_IPV6 = 0, 41
# IP_ADD_MEMBERSHIP, IP_ADD_SOURCE_MEMBERSHIP, MCAST_JOIN_GROUP, MCAST_JOIN_SOURCE_GROUP;
# IPV6_ADD_MEMBERSHIP, IPV6_JOIN_ANYCAST and the same two MCAST_ options.
MULTICAST_JOINS = ((SOL_IP, (35, 39, 42, 46)), (SOL_IPV6, (20, 27, 42, 46)))


# The calls the program looks into (above), the most frequent in a server first: nginx makes
# two setsockopt and one openat per request (bench/seccomp_calls.py, both filters: setsockopt
# +95 -> +79 ns, openat +206 -> +160 ns against their place in syscall-number order).
ARGUMENT_CHECKED = ("setsockopt", "openat", "open", "ioctl", "clone",
                    *sorted({name for name, _ in MODE_ARGUMENT}))


@dataclass
class Filters:
    """A plan compiled: `main` (the plan; denials logged) and `quiet` (ENOSYS and user
    notifications, not logged; None when there are none). `main` allows every call `quiet`
    answers, so for each call one of them decides. `quiet` is loaded first: libseccomp's own
    calls while loading a filter (seccomp, prctl, memory) need not be in an allow-list."""
    main: Any
    quiet: Any


def build(plan: SeccompPlan, *, log: bool = True, notify: tuple[str, ...] = ()) -> Filters:
    """`notify`: calls handed to the supervisor (seccomp user notification) before they run;
    corral uses it for execve/execveat, the `exec` tripwire."""
    pyseccomp = libseccomp.load()
    MASKED_EQ, Arg = pyseccomp.MASKED_EQ, pyseccomp.Arg

    deny = action(plan.deny_action)
    if plan.mode not in ("deny-list", "allow-list"):
        raise ValueError(f"unknown seccomp mode {plan.mode!r}")
    default = pyseccomp.ALLOW if plan.mode == "deny-list" else deny
    filt = pyseccomp.SyscallFilter(default)
    # Only the native arch is in the filter, so any other ABI gets this action.
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, action(plan.other_arch))
    if log:
        filt.set_attr(pyseccomp.Attr.CTL_LOG, 1)
    # A linear program, not libseccomp's binary tree (CTL_OPTIMIZE=2): the tree measured 10-30
    # ns less per uncached call, inside the noise (bench/seccomp_open.py at 6b98806), and made
    # the program 211 instructions instead of 193 (tests/test_seccomp.py keeps it under 200).
    # The calls whose arguments it reads come first: the kernel answers every other call from
    # its action cache without running the program, so only these ever walk it.
    for rank, name in enumerate(ARGUMENT_CHECKED):
        if (nr := _number(name)) is not None:
            filt.syscall_priority(nr, 255 - rank)

    def add(act: int, name: str, *args: Any) -> None:  # args: pyseccomp.Arg (no type info)
        if (nr := _number(name)) is not None:
            filt.add_rule(act, nr, *args)

    special = set(plan.enosys)  # enosys wins over the list in both modes (see sandbox.py)
    quiet = _quiet(sorted(special), sorted(set(notify) - special))
    if plan.mode == "deny-list":
        listed = set(plan.syscalls) - special - set(notify)
        for name in sorted(listed):
            add(deny, name)
        for name, index in MODE_ARGUMENT:
            if name not in listed | special:
                for bit in SETID_BITS:
                    add(deny, name, Arg(index, MASKED_EQ, bit, bit))
        # One rule per (creating flag, setid bit): a rule's comparisons are ANDed.
        for name, flags, index in CREATE_MODE_ARGUMENT:
            if name not in listed | special:
                for flag, bit in itertools.product(CREATING_FLAGS, SETID_BITS):
                    add(deny, name, Arg(flags, MASKED_EQ, flag, flag),
                        Arg(index, MASKED_EQ, bit, bit))
        if "clone" not in listed | special:
            # One rule per flag: MASKED_EQ(flag, flag) is "this flag is set". On x86_64 the flags
            # are clone's first argument (clone(flags, stack, parent_tid, child_tid, tls)).
            for flag in _bits(CLONE_NAMESPACE_FLAGS):
                add(deny, "clone", Arg(0, MASKED_EQ, flag, flag))
        if "ioctl" not in listed | special:
            for cmd in TTY_INJECTION:
                add(deny, "ioctl", Arg(1, MASKED_EQ, LOW32, cmd))
        if not plan.multicast and "setsockopt" not in listed | special:
            for level, options in MULTICAST_JOINS:  # level and optname are ints: low 32 bits
                for option in options:
                    add(deny, "setsockopt", Arg(1, MASKED_EQ, LOW32, level),
                        Arg(2, MASKED_EQ, LOW32, option))
    else:
        listed = (set(plan.syscalls) | set(ALWAYS_ALLOWED)) - special - set(notify)
        # What `quiet` answers, `main` must allow: its deny action (EPERM, or a kill, which
        # would beat quiet's answer) is for the calls nobody listed.
        narrowed = {"clone", "ioctl"} | ({"setsockopt"} if not plan.multicast else set())
        for name in sorted((listed - narrowed) | special | set(notify)):
            add(pyseccomp.ALLOW, name)
        if "setsockopt" in listed and not plan.multicast:
            # Allowed: any other level, and at SOL_IP/SOL_IPV6 any option but the joins.
            for mask, datum in not_in_low32(tuple(level for level, _ in MULTICAST_JOINS)):
                add(pyseccomp.ALLOW, "setsockopt", Arg(1, MASKED_EQ, mask, datum))
            for level, options in MULTICAST_JOINS:
                for mask, datum in not_in_low32(options):
                    add(pyseccomp.ALLOW, "setsockopt", Arg(1, MASKED_EQ, LOW32, level),
                        Arg(2, MASKED_EQ, mask, datum))
        # A listed rule cannot be narrowed with a rule whose action is the default one
        # (libseccomp refuses it), so these allow only the harmless arguments instead.
        if "clone" in listed:
            add(pyseccomp.ALLOW, "clone", Arg(0, MASKED_EQ, CLONE_NAMESPACE_FLAGS, 0))
        if "ioctl" in listed:
            for mask, datum in not_in_low32(TTY_INJECTION):
                add(pyseccomp.ALLOW, "ioctl", Arg(1, MASKED_EQ, mask, datum))
    return Filters(filt, quiet)


def _quiet(enosys: list[str], notify: list[str]) -> Any:
    """The unlogged filter: allows everything but `enosys` (ENOSYS) and `notify` (user
    notification); calls of another ABI it leaves to the main filter."""
    if not enosys and not notify:
        return None
    pyseccomp = libseccomp.load()
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.ALLOW)
    for act, names in ((pyseccomp.ERRNO(errno.ENOSYS), enosys), (pyseccomp.NOTIFY, notify)):
        for name in names:  # sorted: the same plan always compiles to the same program
            if (nr := _number(name)) is not None:
                filt.add_rule(act, nr)
    return filt


def notify_fd(filters: Filters) -> int:
    """The listener descriptor of the loaded quiet filter's NOTIFY rules."""
    if filters.quiet is None:
        raise OSError(errno.ENOENT, "seccomp_notify_fd: no notification rules")
    return libseccomp.notify_fd(filters.quiet)


def load(filters: Filters, main: bool = True) -> None:
    """In the child, last thing before execve. The kernel accepts a filter from an unprivileged
    process only under no_new_privs; launch sets it earlier, set it here if it did not.
    `main=False` is for attribution benchmarks only (launch.benchskip)."""
    if kernel.prctl(kernel.PR_GET_NO_NEW_PRIVS) != 1:
        kernel.prctl(kernel.PR_SET_NO_NEW_PRIVS, 1)
    if filters.quiet is not None:
        filters.quiet.load()
    if main:
        filters.main.load()  # the child is single-threaded after fork: no TSYNC needed


def apply(plan: SeccompPlan) -> None:
    load(build(plan))


def export_bpf(plan: SeccompPlan) -> bytes:
    """The main filter's classic-BPF program (struct sock_filter array), for tests and
    inspection."""
    import tempfile

    with tempfile.TemporaryFile() as out:
        build(plan).main.export_bpf(out)
        out.seek(0)
        return out.read()
