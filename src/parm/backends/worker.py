"""The worker loop every instance runs, whatever the transport.

Requests are ``(work_id, payload bytes, shape)`` float32 tensors; replies are
``("ok", work_id, payload, shape)`` or ``("err", work_id, message)``. Faults from
``parm.faults`` are applied here, at the instance: a batch takes ``service_time_s`` (compute
time × the active slowdown + random extra delay), a crash exits the process, a stall keeps it
alive and silent. A fault whose time has already passed when the process starts (a restarted
instance) does not fire again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Protocol

import numpy as np
import torch

from parm.backends.base import InstanceSpec
from parm.devices import autocast

log = logging.getLogger(__name__)

INJECTED_CRASH_EXIT = 17  # the backend tells an injected crash from a real one by this exit code
FATAL_EXIT = 18  # the instance could not load its model: it said why ("fatal") before exiting


def die_with_parent() -> None:
    """Linux: the kernel kills this process when the one that started it exits, so a worker never
    outlives its frontend (even one killed with SIGKILL), stalled or not. Elsewhere: nothing."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Channel(Protocol):
    def send(self, obj: Any) -> None: ...
    def recv(self) -> Any: ...
    def poll(self, timeout: float | None = None) -> bool: ...


class ModelRunner:
    """Runs one batch through the instance's model, applying faults and emulated time."""

    def __init__(self, spec: InstanceSpec, t0_wall_s: float) -> None:
        torch.set_num_threads(1)
        self.spec, self.faults, self.t0_wall_s = spec, spec.faults, t0_wall_s
        self.device = torch.device(spec.device)
        self.model = spec.model.build().to(self.device)
        self.spare = None if spec.spare is None else spec.spare.build().to(self.device)
        self.seq = 0
        self.set_origin(t0_wall_s)

    def set_origin(self, t0_wall_s: float) -> None:
        """Count fault time from ``t0_wall_s``; faults already past for this process never fire."""
        self.t0_wall_s = t0_wall_s
        self.started_s = self.now_s()
        self.crash_at_s = None if self.faults is None else self.faults.crash_after(self.started_s)

    def now_s(self) -> float:
        return time.time() - self.t0_wall_s

    def stalled(self) -> bool:
        return self.faults is not None and self.faults.stalls_at(self.now_s(), self.started_s)

    @torch.inference_mode()
    def run(self, payload: bytes, shape: tuple[int, ...], spare: bool = False) -> np.ndarray:
        start = time.perf_counter()
        x = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(shape).copy())  # (B, *S)
        model = self.model if not spare else self.spare
        if model is None:
            raise ValueError(f"instance {self.spec.instance_id} holds no spare model")
        with autocast(self.device, self.spec.precision):
            out = model(x.to(self.device)).float().cpu().numpy()  # (B, C); .cpu() waits for the device
        compute_s = time.perf_counter() - start
        target_s = compute_s + self.spec.emulated_ms / 1e3
        if self.faults is not None:
            target_s = self.faults.service_time_s(self.now_s(), target_s, self.seq, nbytes=len(payload) + out.nbytes)
        self.seq += 1
        remaining = target_s - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return out


def _wait_for_request(conn: Channel, runner: ModelRunner) -> bool:
    """Block until a request arrives; exit the process if the crash time comes first."""
    while runner.crash_at_s is not None:
        if conn.poll(max(0.0, runner.crash_at_s - runner.now_s())):
            return True
        if runner.now_s() >= runner.crash_at_s:
            log.warning("instance %d: injected crash", runner.spec.instance_id)
            os._exit(INJECTED_CRASH_EXIT)
    return True


def serve_forever(conn: Channel, spec: InstanceSpec, t0_wall_s: float) -> None:
    """The worker loop: load the model, say ready, answer requests until told to stop. A model
    that cannot be loaded is reported (``fatal``, with the reason) before the process exits."""
    try:
        runner = ModelRunner(spec, t0_wall_s)
    except Exception as exc:  # a missing file, a bad factory, no such device, out of memory...
        conn.send(("fatal", spec.instance_id, f"{type(exc).__name__}: {exc}"))
        os._exit(FATAL_EXIT)
    conn.send(("ready", spec.instance_id, os.getpid(), str(runner.device)))
    while _wait_for_request(conn, runner):
        msg = conn.recv()
        if msg is None:
            return
        if msg[0] == "t0":
            runner.set_origin(msg[1])
            continue
        work_id, payload, shape, spare = msg
        if runner.crash_at_s is not None and runner.now_s() >= runner.crash_at_s:
            os._exit(INJECTED_CRASH_EXIT)
        while runner.stalled():  # alive but silent: the frontend has to notice and kill us
            time.sleep(0.05)
        try:
            out = runner.run(payload, shape, spare)
        except Exception as exc:  # a model error answers this batch with an error, the worker lives on
            conn.send(("err", work_id, f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("ok", work_id, out.tobytes(), out.shape))
