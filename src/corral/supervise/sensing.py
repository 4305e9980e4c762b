"""The supervisor's sensors (watch.sensors): which run, how each is doing, and draining what
they saw into the watcher. One the kernel wakes sits in the supervisor's selector; one with an
interval is also drained by the loop every `interval` seconds (the polled delta walk, and the
fanotify sensor's safety-net walk). A sensor's failure blinds that sensor only, and `corral
status` says so; it is never the supervisor's end."""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable

from corral.core import log
from corral.host.runtime import ServiceSpec
from corral.watch.event import Event

TYPE_CHECKING = False  # typing is not imported at run time: see core/record.py
if TYPE_CHECKING:
    from typing import Any

    Trip = Callable[[Event], Any]

DELTA_POLL = 0.25  # seconds between walks of a delta fanotify cannot watch (no fs of its own)


class Sensing:
    def __init__(self, spec: ServiceSpec, selector: selectors.BaseSelector):
        self.spec, self.selector = spec, selector
        self.states: dict[str, str] = {}  # sensors not running (why), and the exec wire's
        self.live: dict[str, Any] = {}  # name -> a running watch.sensors.Sensor
        self.due: dict[str, float] = {}  # sensor drained on a timer -> its next drain
        self.ring: Any = None  # kernel.bpfring.Ring: the UDP bind program's refusals
        self._counted: dict[str, int] | None = None  # audit counts last shown, and when
        self._counted_at = 0.0
        self.audit_status: Any = None  # kernel.auditholds.Early, asked ahead of start

    def ask_audit(self) -> None:
        """Ask the kernel whether audit is on now; `start` reads the answer (see
        kernel.audit.StatusQuery: the reply takes a kernel thread's start)."""
        from corral.kernel import auditholds

        try:
            self.audit_status = auditholds.ask()
        except OSError:
            self.audit_status = None  # start asks again, and says what is wrong

    def bind_ring(self) -> int | None:
        """The fd of the ring buffer the cgroups' bind programs report refusals to (one per
        service, made at the first call), or None where the kernel has none (the binds are
        still refused; `corral status` says the refusals are not seen)."""
        if self.ring is None and "udp-bind" not in self.states:
            from corral.kernel import bpfring

            try:
                self.ring = bpfring.Ring()
            except OSError as exc:
                self.states["udp-bind"] = f"off: {exc.strerror}"
        return self.ring.fileno() if self.ring is not None else None

    def start(self) -> None:
        from corral.watch import sensors

        status, self.audit_status = self.audit_status, None
        try:
            self.add(sensors.AuditReader(status, (p.uid for p in self.spec.processes)))
        except OSError as exc:
            self.states["audit"] = f"off: {exc.strerror}"
        finally:
            if status is not None:
                status.close()  # read by the reader, or unread if it failed before
        try:
            from corral.core.nflog import nflog_group

            self.add(sensors.PacketSensor(nflog_group(self.spec.service), self._netns_fd()))
        except Exception as exc:  # noqa: BLE001 - a busy group: say so, keep running
            self.states["network"] = f"off: {exc}"
        if self.ring is not None:
            from corral.watch.refusals import BindRefusals

            self.add(BindRefusals(self.ring))
        if self._armed("base-write"):
            self.add(self._base_write_sensor())
        else:
            # Its events would be dropped unseen, and each one costs the service's own file
            # system calls (the kernel builds it there): a manifest that leaves the tripwire
            # out pays nothing for it.
            self.states["base-write"] = "off (not in watch.tripwires)"
        from corral.watch import floods

        self.add(floods.FloodSensor(floods.watched_of(self.spec)))
        self.states["exec"] = "on (seccomp user notification)"

    def _armed(self, tripwire: str) -> bool:
        """Whether the manifest's `watch.tripwires` has it (none listed: every one, as the
        watcher reads it)."""
        return tripwire in ((self.spec.watch or {}).get("tripwires") or (tripwire,))

    def _netns_fd(self) -> int | None:
        """network = "own": the service's drops are logged in its namespace, so the NFLOG
        socket is made there (the reader keeps its own reference to the namespace)."""
        if not self.spec.own_network:
            return None
        return os.open(self.spec.netns, os.O_RDONLY | os.O_CLOEXEC)

    def _base_write_sensor(self) -> Any:
        """fanotify on the delta's tmpfs, the walk every few seconds as its safety net; the
        walk alone every DELTA_POLL where fanotify cannot be used (a delta that is no file system
        of its own)."""
        from corral.launch import imageroot
        from corral.watch import delta_events, sensors

        delta_dir, base = self.spec.delta_dir, self.spec.base_root
        why = "the delta is no file system of its own"
        # A file system of its own (the tmpfs or the disk delta): a filesystem mark then sees
        # the delta and nothing else; the image root asks the same to bind the delta's paths.
        if imageroot.own_filesystem(delta_dir):
            try:
                return delta_events.DeltaEvents(delta_dir, base)
            except OSError as exc:
                why = f"fanotify: {exc.strerror}"
        poller = sensors.DeltaPoller(os.path.join(delta_dir, "upper"), base, DELTA_POLL)
        poller.ON = f"on (delta walk every {DELTA_POLL:g}s; {why})"
        poller.state = poller.ON
        return poller

    def add(self, sensor: Any) -> None:
        self.live[sensor.name] = sensor
        if sensor.fileno() is not None:
            self.selector.register(sensor, selectors.EVENT_READ, ("sensor", sensor.name))
        if sensor.fileno() is None or sensor.interval > 0:
            self.due[sensor.name] = 0.0

    def drain(self, name: str, trip: Trip | None) -> bool:
        """Hand what sensor `name` saw to `trip` (None: a reaction is under way, those acts die
        with the processes). Returns whether its state changed (the caller rewrites its own);
        a sensor that went off for good leaves the selector."""
        sensor = self.live[name]
        before = sensor.state
        try:
            events = sensor.drain(time.time())
        except Exception as exc:  # noqa: BLE001 - a sensor's bug blinds that sensor only
            log.error(f"sensor {name}: {exc!r}")
            events = []
        if trip is not None:
            for event in events:
                try:
                    trip(event)
                except Exception as exc:  # noqa: BLE001 - one event's failure (a full disk
                    # under the incident file) is logged, never the supervisor's end
                    log.error(f"sensor {name}: {event.tripwire} event: {exc!r}")
        if sensor.state.startswith("off") and sensor.fileno() is not None:
            self.selector.unregister(sensor)
            sensor.close()
            del self.live[name]
            self.due.pop(name, None)
            self.states[name] = sensor.state
        return sensor.state != before

    def drain_due(self, trip: Trip | None) -> bool:
        """Drain the sensors whose interval has passed; whether a state changed."""
        now, changed = time.monotonic(), False
        for name, when in list(self.due.items()):
            if now >= when and name in self.live:
                self.due[name] = now + self.live[name].interval
                changed |= self.drain(name, trip)
        return changed

    def refused(self, detail: dict[str, Any]) -> None:
        """A write corral refused to keep its reserve (a journal close on the journals' worker
        thread, a revert's archive): a `flood` event at the next drain."""
        sensor = self.live.get("flood")
        if sensor is not None:
            sensor.refused(detail)

    def fresh_delta(self) -> None:
        """After a revert: the new delta's base writes are reported anew."""
        if "base-write" in self.live:
            self.live["base-write"].reported.clear()

    def audit_counts(self) -> dict[str, int] | None:
        """The audit reader's record counts (read, foreign, parsed, lost), if it runs."""
        reader = self.live.get("audit")
        return dict(reader.counts) if reader is not None else None

    def counts_moved(self, every: float = 1.0) -> bool:
        """Whether the counts changed since they were last shown, at most once per `every`
        seconds: a flood of other services' records must not rewrite the state file each
        time."""
        now = time.monotonic()
        if now < self._counted_at + every:
            return False
        counts = self.audit_counts()
        if counts == self._counted:
            return False
        self._counted, self._counted_at = counts, now
        return True

    def report(self) -> dict[str, str]:
        return self.states | {name: s.state for name, s in self.live.items()}

    def stop(self) -> None:
        """The processes are gone: sensors that can stop ahead of their close do (the
        fanotify sensor drops its mark, whose release the kernel finishes meanwhile)."""
        for sensor in self.live.values():
            if hasattr(sensor, "stop"):
                sensor.stop()

    def close(self) -> None:
        if self.audit_status is not None:  # asked, and the start never came
            self.audit_status.close()
        for sensor in self.live.values():
            sensor.close()
        if self.ring is not None:
            self.ring.close()
