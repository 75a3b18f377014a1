"""Coding-group isolation: one client's inputs must not spoil another client's answers.

A parity query sums the inputs of a group, so an input far outside what the parity model was
trained on (unnormalised pixels, all-10.0, 3e38, NaN) reaches every reconstruction of its group.
Queries outside the parity checkpoint's input envelope are served outside every group (or
refused); a non-finite output is never used to decode, and never answered as NaN."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fakes import FakeBackend, specs_for
from parm.backends.base import InstanceSpec, ModelRef
from parm.checkpoint import ENVELOPE_FILE, load_checkpoint, load_envelope, save_envelope
from parm.coding import InputEnvelope
from parm.data import load_dataset
from parm.errors import BadQueryError, CheckpointError, ConfigError, ModelFailedError
from parm.serving.config import ServingConfig, instance_roles
from parm.serving.frontend import Frontend
from parm.serving.types import Prediction, Source
from parm.testing import run_virtual

S = (1, 4, 4)
C = 5


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def normal(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *S, generator=torch.Generator().manual_seed(seed))  # (n, *S) in [0, 1)


ENVELOPE = InputEnvelope.fit(normal(500, seed=1))


# ---- the envelope ----------------------------------------------------------------------------------
def test_the_envelope_holds_inputs_like_the_training_ones_and_nothing_hostile() -> None:
    assert bool(ENVELOPE.contains(normal(200, seed=2)).all())
    hostile = {
        "unnormalised (x255)": normal(1, seed=3) * 255,
        "all 10.0": torch.full((1, *S), 10.0),
        "3e38": torch.full((1, *S), 3e38),
        "one feature far out": normal(1, seed=4).index_put_((torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                                                              torch.tensor([0])), torch.tensor(5.0)),
        "NaN": normal(1, seed=5).fill_(float("nan")),
        "inf": torch.full((1, *S), float("inf")),
    }
    for name, query in hostile.items():
        assert not bool(ENVELOPE.contains(query)[0]), name


def test_an_input_inside_every_feature_range_but_far_from_any_real_one_is_outside() -> None:
    """Every feature at its maximum (a white image): each value is in range, the norm is not."""
    assert not bool(ENVELOPE.contains(ENVELOPE.hi[None])[0])


def test_the_envelope_round_trips_and_a_damaged_one_is_a_clear_error(tmp_path: Path) -> None:
    assert load_envelope(tmp_path) is None  # trained before envelopes: none
    save_envelope(tmp_path, ENVELOPE)
    back = load_envelope(tmp_path, S)
    assert back is not None and back.max_norm == ENVELOPE.max_norm and torch.equal(back.lo, ENVELOPE.lo)
    with pytest.raises(CheckpointError, match=r"not the model's input shape \[1, 28, 28\]"):
        load_envelope(tmp_path, (1, 28, 28))
    (tmp_path / ENVELOPE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable input envelope"):
        load_envelope(tmp_path)


def test_parity_training_writes_the_envelope_of_its_inputs(tiny_checkpoints: tuple[Path, Path]) -> None:
    base, parity = tiny_checkpoints
    envelope = load_envelope(parity, (1, 28, 28))
    assert envelope is not None
    record = load_checkpoint(base)[1]
    lowest = (0.0 - record.mean[0]) / record.std[0]  # a black pixel, normalised as the base was trained
    assert float(envelope.lo.min()) == pytest.approx(lowest, abs=1e-5)


# ---- the frontend codes only what is inside ----------------------------------------------------------
def build(action: str = "uncoded", *, envelope: InputEnvelope | None = ENVELOPE, **config):
    serving = ServingConfig(query_shape=S, mode="coded", k=2, input_envelope=action, **config)
    backend = FakeBackend(specs_for(instance_roles("coded", 2, 2), S, C, 2), delay_s=0.001)
    return Frontend(serving, backend, clock=loop_time, envelope=envelope), backend


async def _interleaved(frontend: Frontend, good: torch.Tensor, bad: torch.Tensor) -> tuple[list, list]:
    futures = []
    for g, b in zip(good, bad):
        futures += [frontend.submit(b), frontend.submit(g)]
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 5.0)
    return results[1::2], results[0::2]


def test_queries_outside_the_envelope_never_share_a_coding_group() -> None:
    async def main() -> None:
        frontend, backend = build()
        await frontend.start()
        try:
            good, bad = normal(8, seed=6), normal(8, seed=7) * 255
            answers_good, answers_bad = await _interleaved(frontend, good, bad)
        finally:
            await frontend.stop()
        assert all(isinstance(a, Prediction) for a in answers_good + answers_bad)
        assert {a.source for a in answers_bad} == {Source.ORIGINAL}
        for sent in backend.sends_to("parity"):  # every parity query is a sum of in-envelope queries only
            assert bool(ENVELOPE.contains(sent.inputs / 2).all()) and float(sent.inputs.abs().max()) <= 2.0
        assert frontend.metrics.registry.get_sample_value("parm_out_of_envelope_queries_total",
                                                          {"action": "uncoded"}) == 8
    run_virtual(main())


def test_reject_refuses_a_request_with_any_query_outside_and_queues_nothing() -> None:
    async def main() -> None:
        frontend, _ = build("reject")
        await frontend.start()
        try:
            with pytest.raises(BadQueryError, match="1 query lies outside the input envelope"):
                await frontend.predict(torch.cat([normal(3, seed=8), torch.full((1, *S), 10.0)]))
            assert frontend.pending_queries() == 0
            assert len(await frontend.predict(normal(3, seed=9))) == 3
        finally:
            await frontend.stop()
    run_virtual(main())


def test_without_an_envelope_a_non_finite_input_fails_alone_and_its_partner_gets_its_original() -> None:
    """input_envelope off: a 3e38 query is coded. Its scores are inf/NaN: its own answer is a 422
    error (never NaN in an answer), the NaN parity output is not used, and its partner, slow on its
    instance, is answered by its own original instead of a NaN reconstruction."""
    async def main() -> None:
        frontend, backend = build("off")
        await frontend.start()
        try:
            backend.set_delay(frontend.dispatcher.idle_order("data")[1], 0.05)  # the good query's instance
            bad, good = torch.full(S, 3e38), normal(1, seed=10)[0]
            results = await asyncio.wait_for(asyncio.gather(frontend.submit(bad), frontend.submit(good),
                                                            return_exceptions=True), 5.0)
        finally:
            await frontend.stop()
        err, answer = results
        assert isinstance(err, ModelFailedError) and err.status == 422 and "not finite" in str(err)
        assert isinstance(answer, Prediction) and answer.source is Source.ORIGINAL
        assert bool(torch.isfinite(answer.scores).all())
        assert frontend.metrics.registry.get_sample_value("parm_unusable_outputs_total", {"kind": "parity"}) == 1
    run_virtual(main())


# ---- tenant grouping: coding groups never mix tenants ------------------------------------------------
def test_with_tenant_grouping_no_coding_group_or_batch_mixes_tenants() -> None:
    """The envelope is off (every input is coded): tenant A's inputs are 100 + x, B's x in [0, 1),
    so a parity query (the sum of a group's members) shows whose inputs it holds."""
    async def main() -> None:
        frontend, backend = build("off", tenant_header="x-api-key", batch_size=2, group_wait_ms=5.0)
        await frontend.start()
        try:
            futures = []
            for i in range(12):  # interleaved one by one, with an odd count left for each tenant
                futures.append(frontend.submit(normal(1, seed=20 + i)[0] + 100, tenant="a"))
                futures.append(frontend.submit(normal(1, seed=40 + i)[0], tenant="b"))
            futures.append(frontend.submit(normal(1, seed=60)[0]))  # no tenant: the tenant "", alone
            answers = await asyncio.wait_for(asyncio.gather(*futures), 5.0)
            assert frontend.batcher.lanes() == 0 and len(frontend.policy.tracker) == 0  # nothing left behind
        finally:
            await frontend.stop()
        assert all(isinstance(a, Prediction) for a in answers)
        parities = backend.sends_to("parity")
        assert parities
        for sent in parities:  # each row sums one group's members: A's (>= 100 each) or B's (< 1 each), never both
            for row in sent.inputs:
                assert float(row.min()) >= 100 or float(row.max()) < 2, float(row.max())
        for sent in backend.sends_to("data"):  # batches of one tenant only (a zero pad row is anyone's)
            rows = [r for r in sent.inputs if float(r.abs().max()) > 0]
            assert all(float(r.min()) >= 100 for r in rows) or all(float(r.max()) < 1 for r in rows)
    run_virtual(main())


def test_tenant_grouping_is_off_by_default_and_in_uncoded_modes() -> None:
    async def main() -> None:
        frontend, backend = build("off", batch_size=2)
        await frontend.start()
        try:
            await asyncio.gather(frontend.submit(normal(1)[0] + 100, tenant="a"), frontend.submit(normal(1)[0], tenant="b"))
        finally:
            await frontend.stop()
        (sent,) = [s for s in backend.sends_to("data") if bool(s.inputs.any())]  # (not the F(0) probe)
        # one batch holds both tenants' queries
        assert float(sent.inputs[0].min()) >= 100 and float(sent.inputs[1].max()) < 1
    run_virtual(main())
    with pytest.raises(ConfigError, match="tenant_header must be an HTTP header name"):
        ServingConfig(query_shape=S, tenant_header="X Api Key")


# ---- the bar: another client's reconstructions are unchanged -------------------------------------------
def _mnist_frontend(base: Path, parity: Path, action: str, tenants: bool = False) -> tuple[Frontend, FakeBackend]:
    record = load_checkpoint(base)[1]
    specs = [InstanceSpec(0, "data", ModelRef(checkpoint=str(base))), InstanceSpec(1, "data", ModelRef(checkpoint=str(base))),
             InstanceSpec(2, "parity", ModelRef(checkpoint=str(parity)))]
    backend = FakeBackend(specs, delay_s=0.005)
    backend.set_delay(0, 0.05)  # a straggler: batches it holds are reconstructed
    serving = ServingConfig(query_shape=record.in_shape, mode="coded", k=2, input_envelope=action,
                            tenant_header="x-api-key" if tenants else "")
    return Frontend(serving, backend, clock=loop_time, envelope=load_envelope(parity, record.in_shape)), backend


def _agreement_of_reconstructions(base: Path, parity: Path, action: str, good: torch.Tensor,
                                  bad: torch.Tensor | None, tenants: bool = False) -> tuple[float, int, set]:
    model = load_checkpoint(base)[0]
    with torch.inference_mode():
        want = model(good).argmax(-1)

    async def main() -> tuple[list, list]:
        frontend, _ = _mnist_frontend(base, parity, action, tenants)
        await frontend.start()
        try:
            futures_good, futures_bad = [], []
            for i in range(len(good)):
                if bad is not None:
                    futures_bad.append(frontend.submit(bad[i], tenant="a"))
                futures_good.append(frontend.submit(good[i], tenant="b"))
                await asyncio.sleep(0.004)  # 250 client-B queries/s
            return (await asyncio.gather(*futures_good, return_exceptions=True),
                    await asyncio.gather(*futures_bad, return_exceptions=True))
        finally:
            await frontend.stop()

    answers, bad_answers = run_virtual(main())
    recon = [i for i, a in enumerate(answers) if isinstance(a, Prediction) and a.source is Source.RECONSTRUCTED]
    agree = sum(answers[i].label == int(want[i]) for i in recon) / max(len(recon), 1)
    return agree, len(recon), {a.source if isinstance(a, Prediction) else type(a) for a in bad_answers}


def test_a_clients_unnormalised_inputs_leave_another_clients_reconstructions_unchanged(
        tiny_checkpoints: tuple[Path, Path], data_root: Path) -> None:
    base, parity = tiny_checkpoints
    record = load_checkpoint(base)[1]
    test = load_dataset("mnist", "test", data_root=data_root)
    images = test.prepared_for(record.in_shape, record.mean, record.std, model="base").float_images()
    n = min(400, len(images))
    good = images[:n]  # client B, normalised as the model expects; client A sends other images' 0..255 pixels
    raw = test.images[:n].to(torch.float32).roll(1, dims=0)
    alone, n_alone, _ = _agreement_of_reconstructions(base, parity, "uncoded", good, None)
    guarded, n_guarded, bad_sources = _agreement_of_reconstructions(base, parity, "uncoded", good, raw)
    exposed, n_exposed, _ = _agreement_of_reconstructions(base, parity, "off", good, raw)
    apart, n_apart, _ = _agreement_of_reconstructions(base, parity, "off", good, raw, tenants=True)
    assert min(n_alone, n_guarded, n_exposed, n_apart) >= 30, (n_alone, n_guarded, n_exposed, n_apart)
    assert bad_sources == {Source.ORIGINAL}  # client A is answered, uncoded
    # within noise of client B alone (binomial sd over >= 30 reconstructions is <= 0.09), with the
    # envelope, or with tenant grouping alone (A and B two tenants, envelope off) ...
    assert guarded >= alone - 0.15, (alone, guarded)
    assert apart >= alone - 0.15, (alone, apart)
    # ... while without the envelope client A's inputs wreck them (which is what the test guards)
    assert exposed < alone - 0.3, (alone, exposed)
