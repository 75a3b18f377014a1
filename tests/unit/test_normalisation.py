"""The checkpoint is the single truth about how its model's inputs are prepared: every path that
feeds a dataset to a saved model (parity training, eval, bench) normalises with the record's
mean/std and checks the record's input shape, never the dataset's built-in constants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures_data import train_outside_parm
from parm.checkpoint import ModelRecord, save_checkpoint
from parm.data import load_dataset
from parm.errors import ShapeError
from parm.models import build_model
from parm.training.evaluate import evaluate
from parm.training.parity import load_coded_split


def _save_base(directory: Path, *, mean: tuple[float, ...], std: tuple[float, ...],
               in_shape: tuple[int, ...] = (1, 28, 28)) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", in_shape, 10).eval()
    save_checkpoint(directory, model, ModelRecord(kind="base", arch="mlp", in_shape=in_shape, num_classes=10,
                                                  dataset="mnist", mean=mean, std=std))
    return model


MEAN, STD = 0.9, 0.05  # far from MNIST's (0.1307, 0.3081), so that using the wrong ones shows


def _trained_with_own_normalisation(directory: Path, data_root: Path) -> torch.nn.Module:
    """A base model trained (briefly) on (x/255 - MEAN)/STD and saved with that normalisation: fed
    MNIST's standard normalisation instead, its accuracy collapses (1.0 -> 0.23 on the fixtures)."""
    train = load_dataset("mnist", "train", data_root=data_root)
    x, y = (train.images.float() / 255.0 - MEAN) / STD, train.labels
    torch.manual_seed(0)
    model = train_outside_parm(build_model("mlp", (1, 28, 28), 10), x, y, steps=100, lr=1e-3)
    save_checkpoint(directory, model, ModelRecord(kind="base", arch="mlp", in_shape=(1, 28, 28), num_classes=10,
                                                         dataset="mnist", mean=(MEAN,), std=(STD,)))
    return model


def test_coded_split_uses_the_record_normalisation_not_the_datasets(tmp_path: Path, fixture_root: Path) -> None:
    """A model trained on x/255 (mean 0, std 1), as the authors' MNIST MLP: its parity models must
    be trained on x/255 and its outputs computed on x/255, not on MNIST's (x/255 - 0.1307)/0.3081."""
    model = _save_base(tmp_path / "base", mean=(0.0,), std=(1.0,))
    _, _, data, coded = load_coded_split(tmp_path / "base", "test", data_root=fixture_root)
    raw = load_dataset("mnist", "test", data_root=fixture_root).images.to(torch.float32) / 255.0  # (N, 1, 28, 28)
    torch.testing.assert_close(coded.images, raw)
    with torch.inference_mode():
        torch.testing.assert_close(coded.outputs, model(raw))
    assert data.mean == (0.0,) and data.std == (1.0,)


def test_outputs_cached_under_one_normalisation_are_not_reused_for_another(tmp_path: Path, fixture_root: Path
                                                                          ) -> None:
    _save_base(tmp_path / "a", mean=(0.1307,), std=(0.3081,))
    _save_base(tmp_path / "b", mean=(0.0,), std=(1.0,))  # the same weights (same seed), another normalisation
    _, _, _, first = load_coded_split(tmp_path / "a", "test", data_root=fixture_root)
    _, _, _, second = load_coded_split(tmp_path / "b", "test", data_root=fixture_root)
    assert not torch.allclose(first.outputs, second.outputs)


def test_a_dataset_that_does_not_fit_the_model_is_an_error_naming_both(tmp_path: Path, fixture_root: Path) -> None:
    _save_base(tmp_path / "base", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), in_shape=(3, 32, 32))
    with pytest.raises(ShapeError, match=r"mnist images are 1 channel of 28x28 but .* takes inputs of 3 channels of 32x32"):
        load_coded_split(tmp_path / "base", "test", data_root=fixture_root)


def test_eval_uses_the_record_normalisation(tmp_path: Path, fixture_root: Path) -> None:
    """``parm eval``'s A_a is the model's accuracy on inputs normalised as it was trained."""
    from parm.coding import CodeConfig
    from parm.training import OptimConfig, ParityConfig, train_parity

    model = _trained_with_own_normalisation(tmp_path / "base", fixture_root)
    train_parity(tmp_path / "base", tmp_path / "parity", ParityConfig(CodeConfig(k=2), init="base"),
                 OptimConfig(epochs=1, batch_size=256, val_size=200), data_root=fixture_root, progress=False)
    test = load_dataset("mnist", "test", data_root=fixture_root)
    with torch.inference_mode():
        own = (model((test.images.to(torch.float32) / 255.0 - MEAN) / STD).argmax(-1) == test.labels).float().mean().item()
    (result,) = evaluate(tmp_path / "base", [tmp_path / "parity"], data_root=fixture_root)
    assert result.available_top1 == pytest.approx(own)


def test_train_base_without_normalisation_records_x_over_255_and_consecutive_pairing(tmp_path: Path,
                                                                                     fixture_root: Path) -> None:
    """``train-base --normalise none`` (the authors' inputs): the record says mean 0, std 1, so every
    later command feeds x/255; ``parm eval --pairing consecutive`` groups queries 0..k-1, k..2k-1, …"""
    from parm.checkpoint import load_record
    from parm.coding import CodeConfig
    from parm.training import OptimConfig, ParityConfig, train_base, train_parity

    record = train_base("mnist", "mlp", tmp_path / "base", optim=OptimConfig(epochs=1, batch_size=128, val_size=200),
                        data_root=fixture_root, progress=False, device="cpu", normalise=False)
    assert record.mean == (0.0,) and record.std == (1.0,) and load_record(tmp_path / "base").mean == (0.0,)
    _, _, _, coded = load_coded_split(tmp_path / "base", "test", data_root=fixture_root)
    raw = load_dataset("mnist", "test", data_root=fixture_root).images.to(torch.float32) / 255.0
    torch.testing.assert_close(coded.images, raw)
    parity = train_parity(tmp_path / "base", tmp_path / "parity", ParityConfig(CodeConfig(k=2), init="authors"),
                          OptimConfig(epochs=1, batch_size=64, val_size=200), data_root=fixture_root, progress=False,
                          device="cpu")
    assert parity.metrics["val_mse"] > 0 and parity.config["parity"]["init"] == "authors"
    (random,) = evaluate(tmp_path / "base", [tmp_path / "parity"], data_root=fixture_root, device="cpu")
    (consecutive,) = evaluate(tmp_path / "base", [tmp_path / "parity"], data_root=fixture_root, device="cpu",
                              pairing="consecutive")
    assert (random.pairing, consecutive.pairing) == ("random", "consecutive")
    assert consecutive.num_test_groups == len(raw) // 2
    assert consecutive.degraded_top1 != random.degraded_top1  # other groups, another (close) figure
