"""The exec tripwire: each contained process's seccomp filter turns its execve/execveat into a
notification that this guard answers, from the supervisor, before the kernel goes on. Only the
process's declared `exec` programs may run, told apart by identity (device, inode) in its root,
not by name; anything else is refused and trips the watcher.

`corral exec` starts its command under the same filter and hands the listener over through the
service's control socket, so the same guard answers for it.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import time
from collections.abc import Callable, Container

from corral.core import log
from corral.host.runtime import ServiceSpec
from corral.kernel import notify
from corral.watch.event import Event  # not .sensors: the walk and its deps load after the fork

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any

    # What the guard reports a refused exec to: the watcher's trip(event, process=...).
    Trip = Callable[[Event, str], Any]


class ExecGuard:
    def __init__(self, spec: ServiceSpec, selector: selectors.BaseSelector, trip: Trip):
        self.spec = spec
        self.selector = selector
        self.trip = trip
        self.allowed: dict[str, set[tuple[int, int]]] = {}  # process -> executables' identities
        self.setup_allowed: dict[str, set[tuple[int, int]]] = {}  # the same for its setup
        self.listeners: dict[int, str] = {}  # seccomp listener -> process name
        self.setup_listeners: set[int] = set()  # those of a setup (its own list)
        self.control: socket.socket | None = None

    def index(self, spec: ServiceSpec) -> None:
        """The identities of what each process may exec, in its root (again after a revert:
        a new root, and perhaps a new base)."""
        self.spec = spec
        root = os.open(spec.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for proc in spec.processes:
                paths = spec.exec_paths.get(proc.name) or [proc.command[0]]
                self.allowed[proc.name] = _identities(root, paths)
                self.setup_allowed[proc.name] = _identities(
                    root, (proc.setup or {}).get("exec") or paths)
        finally:
            os.close(root)

    def listen(self, run_dir: str) -> None:
        """The control socket `corral exec` hands its command's listener to (root only)."""
        path = os.path.join(run_dir, "control.sock")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        short, dir_fd = notify.unix_path(path)
        try:
            self.control.bind(short)
        finally:
            os.close(dir_fd)
        os.chmod(path, 0o600)
        self.control.listen(8)
        self.selector.register(self.control, selectors.EVENT_READ, ("control", ""))

    def add(self, fd: int, process: str, setup: bool = False) -> None:
        """`setup`: the listener of the process's one-shot setup, judged by the setup's list."""
        self.listeners[fd] = process
        if setup:
            self.setup_listeners.add(fd)
        self.selector.register(fd, selectors.EVENT_READ, ("notify", process))

    def answer(self, process: str, fd: int, setup: bool | None = None) -> None:
        """Answer one exec notification: only the process's `exec` paths may run. Every
        notification is hostile input: whatever goes wrong while judging it refuses that exec
        and trips the wire, and the listener stays (dropping it would switch the wire off:
        the kernel fails every later exec of its tasks with ENOSYS, unseen)."""
        req = notify.receive(fd)
        if req is None:
            return
        detected = time.time()
        try:
            target = notify.target_of(req)
        except Exception as exc:  # noqa: BLE001 - fail closed, never the supervisor's end
            log.error(f"exec check of {process} pid {req.pid}: {exc!r}")
            target = notify.Target(None, notify.UNRESOLVED, error=f"check failed: {exc}")
        if not notify.still_valid(fd, req.id):
            return
        if target.missing:  # nothing there: said here, so the kernel never looks itself
            notify.respond(fd, req.id, False, target.missing)
            return
        if setup is None:
            setup = fd in self.setup_listeners
        allowed = target.ident in (self.setup_allowed if setup else self.allowed).get(
            process, set())
        notify.respond(fd, req.id, allowed)
        if not allowed:
            proc = self.spec.process(process)
            detail: dict[str, Any] = {"path": target.path}
            if target.error:
                detail["error"] = target.error
            if setup:
                detail["setup"] = True
            self.trip(Event("exec", proc.uid if proc else None, req.pid, detected, detail,
                            "notification"), process)

    def ready(self, fd: int, process: str) -> None:
        """A listener is readable: a notification to answer, or every task using that filter
        is gone (hang-up: the only reason to drop it)."""
        import select

        poller = select.poll()
        poller.register(fd, select.POLLIN)
        events = poller.poll(0)
        if events and events[0][1] & (select.POLLHUP | select.POLLERR) \
                and not events[0][1] & select.POLLIN:
            self.drop(fd)
            return
        try:
            self.answer(process, fd)
        except OSError as exc:  # receive or respond: that one call, not the listener
            log.error(f"exec notification of {process}: {exc}")

    def accept(self, processes: Container[str]) -> None:
        """`corral exec` hands over the listener of the command it starts inside a process."""
        assert self.control is not None
        try:
            conn, _ = self.control.accept()
        except OSError:
            return
        with conn:
            try:
                message, fd = notify.recv_fd(conn)
                name = json.loads(message or b"{}").get("process")
            except (OSError, ValueError):
                return
            if fd is None:
                return
            if name not in processes:
                os.close(fd)
                return
            self.add(fd, name)
            try:
                conn.send(b"ok")
            except OSError:  # the client gave up waiting (a stalled loop): its loss, not ours
                pass

    def drop(self, fd: int) -> None:
        if fd in self.listeners:
            del self.listeners[fd]
            self.setup_listeners.discard(fd)
            self.selector.unregister(fd)
            os.close(fd)

    def drop_process(self, process: str) -> None:
        """Its PID namespace is gone: so are its exec sessions."""
        for fd, name in list(self.listeners.items()):
            if name == process:
                self.drop(fd)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()


def _identities(root: int, paths: list[str]) -> set[tuple[int, int]]:
    return {i for p in paths if (i := notify.identity(root, p))
            not in (notify.MISSING, notify.UNRESOLVED)}
