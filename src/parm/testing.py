"""Time you control, for tests and the simulator: a virtual-time asyncio loop and a manual clock.

The simulator (``parm.bench.simulate``) and the frontend's unit tests both run on
``VirtualTimeLoop``: the real frontend, at simulation speed, with no wall-clock sleep.

``VirtualTimeLoop`` is a standard selector event loop whose clock is a number it advances
itself: when the loop would block until its next timer, the selector instead moves the
clock to that timer and returns at once. Everything scheduled with ``call_later`` /
``call_at`` / ``asyncio.sleep`` — the frontend's batch, group, hedge and deadline timers, and a
simulated backend's service completions — fires in timestamp order, as fast as the CPU runs
the callbacks. No I/O may be waited on (there is none in a simulation); if the loop has
nothing scheduled and nothing ready, the simulation is stuck and ``SimulationStuck`` is raised.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class SimulationStuck(RuntimeError):
    """The simulated system waits for something that will never happen."""


class _VirtualSelector(selectors.BaseSelector):
    def __init__(self) -> None:
        self._map: dict[Any, selectors.SelectorKey] = {}
        self.loop: VirtualTimeLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, fileobj if isinstance(fileobj, int) else fileobj.fileno(), events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def select(self, timeout: float | None = None) -> list:
        assert self.loop is not None
        if timeout is None:
            raise SimulationStuck("nothing is scheduled and nothing is ready: the simulated system waits forever")
        self.loop.advance(timeout)
        return []

    def get_map(self) -> dict:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual and jumps to the next timer instead of waiting."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        selector = _VirtualSelector()
        super().__init__(selector=selector)
        selector.loop = self

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._virtual_now += seconds


class ManualClock:
    """A clock that moves only when told: ``clock()`` reads it, ``clock.advance(s)`` moves it."""

    def __init__(self, start_s: float = 100.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def run_virtual(coro: Any) -> Any:
    """Run ``coro`` to completion on a fresh VirtualTimeLoop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
