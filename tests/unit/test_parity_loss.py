"""Parity-training losses (``--loss mse|kl|mse+kl``): what each measures, that a run records its
loss (and resumes only with the same one), and a short real training run with each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parm.coding import CodeConfig
from parm.errors import ConfigError
from parm.training import ParityConfig
from parm.training.parity import parity_loss, parity_targets


def _members(g: int = 64, k: int = 3, c: int = 10, seed: int = 0) -> torch.Tensor:
    return 4 * torch.randn(g, k, c, generator=torch.Generator().manual_seed(seed))  # (G, k, C)


@pytest.mark.parametrize("encoder, k", [("add", 2), ("add", 3), ("tiles", 4)])
@pytest.mark.parametrize("loss", ["kl", "mse+kl"])
def test_an_exact_parity_output_costs_nothing_and_an_error_costs_more(encoder: str, k: int, loss: str) -> None:
    parity = ParityConfig(CodeConfig(k=k, encoder=encoder), loss=loss)
    members = _members(k=k)
    exact = parity_targets(parity, members)  # (G, D): every reconstruction is exactly F(X_j)
    fn = parity_loss(parity)
    assert float(fn(exact, members)) == pytest.approx(0.0, abs=1e-5)
    noisy = (exact + torch.randn(exact.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
    value = fn(noisy, members)
    assert float(value.detach()) > 0.01
    value.backward()
    assert noisy.grad is not None and float(noisy.grad.abs().sum()) > 0


def test_kl_ignores_a_shift_of_every_logit_that_mse_pays_for() -> None:
    """Adding one constant to every logit of the parity output moves each reconstruction's logits
    alike: the softmax, the answer and the KL loss stay; MSE charges it in full."""
    parity = ParityConfig(CodeConfig(k=2), loss="kl")
    members = _members(k=2)
    shifted = parity_targets(parity, members) + 3.0
    assert float(parity_loss(parity)(shifted, members)) == pytest.approx(0.0, abs=1e-5)
    assert float(F.mse_loss(shifted, parity_targets(parity, members))) == pytest.approx(9.0)
    mixed = ParityConfig(CodeConfig(k=2), loss="mse+kl")
    assert float(parity_loss(mixed)(shifted, members)) == pytest.approx(9.0, rel=1e-4)


def test_the_temperature_softens_the_comparison() -> None:
    members = _members(k=2)
    out = parity_targets(ParityConfig(CodeConfig(k=2)), members) + torch.randn(64, 10, generator=torch.Generator().manual_seed(2))
    sharp = parity_loss(ParityConfig(CodeConfig(k=2), loss="kl", temperature=0.5))(out, members)
    soft = parity_loss(ParityConfig(CodeConfig(k=2), loss="kl", temperature=8.0))(out, members)
    assert float(sharp) != pytest.approx(float(soft), rel=0.05)


def test_the_loss_is_part_of_a_run_identity_and_mse_keeps_the_old_one() -> None:
    code = CodeConfig(k=2)
    assert "loss" not in ParityConfig(code).to_json()  # runs trained before losses existed still resume
    described = ParityConfig(code, loss="kl", temperature=3.0).to_json()
    assert (described["loss"], described["temperature"]) == ("kl", 3.0)
    with pytest.raises(ConfigError, match="loss must be one of mse, kl, mse\\+kl"):
        ParityConfig(code, loss="huber")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        ParityConfig(code, loss="kl", temperature=0.0)


@pytest.mark.parametrize("loss", ["kl", "mse+kl"])
def test_train_parity_with_each_loss_records_it(tmp_path: Path, tiny_checkpoints: tuple[Path, Path], loss: str,
                                                data_root: Path) -> None:
    from parm.cli import main

    out = tmp_path / "parity"
    assert main(["train-parity", "--base", str(tiny_checkpoints[0]), "--k", "2", "--out", str(out), "--epochs", "1",
                 "--loss", loss, "--loss-temperature", "3", "--data-root", str(data_root), "--no-progress"]) == 0
    from parm.checkpoint import load_record

    record = load_record(out)
    assert record.config["parity"]["loss"] == loss and record.config["parity"]["temperature"] == 3.0
    assert 0.0 <= record.metrics["val_reconstruction_top1"] <= 1.0
