"""Probes: one-off batches the frontend runs on some instance of a role and awaits (the coded
policy's F(0)); a probe whose instance dies is re-sent elsewhere, and stopping fails them."""

from __future__ import annotations

import asyncio

import torch

from parm.errors import ServingError
from parm.serving.dispatch import Dispatcher, Work


class Probes:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._futures: dict[int, asyncio.Future] = {}

    async def run(self, role: str, inputs: torch.Tensor, timeout_s: float) -> torch.Tensor:
        work = Work(self.dispatcher.new_id(), "probe", -1, role, inputs)
        future = asyncio.get_running_loop().create_future()
        self._futures[work.work_id] = future
        self.dispatcher.submit(work)
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._futures.pop(work.work_id, None)

    def finish(self, work: Work, output: torch.Tensor | None, error: str | None) -> None:
        future = self._futures.get(work.work_id)
        if future is not None and not future.done():
            if output is None:
                future.set_exception(ServingError(f"probe failed on instance {work.instance}: {error}"))
            else:
                future.set_result(output)

    def resend(self, work: Work, failed_instance: int) -> None:
        self.dispatcher.submit(Work(work.work_id, "probe", -1, work.role, work.inputs,
                                    avoid=frozenset({failed_instance})), front=True)

    def fail_all(self, error: Exception) -> None:
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
