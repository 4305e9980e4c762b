"""One small supervisor per service: prepares the root, starts every process contained, restarts
crashed ones with back-off, and takes every process, mount and cgroup with it when it stops.

It runs as `python -m corral.supervise.supervisor NAME` (started by `corral up`) or in the foreground
(`corral run`). Its state is /run/corral/NAME/state.json, rewritten atomically on each change;
`corral status` reads it, `corral down` sends SIGTERM to the pid in it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from corral.launch import cgroup, landlock, pipeline as launch, mnt, output
from corral.kernel import notify
from corral.host import runtime
from corral.core import tree
from corral.core.errors import CorralError
from corral.core.fsio import write_json
from corral.core.text import iso, parse_iso
from corral.launch.output import Output
from corral.host.runtime import ProcessSpec, ServiceSpec

RESTART_LIMIT = 5  # crashes within RESTART_WINDOW before a process stays down
RESTART_WINDOW = 60.0
BACKOFF_MAX = 30.0
STOP_GRACE = 5.0  # seconds a process with a SIGTERM handler gets before SIGKILL
DELTA_POLL = 0.25  # seconds between walks of the delta for the base-write tripwire
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


@dataclass
class Child:
    spec: ProcessSpec
    group: Any
    output: Output
    state: str = "starting"  # running | backoff | exited | failed | stopped
    holder: int = 0
    init: int = 0
    pidfd: int = -1
    started_at: float = 0.0
    restarts: int = 0
    crashes: list[float] = field(default_factory=list)
    exit_code: int | None = None
    next_start: float = 0.0
    error: str = ""


_iso = iso  # the one timestamp format (core.text)


class Supervisor:
    def __init__(self, spec: ServiceSpec, echo: TextIO | None = None):
        self.spec = spec
        self.echo = echo  # foreground: the processes' output is copied here
        self.run_dir = str(spec.run)
        self.children: dict[str, Child] = {}
        self.stopping = False  # the supervisor is ending
        self.halting = False  # processes are being stopped (end, or a revert)
        self.revert_requested = False
        self.reverts = 0
        self.last_archive: str | None = None
        self.phase = "starting"
        self.error = ""
        self.selector = selectors.DefaultSelector()
        self.host_mnt = -1
        self.landlock = landlock.describe_abi()
        self.allowed: dict[str, set[tuple[int, int]]] = {}  # process -> executables' identities
        self.notify_fds: dict[int, str] = {}  # seccomp listener -> process name
        self.sensors: dict[str, str] = {}  # sensor -> "on" or why it is off
        self.warnings: list[str] = []  # degradations to show in status (a bind-mounted volume)
        self.watcher: Any = None
        self.poller: Any = None
        self.control: socket.socket | None = None
        self.isolated = False
        self.journals: list[Any] = []  # [journal, volume, next close time]

    # -- state ------------------------------------------------------------------------------
    def write_state(self) -> None:
        write_json(os.path.join(self.run_dir, "state.json"), {
            "service": self.spec.service,
            "supervisor": os.getpid(),
            "phase": self.phase,
            "error": self.error,
            "base_version": self.spec.base_version,
            "delta": {"kind": self.spec.delta, "path": str(self.spec.delta_dir)},
            "landlock": self.landlock,
            "warnings": self.warnings,
            "reverts": self.reverts,
            "isolated": self.isolated,
            "sensors": self.sensors,
            "last_archive": self.last_archive,
            "cgroup": cgroup.describe(),
            "processes": {name: {
                "state": c.state, "pid": c.init or None, "user": c.spec.user,
                "started_at": _iso(c.started_at) if c.started_at else None,
                "restarts": c.restarts, "exit_code": c.exit_code, "error": c.error,
                "listen": c.spec.listen,
            } for name, c in self.children.items()},
        })

    # -- set-up and tear-down ---------------------------------------------------------------
    def prepare(self) -> None:
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(self.run_dir, "logs"), mode=0o700, exist_ok=True)
        delta = str(self.spec.delta_dir)
        mnt.mount_delta(delta, self.spec.delta, self.spec.delta_size)
        if self.spec.delta == "tmpfs":
            mnt.clear_delta(delta)  # a fresh delta at every start, even after a crash
        self.host_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        mnt.private_namespace()
        self.warnings = mnt.prepare_service_root(
            str(self.spec.root), str(self.spec.base_root), delta, launch.volumes_of(self.spec),
            self._noexec_paths())
        for warning in self.warnings:
            print(f"corral supervisor: {warning}", file=sys.stderr)
        self._index_executables()
        for proc in self.spec.processes:
            limits = cgroup.Limits(memory=proc.limits.get("memory"), pids=proc.limits.get("pids"),
                                   cpu=proc.limits.get("cpu"))
            group = cgroup.Cgroup.create(self.spec.service, proc.name, limits)
            out = Output(proc.name, os.path.join(self.run_dir, "logs", f"{proc.name}.log"),
                         self.echo)
            self.children[proc.name] = Child(proc, group, out)
            self.selector.register(out.read_fd, selectors.EVENT_READ, ("log", proc.name))

    def _noexec_paths(self) -> tuple[str, ...]:
        """/tmp and every `writable` path: what the service writes must never run. A path
        that holds one of the `exec` programs is left executable (it cannot be both)."""
        volumes = {v.path for v in self.spec.volumes}  # already noexec bind mounts
        executables = [p for paths in self.spec.exec_paths.values() for p in paths]
        out = {"/tmp"}
        for proc in self.spec.processes:
            out |= set(proc.landlock.get("read_write", ())) - {"/dev"} - volumes
        return tuple(sorted(p for p in out if not any(
            e == p or e.startswith(p.rstrip("/") + "/") for e in executables)))

    def _index_executables(self) -> None:
        """The identities (device, inode) of what each process may exec, in its root."""
        root = os.open(str(self.spec.root), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for proc in self.spec.processes:
                paths = self.spec.exec_paths.get(proc.name) or [proc.command[0]]
                self.allowed[proc.name] = {i for p in paths
                                           if (i := notify.identity(root, p))
                                           not in (notify.MISSING, notify.UNRESOLVED)}
        finally:
            os.close(root)

    def start_journals(self) -> None:
        """Journaled volumes: finish what a crash interrupted, start the log if new."""
        volumes = [v for v in self.spec.volumes if getattr(v, "journal", False)]
        if not volumes:
            return
        from corral.recover.journal.journal import Journal

        for vol in volumes:
            journal = Journal(self.spec, vol.store)
            journal.recover()
            journal.ensure()
            self.journals.append([journal, vol, time.time() + (vol.epoch or 600)])

    def close_epochs(self, reason: str, incidents: tuple[str, ...] = (),
                     due_only: bool = False) -> None:
        """End the open epoch of every journaled volume (on its schedule when `due_only`)."""
        from corral.recover.journal.config import freezer

        now = time.time()
        for entry in self.journals:
            journal, vol, due = entry
            if due_only and now < due:
                continue
            entry[2] = now + (vol.epoch or 600)
            child = self.children.get(vol.owner)
            hint = {"process": vol.owner, "pid": child.init if child else None}
            running = any(c.init for c in self.children.values())
            try:
                journal.close_epoch(reason, incidents=incidents, writer_hint=hint,
                                    freeze=freezer(self.spec) if running else None,
                                    wait=not due_only)
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop the watcher
                print(f"corral supervisor: journal {vol.path}: {exc}", file=sys.stderr)

    def start_sensors(self) -> None:
        from corral.watch import sensors, watcher as watch

        self.watcher = watch.Watcher.for_supervisor(self)
        try:
            self.audit = sensors.AuditReader()
            self.selector.register(self.audit, selectors.EVENT_READ, ("audit", ""))
            self.sensors["audit"] = "on"
        except OSError as exc:
            self.sensors["audit"] = f"off: {exc.strerror}"
        try:
            from corral.watch import nflog as events
            from corral.plan import nft_rules as nftables

            self.nflog = events.EventReader(nftables.nflog_group(self.spec.service))
            self.selector.register(self.nflog, selectors.EVENT_READ, ("nflog", ""))
            self.sensors["network"] = "on (NFLOG group "\
                f"{nftables.nflog_group(self.spec.service)})"
        except Exception as exc:  # noqa: BLE001 - a busy group: say so, keep running
            self.sensors["network"] = f"off: {exc}"
        self.poller = sensors.DeltaPoller(os.path.join(str(self.spec.delta_dir), "upper"),
                                          str(self.spec.base_root))
        self.sensors["base-write"] = self.poller.state
        self.sensors["exec"] = "on (seccomp user notification)"
        path = os.path.join(self.run_dir, "control.sock")
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

    def _writer_of(self, path: str) -> str:
        """Which process could have written `path` in the delta: a copied-up file keeps the
        base's owner (root), so the owner does not tell. Landlock lets only the processes
        whose `writable` paths cover it write there."""
        names = [p.name for p in self.spec.processes
                 if any(path == w or path.startswith(w.rstrip("/") + "/")
                        for w in p.landlock.get("read_write", ()))]
        return names[0] if len(names) == 1 else (names[0] if names else
                                                 self.spec.processes[0].name)

    def on_exec(self, name: str, fd: int) -> None:
        """Answer one exec notification: only the process's `exec` paths may run."""
        from corral.watch.sensors import Event

        req = notify.receive(fd)
        if req is None:
            return
        detected = time.time()
        path, ident = notify.target_of(req)
        if not notify.still_valid(fd, req.id):
            return
        allowed = ident is notify.MISSING or ident in self.allowed.get(name, set())
        notify.respond(fd, req.id, allowed)  # MISSING: no such file; the kernel will say so
        if not allowed and self.watcher is not None:
            proc = self.spec.process(name)
            self.watcher.trip(Event("exec", proc.uid if proc else None, req.pid, detected,
                                    {"path": path}), process=name)

    def accept_control(self) -> None:
        """`corral exec` hands over the exec listener of the command it starts inside."""
        assert self.control is not None
        conn, _ = self.control.accept()
        with conn:
            try:
                message, fd = notify.recv_fd(conn)
                name = json.loads(message or b"{}").get("process")
            except (OSError, ValueError):
                return
            if fd is None:
                return
            if name not in self.children:
                os.close(fd)
                return
            self.notify_fds[fd] = name
            self.selector.register(fd, selectors.EVENT_READ, ("notify", name))
            conn.send(b"ok")

    def drop_notify(self, fd: int) -> None:
        if fd in self.notify_fds:
            del self.notify_fds[fd]
            self.selector.unregister(fd)
            os.close(fd)

    # -- reactions (called by the watcher) --------------------------------------------------
    def isolate(self) -> None:
        from corral.host import nft

        nft.isolate(self.spec.service, [p.uid for p in self.spec.processes])
        for child in self.children.values():
            child.group.freeze()
        self.isolated = True
        self.phase = "isolated"
        self.write_state()

    def release(self) -> None:
        from corral.host import nft

        if self.isolated:
            for child in self.children.values():
                child.group.thaw()
            nft.release(self.spec.service)
            self.isolated = False

    def kill_all(self) -> None:
        """SIGKILL every process of the service now; reaped by the loop."""
        self.halting = True
        for child in self.children.values():
            if child.init:
                _kill(child.init, signal.SIGKILL)
            child.group.kill()

    def wait_reaped(self) -> None:
        while any(c.pidfd >= 0 for c in self.children.values()):
            self.poll(0.05)
        self.halting = False

    def stay_down(self, reason: str) -> None:
        self.wait_reaped()
        self.phase, self.error = "killed", reason
        self.stopping = True

    def finish_revert(self, record: dict[str, Any]) -> str | None:
        self.wait_reaped()
        self.revert({"reason": "incident", "incident": record["id"]})
        return self.last_archive

    def teardown(self) -> None:
        self.resume_logs(everything=True)  # the last words of every process
        for child in self.children.values():
            child.output.end()
        self.close_epochs("schedule")  # what the last stretch wrote is in the log
        try:
            self.release()
        except Exception as exc:  # the table may be gone already (uninstall)
            print(f"corral supervisor: releasing isolation: {exc}", file=sys.stderr)
        if self.control is not None:
            self.control.close()
        if getattr(self, "nflog", None) is not None:
            self.nflog.close()
        for child in self.children.values():
            try:
                child.group.remove()
            except OSError as exc:
                print(f"corral supervisor: cgroup of {child.spec.name}: {exc}", file=sys.stderr)
        cgroup.remove_service(self.spec.service)
        if self.host_mnt >= 0:
            from corral.kernel import syscalls as kernel

            kernel.setns(self.host_mnt, kernel.CLONE_NEWNS)  # our private mounts die with us
            mnt.unmount_delta(str(self.spec.delta_dir), self.spec.delta)

    # -- processes --------------------------------------------------------------------------
    def spawn(self, child: Child) -> launch.Spawned | None:
        try:
            return launch.spawn(self.spec, child.spec, child.output.write_fd, child.group)
        except OSError as exc:
            child.error = str(exc)
            return None

    def start(self, child: Child, spawned: launch.Spawned | None = None) -> None:
        """Start a child, or finish the start of one spawned already."""
        try:
            if spawned is None:
                spawned = launch.spawn(self.spec, child.spec, child.output.write_fd, child.group)
            started = launch.finish(spawned, lambda fd, n=child.spec.name: self.on_exec(n, fd))
        except OSError as exc:
            child.error = str(exc)
            self._crashed(child, 127)
            return
        child.holder, child.init = started.holder, started.init
        if started.notify_fd >= 0:
            self.notify_fds[started.notify_fd] = child.spec.name
            self.selector.register(started.notify_fd, selectors.EVENT_READ,
                                   ("notify", child.spec.name))
        child.pidfd = os.pidfd_open(started.holder)
        self.selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child.spec.name))
        child.state, child.started_at, child.exit_code = "running", time.time(), None

    def _crashed(self, child: Child, code: int) -> None:
        now = time.time()
        child.exit_code = code
        child.crashes = [t for t in child.crashes if now - t < RESTART_WINDOW] + [now]
        if len(child.crashes) > RESTART_LIMIT:
            child.state = "failed"
            child.error = child.error or f"crashed {len(child.crashes)} times in " \
                                         f"{RESTART_WINDOW:.0f}s; left down"
            return
        child.state = "backoff"
        child.next_start = now + min(BACKOFF_MAX, 2 ** (len(child.crashes) - 1))

    def reap(self, child: Child) -> None:
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        child.pidfd = -1
        _, status = os.waitpid(child.holder, 0)
        code = os.waitstatus_to_exitcode(status)
        for fd, name in list(self.notify_fds.items()):
            if name == child.spec.name:  # its PID namespace is gone: so are exec sessions
                self.drop_notify(fd)
        child.init = 0
        if self.halting:
            child.state, child.exit_code = "stopped", code
        elif code == 0:
            child.state, child.exit_code = "exited", 0
        else:
            child.restarts += 1
            self._crashed(child, code)

    def stop_all(self) -> None:
        """SIGTERM where the program handles it, SIGKILL otherwise (PID 1 of a namespace
        ignores signals it has no handler for), then the cgroup's kill for anything left."""
        self.halting = True
        deadline = time.time() + STOP_GRACE
        for child in self.children.values():
            if child.init:
                sig = signal.SIGTERM if _handles_sigterm(child.init) else signal.SIGKILL
                _kill(child.init, sig)
        while any(c.pidfd >= 0 for c in self.children.values()) and time.time() < deadline:
            self.poll(0.1)
        for child in self.children.values():
            if child.pidfd >= 0:
                _kill(child.init, signal.SIGKILL)
                child.group.kill()
        while any(c.pidfd >= 0 for c in self.children.values()):
            self.poll(0.1)
        self.halting = False

    def revert(self, request: dict[str, Any] | None = None) -> None:
        """Kill, archive the delta, restart from the clean base with a fresh delta; the volumes
        stay as they are. The request (or the request file) says why and which incident."""
        from corral.recover import archive
        from corral.kernel import syscalls as kernel

        self.revert_requested = False
        if request is None:
            request_path = os.path.join(self.run_dir, "revert-request.json")
            try:
                with open(request_path) as handle:
                    request = json.load(handle)
                os.unlink(request_path)
            except (OSError, ValueError):
                request = {"reason": "revert"}
        self.stop_all()
        self.release()
        self.close_epochs("revert", tuple(filter(None, [request.get("incident")])))
        fresh = runtime.read(self.spec.service)  # a `base use` or commit may have moved it
        upper = os.path.join(str(self.spec.delta_dir), "upper")
        try:
            with open_dirs(upper, str(self.spec.base_root)) as (upper_fd, base_fd):
                path = archive.archive_delta(upper_fd, base_fd, self.spec.state / "archives", {
                    "service": self.spec.service, "reason": request.get("reason", "revert"),
                    "incident": request.get("incident"), "base_version": self.spec.base_version})
            self.last_archive = str(path / archive.ARCHIVE)
        except (OSError, CorralError) as exc:  # a tree.WalkError too: revert all the same
            self.last_archive = None
            print(f"corral supervisor: archiving the delta failed: {exc}", file=sys.stderr)
        if fresh is not None and fresh.base_version != self.spec.base_version:
            self.spec = dataclasses.replace(self.spec, base_version=fresh.base_version)
        kernel.umount2(str(self.spec.root), kernel.MNT_DETACH)  # overlay, /dev and volumes
        mnt.clear_delta(str(self.spec.delta_dir))
        self.warnings = mnt.prepare_service_root(
            str(self.spec.root), str(self.spec.base_root), str(self.spec.delta_dir),
            launch.volumes_of(self.spec), self._noexec_paths())
        self.reverts += 1
        if self.poller is not None:
            self.poller.reported.clear()
        self._index_executables()
        for child in self.children.values():
            child.crashes.clear()
            self.start(child)
        self.phase = "running"
        self.write_state()

    # -- the loop ---------------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        paused = [c.output.paused_until for c in self.children.values() if c.output.paused_until]
        if paused:
            timeout = max(0.0, min(timeout, min(paused) - time.monotonic()))
        for key, _ in self.selector.select(timeout):
            kind, name = key.data
            child = self.children.get(name) if name else None
            if kind == "signal":
                try:
                    received = os.read(key.fd, 512)
                except BlockingIOError:
                    received = b""
                if signal.SIGUSR1 in received:
                    self.revert_requested = True
                if set(received) - {signal.SIGUSR1}:
                    self.stopping = True
            elif kind == "log":  # copy it now, the rest of this batch window's output later
                child.output.copy()
                self.selector.unregister(child.output.read_fd)
                child.output.paused_until = time.monotonic() + output.BATCH
            elif kind == "notify":
                self._notify_ready(key.fd, name)
            elif kind == "audit":
                for event in self.audit.read():
                    if self.watcher is not None and not self.halting:
                        self.watcher.trip(event)
                if self.audit.state != "on":  # failed for good: drop it, say so in status
                    self.selector.unregister(self.audit)
                    self.audit.close()
                    self.sensors["audit"] = self.audit.state
                    self.write_state()
            elif kind == "control":
                self.accept_control()
            elif kind == "nflog":
                for event in self.nflog.read(0):
                    if self.watcher is not None and not self.halting:
                        self.watcher.trip(_packet_event(event))
            elif kind == "exit":
                child.output.copy()
                child.output.end()
                self.reap(child)
                self.write_state()
        self.resume_logs()

    def resume_logs(self, everything: bool = False) -> None:
        """Copy the output of processes whose batch window has ended (or all), and watch their
        pipes again."""
        now = time.monotonic()
        for name, child in self.children.items():
            out = child.output
            if out.paused_until and (everything or now >= out.paused_until):
                out.paused_until = None
                out.copy()
                self.selector.register(out.read_fd, selectors.EVENT_READ, ("log", name))

    def _notify_ready(self, fd: int, name: str) -> None:
        import select

        poller = select.poll()
        poller.register(fd, select.POLLIN)
        events = poller.poll(0)
        if events and events[0][1] & (select.POLLHUP | select.POLLERR) \
                and not events[0][1] & select.POLLIN:
            self.drop_notify(fd)  # every task using that filter is gone
            return
        try:
            self.on_exec(name, fd)
        except OSError:
            self.drop_notify(fd)

    def serve(self) -> int:
        tree.raise_nofile_limit()  # see there: a service must not make us run out of fds
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)
        self.selector.register(wake_r, selectors.EVENT_READ, ("signal", ""))
        try:
            self.prepare()
            # The processes set themselves up (cgroup, namespaces, root, sandbox) while the
            # journals and sensors start; none runs its program before `start` lets it.
            spawned = {name: self.spawn(child) for name, child in self.children.items()}
            try:
                self.start_journals()
                self.start_sensors()
            except BaseException:
                for pending in filter(None, spawned.values()):
                    launch.abandon(pending)
                raise
            for name, child in self.children.items():
                if spawned[name] is None:
                    self._crashed(child, 127)
                else:
                    self.start(child, spawned[name])
            failed = [c for c in self.children.values() if c.state != "running"]
            if failed:
                self.phase, self.error = "failed", "; ".join(c.error for c in failed)
                self.write_state()
                return 1
            self.phase = "running"
            self.write_state()
            next_poll = 0.0
            while not self.stopping:
                self.poll(DELTA_POLL)
                now = time.time()
                if now >= next_poll and not self.halting and self.phase == "running":
                    next_poll = now + DELTA_POLL
                    for event in self.poller.poll(now):
                        self.watcher.trip(event, process=self._writer_of(event.detail["path"]))
                    if self.sensors.get("base-write") != self.poller.state:
                        self.sensors["base-write"] = self.poller.state
                        self.write_state()
                self.watcher.flush_counts()
                if self.journals and self.phase == "running" and not self.halting:
                    self.close_epochs("schedule", due_only=True)
                if self.revert_requested and not self.stopping:
                    self.revert()
                if self.stopping:
                    break
                now = time.time()
                for child in self.children.values():
                    if child.state == "backoff" and now >= child.next_start:
                        self.start(child)
                        self.write_state()
                finished = [c.state in ("exited", "failed") for c in self.children.values()]
                if all(finished):  # nothing left to supervise: a batch job, or all gave up
                    failed = [c for c in self.children.values() if c.state == "failed"]
                    self.phase = "failed" if failed else "exited"
                    self.error = "; ".join(f"{c.spec.name}: {c.error}" for c in failed)
                    return 1 if failed else 0
            return 0
        except Exception as exc:
            self.phase, self.error = "failed", str(exc)
            self.write_state()
            print(f"corral supervisor: {exc}", file=sys.stderr)
            return 1
        finally:
            self.stop_all()
            self.teardown()
            if self.phase not in ("failed", "exited", "killed"):
                self.phase = "stopped"
            self.write_state()


PACKET_TRIPWIRES = {"egress": "egress", "listen": "listen", "spoof": "spoof",
                    "untracked": "egress"}


def _packet_event(event: dict[str, Any]) -> Any:
    """A dropped packet (from the service's NFLOG group) as a tripwire event."""
    from corral.watch.sensors import Event

    try:
        at = parse_iso(event["time"])
    except (KeyError, ValueError, AttributeError):
        at = 0.0
    detail = {k: event.get(k) for k in ("proto", "src", "sport", "dst", "dport")}
    return Event(PACKET_TRIPWIRES.get(event.get("reason") or "", "egress"), event.get("uid"),
                 None, at, detail)


@contextmanager
def open_dirs(*paths: str) -> Iterator[tuple[int, ...]]:
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        yield tuple(fds)
    finally:
        for fd in fds:
            os.close(fd)


def _handles_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & SIGTERM_BIT)
    except OSError:
        pass
    return False


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def lock(run_dir: str) -> int:
    """One supervisor per service: an exclusive lock held for the supervisor's life."""
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(run_dir, "supervisor.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def main(argv: list[str]) -> int:
    service = argv[0]
    foreground = "--foreground" in argv
    spec = runtime.read(service)
    if spec is None:
        print(f"corral: {service}: not installed", file=sys.stderr)
        return 2
    try:
        lock(str(spec.run))
    except BlockingIOError:
        print(f"corral: {service}: already running", file=sys.stderr)
        return 1
    return Supervisor(spec, echo=sys.stdout if foreground else None).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
