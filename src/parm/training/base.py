"""train_base: train the deployed model F and report its test accuracy (A_a)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from parm.checkpoint import ModelRecord, load_checkpoint, save_checkpoint
from parm.data import ArrayDataset, load_dataset, train_val_split
from parm.devices import check_precision, resolve_device
from parm.models import build_model, check_arch
from parm.training.config import OptimConfig, base_recipe
from parm.training.loop import FitSpec, fit
from parm.training.metrics import topk_correct
from parm.training.outputs import model_outputs

log = logging.getLogger(__name__)


def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return topk_correct(model_outputs(model, images), labels).float().mean().item()


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(images), generator=gen)  # (N,)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield images[idx], labels[idx]  # (B, C, H, W), (B,)
    return batches


def _record(train: ArrayDataset, arch: str, optim: OptimConfig, metrics: dict[str, float]) -> ModelRecord:
    return ModelRecord(
        kind="base", arch=arch, in_shape=tuple(train.images.shape[1:]), num_classes=train.num_classes,
        dataset=train.name, mean=tuple(train.mean), std=tuple(train.std), metrics=metrics,
        config={"optim": optim.to_json()},
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
) -> ModelRecord:
    """Train ``arch`` on ``dataset``; keep the epoch with the best validation accuracy.

    ``normalise``: inputs are (x/255 − mean)/std with the training split's per-channel mean and
    std (default), or x/255 alone (False: mean 0, std 1, as the ParM authors' models). The record
    keeps what was used, and every later command prepares inputs the same way.

    The validation split is ``optim.val_size`` samples of the training split (seeded). Returns
    the saved record, whose metrics hold ``val_top1`` and ``available_top1`` (test accuracy).
    Running again with the same ``out`` resumes an interrupted run (on any device). ``device``
    (:func:`parm.devices.resolve_device`) is where the model trains and is tested; ``precision``
    (fp32, bf16, fp16) the autocast type of its training forward passes (evaluation: float32).
    """
    optim = optim or base_recipe()
    out = Path(out)
    check_arch(arch)  # an unknown --model fails before the dataset loads
    where = device if isinstance(device, torch.device) else resolve_device(device)
    check_precision(precision, where)
    train = load_dataset(dataset, "train", data_root=data_root, download=download)
    test = load_dataset(dataset, "test", data_root=data_root, download=download)
    if not normalise:  # x/255 only
        zero, one = (0.0,) * len(train.mean), (1.0,) * len(train.std)
        train = dataclasses.replace(train, mean=zero, std=one)
        test = dataclasses.replace(test, mean=zero, std=one)
    train_idx, val_idx = train_val_split(len(train), optim.val_size, optim.seed)
    images, labels = train.float_images(), train.labels  # (N, C, H, W), (N,)
    x_tr, y_tr, x_val, y_val = images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
    torch.manual_seed(optim.seed)
    model = build_model(arch, tuple(images.shape[1:]), train.num_classes)

    def save_best(m: torch.nn.Module, metrics: dict[str, float]) -> None:
        save_checkpoint(out, m, _record(train, arch, optim, {"val_top1": metrics["score"]}))

    spec = FitSpec(
        optim=optim, steps_per_epoch=math.ceil(len(x_tr) / optim.batch_size),
        batches=_batches(x_tr, y_tr, optim.batch_size), loss_fn=F.cross_entropy,
        validate=lambda m: {"score": _accuracy(m, x_val, y_val)}, save_best=save_best,
        state_dir=out / "resume", fingerprint={"kind": "base", "dataset": train.name, "arch": arch,
                                                      **({} if normalise else {"normalise": False})},
        best_path=out, progress=progress, desc=f"train-base {arch}/{train.name}", device=where, precision=precision,
    )
    result = fit(model, spec)
    best, _ = load_checkpoint(out, map_location=str(where))
    metrics = {"val_top1": result.best_metrics["score"], "best_epoch": result.best_epoch + 1,
               "available_top1": _accuracy(best, test.float_images(), test.labels)}
    record = save_checkpoint(out, best, _record(train, arch, optim, metrics))
    log.info("base %s on %s: test accuracy %.4f", arch, train.name, metrics["available_top1"])
    return record
