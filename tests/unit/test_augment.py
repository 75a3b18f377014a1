"""Base-model training augmentation: crop-flip moves and mirrors each training image, keeps its
shape and pixel values, and is chosen by default only for colour images."""

from __future__ import annotations

import pytest
import torch

from parm.errors import ConfigError
from parm.training.base import _augment_crop_flip, resolve_augment


def test_crop_flip_returns_shifted_or_mirrored_crops_of_each_image() -> None:
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = _augment_crop_flip(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for i in range(len(images)):  # each output is one of the 81 crops of its padded image, maybe mirrored
        found = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8].flip(-1) if f
                                else padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert found, i
        flips += found[0][2]
    assert 16 < flips < 48  # about half are mirrored
    again = _augment_crop_flip(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # the run's generator decides: resumable runs replay it


def test_auto_augments_colour_images_only() -> None:
    assert resolve_augment("auto", 3) == "crop-flip" and resolve_augment("auto", 1) == "none"
    assert resolve_augment("none", 3) == "none"
    with pytest.raises(ConfigError, match="augment must be one of"):
        resolve_augment("mixup", 3)


def test_train_base_interrupted_inside_an_epoch_resumes_there(tmp_path, fixture_root, monkeypatch) -> None:
    """``train-base`` with a tiny save interval, interrupted inside its second epoch, resumes from
    that step (the state says so) and finishes with the same result as a run never interrupted."""
    import json

    import torch.nn.functional as F

    from parm.training import OptimConfig, train_base

    optim = OptimConfig(epochs=2, batch_size=32, val_size=200)
    whole = train_base("mnist", "mlp", tmp_path / "whole", optim=optim, data_root=fixture_root, progress=False,
                       device="cpu")
    real, calls = F.cross_entropy, {"n": 0}
    steps = json.loads((tmp_path / "whole" / "resume" / "state.json").read_text())["history"]
    assert len(steps) == 2

    def interrupt_late(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupt_late)
    with pytest.raises(KeyboardInterrupt):
        train_base("mnist", "mlp", tmp_path / "cut", optim=optim, data_root=fixture_root, progress=False,
                   device="cpu", save_every_s=0.0)
    monkeypatch.setattr(F, "cross_entropy", real)
    state = json.loads((tmp_path / "cut" / "resume" / "state.json").read_text())
    assert state["step"] > 0  # saved inside an epoch
    resumed = train_base("mnist", "mlp", tmp_path / "cut", optim=optim, data_root=fixture_root, progress=False,
                         device="cpu")
    assert resumed.metrics["available_top1"] == whole.metrics["available_top1"]
    assert resumed.weights_sha256 == whole.weights_sha256
