"""Steady load for serving tests that check every answer: each query's Prediction, in order."""

from __future__ import annotations

import asyncio
import time

import torch

from parm.serving import Frontend, Source


async def send_steadily(frontend: Frontend, queries: torch.Tensor, rate_qps: float) -> list:
    """Submit the queries at ``rate_qps``; every query's Prediction (or exception), in order."""
    loop = asyncio.get_running_loop()
    start, futures = loop.time(), []
    for i, query in enumerate(queries):
        await asyncio.sleep(max(0.0, start + i / rate_qps - loop.time()))
        futures.append(frontend.submit(query))
    return await asyncio.gather(*futures, return_exceptions=True)


async def serve_all(frontend: Frontend, queries: torch.Tensor, rate_qps: float, during=None) -> list:
    """Start the frontend, send the queries steadily (running ``during(frontend)`` alongside), stop."""
    await frontend.start()
    try:
        frontend.backend.set_time_origin(time.time())
        task = asyncio.create_task(send_steadily(frontend, queries, rate_qps))
        if during is not None:
            await during(frontend)
        return await task
    finally:
        await frontend.stop()


def settled(frontend: Frontend, source: Source) -> float:
    """Queries the frontend settled with ``source`` (its ``parm_queries_total`` metric)."""
    return frontend.metrics.registry.get_sample_value("parm_queries_total", {"source": source.value}) or 0.0
