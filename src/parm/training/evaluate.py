"""evaluate: available and degraded-mode accuracy of a base model and its parity models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parm.checkpoint import check_parity_matches, load_checkpoint
from parm.coding import CodeConfig
from parm.data.groups import fixed_groups
from parm.data.registry import Split
from parm.devices import resolve_device
from parm.errors import ConfigError
from parm.training.config import ParityConfig
from parm.training.metrics import default_top1, topk_correct
from parm.training.parity import load_coded_split, reconstruction_metrics

EVAL_GROUP_SEED = 0
PAIRINGS: tuple[str, ...] = ("random", "consecutive")
"""How test queries form groups: ``random`` (a seeded draw, EVAL_GROUP_SEED) or ``consecutive``
(queries 0..k-1, k..2k-1, … in the split's order, as the ParM authors' test loader does)."""


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one (base, parity) pair on a split; degraded metrics average over every
    test group and every erased position."""

    dataset: str
    model: str
    parity_model: str
    k: int
    r: int
    parity_index: int
    encoder: str
    split: str
    available_top1: float | None  # None: unlabelled inputs (``inputs``), where only agreement is measured
    degraded_top1: float | None
    degraded_top5: float | None
    reconstruction_top1: float
    default_top1: float | None
    num_test_groups: int
    num_test_samples: int
    base: str
    parity: str
    pairing: str = "random"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate(
    base_dir: str | Path,
    parity_dirs: list[str | Path],
    *,
    split: Split = "test",
    data_root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    inputs: str | Path | None = None,
    device: str | torch.device | None = "auto",
    pairing: str = "random",
    dataset: str | None = None,
) -> list[EvalResult]:
    """One EvalResult per parity checkpoint; each must have been trained for ``base_dir``. With
    ``inputs`` (unlabelled inputs, :mod:`parm.data.inputs`) instead of the base's dataset, only
    ``reconstruction_top1`` (agreement of reconstructions with the deployed model) is measured;
    the label-based fields are None and ``split`` is ``"inputs"``. Models run on ``device``
    (:func:`parm.devices.resolve_device`), in float32. ``pairing``: how test queries are grouped
    (:data:`PAIRINGS`). ``dataset``: where the base's dataset is now (see
    :func:`parm.training.parity.load_coded_split`); only the split evaluated is read."""
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing must be one of {', '.join(PAIRINGS)}; got {pairing!r}", field="pairing",
                          value=pairing)
    where = device if isinstance(device, torch.device) else resolve_device(device)
    _, base, _, coded = load_coded_split(base_dir, split, data_root=data_root, download=download, dataset=dataset,
                                         cache_dir=cache_dir, inputs=inputs, device=where)
    if coded.labels is None:
        available = default = None
        split_name = "inputs"
    else:
        available = topk_correct(coded.outputs, coded.labels).float().mean().item()
        default = default_top1(coded.labels, base.num_classes)
        split_name = split
    results = []
    for parity_dir in parity_dirs:
        model, record = load_checkpoint(parity_dir, map_location=str(where))
        check_parity_matches(base, record)
        assert record.k is not None and record.r is not None and record.encoder is not None
        parity = ParityConfig(CodeConfig(record.k, record.r, record.encoder), record.parity_index or 0, record.arch)
        if pairing == "random":
            groups = fixed_groups(torch.arange(len(coded.images)), record.k, EVAL_GROUP_SEED)  # (G, k)
        else:
            count = len(coded.images) // record.k * record.k
            groups = torch.arange(count).reshape(-1, record.k)  # (G, k)
        metrics = reconstruction_metrics(parity, model, coded, groups)
        results.append(EvalResult(
            dataset=base.dataset, model=base.arch, parity_model=record.arch, k=record.k, r=record.r,
            parity_index=parity.parity_index, encoder=record.encoder, split=split_name, available_top1=available,
            default_top1=default, num_test_groups=len(groups), num_test_samples=len(coded.images),
            base=str(base_dir), parity=str(parity_dir), reconstruction_top1=metrics["reconstruction_top1"],
            degraded_top1=metrics.get("degraded_top1"), degraded_top5=metrics.get("degraded_top5"), pairing=pairing,
        ))
    return results
