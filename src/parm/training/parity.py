"""train_parity: learn F_P so that F_P(E(X_1..X_k)) ≈ Σ_j w_j F(X_j) for a frozen base model F.

Data path: dataset -> frozen base model -> cached base outputs (N, C) -> groups of k re-drawn
every epoch -> encoder -> parity model -> MSE against the weighted sum of base outputs.
Everything stays as tensors in memory; a step is a handful of indexing ops, no per-sample
Python. The epoch kept is the one with the best validation reconstruction accuracy.

:func:`train_parity` trains one parity model (index i of the code's r) into one folder;
:func:`train_parities` trains all r of them, one after another, into the parity-set layout of
:func:`parm.checkpoint.parity_set_dirs`: ``out`` itself for r = 1, else ``out/parity-0`` ...
``out/parity-<r-1>``, which :func:`parm.checkpoint.load_parity_set` reads back in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from parm.checkpoint import (
    ENVELOPE_FILE,
    ModelRecord,
    build_parity_model,
    check_parity_matches,
    load_checkpoint,
    load_record,
    parity_set_dirs,
    save_checkpoint,
    save_envelope,
)
from parm.coding import CodeConfig, InputEnvelope, encode, reconstruct_each
from parm.data import ArrayDataset, dataset_identity, load_dataset, resolve_data_root, train_val_split
from parm.data.groups import fixed_groups, sample_groups
from parm.data.inputs import load_inputs
from parm.data.registry import Split
from parm.devices import check_precision, module_device, resolve_device
from parm.errors import CheckpointError, ConfigError, DataError
from parm.training.config import OptimConfig, ParityConfig
from parm.training.loop import FitSpec, finished, fit
from parm.training.metrics import degraded_metrics
from parm.training.outputs import cached_input_outputs, cached_outputs, inputs_digest

log = logging.getLogger(__name__)

VAL_GROUP_SEED = 1
RESUME_DIR = "resume"  # fit's state folder inside a parity checkpoint folder


@dataclass(frozen=True)
class CodedData:
    """Inputs and base outputs of one split, ready to be grouped: images (N, *S), outputs (N, C),
    labels (N,) — None for unlabelled inputs (``--inputs``)."""

    images: torch.Tensor
    outputs: torch.Tensor
    labels: torch.Tensor | None

    def take(self, index: torch.Tensor) -> CodedData:
        return CodedData(self.images[index], self.outputs[index], None if self.labels is None else self.labels[index])


def parity_targets(parity: ParityConfig, outputs: torch.Tensor) -> torch.Tensor:
    """outputs (G, k, C) -> Σ_j w[i, j] outputs[:, j] (G, C) for parity i; with the ``tiles``
    code every member's output, (G, k·C)."""
    if parity.code.per_query:
        return outputs.flatten(1)
    w = parity.code.weights(outputs.dtype)[parity.parity_index]  # (k,)
    return torch.einsum("k,gkc->gc", w, outputs)


def parity_inputs(parity: ParityConfig, images: torch.Tensor) -> torch.Tensor:
    """images (G, k, *S) -> the parity query of parity i, (G, *S)."""
    return encode(parity.code, images)[:, parity.parity_index]


def parity_loss(parity: ParityConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of ``parity.loss`` (:data:`parm.training.config.LOSSES`): loss(parity
    output (G, D), targets) with targets the parity targets (G, D) for ``mse``, else every member's
    base output (G, k, C) (see :func:`_batches`)."""
    if parity.loss == "mse":
        return F.mse_loss
    t = parity.temperature

    def loss(parity_out: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        recon = reconstruct_each(parity.code, members, parity_out, parity.parity_index)  # (G, k, C)
        kl = F.kl_div(F.log_softmax(recon / t, dim=-1), F.log_softmax(members / t, dim=-1), log_target=True,
                      reduction="none").sum(dim=-1).mean() * (t * t)  # per member, averaged
        if parity.loss == "kl":
            return kl
        return F.mse_loss(parity_out, parity_targets(parity, members)) + kl
    return loss


def _batches(parity: ParityConfig, data: CodedData, batch_groups: int, encode_chunk: int = 4096):
    """Each epoch: draw groups, encode all of them at once, then yield contiguous slices.

    Encoding the epoch in a few large ops (not per step) keeps a step down to forward,
    backward and the optimiser: (G, *S) parity inputs and (G, C) targets per epoch (the
    members' outputs (G, k, C) for the kl losses, which reconstruct each member).
    """
    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        groups = sample_groups(torch.arange(len(data.images)), parity.code.k, gen)  # (G, k)
        inputs = torch.cat([parity_inputs(parity, data.images[groups[i:i + encode_chunk]])
                            for i in range(0, len(groups), encode_chunk)])  # (G, *S)
        members = data.outputs[groups]  # (G, k, C)
        targets = members if parity.loss != "mse" else parity_targets(parity, members)  # (G, k, C) or (G, D)
        for i in range(0, len(groups), batch_groups):
            yield inputs[i:i + batch_groups], targets[i:i + batch_groups]
    return batches


@torch.inference_mode()
def reconstruction_metrics(
    parity: ParityConfig, model: torch.nn.Module, data: CodedData, groups: torch.Tensor, batch_groups: int = 1024,
) -> dict[str, float]:
    """Degraded-mode metrics over every group (G, k) of ``data`` and every erased position."""
    model.eval()
    device = module_device(model)
    parity_out = torch.cat([
        model(parity_inputs(parity, data.images[groups[i:i + batch_groups]]).to(device)).float().cpu()
        for i in range(0, len(groups), batch_groups)
    ])  # (G, C), on the CPU whatever the model's device
    base_out = data.outputs[groups]  # (G, k, C)
    recon = reconstruct_each(parity.code, base_out, parity_out, parity.parity_index)  # (G, k, C)
    metrics = degraded_metrics(recon, base_out, None if data.labels is None else data.labels[groups])
    metrics["mse"] = F.mse_loss(parity_out, parity_targets(parity, base_out)).item()  # the training loss, on these groups
    return metrics


def parity_arch(parity: ParityConfig, base_arch: str) -> str:
    """The parity model's architecture: the one asked for, else ``tile-mlp`` for the ``tiles``
    code, else the base model's."""
    return parity.arch or ("tile-mlp" if parity.code.per_query else base_arch)


def _init_parity_model(parity: ParityConfig, base_record: ModelRecord, base_model: torch.nn.Module) -> torch.nn.Module:
    arch = parity_arch(parity, base_record.arch)
    model = build_parity_model(arch, base_record.in_shape, base_record.num_classes, parity.code)
    if parity.init == "base":
        if arch != base_record.arch:
            raise ConfigError(
                f"init='base' copies the base weights, so the parity architecture must be the base's "
                f"({base_record.arch!r}); got {arch!r}. Use init='scratch' for another architecture.",
                field="init", value=parity.init,
            )
        model.load_state_dict(base_model.state_dict())
    elif parity.init == "authors":
        authors_init(model)
    return model


@torch.no_grad()
def authors_init(model: torch.nn.Module) -> None:
    """The ParM authors' initialisation (their trainer's ``init_weights``), in place: Linear
    weights N(0, 0.01²), conv weights Xavier-uniform with ReLU gain, biases 0, batch norm 1/0."""
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, torch.nn.Linear):
            m.weight.normal_(0.0, 0.01)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            torch.nn.init.xavier_uniform_(m.weight, gain=torch.nn.init.calculate_gain("relu"))
            if m.bias is not None:
                m.bias.zero_()


def _parity_record(parity: ParityConfig, base: ModelRecord, optim: OptimConfig, recipe: str,
                   metrics: dict[str, float], inputs: dict[str, object] | None = None) -> ModelRecord:
    return ModelRecord(
        kind="parity", arch=parity_arch(parity, base.arch), in_shape=base.in_shape, num_classes=base.num_classes,
        dataset=base.dataset, mean=base.mean, std=base.std, k=parity.code.k, r=parity.code.r,
        parity_index=parity.parity_index, encoder=parity.code.encoder, base_sha256=base.weights_sha256,
        metrics=metrics, config={"recipe": recipe, "optim": optim.to_json(), "parity": parity.to_json(),
                                **({} if inputs is None else {"inputs": inputs})},
    )


def _fingerprint(parity: ParityConfig, base: ModelRecord, digest: str | None = None) -> dict[str, object]:
    extra = {} if digest is None else {"inputs_sha256": digest}  # resume only on the same inputs
    return {"kind": "parity", "base_sha256": base.weights_sha256, **parity.to_json(), **extra}


def _desc(parity: ParityConfig) -> str:
    code = parity.code
    which = f" p{parity.parity_index}/{code.r}" if code.r > 1 else ""
    return f"train-parity k={code.k} {code.encoder}{which}"


def load_coded_split(
    base_dir: str | Path, split: Split, *, data_root: str | Path | None = None, download: bool = False,
    cache_dir: str | Path | None = None, inputs: str | Path | None = None, device: torch.device | None = None,
    dataset: str | None = None,
) -> tuple[torch.nn.Module, ModelRecord, ArrayDataset | None, CodedData]:
    """Base model (on ``device``, default the CPU), its record, and a split of its dataset with cached
    base outputs — or, with ``inputs`` (:func:`parm.data.load_inputs`), those unlabelled inputs
    instead (no dataset). Inputs and outputs stay on the CPU. ``dataset`` names where the base's
    dataset is now (e.g. ``imagefolder:NEW/PATH`` after the folder moved; default: the record's,
    an image folder's path taken relative to ``data_root``); an image folder must hold the same
    files (names and sizes) as when the base was trained."""
    base_model, base = load_checkpoint(base_dir)
    base_model = base_model.to(device or "cpu")
    if inputs is not None:
        images = load_inputs(inputs, base.in_shape, base.mean, base.std)  # (N, *S)
        outputs = cached_input_outputs(base_model, base.weights_sha256, images, inputs_digest(images), cache_dir)
        return base_model, base, None, CodedData(images, outputs, None)
    if not base.dataset:
        raise ConfigError(f"the base checkpoint {base_dir} records no dataset (it was imported without --dataset); "
                          "pass --inputs PATH with inputs of the deployed model", field="inputs", value=None)
    name = dataset or base.dataset
    if base.dataset_fingerprint:
        found = dataset_identity(name, data_root)[1]
        if found != base.dataset_fingerprint:
            raise DataError(
                f"{name} (data root {resolve_data_root(data_root)}) does not hold the images the base model in "
                f"{base_dir} was trained on (its files' names and sizes differ: fingerprint {found[:12]}… vs "
                f"{base.dataset_fingerprint[:12]}…); pass --dataset imagefolder:PATH or --data-root DIR naming "
                "where that dataset is now")
    data = load_dataset(name, split, data_root=data_root, download=download)
    data = data.prepared_for(base.in_shape, base.mean, base.std, model=f"the base model in {base_dir}")
    outputs = cached_outputs(base_model, base.weights_sha256, data, split, cache_dir)
    return base_model, base, data, CodedData(data.float_images(), outputs, data.labels)


def train_parity(
    base_dir: str | Path,
    out: str | Path,
    parity: ParityConfig,
    optim: OptimConfig,
    *,
    recipe: str = "custom",
    data_root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    inputs: str | Path | None = None,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
    dataset: str | None = None,
    save_every_s: float = 120.0,
) -> ModelRecord:
    """Train the parity model for the base checkpoint at ``base_dir``; save the best epoch to ``out``.
    With ``inputs`` (unlabelled inputs of the deployed model, :mod:`parm.data.inputs`) it trains on
    those instead of the base's dataset, holding back ``optim.val_size`` of them (at most a fifth)
    for validation; labels are never needed, validation scores agreement with the deployed model.

    ``device`` (:func:`parm.devices.resolve_device`: auto, cpu, cuda, cuda:N, mps) is where the base
    outputs are computed and the parity model trains; ``precision`` (fp32, bf16, fp16) the autocast
    type of its forward passes in training (validation runs in float32). Neither is part of the
    run's identity: a run interrupted on one device resumes on another.

    Returns the saved record; its metrics hold the validation metrics of the best epoch.
    Running again with the same ``out`` and configuration resumes an interrupted run.
    """
    out = Path(out)
    where = device if isinstance(device, torch.device) else resolve_device(device)
    check_precision(precision, where)
    base_model, base, _, full = load_coded_split(base_dir, "train", data_root=data_root, download=download,
                                                 dataset=dataset,
                                                 cache_dir=cache_dir, inputs=inputs, device=where)
    base_optim = base.config.get("optim", {})
    val_size = base_optim.get("val_size", optim.val_size)
    digest = None
    if inputs is not None:  # the base's own split does not apply: hold back part of these inputs
        val_size, digest = min(optim.val_size, len(full.images) // 5), inputs_digest(full.images)
        if val_size < parity.code.k:
            raise ConfigError(f"{len(full.images)} inputs are too few to hold back validation groups of k={parity.code.k}; "
                              "give at least 5·k inputs (thousands for a useful parity model)", field="inputs",
                              value=len(full.images))
    save_envelope(out, InputEnvelope.fit(full.images))  # which queries serving may code together
    train_idx, val_idx = train_val_split(len(full.images), val_size, base_optim.get("seed", optim.seed))
    train, val = full.take(train_idx), full.take(val_idx)
    trained_on: dict[str, object] | None = None if inputs is None else {
        "path": Path(inputs).name, "sha256": digest, "count": len(full.images)}
    val_groups = fixed_groups(torch.arange(len(val.images)), parity.code.k, VAL_GROUP_SEED)  # (Gv, k)
    torch.manual_seed(optim.seed)
    model = _init_parity_model(parity, base, base_model)

    def validate(m: torch.nn.Module) -> dict[str, float]:
        metrics = reconstruction_metrics(parity, m, val, val_groups)
        return {"score": metrics["reconstruction_top1"], **{f"val_{k}": v for k, v in metrics.items()}}

    def save_best(m: torch.nn.Module, metrics: dict[str, float]) -> None:
        save_checkpoint(out, m, _parity_record(parity, base, optim, recipe, {**metrics, "best_epoch": metrics["epoch"] + 1},
                                               trained_on))

    spec = FitSpec(
        optim=optim, steps_per_epoch=math.ceil((len(train.images) // parity.code.k) / optim.batch_size),
        batches=_batches(parity, train, optim.batch_size), loss_fn=parity_loss(parity), validate=validate,
        save_best=save_best, state_dir=out / RESUME_DIR, fingerprint=_fingerprint(parity, base, digest),
        best_path=out, progress=progress, desc=_desc(parity), device=where, precision=precision,
        save_every_s=save_every_s,
    )
    result = fit(model, spec)
    log.info("%s: best epoch %d, val reconstruction accuracy %.4f",
             _desc(parity), result.best_epoch + 1, result.best_metrics["score"])
    return load_checkpoint(out)[1]


def write_envelope(base_dir: str | Path, out: str | Path, *, data_root: str | Path | None = None,
                   download: bool = False, cache_dir: str | Path | None = None,
                   inputs: str | Path | None = None, dataset: str | None = None) -> Path:
    """Write the input envelope (:class:`parm.coding.InputEnvelope`) of the base's training inputs
    (or of ``inputs``) into the parity checkpoint folder ``out``; training does this itself, this
    adds one to a checkpoint trained before envelopes existed."""
    _, _, _, full = load_coded_split(base_dir, "train", data_root=data_root, download=download, cache_dir=cache_dir,
                                     inputs=inputs, dataset=dataset)
    return save_envelope(out, InputEnvelope.fit(full.images))


def _already_trained(out: Path, parity: ParityConfig, base: ModelRecord, optim: OptimConfig) -> ModelRecord | None:
    """The record in ``out`` when its run finished every epoch with this configuration, else None."""
    if not finished(out / RESUME_DIR, _fingerprint(parity, base), optim):
        return None
    try:
        record = load_record(out)
        check_parity_matches(base, record, k=parity.code.k, r=parity.code.r, encoder=parity.code.encoder,
                             parity_index=parity.parity_index)
    except CheckpointError:
        return None
    return record


def train_parities(
    base_dir: str | Path,
    out: str | Path,
    code: CodeConfig,
    optim: OptimConfig,
    *,
    arch: str | None = None,
    init: str = "scratch",
    loss: str = "mse",
    temperature: float = 2.0,
    recipe: str = "custom",
    data_root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    inputs: str | Path | None = None,
    device: str | torch.device | None = "auto",
    precision: str = "fp32",
    dataset: str | None = None,
    save_every_s: float = 120.0,
) -> list[ModelRecord]:
    """Train all ``code.r`` parity models for the base checkpoint at ``base_dir``, one after another
    (:func:`train_parity` each, one progress bar each); returns their records by parity index.

    Layout: r = 1: ``out`` is the parity checkpoint; r > 1: ``out/parity-<i>`` for i in 0..r-1, each an
    ordinary parity checkpoint with r=code.r and parity_index=i. Pass ``out`` to
    :func:`parm.checkpoint.load_parity_set`. Running again resumes per model: an index whose run
    finished every epoch with this configuration (and whose record fits) is skipped without loading
    any data; an interrupted one continues after its last finished epoch. ``device`` and
    ``precision`` as in :func:`train_parity`.
    """
    base = load_record(base_dir)
    where = device if isinstance(device, torch.device) else resolve_device(device)
    check_precision(precision, where)
    records = []
    for i, folder in enumerate(parity_set_dirs(out, code.r)):
        parity = ParityConfig(code=code, parity_index=i, arch=arch, init=init, loss=loss, temperature=temperature)
        record = None if inputs is not None else _already_trained(folder, parity, base, optim)  # inputs: resumed by fit
        if record is not None:
            log.info("%s: already trained in %s, skipped", _desc(parity), folder)
            if not (Path(folder) / ENVELOPE_FILE).exists():  # trained before envelopes: add one
                write_envelope(base_dir, folder, data_root=data_root, download=download, cache_dir=cache_dir,
                               dataset=dataset)
        else:
            record = train_parity(base_dir, folder, parity, optim, recipe=recipe, data_root=data_root,
                                  download=download, cache_dir=cache_dir, progress=progress, inputs=inputs,
                                  device=where, precision=precision, dataset=dataset, save_every_s=save_every_s)
        records.append(record)
    return records
