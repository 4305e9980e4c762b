"""What every audit reports: a `Finding` with a stable id, a severity, what was found, where,
why it matters and how to fix it; and the names of the tools an intruder reaches for."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "low", "medium", "high")

# Names of the tools an intruder reaches for. Whole-name regular expressions, by category.
TOOLS: dict[str, re.Pattern[str]] = {k: re.compile(v) for k, v in {
    "shell": r"(ba|da|z|k|mk|pdk|c|tc|a|y|r|rba)?sh|fish|busybox|toybox",
    "compiler": r"(\w+-linux-gnu\w*-)?(gcc|g\+\+|cc|c\+\+|cpp|as|ld|ld\.bfd|ld\.gold|ld\.lld"
                r"|clang|clang\+\+|tcc)(-[\d.]+)?|make|gmake|rustc|cargo|go|gccgo|javac|nasm|yasm",
    "interpreter": r"perl[\d.]*|python[\d.]*|pypy[\d.]*|ruby[\d.]*|irb|php[\d.]*|lua[\d.]*"
                   r"|luajit|node|nodejs|deno|tclsh[\d.]*|wish[\d.]*|guile[\d.]*|java|jshell"
                   r"|Rscript|pwsh|expect",
    "network-tool": r"nc|ncat|netcat|nc\.openbsd|nc\.traditional|socat|curl|wget|telnet|ssh"
                    r"|scp|sftp|ftp|tftp|nmap|tcpdump|tshark|dumpcap|rsync",
}.items()}


def tool_kind(name: str) -> str | None:
    for kind, pattern in TOOLS.items():
        if pattern.fullmatch(name):
            return kind
    return None


# Why each kind of finding matters and how to fix it: printed once per kind in the text report.
WHY_FIX: dict[str, tuple[str, str]] = {
    "setuid": ("a setuid or setgid program runs with its owner's rights for any caller: one bug "
               "in it is a privilege escalation", "remove the bit (chmod u-s,g-s FILE) or the "
               "package if nothing needs it; keep only what you can name a use for"),
    "world-writable-dir": ("anyone can delete or replace anyone's files in it (no sticky bit), "
                           "e.g. swap a file a root job reads", "chmod o-w DIR, or chmod +t DIR "
                           "if it really is a shared scratch directory"),
    "world-writable-file": ("anyone can change it; if a program or a root job reads or runs it, "
                            "that is code execution", "chmod o-w FILE"),
    "tool": ("compilers, interpreters and network tools turn a foothold into a toolbox: build an "
             "exploit, fetch a payload, open a reverse shell", "remove the packages a server does "
             "not need (apt-get purge ...), or restrict them to administrators (chmod 0750, "
             "group adm)"),
    "sysctl": ("a kernel setting that hands an attacker information or reach", "set it in "
               "/etc/sysctl.d/90-hardening.conf and run sysctl --system"),
    "listen": ("a network daemon outside corral runs with all its user's rights on the host; "
               "a root one is the whole host if it is compromised", "contain it with a corral "
               "manifest, run it as its own unprivileged user, or bind it to loopback"),
    "daemon": ("a long-running program outside corral: nothing contains it if it is "
               "compromised", "contain it with a corral manifest, or stop it if unused"),
    "firewall": ("without a default-deny policy every port a program opens is reachable, and "
                 "every destination a compromised program wants is allowed",
                 "write a host file and `corral host apply` it (table inet corral-host), or set "
                 "the input hook chain's policy to drop"),
    "walk": ("part of the tree was not examined", "run as root; raise --time-limit"),
    "shell": ("a shell in the image is the first thing an intruder wants: a command line "
              "inside the containment", "drop it from image.include (and from anything that "
              "pulls it in)"),
    "compiler": ("a compiler in the image lets an intruder build tools inside the containment",
                 "drop it from image.include"),
    "interpreter": ("an interpreter the process does not run is a ready-made scripting engine "
                    "for an intruder", "drop it from image.include"),
    "network-tool": ("a network tool in the image helps exfiltrate data or pivot",
                     "drop it from image.include"),
    "device": ("a device node gives direct access to hardware or kernel memory",
               "remove it; corral mounts its own /dev with null, zero, full, random, urandom"),
    "unused": ("files the processes never open are attack surface for no gain",
               "narrow image.include to what `corral learn` saw used"),
    "learn": ("without learn data, unused files cannot be told apart",
              "run `corral learn` and keep its learn.json in the service's state directory"),
}


@dataclass
class Finding:
    id: str
    severity: str  # info | low | medium | high
    kind: str  # key of WHY_FIX
    what: str
    where: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def why(self) -> str:
        return WHY_FIX.get(self.kind, ("", ""))[0]

    @property
    def fix(self) -> str:
        return WHY_FIX.get(self.kind, ("", ""))[1]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "severity": self.severity, "kind": self.kind,
                               "what": self.what, "where": self.where, "why": self.why,
                               "fix": self.fix}
        if self.detail:
            out["detail"] = self.detail
        return out


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (-SEVERITIES.index(f.severity), f.kind, f.id))
