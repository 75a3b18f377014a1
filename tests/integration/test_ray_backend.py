"""The Ray Serve backend on a real local Ray cluster (marker ``ray``; one cluster per session).

The end-to-end bar: 500 queries with one data replica killed mid-run (``ray.kill``, as a node
failure would) are all answered, some by reconstruction, and every answer equals what the local
backend gives for the same input. Toy linear models with an exact parity model make
"equal" checkable to float tolerance for reconstructed answers too.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.models.toy import linear
from parm.serving import Frontend, ServingConfig, Source, instance_roles
from steady_load import serve_all, settled

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install \"parm-serving[ray]\"")

from parm.backends.ray_serve import SERVE_NAMESPACE, RayServeBackend, _portable, check_reachable  # noqa: E402
from parm.errors import ConfigError, InstanceFailedError  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

SHAPE = (1, 28, 28)
N_QUERIES = 500
RATE_QPS = 50.0  # 10 s of traffic: Serve replaces a killed replica in ~5-10 s here


def toy_specs(mode: str, m: int, k: int, emulated_ms: float = 5.0) -> list[InstanceSpec]:
    data = ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE})
    parity = ModelRef(factory="parm.models.toy:linear_parity", kwargs={"in_shape": SHAPE, "k": k})
    return [InstanceSpec(i, role, parity if role == "parity" else data, emulated_ms=emulated_ms)
            for i, role in enumerate(instance_roles(mode, m, k))]


def scores_by_query(predictions: list) -> torch.Tensor:
    """The scores of every query's answer, in submission order (all must be answered)."""
    failed = [p for p in predictions if isinstance(p, BaseException)]
    assert not failed, failed[:3]
    return torch.stack([p.scores for p in predictions])


def test_500_queries_with_a_data_replica_killed_are_all_answered_and_equal_the_local_backend() -> None:
    torch.manual_seed(0)
    queries = torch.randn(N_QUERIES, *SHAPE)
    backend = RayServeBackend(toy_specs("coded", 2, 2))
    frontend = Frontend(ServingConfig(SHAPE, mode="coded", k=2), backend)
    killed: list[str] = []
    after: list = []  # answers to queries sent once Serve's replacement replica is up

    async def kill_a_busy_data_replica(fe: Frontend) -> None:
        await asyncio.sleep(N_QUERIES / RATE_QPS / 3)
        while not fe.dispatcher.instances[0].in_flight:  # kill it while it holds work, so that work is lost
            await asyncio.sleep(0.001)
        killed.append(backend.actor_name(0))
        ray.kill(ray.get_actor(killed[0], namespace=SERVE_NAMESPACE), no_restart=True)
        deadline = time.monotonic() + 60
        while (backend.healthy(0) or backend.actor_name(0) == killed[0]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the backend notices the death ...
        while not backend.healthy(0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # ... and the replica Serve started in its place
        assert backend.healthy(0), "Serve did not replace the killed replica within 60 s"
        for query in queries[:40]:  # the run may be over by now: more traffic, for the new replica
            after.append(fe.submit(query))
            await asyncio.sleep(0.01)
        after[:] = await asyncio.gather(*after)

    results = asyncio.run(serve_all(frontend, queries, RATE_QPS, kill_a_busy_data_replica))
    ray_scores = scores_by_query(results)
    assert settled(frontend, Source.RECONSTRUCTED) > 0
    assert settled(frontend, Source.ERROR) == 0
    assert backend.restarts == 1 and backend.actor_name(0) != killed[0], "Serve did not replace the replica"
    assert any(p.instance == 0 for p in after), "the replacement replica served nothing"
    torch.testing.assert_close(torch.stack([p.scores for p in after]), linear(SHAPE)(queries[:40]).detach(),
                               rtol=1e-4, atol=1e-4)

    local = Frontend(ServingConfig(SHAPE, mode="coded", k=2), LocalBackend(toy_specs("coded", 2, 2)))
    local_scores = scores_by_query(asyncio.run(serve_all(local, queries, RATE_QPS)))
    torch.testing.assert_close(ray_scores, local_scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ray_scores, linear(SHAPE)(queries).detach(), rtol=1e-4, atol=1e-4)


def test_a_model_error_fails_only_its_batch_and_cancel_stops_a_waiting_one() -> None:
    backend = RayServeBackend([InstanceSpec(0, "data", ModelRef(factory="parm.models.toy:linear",
                                                                kwargs={"in_shape": SHAPE}), emulated_ms=300.0)])
    outcomes: dict[int, tuple] = {}
    failures: list = []

    async def main() -> tuple:
        await backend.start(lambda i, w, out, err: outcomes.__setitem__(w, (out, err)),
                            lambda i, reason: failures.append(reason), lambda i: None)
        try:
            actor = backend.actor_name(0)
            backend.send(0, 1, torch.zeros(1, 3))  # a shape the model cannot take: an error, the replica lives
            backend.send(0, 2, torch.ones(2, *SHAPE))  # runs for 300 ms ...
            backend.send(0, 3, torch.ones(1, *SHAPE))  # ... while this one waits for the model thread
            await asyncio.sleep(0.1)
            backend.cancel(0, 3)
            for _ in range(300):
                if len(outcomes) == 3:
                    break
                await asyncio.sleep(0.01)
            return actor, backend.actor_name(0)
        finally:
            await backend.stop()

    actor_before, actor_after = asyncio.run(main())
    from ray import serve

    assert not [app for app in serve.status().applications if app.startswith(f"parm-{backend.token}-")], \
        "stop() left Serve applications behind"
    assert outcomes[1][0] is None and "RuntimeError" in outcomes[1][1], outcomes[1]
    assert outcomes[2][1] is None and tuple(outcomes[2][0].shape) == (2, 10)
    assert outcomes[3] == (None, "cancelled")
    assert actor_before == actor_after and failures == [], "a model error must not cost the replica"


def test_checkpoints_travel_to_replicas_as_bytes(tiny_checkpoints: tuple[Path, Path]) -> None:
    base, _ = tiny_checkpoints
    spec = _portable(InstanceSpec(0, "data", ModelRef(checkpoint=str(base))))
    assert spec.model.checkpoint is None and "record.json" in spec.model.kwargs["files"]
    model = spec.model.build()
    from parm.checkpoint import load_checkpoint

    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), load_checkpoint(base)[0](x))
    with pytest.raises(ValueError, match="no record.json"):
        _portable(InstanceSpec(0, "data", ModelRef(checkpoint=str(base.parent))))


def test_bench_runs_an_experiment_file_on_ray(tiny_checkpoints: tuple[Path, Path], tmp_path: Path,
                                               data_root: Path) -> None:
    from parm.bench.experiment import load_experiment
    from parm.bench.run_experiment import run_bench

    base, parity = tiny_checkpoints
    exp_file = tmp_path / "ray.toml"
    exp_file.write_text(f"""
name = "ray-smoke"
modes = ["equal", "coded"]
[system]
data_root = "{data_root}"
base = "{base}"
parity = "{parity}"
instances = 2
emulated_ms = 2.0
[load]
queries = 200
rate = 100
warmup = 20
trials = 1
[faults]
[[faults.fault]]
kind = "crash"
instance = 1
at_s = 1.0
""")
    summary = run_bench(load_experiment(exp_file), tmp_path / "out", progress=False, backend="ray")
    assert summary["backend"] == "ray"
    for mode in ("equal", "coded"):
        assert summary[mode]["lost"] == 0 and summary[mode]["errors"] == 0, summary[mode]
        assert summary[mode]["restarts"] >= 1, "the injected crash did not fire inside the replica"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["backend"] == "ray"


def test_an_unreachable_cluster_address_fails_fast_with_what_to_do() -> None:
    started = time.monotonic()
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(ConfigError, match="ray start --head"):
            check_reachable(address)
    assert time.monotonic() - started < 10
    check_reachable("auto")  # left to Ray


def test_replicas_the_cluster_cannot_place_fail_the_start_clearly_and_leave_nothing() -> None:
    specs = [InstanceSpec(0, "data", ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE}))]
    backend = RayServeBackend(specs, num_cpus=1000, start_timeout_s=8)
    started = time.monotonic()
    with pytest.raises(InstanceFailedError, match="ray status"):
        asyncio.run(backend.start(lambda *a: None, lambda *a: None, lambda *a: None))
    assert time.monotonic() - started < 60
    from ray import serve

    assert not [app for app in serve.status().applications if app.startswith(f"parm-{backend.token}-")]


def test_a_parity_replica_runs_its_spare_model_and_each_replica_names_its_node() -> None:
    """coded-hedge's parity instances hold the deployed model as a spare: a batch sent with
    spare=True runs on it, one without on the parity model. Each replica's failure domain for
    placement is the Ray node it runs on (one node here)."""
    data = ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE})
    specs = [InstanceSpec(i, spec.role, spec.model, emulated_ms=0.0, spare=data if spec.role == "parity" else None)
             for i, spec in enumerate(toy_specs("coded-hedge", 2, 2))]
    backend = RayServeBackend(specs)
    x = torch.randn(3, *SHAPE)

    async def main() -> tuple[dict, list]:
        results: dict[int, tuple] = {}
        done = asyncio.Event()

        def on_result(instance_id: int, work_id: int, output, error) -> None:
            results[work_id] = (output, error)
            if len(results) == 2:
                done.set()

        await backend.start(on_result, lambda i, reason: None, lambda i: None)
        try:
            backend.send(2, 1, x)
            backend.send(2, 2, x, spare=True)
            await asyncio.wait_for(done.wait(), 60)
            return results, [backend.zone(i) for i in range(len(specs))]
        finally:
            await backend.stop()

    results, zones = asyncio.run(main())
    assert results[1][1] is None and results[2][1] is None, results
    from parm.models.toy import linear_parity

    torch.testing.assert_close(results[1][0], linear_parity(SHAPE, k=2)(x).detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[2][0], linear(SHAPE)(x).detach(), rtol=1e-4, atol=1e-4)
    assert all(z is not None and z.startswith("node:") for z in zones) and len(set(zones)) == 1, zones
