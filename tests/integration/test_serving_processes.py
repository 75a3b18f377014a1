"""The serving system with real worker processes: SIGKILL and stall mid-run lose nothing, and
decoded answers equal the offline decoder's.

The kill and stall runs use toy linear models whose exact parity model is known, so every
answer — original or reconstructed — can be checked against W x + b.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.bench import run_open_loop
from parm.coding import CodeConfig, encode, reconstruct_each
from parm.faults import parse_fault_spec
from parm.models.toy import linear
from parm.serving import Frontend, Prediction, ServingConfig, Source, instance_roles
from parm.system import with_faults

SHAPE = (1, 28, 28)
N_QUERIES = 2000
RATE_QPS = 400.0


def _toy_specs(mode: str, m: int, k: int) -> list[InstanceSpec]:
    data = ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE})
    parity = ModelRef(factory="parm.models.toy:linear_parity", kwargs={"in_shape": SHAPE, "k": k})
    return [InstanceSpec(i, role, parity if role == "parity" else data, emulated_ms=1.0)
            for i, role in enumerate(instance_roles(mode, m, k))]


def _steady_arrivals(n: int) -> np.ndarray:
    return np.arange(n) / RATE_QPS


def _recording(frontend: Frontend, got: dict[int, Prediction]):
    """``frontend.submit`` that also keeps the i-th query's Prediction in ``got[i]``."""

    counter = iter(range(10**9))

    def submit_and_keep(query: torch.Tensor):
        index = next(counter)
        future = frontend.submit(query)
        future.add_done_callback(lambda f: None if f.exception() else got.__setitem__(index, f.result()))
        return future

    return submit_and_keep


def _count(frontend: Frontend, source: Source) -> float:
    return frontend.metrics.registry.get_sample_value("parm_queries_total", {"source": source.value}) or 0.0


async def _run(frontend: Frontend, queries: torch.Tensor, during=None, got: dict[int, Prediction] | None = None
               ) -> list:
    await frontend.start()
    try:
        frontend.backend.set_time_origin(time.time())
        submit = frontend.submit if got is None else _recording(frontend, got)
        task = asyncio.create_task(run_open_loop(submit, queries, _steady_arrivals(len(queries))))
        if during is not None:
            await during(frontend)
        return await task
    finally:
        await frontend.stop()


def _check_all_answered_exactly(results: list, queries: torch.Tensor, frontend: Frontend) -> None:
    assert len(results) == len(queries)
    errors = [r for r in results if r.outcome != "ok"]
    assert not errors, errors[:3]
    assert _count(frontend, Source.RECONSTRUCTED) > 0
    assert _count(frontend, Source.ERROR) == 0


def test_sigkill_of_a_data_instance_loses_nothing() -> None:
    torch.manual_seed(0)
    queries = torch.randn(N_QUERIES, *SHAPE)
    backend = LocalBackend(_toy_specs("coded", 2, 2))
    frontend = Frontend(ServingConfig(SHAPE, mode="coded", k=2), backend)

    async def kill_midway(fe: Frontend) -> None:
        await asyncio.sleep(N_QUERIES / RATE_QPS / 2)
        os.kill(backend.pid(1), signal.SIGKILL)

    results = asyncio.run(_run(frontend, queries, kill_midway))
    _check_all_answered_exactly(results, queries, frontend)
    assert backend.restarts >= 1


def test_stalled_instance_is_detected_and_nothing_is_lost() -> None:
    torch.manual_seed(1)
    queries = torch.randn(N_QUERIES, *SHAPE)
    backend = LocalBackend(with_faults(_toy_specs("coded", 2, 2), parse_fault_spec("stall:instance=1,at_s=2")))
    frontend = Frontend(ServingConfig(SHAPE, mode="coded", k=2, stall_timeout_ms=500), backend)
    results = asyncio.run(_run(frontend, queries))
    _check_all_answered_exactly(results, queries, frontend)
    assert backend.restarts >= 1  # the stalled process was killed and replaced


def test_answers_are_exact_through_kill_for_linear_models() -> None:
    """Original and reconstructed answers both equal F(x) = Wx + b (exact parity model)."""
    torch.manual_seed(2)
    queries = torch.randn(600, *SHAPE)
    backend = LocalBackend(with_faults(_toy_specs("coded", 2, 2), parse_fault_spec("crash:instance=0,at_s=0.7")))
    frontend = Frontend(ServingConfig(SHAPE, mode="coded", k=2), backend)
    got: dict[int, Prediction] = {}
    results = asyncio.run(_run(frontend, queries, got=got))
    assert all(r.outcome == "ok" for r in results) and len(got) == len(queries)
    with torch.no_grad():
        want = linear(SHAPE)(queries)  # (N, C)
    assert {p.source for p in got.values()} >= {Source.ORIGINAL, Source.RECONSTRUCTED}
    for index, pred in got.items():
        torch.testing.assert_close(pred.scores, want[index], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiles_parity(tiny_checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A k = 2 parity model of the tiles code (tile-mlp, a prediction per member), one epoch."""
    from parm.training import OptimConfig, ParityConfig, train_parity

    out = tmp_path_factory.mktemp("tiles") / "k2-tiles"
    train_parity(tiny_checkpoints[0], out, ParityConfig(CodeConfig(k=2, encoder="tiles")),
                 OptimConfig(epochs=1, batch_size=256, val_size=200), data_root=data_root, progress=False)
    return out


@pytest.mark.parametrize("encoder", ["add", "tiles"])
def test_served_reconstructions_equal_offline_decoder(tiny_checkpoints: tuple[Path, Path], encoder: str,
                                                      request: pytest.FixtureRequest) -> None:
    """Same checkpoints, same groups: the serving path's decoded scores equal reconstruct_each's
    (addition code: subtraction; tiles code: the parity model's prediction of the member)."""
    from parm.checkpoint import load_checkpoint

    base_dir = tiny_checkpoints[0]
    parity_dir = tiny_checkpoints[1] if encoder == "add" else request.getfixturevalue("tiles_parity")
    base_model, base = load_checkpoint(base_dir)
    parity_model, _ = load_checkpoint(parity_dir)
    roles = instance_roles("coded", 2, 2)
    specs = [InstanceSpec(i, r, ModelRef(checkpoint=str(parity_dir if r == "parity" else base_dir)))
             for i, r in enumerate(roles)]
    # instance 1 is always very slow, so its batches are answered by the decoder
    backend = LocalBackend(with_faults(specs, parse_fault_spec("delay:mean_ms=300,dist=const,instances=1")))
    frontend = Frontend(ServingConfig(tuple(base.in_shape), mode="coded", k=2, encoder=encoder, stall_timeout_ms=5000),
                        backend)
    torch.manual_seed(3)
    queries = torch.randn(40, *base.in_shape)
    got: dict[int, tuple[torch.Tensor, Source]] = {}  # batch size 1, sent in order: batch id == query index

    async def main() -> None:
        await frontend.start()
        try:
            for g in range(0, len(queries), 2):  # two consecutive submissions = one coding group
                preds = await asyncio.gather(frontend.submit(queries[g]), frontend.submit(queries[g + 1]))
                for i, pred in enumerate(preds):
                    got[g + i] = (pred.scores, pred.source)
        finally:
            await frontend.stop()

    asyncio.run(main())
    code = CodeConfig(k=2, encoder=encoder)
    with torch.no_grad():
        groups = queries.view(-1, 2, *base.in_shape)  # (G, k, *S)
        offline = reconstruct_each(code, base_model(queries).view(-1, 2, base.num_classes),
                                   parity_model(encode(code, groups)[:, 0]))  # (G, k, C)
    reconstructed = [b for b, (_, s) in got.items() if s is Source.RECONSTRUCTED]
    assert reconstructed, "the slow instance's batches should have been reconstructed"
    for batch_id in reconstructed:
        torch.testing.assert_close(got[batch_id][0], offline[batch_id // 2, batch_id % 2], rtol=1e-4, atol=1e-4)
