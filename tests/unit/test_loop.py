"""The shared training loop: NaN guard keeps the last good checkpoint, resume, LR schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parm.checkpoint import ModelRecord, load_checkpoint, save_checkpoint
from parm.errors import CheckpointMismatchError, NonFiniteLossError
from parm.training.config import OptimConfig
from parm.training.loop import FitSpec, fit, lr_at

X = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
Y = X.flatten(1) @ torch.randn(4, 3, generator=torch.Generator().manual_seed(1))


def _spec(out: Path, epochs: int = 3, loss_fn=F.mse_loss, **fingerprint) -> FitSpec:
    optim = OptimConfig(epochs=epochs, batch_size=16, lr=1e-2, schedule="cosine")
    record = ModelRecord(kind="base", arch="mlp", in_shape=(1, 2, 2), num_classes=3, dataset="toy",
                         mean=(0.0,), std=(1.0,))

    def batches(gen: torch.Generator):
        order = torch.randperm(64, generator=gen)
        for i in range(0, 64, 16):
            yield X[order[i:i + 16]], Y[order[i:i + 16]]

    return FitSpec(
        optim=optim, steps_per_epoch=4, batches=batches, loss_fn=loss_fn,
        validate=lambda m: {"score": -F.mse_loss(m(X), Y).item()},
        save_best=lambda m, metrics: save_checkpoint(out, m, record),
        state_dir=out / "resume", fingerprint={"run": "toy", **fingerprint}, best_path=out, progress=False,
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    from parm.models import build_model
    return build_model("mlp", (1, 2, 2), 3)


def test_nan_loss_stops_and_keeps_last_good(tmp_path: Path) -> None:
    calls = {"n": 0}

    def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = F.mse_loss(pred, target)
        return loss * float("nan") if calls["n"] > 6 else loss  # NaN in the 2nd epoch

    with pytest.raises(NonFiniteLossError) as info:
        fit(_model(), _spec(tmp_path, loss_fn=loss_fn))
    assert info.value.epoch == 2 and info.value.last_good == tmp_path
    assert "nan" in str(info.value) and "kept" in str(info.value)
    model, _ = load_checkpoint(tmp_path)  # the epoch-1 checkpoint is intact
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_in_first_epoch_saves_nothing(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="nothing was saved") as info:
        fit(_model(), _spec(tmp_path, loss_fn=lambda p, t: F.mse_loss(p, t) * float("inf")))
    assert info.value.last_good is None and not (tmp_path / "record.json").exists()


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    straight = fit(_model(), _spec(tmp_path / "a", epochs=4))
    fit(_model(), _spec(tmp_path / "b", epochs=4))  # same run, to compare with below
    first = fit(_model(), _spec(tmp_path / "c", epochs=2))
    assert first.epochs_run == 2
    # continuing the same configuration with more epochs is a different schedule: refused by field
    with pytest.raises(CheckpointMismatchError) as info:
        fit(_model(), _spec(tmp_path / "c", epochs=4))
    assert info.value.field == "epochs"
    # an interrupted 4-epoch run resumes to exactly the uninterrupted result
    spec = _spec(tmp_path / "d", epochs=4)
    real_batches = spec.batches
    state = {"epoch": 0}

    def interrupting(gen: torch.Generator):
        state["epoch"] += 1
        if state["epoch"] == 3:
            raise KeyboardInterrupt
        yield from real_batches(gen)

    spec.batches = interrupting
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), spec)
    resumed = fit(_model(), _spec(tmp_path / "d", epochs=4))
    assert resumed.epochs_run == 2
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in straight.history])
    again = fit(_model(), _spec(tmp_path / "d", epochs=4))
    assert again.epochs_run == 0


def test_lr_schedules() -> None:
    assert lr_at(5, 100, 1e-3, "constant") == 1e-3
    assert lr_at(0, 100, 1e-3, "cosine") == pytest.approx(1e-3)
    assert lr_at(100, 100, 1e-3, "cosine") == pytest.approx(0.0)
    assert lr_at(0, 100, 1e-3, "onecycle") == pytest.approx(1e-3 / 25)
    assert lr_at(30, 100, 1e-3, "onecycle") == pytest.approx(1e-3)
    assert lr_at(100, 100, 1e-3, "onecycle") < 1e-7
    values = [lr_at(s, 100, 1.0, "onecycle") for s in range(101)]
    assert max(values) == pytest.approx(1.0) and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("how", ["crash", "ctrl-c"])
def test_an_interruption_inside_an_epoch_resumes_there_and_ends_as_an_uninterrupted_run(tmp_path: Path,
                                                                                        how: str) -> None:
    """With a tiny save interval, state is saved inside epochs; a run killed at step 6 (of 4 per
    epoch: inside epoch 2) or interrupted with Ctrl-C resumes at that step — the same batches, the
    same weights — and ends with exactly the weights of a run never interrupted."""
    import dataclasses
    import json

    whole = fit(_model(), dataclasses.replace(_spec(tmp_path / "whole"), save_every_s=1e9))
    want = load_checkpoint(tmp_path / "whole")[0].state_dict()

    steps = {"n": 0}

    def stop_at_6(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        steps["n"] += 1
        if steps["n"] == 7:  # step 6 (0-based) of the run: after 6 trained steps
            raise KeyboardInterrupt if how == "ctrl-c" else RuntimeError("the machine went away")
        return F.mse_loss(pred, target)

    spec = _spec(tmp_path / "cut", loss_fn=stop_at_6)
    spec = dataclasses.replace(spec, save_every_s=0.0 if how == "crash" else 1e9)  # Ctrl-C saves by itself
    with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else RuntimeError):
        fit(_model(), spec)
    state = json.loads((tmp_path / "cut" / "resume" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 2)  # inside the second epoch, two steps done
    resumed = fit(_model(), _spec(tmp_path / "cut"))
    assert resumed.epochs_run == 2 and resumed.best_epoch == whole.best_epoch
    got = load_checkpoint(tmp_path / "cut")[0].state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in whole.history])
