"""train_base: train the deployed model F and report its test accuracy (A_a)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from parm.checkpoint import ModelRecord, load_checkpoint, save_checkpoint
from parm.data import ArrayDataset, dataset_identity, load_dataset, train_val_split
from parm.devices import check_precision, resolve_device
from parm.errors import ConfigError
from parm.models import build_model, check_arch
from parm.training.config import OptimConfig, base_recipe
from parm.training.loop import FitSpec, fit
from parm.training.metrics import topk_correct
from parm.training.outputs import model_outputs

log = logging.getLogger(__name__)


def _accuracy(model: torch.nn.Module, data: ArrayDataset, index: torch.Tensor | None = None,
              chunk: int = 1024) -> float:
    """Top-1 accuracy on ``data`` (or its rows ``index``), normalising one chunk at a time."""
    rows = torch.arange(len(data)) if index is None else index
    correct = 0
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        correct += int(topk_correct(model_outputs(model, data.float_images(part), chunk), data.labels[part]).sum())
    return correct / max(len(rows), 1)


AUGMENTS: tuple[str, ...] = ("auto", "none", "crop-flip")
"""Training-time augmentation of base models: ``crop-flip`` pads each image by 4 pixels (black)
and takes a random crop of the original size, then flips it left-right with probability 1/2 (the
usual recipe for CIFAR-style photos); ``none``; ``auto`` chooses ``crop-flip`` for colour images
(3 channels) and ``none`` for grey ones (digits and clothes are not left-right symmetric)."""


def _augment_crop_flip(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """uint8 (B, C, H, W) -> the same shape: a random crop of the image padded by ``pad`` zeros,
    flipped left-right with probability 1/2 (each image its own offsets)."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p), zeros
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channel, rows, cols]  # (B, C, H, W)


def _batches(data: ArrayDataset, rows: torch.Tensor, batch_size: int, augment: str = "none"):
    """Batches of ``data``'s rows ``rows`` in a new order each epoch; images stay uint8 until a
    batch is formed (then augmented, and normalised: (x/255 − mean)/std)."""
    mean = torch.tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1)

    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = rows[torch.randperm(len(rows), generator=gen)]  # (N,)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if augment == "crop-flip":
                x = _augment_crop_flip(data.images[idx], gen).to(torch.float32).div_(255.0).sub_(mean).div_(std)
                yield x, data.labels[idx]
            else:
                yield data.float_images(idx), data.labels[idx]  # (B, C, H, W), (B,)
    return batches


def resolve_augment(augment: str, channels: int) -> str:
    """``auto`` -> ``crop-flip`` for colour images, ``none`` for grey ones; others as given."""
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}; got {augment!r}", field="augment",
                          value=augment)
    if augment == "auto":
        return "crop-flip" if channels == 3 else "none"
    return augment


def _record(train: ArrayDataset, arch: str, optim: OptimConfig, metrics: dict[str, float],
            identity: tuple[str, str], augment: str) -> ModelRecord:
    return ModelRecord(
        kind="base", arch=arch, in_shape=tuple(train.images.shape[1:]), num_classes=train.num_classes,
        dataset=identity[0], dataset_fingerprint=identity[1], mean=tuple(train.mean), std=tuple(train.std),
        metrics=metrics, config={"optim": optim.to_json(), "augment": augment},
    )


def train_base(
    dataset: str,
    arch: str,
    out: str | Path,
    *,
    optim: OptimConfig | None = None,
    data_root: str | Path | None = None,
    download: bool = False,
    progress: bool = True,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
    normalise: bool = True,
    save_every_s: float = 120.0,
    augment: str = "auto",
    recipe_overrides: Mapping[str, Any] | None = None,
) -> ModelRecord:
    """Train ``arch`` on ``dataset``; keep the epoch with the best validation accuracy.

    ``normalise``: inputs are (x/255 − mean)/std with the training split's per-channel mean and
    std (default), or x/255 alone (False: mean 0, std 1, as the ParM authors' models). The record
    keeps what was used, and every later command prepares inputs the same way. ``augment``
    (:data:`AUGMENTS`) transforms training batches only, never validation or test images. Images stay uint8
    in memory and are normalised one batch at a time. Resumable state is saved after every epoch
    and every ``save_every_s`` seconds inside one (:mod:`parm.training.loop`).

    The validation split is ``optim.val_size`` samples of the training split (seeded). Returns
    the saved record, whose metrics hold ``val_top1`` and ``available_top1`` (test accuracy).
    Running again with the same ``out`` resumes an interrupted run (on any device). ``device``
    (:func:`parm.devices.resolve_device`) is where the model trains and is tested; ``precision``
    (fp32, bf16, fp16) the autocast type of its training forward passes (evaluation: float32).
    """
    out = Path(out)
    check_arch(arch)  # an unknown --model fails before the dataset loads
    where = device if isinstance(device, torch.device) else resolve_device(device)
    check_precision(precision, where)
    identity = dataset_identity(dataset, data_root)  # portable name and content fingerprint
    train = load_dataset(dataset, "train", data_root=data_root, download=download)
    if not normalise:  # x/255 only
        train = dataclasses.replace(train, mean=(0.0,) * len(train.mean), std=(1.0,) * len(train.std))
    augment = resolve_augment(augment, train.image_shape[0])
    if optim is None:  # the recipe for this augmentation, with the fields given in recipe_overrides
        optim = dataclasses.replace(base_recipe(augment=augment), **dict(recipe_overrides or {}))
    train_idx, val_idx = train_val_split(len(train), optim.val_size, optim.seed)
    torch.manual_seed(optim.seed)
    model = build_model(arch, train.image_shape, train.num_classes)

    def save_best(m: torch.nn.Module, metrics: dict[str, float]) -> None:
        save_checkpoint(out, m, _record(train, arch, optim, {"val_top1": metrics["score"]}, identity, augment))

    spec = FitSpec(
        optim=optim, steps_per_epoch=math.ceil(len(train_idx) / optim.batch_size),
        batches=_batches(train, train_idx, optim.batch_size, augment), loss_fn=F.cross_entropy,
        validate=lambda m: {"score": _accuracy(m, train, val_idx)}, save_best=save_best, save_every_s=save_every_s,
        state_dir=out / "resume", fingerprint={"kind": "base", "dataset": train.name, "arch": arch,
                                                      **({} if normalise else {"normalise": False}),
                                                      **({} if augment == "none" else {"augment": augment})},
        best_path=out, progress=progress, desc=f"train-base {arch}/{train.name}", device=where, precision=precision,
    )
    result = fit(model, spec)
    best, _ = load_checkpoint(out, map_location=str(where))
    test = load_dataset(dataset, "test", data_root=data_root, download=download).prepared_for(
        train.image_shape, train.mean, train.std, model=f"the model in {out}")  # normalised as the training split
    metrics = {"val_top1": result.best_metrics["score"], "best_epoch": result.best_epoch + 1,
               "available_top1": _accuracy(best, test)}
    record = save_checkpoint(out, best, _record(train, arch, optim, metrics, identity, augment))
    log.info("base %s on %s: test accuracy %.4f", arch, train.name, metrics["available_top1"])
    return record
