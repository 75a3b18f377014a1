"""The embedded backend (the default): each instance is its own OS process on this machine.

Transport: a ``multiprocessing`` pipe per instance. The event loop reads replies with
``loop.add_reader`` and notices a dead process through its sentinel; it writes requests itself,
non-blocking (``_PipeWriter``: what does not fit in the pipe waits in a buffer flushed when the pipe
is writable), so a full pipe (a stalled worker) never blocks the loop — and no thread hands the GIL
back and forth for every batch.
Processes come from a ``forkserver`` that has already imported torch, so a restart after a
crash takes tens of milliseconds instead of a fresh interpreter's seconds. Workers die with the
forkserver (``PR_SET_PDEATHSIG``), which exits with this process, so none is left behind.

Restarts: a process that dies (or is killed) is reported through ``on_failure`` and started
again — at once after a run of at least ``STABLE_S``; after a quicker death (a crash loop: the
model cannot load, the machine is out of memory or file descriptors) with exponential backoff,
``RESTART_FIRST_S`` doubling up to ``RESTART_CAP_S``, for as long as it takes: a restart that
fails (no descriptors left to make a pipe) is retried on the same schedule. Until it is back the
instance is unhealthy (``/healthz`` says ``degraded``). During ``start`` an instance whose model
cannot load fails the start at once with the worker's reason, in one line.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass, field, replace
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch

from parm.backends.base import Backend, InstanceSpec, OnFailure, OnReady, OnResult
from parm.backends.worker import INJECTED_CRASH_EXIT
from parm.errors import InstanceFailedError

log = logging.getLogger(__name__)

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "parm.backends.worker"])
STABLE_S = 5.0  # an instance that ran this long before dying is restarted at once
RESTART_FIRST_S = 0.1  # then, after each quicker death or failed restart, twice as long ...
RESTART_CAP_S = 10.0  # ... up to this
START_ATTEMPTS = 3  # deaths before first ready that fail start()


def _child_main(conn: Any, spec: InstanceSpec, t0_wall_s: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    from parm.backends.worker import die_with_parent, serve_forever

    die_with_parent()
    serve_forever(conn, spec, t0_wall_s)


def restart_delay_s(quick_failures: int) -> float:
    """Seconds before restarting an instance after ``quick_failures`` deaths in a row that each
    came less than STABLE_S after it started (0: it had been up for a while)."""
    if quick_failures <= 0:
        return 0.0
    return min(RESTART_CAP_S, RESTART_FIRST_S * 2 ** (quick_failures - 1))


class _PipeWriter:
    """Writes messages to an instance's pipe from the event loop, never blocking it: framed as
    ``multiprocessing.Connection`` frames them (the worker reads them with ``Connection.recv``), sent
    with ``MSG_DONTWAIT``, and what does not fit waits in a buffer that ``loop.add_writer`` flushes
    once the pipe is writable again (a stalled worker's pipe fills up; nothing waits for it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Any) -> None:
        self.loop = loop
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))  # the same socket, a descriptor of its own
        self.buffer = bytearray()
        self.watching = False
        self.closed = False

    def send(self, obj: Any) -> None:
        if self.closed:
            return
        payload = ForkingPickler.dumps(obj)
        n = len(payload)
        self.buffer += struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        self.buffer += payload
        if not self.watching:
            self._flush()

    def _flush(self) -> None:
        try:
            while self.buffer:
                del self.buffer[:self.sock.send(self.buffer, socket.MSG_DONTWAIT)]
        except BlockingIOError:
            pass
        except OSError:  # the process is gone; its sentinel reports it
            self.close()
            return
        if self.buffer and not self.watching:
            self.loop.add_writer(self.sock.fileno(), self._flush)
            self.watching = True
        elif not self.buffer and self.watching:
            self.loop.remove_writer(self.sock.fileno())
            self.watching = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.watching:
            self.loop.remove_writer(self.sock.fileno())
            self.watching = False
        self.buffer.clear()
        self.sock.close()


@dataclass
class _Slot:
    """One running process of an instance (a restart makes a new slot)."""

    spec: InstanceSpec
    process: Any
    conn: Any
    writer: _PipeWriter
    ready: bool = False
    dead: bool = False
    kill_reason: str | None = None
    started_s: float = field(default_factory=time.monotonic)
    fatal: str | None = None  # why the worker could not load its model


class LocalBackend(Backend):
    """Instances as local processes (see module docstring)."""

    def __init__(self, instances: list[InstanceSpec], *, start_timeout_s: float = 120.0) -> None:
        self.instances = list(instances)
        self.start_timeout_s = start_timeout_s
        self.t0_wall_s = time.time()
        self._slots: dict[int, _Slot] = {}
        self._stopping = False
        self._crashed: set[int] = set()
        self._quick_failures: dict[int, int] = {}  # instance -> deaths in a row, each soon after its start
        self._start_error: str | None = None
        self._pending: dict[int, asyncio.TimerHandle] = {}  # scheduled restarts
        self.restarts = 0

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self, on_result: OnResult, on_failure: OnFailure, on_ready: OnReady) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_result, self._on_failure, self._on_ready = on_result, on_failure, on_ready
        self.t0_wall_s = time.time()
        self._all_ready = asyncio.Event()
        self._start_error = None
        for spec in self.instances:
            self._spawn(spec)
        try:
            await asyncio.wait_for(self._all_ready.wait(), self.start_timeout_s)
        except asyncio.TimeoutError:
            await self.stop()
            raise InstanceFailedError(
                f"instances did not start within {self.start_timeout_s} s; check the model checkpoints "
                f"and the log of the worker processes", instance=-1,
            ) from None
        if self._start_error is not None:
            await self.stop()
            raise InstanceFailedError(self._start_error, instance=-1)

    def _spawn(self, spec: InstanceSpec) -> None:
        if spec.faults is not None and spec.instance_id in self._crashed:
            spec = replace(spec, faults=spec.faults.after_crash())  # a crash fires once per run
        parent, child = _CTX.Pipe(duplex=True)
        process = _CTX.Process(target=_child_main, args=(child, spec, self.t0_wall_s),
                               daemon=True, name=f"parm-instance-{spec.instance_id}")
        try:
            process.start()
        except BaseException:  # out of descriptors or memory: leave nothing half made
            parent.close()
            child.close()
            raise
        child.close()
        try:
            writer = _PipeWriter(self._loop, parent)
        except BaseException:
            parent.close()
            process.kill()
            raise
        slot = _Slot(spec, process, parent, writer)
        self._slots[spec.instance_id] = slot
        self._loop.add_reader(parent.fileno(), self._readable, slot)
        self._loop.add_reader(process.sentinel, self._died, slot, "process exited")

    async def stop(self) -> None:
        self._stopping = True
        for timer in self._pending.values():
            timer.cancel()
        self._pending.clear()
        slots = list(self._slots.values())
        for slot in slots:
            self._detach(slot)
            slot.writer.close()
            if slot.process.is_alive():
                slot.process.kill()
        deadline = time.monotonic() + 5.0
        for slot in slots:
            while slot.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            slot.process.join(timeout=0)
            slot.conn.close()
        self._slots.clear()

    # ---- I/O ----------------------------------------------------------------------------
    def send(self, instance_id: int, work_id: int, inputs: torch.Tensor, *, spare: bool = False) -> None:
        slot = self._slots.get(instance_id)
        if slot is None or slot.dead:
            self._loop.call_soon(self._on_result, instance_id, work_id, None, "instance is down")
            return
        array = inputs.detach().to(torch.float32).contiguous().numpy()
        slot.writer.send((work_id, array.tobytes(), array.shape, spare))

    def set_time_origin(self, t0_wall_s: float) -> None:
        self.t0_wall_s = t0_wall_s
        for slot in self._slots.values():
            slot.writer.send(("t0", t0_wall_s))

    def healthy(self, instance_id: int) -> bool:
        slot = self._slots.get(instance_id)
        return slot is not None and slot.ready and not slot.dead

    def kill(self, instance_id: int, reason: str) -> None:
        slot = self._slots.get(instance_id)
        if slot is None or slot.dead:
            return
        slot.kill_reason = reason
        if slot.process.pid is not None:
            try:
                os.kill(slot.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def pid(self, instance_id: int) -> int | None:
        slot = self._slots.get(instance_id)
        return None if slot is None else slot.process.pid

    def _readable(self, slot: _Slot) -> None:
        try:
            while not slot.dead and slot.conn.poll():
                self._handle(slot, slot.conn.recv())
        except (EOFError, OSError):
            self._died(slot, "connection closed")

    def _handle(self, slot: _Slot, msg: tuple) -> None:
        iid = slot.spec.instance_id
        if msg[0] == "ok":
            _, work_id, payload, shape = msg
            out = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(shape).copy())
            self._on_result(iid, work_id, out, None)
        elif msg[0] == "err":
            self._on_result(iid, msg[1], None, msg[2])
        elif msg[0] == "fatal":
            slot.fatal = str(msg[2])
            if not self._all_ready.is_set():  # starting: fail now, with the worker's reason
                self._start_error = f"instance {iid} ({slot.spec.role}) cannot start: {slot.fatal}"
                self._all_ready.set()
        elif msg[0] == "ready":
            slot.ready = True
            slot.started_s = time.monotonic()
            log.info("instance %d (%s%s) ready on %s, pid %d", iid, slot.spec.role,
                     "" if slot.spec.zone is None else f", zone {slot.spec.zone}", msg[3], msg[2])
            if self._all_ready.is_set():
                self._on_ready(iid)
            elif all(s.ready for s in self._slots.values()) and len(self._slots) == len(self.instances):
                self._all_ready.set()

    def _detach(self, slot: _Slot) -> None:
        for fd in (slot.conn.fileno() if not slot.conn.closed else None, slot.process.sentinel):
            if fd is not None:
                self._loop.remove_reader(fd)

    def _died(self, slot: _Slot, why: str) -> None:
        if slot.dead or self._stopping:
            return
        slot.dead = True
        self._detach(slot)
        slot.writer.close()
        if slot.process.is_alive():  # pipe closed but process lingering: make sure it is gone
            slot.process.kill()
        slot.process.join(timeout=0.05)
        iid = slot.spec.instance_id
        if slot.process.exitcode == INJECTED_CRASH_EXIT:
            self._crashed.add(iid)
        reason = slot.kill_reason or slot.fatal or f"{why} (exit code {slot.process.exitcode})"
        # a death of its own soon after it started (a crash loop); a stall the frontend killed is not one
        quick = slot.kill_reason is None and (not slot.ready or time.monotonic() - slot.started_s < STABLE_S)
        failures = self._quick_failures[iid] = self._quick_failures.get(iid, 0) + 1 if quick else 0
        delay = restart_delay_s(failures)
        slot.process.join(timeout=0)
        slot.conn.close()
        if self._start_error is not None:  # start() is failing: nothing to restart
            return
        if not self._all_ready.is_set() and (slot.fatal is not None or failures >= START_ATTEMPTS):
            self._start_error = self._start_error or (
                f"instance {iid} ({slot.spec.role}) cannot start: {reason}"
                + ("" if slot.fatal else f" ({failures} attempts; see the worker's output above)"))
            self._all_ready.set()
            return
        log.warning("instance %d (%s) failed: %s; restarting%s", iid, slot.spec.role, reason,
                    f" in {delay:.1f} s" if delay else "")
        self.restarts += 1
        self._on_failure(iid, reason)  # its in-flight work is recovered first
        self._restart_later(slot.spec, delay)

    def _restart_later(self, spec: InstanceSpec, delay_s: float) -> None:
        if delay_s <= 0:
            self._restart(spec)
        else:
            self._pending[spec.instance_id] = self._loop.call_later(delay_s, self._restart, spec)

    def _restart(self, spec: InstanceSpec) -> None:
        """Start the instance again; if that fails (no file descriptors left, say), try again later."""
        self._pending.pop(spec.instance_id, None)
        if self._stopping:
            return
        try:
            self._spawn(spec)
        except OSError as exc:
            failures = self._quick_failures[spec.instance_id] = self._quick_failures.get(spec.instance_id, 0) + 1
            delay = restart_delay_s(failures)
            log.warning("instance %d could not be restarted (%s); trying again in %.1f s", spec.instance_id, exc, delay)
            self._restart_later(spec, delay)
