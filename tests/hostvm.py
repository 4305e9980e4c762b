"""A qemu guest driven through its serial console: the boot test's only channel into it.

Kernel and initramfs are given to qemu directly (no bootloader); the persistent disk is a raw
ext4 image made with `mkfs.ext4 -d` (no loop mount on the test machine). qemu is killed by its
PID in `close`, which the test calls even on failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

PROMPT = re.compile(rb"root@corral-host:[^#\r\n]*# ")


def accel() -> list[str]:
    """TCG unless CORRAL_BOOT_ACCEL=kvm. On the development machines (a nested AMD EPYC),
    `-enable-kvm -cpu qemu64` starts qemu but Debian's 6.1 kernel hangs right after "Probing
    EDD", before its first message, with or without earlyprintk; under TCG it boots."""
    if os.environ.get("CORRAL_BOOT_ACCEL") == "kvm" and os.access("/dev/kvm", os.W_OK):
        return ["-enable-kvm", "-cpu", "qemu64"]
    return ["-accel", "tcg", "-cpu", "qemu64"]


def make_disk(path: Path, content: Path, size_mb: int = 1024) -> None:
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "corral-persist", "-d", str(content),
                    str(path)], check=True)


class Guest:
    def __init__(self, kernel: Path, initrd: Path, disk: Path, log: Path) -> None:
        self.log = open(log, "ab")
        self.buf = b""
        self.lock = threading.Lock()
        self.started = time.monotonic()
        argv = ["qemu-system-x86_64", *accel(), "-m", "1024", "-smp", "2", "-no-reboot",
                "-display", "none", "-monitor", "none", "-serial", "stdio",
                "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", "console=ttyS0 boot=corral corral.persist=LABEL=corral-persist "
                           "panic=-1 quiet",
                "-drive", f"file={disk},format=raw,if=virtio",
                "-nic", "user,model=virtio-net-pci"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.log.write(chunk)
            self.log.flush()
            with self.lock:
                self.buf += chunk

    def expect(self, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                match = pattern.search(self.buf)
                if match:
                    self.buf = self.buf[match.end():]
                    return match
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu exited ({self.proc.returncode}) waiting for "
                                     f"{pattern.pattern!r}; see {self.log.name}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {pattern.pattern!r}; see {self.log.name}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def sh(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a shell command; its output and exit code, told apart from the echoed input by
        markers the input itself does not contain (the quotes split them)."""
        self.send(f"echo '<<'BEGIN; {command}; echo \"<<END $?>>\"")
        self.expect(re.compile(rb"<<BEGIN\r?\n"), timeout)
        match = self.expect(re.compile(rb"(.*?)<<END (\d+)>>", re.S), timeout)
        out = match.group(1).decode(errors="replace").replace("\r\n", "\n")
        return int(match.group(2)), out

    def tail(self, size: int = 3000) -> str:
        """The console's last bytes, control characters made visible: for failure messages."""
        self.log.flush()
        with open(self.log.name, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - size))
            text = log.read().decode(errors="replace")
        return "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}"
                       for c in text.replace("\r\n", "\n"))

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by this object's own PID only
            self.proc.wait(10)
        self.log.close()
