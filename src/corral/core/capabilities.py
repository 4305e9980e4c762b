"""Linux capability names and numbers (linux/capability.h, up to CAP_CHECKPOINT_RESTORE, 5.9+)."""

from __future__ import annotations

CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        """CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP
        LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER
        SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE
        SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP
        MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF
        CHECKPOINT_RESTORE""".split()
    )
}


def normalize_capability(raw: object) -> str:
    """"NET_BIND_SERVICE", "CAP_NET_BIND_SERVICE" or "net_bind_service" -> "NET_BIND_SERVICE"."""
    if not isinstance(raw, str):
        raise ValueError('expected a capability name like "NET_BIND_SERVICE"')
    name = raw.strip().upper()
    name = name.removeprefix("CAP_")
    if name not in CAPABILITIES:
        raise ValueError(f'"{raw}": unknown capability')
    return name
