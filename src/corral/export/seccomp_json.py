"""corral's seccomp policy (plan.sandbox, as launch.seccomp compiles it) in the OCI/Docker
seccomp JSON format that runc, crun, podman and the kubelet's `Localhost` profiles read.

The same rules, written as data: the deny-list (EPERM), clone3's ENOSYS, clone with a namespace
flag, the terminal-injection ioctls and setuid/setgid bits in a mode argument. What the format
cannot say is in LOST."""

from __future__ import annotations

import errno
from typing import Any

from corral.launch.seccomp import (
    ALWAYS_ALLOWED,
    CREATE_MODE_ARGUMENT,
    CREATING_FLAGS,
    MODE_ARGUMENT,
    SETID_BITS,
    TTY_INJECTION,
    not_in_low32,
)
from corral.plan.sandbox import CLONE_NAMESPACE_FLAGS, SeccompPlan

LOST = (
    "calls of another architecture return an error instead of killing the process (the "
    "runtime decides what an unlisted architecture gets)",
    "the ioctl filter compares all 64 bits of the request (corral: the low 32 bits, as the "
    "kernel reads it); a request with high bits set passes",
    "denials are not logged for a watcher (no SECCOMP_FILTER_FLAG_LOG), and execve is not "
    "held for the exec tripwire",
)


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]


def _masked(name: str, index: int, bit: int) -> dict[str, Any]:
    """Deny `name` when argument `index` has `bit` set: MASKED_EQ is (arg & value) == valueTwo."""
    return {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
            "args": [{"index": index, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}]}


def _allowed_if(name: str, index: int, mask: int, datum: int) -> dict[str, Any]:
    return {"names": [name], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": index, "value": mask, "valueTwo": datum,
                      "op": "SCMP_CMP_MASKED_EQ"}]}


def profile(plan: SeccompPlan) -> dict[str, Any]:
    """Deny-list: allow by default, deny the calls, and deny by argument (one rule per bit or
    value: rules OR, a rule's args AND). Allow-list: deny by default, allow the calls, and allow
    the argument-checked ones only when their arguments are harmless (a conditional rule, never
    beside an unconditional one for the same call, which runtimes refuse)."""
    checked_modes = dict(MODE_ARGUMENT)
    setid = sum(SETID_BITS)
    rules: list[dict[str, Any]] = []
    if plan.mode == "deny-list":
        default = "SCMP_ACT_ALLOW"
        rules.append({"names": sorted(plan.syscalls), "action": "SCMP_ACT_ERRNO",
                      "errnoRet": errno.EPERM})
        rules += [_masked("clone", 0, bit) for bit in _bits(CLONE_NAMESPACE_FLAGS)]
        rules += [{"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
                   "args": [{"index": 1, "value": value, "op": "SCMP_CMP_EQ"}]}
                  for value in TTY_INJECTION]
        for name, index in MODE_ARGUMENT:
            rules += [_masked(name, index, bit) for bit in SETID_BITS]
        # open/openat: only a creating open reads its mode, as corral's own filter has it: one
        # rule per (creating flag, setid bit), a rule's comparisons ANDed.
        for name, flags, index in CREATE_MODE_ARGUMENT:
            rules += [{"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
                       "args": [{"index": flags, "value": flag, "valueTwo": flag,
                                 "op": "SCMP_CMP_MASKED_EQ"},
                                {"index": index, "value": bit, "valueTwo": bit,
                                 "op": "SCMP_CMP_MASKED_EQ"}]}
                      for flag in CREATING_FLAGS for bit in SETID_BITS]
    else:
        default = "SCMP_ACT_ERRNO"
        listed = set(plan.syscalls) | set(ALWAYS_ALLOWED)
        creating = {name: (flags, index) for name, flags, index in CREATE_MODE_ARGUMENT}
        checked = {"clone", "ioctl"} | set(checked_modes) | set(creating)
        rules.append({"names": sorted(listed - checked), "action": "SCMP_ACT_ALLOW"})
        if "clone" in listed:
            rules.append(_allowed_if("clone", 0, CLONE_NAMESPACE_FLAGS, 0))
        if "ioctl" in listed:
            rules += [_allowed_if("ioctl", 1, mask, datum)
                      for mask, datum in not_in_low32(TTY_INJECTION)]
        for name in sorted(listed & set(checked_modes)):
            rules.append(_allowed_if(name, checked_modes[name], setid, 0))
        # A listed open/openat is allowed when it does not create, or creates without a setid
        # bit (two rules: rules OR).
        for name in sorted(listed & set(creating)):
            flags, index = creating[name]
            rules.append(_allowed_if(name, flags, sum(CREATING_FLAGS), 0))
            rules.append(_allowed_if(name, index, setid, 0))
    if plan.enosys:
        rules.append({"names": sorted(plan.enosys), "action": "SCMP_ACT_ERRNO",
                      "errnoRet": errno.ENOSYS})
    return {"defaultAction": default, "defaultErrnoRet": errno.EPERM,
            "architectures": ["SCMP_ARCH_X86_64"], "syscalls": rules}
