"""One small supervisor per service: prepares the root, starts every process contained, restarts
crashed ones with back-off, and takes every process, mount and cgroup with it when it stops.

It runs as `python -m corral.supervise.supervisor NAME` (started by `corral up`) or in the
foreground
(`corral run`). Its state is /run/corral/NAME/state.json, rewritten atomically on each change;
`corral status` reads it, `corral down` sends SIGTERM to the pid in it.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from corral.core import log, tree
from corral.core.errors import CorralError
from corral.core.fsio import ReserveRefused, write_json
from corral.core.record import asdict, field, record, replace
from corral.core.text import iso
from corral.host import runtime
from corral.host.runtime import ProcessSpec, ServiceSpec
from corral.kernel import signals
from corral.launch import benchskip, cgprime, cgroup, landlock, logfile, mnt, output
from corral.launch import pipeline as launch
from corral.launch.output import Output
from corral.supervise import premises, setup
from corral.supervise.exec_guard import ExecGuard
from corral.supervise.journals import Journals
from corral.supervise.sensing import Sensing

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any, TextIO

RESTART_LIMIT = 5  # crashes within RESTART_WINDOW before a process stays down
RESTART_WINDOW = 60.0
BACKOFF_MAX = 30.0
TICK = 0.25  # seconds the loop waits for an event before its timed work (polled sensors, ...)


@record
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
    in_setup: bool = False  # its one-shot `setup` runs now, not its program
    setup_deadline: float = 0.0


class Supervisor:
    def __init__(self, spec: ServiceSpec, echo: TextIO | None = None):
        self.spec = spec
        self.echo = echo  # foreground: the processes' output is copied here
        self.run_dir = spec.run
        self.children: dict[str, Child] = {}
        self.stopping = False  # the supervisor is ending
        self.halting = False  # processes are being stopped (end, or a revert)
        self.revert_requested = False
        self.reload_requested = False
        self.reloads: Any = None  # supervise.reload.Reloads, made at the first reload
        self.reverts = 0
        self.last_archive: str | None = None
        self.phase = "starting"
        self.error = ""
        self.selector = selectors.DefaultSelector()
        self.host_mnt = -1
        self.landlock = landlock.describe_abi()
        self.exec_guard = ExecGuard(spec, self.selector, self._trip_exec)
        self.sensing = Sensing(spec, self.selector)
        self.warnings: list[str] = []  # degradations to show in status (a bind-mounted volume)
        self.bind_warnings: list[str] = []  # UDP binds unguarded: kept across reverts
        self.net_warnings: list[str] = []  # network = "own" without forwarding: likewise
        self.link: Any = None  # host.netns.Link of network = "own"
        self.watcher: Any = None
        self.isolated = False
        self.journals = Journals(spec, hold=lambda: self.isolated)
        self.journals.on_refusal = self.sensing.refused

    # -- state ------------------------------------------------------------------------------
    def write_state(self) -> None:
        # Atomic, not durable: /run ends with the boot, and so does what this file says (a
        # reader after a crash checks that the supervisor still lives: control.supervisor_alive)
        write_json(os.path.join(self.run_dir, "state.json"), durable=False, data={
            "service": self.spec.service,
            "supervisor": os.getpid(),
            "phase": self.phase,
            "error": self.error,
            "base_version": self.spec.base_version,
            "delta": {"kind": self.spec.delta, "path": self.spec.delta_dir},
            "landlock": self.landlock,
            "warnings": self.warnings,
            "reverts": self.reverts,
            "isolated": self.isolated,
            "sensors": self.sensing.report(),
            "audit_records": self.sensing.audit_counts(),
            "journals": self.journals.health,
            "last_archive": self.last_archive,
            "reload": self.reloads.record if self.reloads else None,
            "cgroup": cgroup.describe(),
            "network": {"mode": "own", **asdict(self.link)} if self.link
            else {"mode": "host"},
            "processes": {name: {
                "state": c.state, "pid": c.init or None, "user": c.spec.user,
                "started_at": iso(c.started_at) if c.started_at else None,
                "restarts": c.restarts, "exit_code": c.exit_code, "error": c.error,
                "listen": c.spec.listen, "output": list(c.output.recent),
            } for name, c in self.children.items()},
        })

    # -- set-up and tear-down ---------------------------------------------------------------
    def prepare(self) -> None:
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        if self.spec.own_network:  # still in the host's mount namespace: the pin is seen there
            self.link, self.net_warnings = premises.own_network(self.spec)
        delta = self.spec.delta_dir
        mnt.mount_delta(delta, self.spec.delta, self.spec.delta_size)
        premises.mount_sized_volumes(self.spec)
        if self.spec.delta == "tmpfs":
            mnt.clear_delta(delta)  # a fresh delta at every start, even after a crash
        self.host_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        mnt.private_namespace()
        skip = benchskip.skipped()
        self.warnings = self._mount_root() + self.net_warnings
        if skip:
            self.warnings.append(f"{benchskip.VARIABLE}={','.join(sorted(skip))}: containment "
                                 "weakened for a benchmark; never use it in production")
        for warning in self.warnings:
            log.warning(warning)
        self.exec_guard.index(self.spec)

    def make_children(self) -> None:
        """Each process's cgroup, UDP guard and output. A cgroup operation waits while the
        launch's primer waits for its grace period (launch.cgprime)."""
        skip = benchskip.skipped()
        for proc in self.spec.processes:
            limits = cgroup.Limits(**{k: None if k in skip else proc.limits.get(k)
                                      for k in ("memory", "pids", "cpu")},
                                   cpu_weight_max="cpu-group" in skip,
                                   cpu_cgroup="cpu-cgroup" not in skip)
            group = cgroup.Cgroup.create(self.spec.service, proc.name, limits)
            self._guard_udp(group, proc.listen)
            settings = self.spec.log
            out = Output(proc.name, logfile.LogFile(
                self.spec.logs, proc.name, int(settings.get("size", logfile.SIZE)),
                int(settings.get("files", logfile.FILES))),
                logfile.Forward(self.spec.service, proc.name,
                                int(settings.get("rate", logfile.RATE))), self.echo)
            self.children[proc.name] = Child(proc, group, out)
            self.selector.register(out.read_fd, selectors.EVENT_READ, ("log", proc.name))

    def _mount_root(self) -> list[str]:
        """The service's root in this (private) mount namespace: its warnings."""
        skip = benchskip.skipped()
        image, why = (None, None) if "image" in skip else premises.root_image(self.spec)
        warnings = [mnt.whole_overlay(why)] if why else []
        return warnings + mnt.prepare_service_root(
            self.spec.root, self.spec.base_root, self.spec.delta_dir,
            launch.volumes_of(self.spec), premises.noexec_paths(self.spec),
            premises.writable_paths(self.spec), image, bench_bind_root="overlay" in skip)

    def _guard_udp(self, group: cgroup.Cgroup, listen: list[str]) -> None:
        """Before the process starts: it may bind only its own UDP ports. Where the kernel
        cannot (no cgroup v2, no BPF) the service runs all the same, and status says so."""
        try:
            group.guard_udp_binds(listen, self.sensing.bind_ring())
        except (OSError, ValueError) as exc:
            warning = f"{group.process}: UDP ports not guarded against other services: {exc}"
            log.warning(warning)
            self.bind_warnings.append(warning)
            self.warnings.append(warning)

    def close_epochs(self, reason: str, incidents: tuple[str, ...] = (),
                     due_only: bool = False, inline: bool = False) -> None:
        """End the open epoch of every journaled volume (on its schedule when `due_only`): on
        the journals' worker thread, or here once it is idle when `inline` (the processes are
        dead: a revert, the stop)."""
        def writer_pid(process: str) -> int | None:
            child = self.children.get(process)
            return child.init if child else None

        running = any(c.init for c in self.children.values())
        if not inline:
            self.journals.request(reason, incidents, due_only, writer_pid, running)
            return
        self.journals.wait()
        if self.journals.close_epochs(reason, incidents, due_only, writer_pid, running):
            self.write_state()  # a journal's health changed: `corral status` shows it

    def _trip_exec(self, event: Any, process: str) -> None:
        if self.watcher is not None:
            self.watcher.trip(event, process=process)

    def start_sensors(self) -> None:
        from corral.watch import watcher as watch

        self.watcher = watch.Watcher.for_supervisor(self)
        self.sensing.start()
        self.exec_guard.listen(self.run_dir)

    def _trip(self) -> Any:
        """Where sensors' events go: the watcher, unless a reaction is under way (those acts
        die with the processes)."""
        return None if self.watcher is None or self.halting else self.watcher.trip

    # -- reactions (called by the watcher) --------------------------------------------------
    def isolate(self) -> None:
        from corral.host import nft

        nft.isolate(self.spec.service, [p.name for p in self.spec.processes],
                    premises.table_netns(self.spec))
        for child in self.children.values():
            child.group.freeze()
        self.isolated = True
        self.phase = "isolated"
        self.write_state()

    def release(self) -> None:
        if self.isolated:
            from corral.host import nft  # a reaction's undo: not every stop's (nft, subprocess)

            for child in self.children.values():
                child.group.thaw()
            nft.release(self.spec.service, premises.table_netns(self.spec))
            self.isolated = False

    def kill_all(self) -> None:
        """SIGKILL every process of the service now; reaped by the loop."""
        self.halting = True
        for child in self.children.values():  # every process signalled first, ...
            if child.init:
                _kill(child.init, signal.SIGKILL)
            child.group.start_kill()
        for child in self.children.values():  # ... then all die at once
            child.group.wait_empty()

    def alive(self) -> bool:
        return any(c.pidfd >= 0 for c in self.children.values())

    def settle(self) -> None:
        """Finish the reactions that waited for the processes to die, now that they have
        (the loop calls this between selects, never a handler)."""
        self.watcher.settle()
        self.halting = bool(self.watcher.pending)  # a restart may have tripped again

    def stay_down(self, reason: str) -> None:
        self.phase, self.error = "killed", reason
        self.stopping = True

    def revert_for(self, record: dict[str, Any]) -> str | None:
        self.revert({"reason": "incident", "incident": record["id"]})
        return self.last_archive

    def teardown(self) -> None:
        # First, so that the kernel releases the fanotify mark while the rest is undone: the
        # sensors' close, last, then need not wait for it (~5-13 ms of every `corral run`).
        self.sensing.stop()
        self.resume_logs(everything=True)  # the last words of every process
        for child in self.children.values():
            child.output.end()
            child.output.close()
        self.close_epochs("schedule", inline=True)  # what the last stretch wrote is in the log
        try:
            self.release()
        except Exception as exc:  # noqa: BLE001 - the table may be gone already (uninstall)
            log.warning(f"releasing isolation: {exc}")
        self.exec_guard.close()
        for child in self.children.values():
            try:
                child.group.remove()
            except OSError as exc:
                log.warning(f"cgroup of {child.spec.name}: {exc}")
        cgroup.remove_service(self.spec.service)
        if self.host_mnt >= 0:
            from corral.kernel import syscalls as kernel

            kernel.setns(self.host_mnt, kernel.CLONE_NEWNS)  # our private mounts die with us
            mnt.unmount_delta(self.spec.delta_dir, self.spec.delta)
        premises.remove_own_network(self.spec)  # in the host's mount namespace again
        self.sensing.close()

    # -- processes --------------------------------------------------------------------------
    def spawn(self, child: Child) -> launch.Spawned | None:
        child.in_setup = setup.needed(self.spec, child.spec)
        try:
            return launch.spawn(self.spec, self._program(child), child.output.write_fd,
                                child.group)
        except OSError as exc:
            child.error = str(exc)
            return None

    def start(self, child: Child, spawned: launch.Spawned | None = None) -> None:
        """Start a child, or finish the start of one spawned already."""
        try:
            if spawned is None:
                child.in_setup = setup.needed(self.spec, child.spec)
                spawned = launch.spawn(self.spec, self._program(child), child.output.write_fd,
                                       child.group)
            child.output.mark()
            name = child.spec.name
            in_setup = child.in_setup  # the setup's exec list, not the program's
            started = launch.finish(spawned,
                                    lambda fd: self.exec_guard.answer(name, fd, in_setup))
        except OSError as exc:
            child.error = str(exc)
            self._crashed(child, 127)
            return
        child.holder, child.init = started.holder, started.init
        if started.notify_fd >= 0:
            self.exec_guard.add(started.notify_fd, child.spec.name, child.in_setup)
        child.pidfd = os.pidfd_open(started.holder)
        self.selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child.spec.name))
        child.state, child.started_at, child.exit_code = "running", time.time(), None  # shown
        if child.in_setup:
            child.state = "setup"
            child.setup_deadline = time.monotonic() + float((child.spec.setup or {}).get(
                "timeout", setup.TIMEOUT))

    def _program(self, child: Child) -> ProcessSpec:
        """What runs next under the process's containment: its `setup`, or its command."""
        if child.in_setup and child.spec.setup:
            return setup.program(child.spec)
        return child.spec

    def _crashed(self, child: Child, code: int) -> None:
        now = time.monotonic()
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
        self.exec_guard.drop_process(child.spec.name)
        child.init = 0
        if child.in_setup:
            child.in_setup = False
            if code == 0 and not self.halting:
                setup.done(self.spec, child.spec)
                self.start(child)
            else:
                child.state, child.exit_code = "failed", code
                child.error = setup.failure(child.spec, code, list(child.output.recent),
                                            time.monotonic() > child.setup_deadline)
            return
        if self.halting:
            child.state, child.exit_code = "stopped", code
        elif code == 0:
            child.state, child.exit_code = "exited", 0
        else:
            child.restarts += 1
            self._crashed(child, code)

    def stop_all(self) -> None:
        """Each process's `stop_signal` where the program handles it, SIGKILL otherwise (PID 1
        of a namespace ignores signals it has no handler for); after its `stop_timeout`,
        SIGKILL and the cgroup's kill for anything left."""
        self.halting = True
        now = time.monotonic()
        deadlines = {}
        for child in self.children.values():
            if child.init:
                sig = _signal_number(child.spec.stop_signal)
                _kill(child.init, sig if signals.handles(child.init, sig) else signal.SIGKILL)
                deadlines[child.spec.name] = now + float(child.spec.stop_timeout)
        while self.alive():
            now = time.monotonic()
            for child in self.children.values():
                if child.pidfd >= 0 and now >= deadlines.get(child.spec.name, now):
                    _kill(child.init, signal.SIGKILL)
                    child.group.kill()
            self.poll(0.1)
        self.halting = False

    def revert(self, request: dict[str, Any] | None = None) -> None:
        """Kill, archive the delta, restart from the clean base with a fresh delta; the volumes
        stay as they are. The request (or the request file) says why and which incident."""
        from corral.kernel import syscalls as kernel
        from corral.recover import archive

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
        self.close_epochs("revert", tuple(filter(None, [request.get("incident")])), inline=True)
        fresh = runtime.read(self.spec.service)  # a `base use` or commit may have moved it
        upper = os.path.join(self.spec.delta_dir, "upper")
        try:
            with open_dirs(upper, self.spec.base_root) as (upper_fd, base_fd):
                archives = os.path.join(self.spec.state, "archives")
                path = archive.archive_delta(upper_fd, base_fd, archives, {
                    "service": self.spec.service, "reason": request.get("reason", "revert"),
                    "incident": request.get("incident"), "base_version": self.spec.base_version})
            self.last_archive = str(path / archive.ARCHIVE)
        except (OSError, CorralError) as exc:  # a tree.WalkError too: revert all the same
            self.last_archive = None
            log.error(f"archiving the delta failed: {exc}")
            if isinstance(exc, ReserveRefused):  # corral's reserve: a `flood` incident
                self.sensing.refused(exc.detail)
        if fresh is not None and fresh.base_version != self.spec.base_version:
            self.spec = replace(self.spec, base_version=fresh.base_version)
        kernel.umount2(self.spec.root, kernel.MNT_DETACH)  # overlay, /dev and volumes
        mnt.clear_delta(self.spec.delta_dir)
        self.warnings = self._mount_root() + self.bind_warnings + self.net_warnings
        self.reverts += 1
        self.sensing.fresh_delta()
        self.exec_guard.index(self.spec)
        for child in self.children.values():
            child.crashes.clear()
            self.start(child)
        self.phase = "running"
        self.write_state()

    def reload(self) -> None:
        from corral.supervise.reload import Reloads, read_request

        self.reload_requested = False
        self.reloads = self.reloads or Reloads(self.spec.service)
        self.reloads.start(self.children, read_request(self.run_dir))
        self.write_state()

    # -- the loop ---------------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        paused = [c.output.paused_until for c in self.children.values() if c.output.paused_until]
        if paused:
            timeout = max(0.0, min(timeout, min(paused) - time.monotonic()))
        handlers = {"signal": self._on_signal, "log": self._on_output, "exit": self._on_exit,
                    "notify": self.exec_guard.ready, "control": self._on_control,
                    "sensor": self._on_sensor}
        for key, _ in self.selector.select(timeout):
            if self.selector.get_map().get(key.fd) is not key:
                continue  # an earlier handler of this batch unregistered it (a process ended)
            kind, name = key.data  # what registered the descriptor, and for whom
            try:
                handlers[kind](key.fd, name)
            except Exception as exc:  # noqa: BLE001 - every event is hostile input: one that
                # cannot be handled is logged and lost, never the end of the watcher
                log.error(f"{kind} event{f' of {name}' if name else ''}: {exc!r}")
        self.resume_logs()

    def _on_signal(self, fd: int, _: str) -> None:
        try:
            received = os.read(fd, 512)
        except BlockingIOError:
            received = b""
        if signal.SIGUSR1 in received:
            self.revert_requested = True
        if signal.SIGHUP in received:  # as for most daemons: re-read the configuration
            self.reload_requested = True
        if set(received) - {signal.SIGUSR1, signal.SIGHUP}:
            self.stopping = True

    def _on_output(self, fd: int, name: str) -> None:
        """Copy it now, the rest of this batch window's output later."""
        out = self.children[name].output
        out.copy()
        self.selector.unregister(out.read_fd)
        out.paused_until = time.monotonic() + output.BATCH

    def _on_exit(self, fd: int, name: str) -> None:
        child = self.children[name]
        child.output.copy()
        child.output.end()
        self.reap(child)
        self.write_state()

    def _on_control(self, fd: int, _: str) -> None:
        self.exec_guard.accept(self.children)

    def _on_sensor(self, fd: int, name: str) -> None:
        if self.sensing.drain(name, self._trip()):
            self.write_state()

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

    def tick(self) -> int | None:
        """The loop's work between two selects: reactions that waited for the processes, the
        polled sensors, the journals' schedule, a requested revert, restarts after back-off.
        Returns an exit code once nothing is left to supervise."""
        if self.watcher.pending and not self.alive():
            self.settle()
        if self.phase == "running" and not self.halting and self.sensing.drain_due(self._trip()):
            self.write_state()
        self.watcher.flush_counts()
        if self.sensing.counts_moved():
            self.write_state()
        if self.journals.open and self.phase == "running" and not self.halting \
                and self.journals.due():
            self.close_epochs("schedule", due_only=True)
        if self.journals.changed:  # the worker closed an epoch with a new outcome
            self.journals.changed = False
            self.write_state()
        if self.revert_requested and not self.stopping and not self.halting:
            self.revert()
        if self.reload_requested and not self.stopping and not self.halting:
            self.reload()
        if self.reloads and self.reloads.poll():
            self.write_state()
        cgprime.reap()  # the launch's primer, killed at the fork, once it has ended
        if self.stopping:
            return None
        now = time.monotonic()
        for child in self.children.values():
            if child.state == "setup" and now > child.setup_deadline and child.init:
                _kill(child.init, signal.SIGKILL)
                child.group.kill()
            if child.state == "backoff" and now >= child.next_start:
                self.start(child)
                self.write_state()
        if all(c.state in ("exited", "failed") for c in self.children.values()):
            # nothing left to supervise: a batch job, or all gave up
            failed = [c for c in self.children.values() if c.state == "failed"]
            self.phase = "failed" if failed else "exited"
            self.error = "; ".join(f"{c.spec.name}: {c.error}" for c in failed)
            return 1 if failed else 0
        return None

    def serve(self) -> int:
        tree.raise_nofile_limit()  # see there: a service must not make us run out of fds
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)
        self.selector.register(wake_r, selectors.EVENT_READ, ("signal", ""))
        try:
            self.sensing.ask_audit()  # answered while the service is prepared
            self.prepare()
            # While the kernel's grace period the primer waits for still runs, every cgroup
            # operation would wait for it with nothing to do: the sensors start in that time
            # (a long grace period, after a quiet while), else while the processes set up.
            sensors_first = cgprime.waiting()
            if sensors_first:
                self.sensing.bind_ring()  # made before the sensor that reads it
                self.start_sensors()
            self.make_children()
            # The processes set themselves up (cgroup, namespaces, root, sandbox) while the
            # journals and sensors start; none runs its program before `start` lets it.
            spawned = {name: self.spawn(child) for name, child in self.children.items()}
            try:
                self.journals.start()
                if not sensors_first:
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
            failed = [c for c in self.children.values() if c.state not in ("running", "setup")]
            if failed:
                self.phase, self.error = "failed", "; ".join(c.error for c in failed)
                self.write_state()
                return 1
            self.phase = "running"
            self.write_state()
            while not self.stopping:
                self.poll(TICK)
                code = self.tick()
                if code is not None:
                    return code
            return 0
        except (CorralError, OSError) as exc:  # said in state.json and the log, then cleaned up
            self.phase, self.error = "failed", str(exc)
            self.write_state()
            log.error(str(exc))
            return 1
        except Exception as exc:  # noqa: BLE001 - a bug: its text means nothing to a user
            import traceback

            traceback.print_exc()  # supervisor.log (or the terminal of `corral run`)
            self.phase = "failed"
            self.error = (f"internal error in corral's supervisor ({type(exc).__name__}); "
                          f"details in {self.run_dir}/supervisor.log; please report it")
            self.write_state()
            return 1
        finally:
            self.stop_all()
            self.teardown()
            if self.phase not in ("failed", "exited", "killed"):
                self.phase = "stopped"
            self.write_state()


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


def _signal_number(name: str) -> int:
    return int(signal.Signals[name]) if name in signal.Signals.__members__ else signal.SIGTERM


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
        lock(spec.run)
    except BlockingIOError:
        print(f"corral: {service}: already running", file=sys.stderr)
        return 1
    return Supervisor(spec, echo=sys.stdout if foreground else None).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
