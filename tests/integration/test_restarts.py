"""Instances that cannot start, or keep dying, with real processes: a broken checkpoint fails
`parm serve` in seconds with one line; a model that cannot load fails start() with its reason; a
crash loop is restarted with backoff (not thousands of times) and reported as down until it comes
back; a restart that fails for want of file descriptors is retried until they are free; a
stalled worker dies with its frontend even when that is SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.errors import InstanceFailedError
from processes import alive

SHAPE = (4,)


def _backend(*refs: ModelRef, **kwargs) -> LocalBackend:
    return LocalBackend([InstanceSpec(i, "data", ref) for i, ref in enumerate(refs)], **kwargs)


async def _started(backend: LocalBackend) -> list[tuple[str, int]]:
    events: list[tuple[str, int]] = []
    await backend.start(lambda *a: None, lambda i, why: events.append(("failed", i)),
                        lambda i: events.append(("ready", i)))
    return events


async def _until(predicate, timeout_s: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(0.02)


def test_a_broken_parity_checkpoint_fails_serve_in_seconds_with_one_line(tmp_path: Path,
                                                                         tiny_checkpoints: tuple[Path, Path]) -> None:
    import shutil

    base, parity = tiny_checkpoints
    broken = tmp_path / "parity"
    shutil.copytree(parity, broken)
    for weights in broken.glob("model-*.safetensors"):
        weights.unlink()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "parm.cli", "serve", "--base", str(base), "--parity", str(broken),
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 1 and took < 5.0, (proc.returncode, took, proc.stderr[-2000:])
    assert proc.stderr.count("\n") == 1 and "missing" in proc.stderr and str(broken) in proc.stderr, proc.stderr


def test_a_model_that_cannot_load_fails_start_with_its_reason() -> None:
    async def main() -> None:
        backend = _backend(ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE}),
                           ModelRef(factory="parm.models.toy:linear", kwargs={"no_such_argument": 1}))
        start = time.monotonic()
        with pytest.raises(InstanceFailedError, match=r"instance 1 \(data\) cannot start: TypeError: .*no_such_argument"):
            await _started(backend)
        assert time.monotonic() - start < 30 and backend.restarts == 0

    asyncio.run(main())


def test_a_crash_loop_backs_off_is_reported_down_and_recovers(tmp_path: Path) -> None:
    marker = tmp_path / "broken"

    async def main() -> None:
        backend = _backend(ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE}),
                           ModelRef(factory="parm.models.toy:linear_unless",
                                    kwargs={"marker": str(marker), "in_shape": SHAPE}))
        await _started(backend)
        try:
            marker.touch()  # from now on instance 1 cannot load its model
            backend.kill(1, "killed by the test")
            await asyncio.sleep(2.5)
            attempts = backend.restarts
            assert 2 <= attempts <= 6, attempts  # 0.1 + 0.2 + 0.4 + 0.8 s ... apart, not a tight loop
            assert not backend.healthy(1) and backend.healthy(0)
            marker.unlink()
            await _until(lambda: backend.healthy(1), timeout_s=8.0)  # the next attempt succeeds
        finally:
            await backend.stop()

    asyncio.run(main())


def test_a_restart_without_file_descriptors_is_retried_until_they_are_free() -> None:
    async def main() -> None:
        backend = _backend(ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE}))
        await _started(backend)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hog: list[int] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
            try:
                while True:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass  # every descriptor is taken
            backend.kill(0, "killed by the test")
            await asyncio.sleep(1.0)
            assert not backend.healthy(0)  # could not restart: no descriptors for its pipe
        finally:
            for fd in hog:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            await _until(lambda: backend.healthy(0), timeout_s=15.0)
        finally:
            await backend.stop()

    asyncio.run(main())


_STALLED_FRONTEND = """
import asyncio, sys
import torch
from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.faults import instance_schedules, parse_fault_spec

async def main():
    spec = InstanceSpec(0, "data", ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": (4,)}),
                        faults=instance_schedules(parse_fault_spec("stall:instance=0,at_s=0"), 1, 60.0)[0])
    backend = LocalBackend([spec])
    await backend.start(lambda *a: None, lambda *a: None, lambda *a: None)
    backend.send(0, 1, torch.zeros(1, 4))  # it takes the batch and stalls: it no longer reads its pipe
    await asyncio.sleep(0.5)
    print(backend.pid(0), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_stalled_worker_dies_with_its_frontend_even_on_sigkill() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_FRONTEND], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(worker):
            time.sleep(0.05)
        assert not alive(worker), f"worker {worker} outlived its SIGKILLed frontend"
    finally:
        proc.kill()



def test_the_restart_delay_doubles_from_a_tenth_of_a_second_to_ten() -> None:
    from parm.backends.local import restart_delay_s

    assert [restart_delay_s(n) for n in range(7)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    assert restart_delay_s(50) == 10.0
