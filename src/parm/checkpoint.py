"""Self-describing checkpoints: safetensors weights plus a JSON record.

A checkpoint is a folder::

    record.json                 what the model is: ModelRecord fields, incl. the weights file name
    model-<sha256[:16]>.safetensors   the weights, named by their hash

Saving writes the weights under a new name, then replaces ``record.json`` atomically, then
removes weights no record points to. A crash at any moment leaves a record that points to
complete weights, so a checkpoint is never half-written. Loading verifies the hash, rebuilds
the model from the record with :func:`parm.models.build_model`, and never unpickles anything.

The r parity models of one code (a *parity set*, :func:`parity_set_dirs`, :func:`load_parity_set`)::

    r = 1:  DIR/                 DIR is the parity checkpoint itself
    r > 1:  DIR/parity-0/ ...    one ordinary parity checkpoint per index i in 0..r-1, each
            DIR/parity-<r-1>/    recording the same k, r, encoder and base_sha256 and parity_index=i
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from parm._version import __version__
from parm.coding.config import CodeConfig
from parm.coding.envelope import InputEnvelope
from parm.errors import CheckpointError, CheckpointMismatchError
from parm.models import build_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECORD_FILE = "record.json"
PARITY_DIR = "parity-{}"  # parity i of an r > 1 set
_PARITY_DIR_RE = re.compile(r"parity-(0|[1-9][0-9]*)")


def package_version() -> str:
    return __version__


@dataclass(frozen=True)
class ModelRecord:
    """Everything needed to rebuild and check a model. ``kind`` is 'base' or 'parity'."""

    kind: str
    arch: str
    in_shape: tuple[int, ...]
    num_classes: int
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    k: int | None = None
    r: int | None = None
    parity_index: int | None = None
    encoder: str | None = None
    base_sha256: str | None = None
    dataset_fingerprint: str = ""  # image folders: content fingerprint (parm.data.dataset_identity); "" else
    weights_sha256: str = ""
    weights_file: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    parm_version: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in ("base", "parity"):
            raise CheckpointError(f"record kind must be 'base' or 'parity'; got {self.kind!r}")
        object.__setattr__(self, "in_shape", tuple(int(s) for s in self.in_shape))
        object.__setattr__(self, "mean", tuple(float(s) for s in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> ModelRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"kind", "arch", "in_shape", "num_classes", "dataset", "mean", "std"} - set(data)
        if missing:
            raise CheckpointError(f"{path} lacks field(s) {sorted(missing)}; is it a ParM checkpoint?", path=path)
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format_version {data['format_version']}, newer than this ParM "
                f"({FORMAT_VERSION}); upgrade parm-serving to load it",
                path=path,
            )
        return cls(**{k: v for k, v in data.items() if k in names})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_tensors(directory: Path, stem: str, tensors: dict[str, torch.Tensor], record: dict[str, Any],
                 record_name: str) -> dict[str, Any]:
    """Write tensors under a hash-named file, then the record naming it, then drop stale files."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{stem}.{os.getpid()}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    digest = sha256_file(tmp)
    name = f"{stem}-{digest[:16]}.safetensors"
    os.replace(tmp, directory / name)
    record = {**record, "weights_sha256": digest, "weights_file": name}
    _write_json_atomic(directory / record_name, record)
    for stale in directory.glob(f"{stem}-*.safetensors"):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    return record


def _read_record(directory: Path, record_name: str) -> dict[str, Any]:
    """The JSON record of a checkpoint (or training state) folder, with a clear error when it
    is missing or damaged: the one reader behind every loader here."""
    path = directory / record_name
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {directory}: {record_name} is missing (train one with 'parm train-base' / "
            f"'parm train-parity', or check the path)",
            path=directory,
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged", path=path) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; is it a ParM checkpoint?", path=path)
    return data


def _read_weights(directory: Path, record_name: str, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors ``record`` names, after checking their hash."""
    weights = directory / str(record.get("weights_file", ""))
    if not record.get("weights_file") or not weights.is_file():
        raise CheckpointError(f"{directory / record_name} names weights {record.get('weights_file')!r}, which are "
                              f"missing", path=weights)
    actual = sha256_file(weights)
    if actual != record.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} has sha256 {actual} but {record_name} expects {record.get('weights_sha256')}; "
            f"the file is damaged: retrain or restore it",
            path=weights,
        )
    try:
        return load_file(str(weights))
    except SafetensorError as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}", path=weights) from exc


def load_tensors(directory: Path, record_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a record and the tensors it names, checking the hash (training state uses this)."""
    record = _read_record(directory, record_name)
    return record, _read_weights(directory, record_name, record)


def save_checkpoint(directory: str | Path, model: nn.Module, record: ModelRecord) -> ModelRecord:
    """Save ``model`` with ``record`` into ``directory``; returns the record as written."""
    data = {**record.to_json(), "parm_version": package_version(), "format_version": FORMAT_VERSION}
    written = save_tensors(Path(directory), "model", model.state_dict(), data, RECORD_FILE)
    log.debug("saved %s checkpoint to %s", record.kind, directory)
    return ModelRecord.from_json(written, Path(directory) / RECORD_FILE)


def load_record(directory: str | Path) -> ModelRecord:
    """Read only the record (no weights) of a checkpoint."""
    return ModelRecord.from_json(_read_record(Path(directory), RECORD_FILE), Path(directory) / RECORD_FILE)


def build_parity_model(arch: str, in_shape: tuple[int, ...], num_classes: int, code: CodeConfig) -> nn.Module:
    """An untrained parity model of ``code``: num_classes outputs, or k·num_classes (a prediction
    per member, built knowing k) for a code that predicts each member apart (``tiles``)."""
    if code.per_query:
        return build_model(arch, in_shape, num_classes * code.k, k=code.k)
    return build_model(arch, in_shape, num_classes)


def build_record_model(record: ModelRecord) -> nn.Module:
    """The untrained model a record describes (:func:`build_parity_model` for a parity record)."""
    if record.kind == "parity" and record.k is not None and record.encoder is not None:
        code = CodeConfig(record.k, record.r or 1, record.encoder)
        return build_parity_model(record.arch, record.in_shape, record.num_classes, code)
    return build_model(record.arch, record.in_shape, record.num_classes)


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelRecord]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    directory = Path(directory)
    data = _read_record(directory, RECORD_FILE)
    record = ModelRecord.from_json(data, directory / RECORD_FILE)  # field check before touching weights
    tensors = _read_weights(directory, RECORD_FILE, data)
    model = build_record_model(record)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointMismatchError(
            f"weights in {directory} do not fit architecture {record.arch!r}: {exc}",
            field="arch", expected=record.arch, got="weights of another architecture", path=directory,
        ) from exc
    return model.to(map_location).eval(), record


def check_parity_matches(base: ModelRecord, parity: ModelRecord, **expected: Any) -> None:
    """Raise CheckpointMismatchError naming the first field where ``parity`` does not fit.

    ``base`` must be the base record the parity model was trained for (by weights hash); each
    keyword (k=2, encoder='add', ...) must equal the parity record's field of that name.
    """
    if parity.kind != "parity":
        raise CheckpointMismatchError(
            f"expected a parity checkpoint; got kind={parity.kind!r}", field="kind", expected="parity", got=parity.kind
        )
    if parity.base_sha256 != base.weights_sha256:
        raise CheckpointMismatchError(
            f"parity model was trained for base weights {str(parity.base_sha256)[:16]}…, not for this base "
            f"model ({base.weights_sha256[:16]}…); train a parity model for this base with 'parm train-parity'",
            field="base_sha256", expected=base.weights_sha256, got=parity.base_sha256,
        )
    for name in ("dataset", "num_classes", "in_shape"):
        if getattr(parity, name) != getattr(base, name):
            raise CheckpointMismatchError(
                f"parity {name}={getattr(parity, name)!r} differs from base {name}={getattr(base, name)!r}",
                field=name, expected=getattr(base, name), got=getattr(parity, name),
            )
    for name, want in expected.items():
        if want is not None and getattr(parity, name) != want:
            raise CheckpointMismatchError(
                f"parity checkpoint has {name}={getattr(parity, name)!r} but {name}={want!r} was asked for",
                field=name, expected=want, got=getattr(parity, name),
            )


ENVELOPE_FILE = "envelope.safetensors"  # a parity checkpoint's input envelope (parm.coding.envelope)


def save_envelope(directory: str | Path, envelope: InputEnvelope) -> Path:
    """Write the input envelope of a parity checkpoint's training inputs into ``directory``
    (atomically: a reader sees the old file or the new one, never half of one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{ENVELOPE_FILE}.{os.getpid()}.tmp"
    save_file({"lo": envelope.lo.contiguous().cpu(), "hi": envelope.hi.contiguous().cpu()}, str(tmp),
              metadata={"max_norm": repr(envelope.max_norm), "margin": repr(envelope.margin)})
    os.replace(tmp, directory / ENVELOPE_FILE)
    return directory / ENVELOPE_FILE


def load_envelope(directory: str | Path, in_shape: tuple[int, ...] | None = None) -> InputEnvelope | None:
    """The input envelope saved in a parity checkpoint folder, or None when it has none (trained
    before envelopes existed). A damaged file, or one whose shape is not ``in_shape``, is a
    CheckpointError."""
    path = Path(directory) / ENVELOPE_FILE
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            lo, hi = fh.get_tensor("lo"), fh.get_tensor("hi")
        envelope = InputEnvelope(lo, hi, float(meta["max_norm"]), float(meta["margin"]))
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable input envelope ({exc}); retrain the parity model or "
                              f"delete the file to serve without one", path=path) from exc
    if in_shape is not None and envelope.shape != tuple(in_shape):
        raise CheckpointError(f"{path} has shape {list(envelope.shape)}, not the model's input shape {list(in_shape)}",
                              path=path)
    return envelope


def parity_set_dirs(directory: str | Path, r: int) -> list[Path]:
    """Where the r parity checkpoints of one code live: ``[directory]`` for r = 1, else
    ``[directory/parity-0, ..., directory/parity-<r-1>]`` (the layout :func:`load_parity_set` reads)."""
    directory = Path(directory)
    return [directory] if r == 1 else [directory / PARITY_DIR.format(i) for i in range(r)]


def _train_hint(record: ModelRecord, out: Path | str, index: int | None = None) -> str:
    which = "" if index is None else f" --parity-index {index}"
    where = out if index is None else Path(out) / PARITY_DIR.format(index)
    return (f"'parm train-parity --base BASE --k {record.k} --encoder {record.encoder} --r {record.r}{which} "
            f"--out {where}'")


def load_parity_set(directory: str | Path) -> list[tuple[Path, ModelRecord]]:
    """The r parity checkpoints of one code, as (folder, record) pairs ordered by parity_index.

    ``directory`` is either one parity checkpoint of an r = 1 code (it holds ``record.json``) or
    a folder of ``parity-<i>`` subfolders, one per index 0..r-1 (what ``parm train-parity --r R``
    writes). Only records are read, not weights. Raises :class:`CheckpointError` when a member is
    missing (naming the index and the command that trains it), when a single checkpoint is one
    parity of an r > 1 code, or when the folder holds neither; :class:`CheckpointMismatchError`
    when the members disagree on k, r, encoder or base_sha256, or an index appears twice.
    """
    directory = Path(directory)
    if (directory / RECORD_FILE).exists():
        record = load_record(directory)
        _check_kind(directory, record)
        r = record.r or 1
        if r > 1:
            raise CheckpointError(
                f"{directory} holds parity index {record.parity_index} of an r={r} code: only one of the {r} parity "
                f"models is present. Pass a folder that holds parity-0 ... parity-{r - 1} (train them all into one with "
                f"{_train_hint(record, 'DIR')})",
                path=directory,
            )
        return [(directory, record)]
    subdirs = {int(m.group(1)): p for p in sorted(directory.iterdir()) if p.is_dir()
               and (m := _PARITY_DIR_RE.fullmatch(p.name))} if directory.is_dir() else {}
    records = {i: load_record(p) for i, p in subdirs.items() if (p / RECORD_FILE).exists()}
    if not records:
        found = ("its parity-<i> subfolders hold no record.json yet (an unfinished run? run the same "
                 "'parm train-parity' command again to resume)") if subdirs else (
                 "no record.json and no parity-<i> subfolders (train parity models with 'parm train-parity', "
                 "or check the path)")
        raise CheckpointError(f"no parity checkpoint at {directory}: {found}", path=directory)
    first_index = min(records)
    first = records[first_index]
    by_index: dict[int, Path] = {}
    for i, record in sorted(records.items()):
        _check_kind(subdirs[i], record)
        for name in ("k", "r", "encoder", "base_sha256"):
            if getattr(record, name) != getattr(first, name):
                raise CheckpointMismatchError(
                    f"parity checkpoints in {directory} disagree on {name}: {subdirs[first_index].name} has "
                    f"{name}={getattr(first, name)!r} but {subdirs[i].name} has {name}={getattr(record, name)!r}; "
                    f"all r parity models of a set must be trained for one code and one base model",
                    field=name, expected=getattr(first, name), got=getattr(record, name), path=subdirs[i],
                )
        index = record.parity_index if record.parity_index is not None else 0
        if index in by_index:
            raise CheckpointMismatchError(
                f"parity index {index} appears twice in {directory}: in {by_index[index].name} and {subdirs[i].name}; "
                f"each parity-<i> folder must hold parity_index=i",
                field="parity_index", expected=i, got=index, path=subdirs[i],
            )
        if index != i:
            raise CheckpointMismatchError(
                f"{subdirs[i]} holds parity_index={index}, but its name says {i}; each parity-<i> folder must hold "
                f"parity_index=i", field="parity_index", expected=i, got=index, path=subdirs[i],
            )
        by_index[index] = subdirs[i]
    r = first.r or 1
    extra = sorted(i for i in subdirs if i >= r)
    if extra:
        raise CheckpointMismatchError(
            f"{directory} holds {PARITY_DIR.format(extra[0])} but its parity models are for r={r} "
            f"(indices 0..{r - 1}); remove it or check the folder", field="parity_index", expected=list(range(r)),
            got=extra[0], path=subdirs[extra[0]],
        )
    missing = [i for i in range(r) if i not in records]
    if missing:
        i = missing[0]
        state = "has no record.json yet (an unfinished run?)" if i in subdirs else "does not exist"
        raise CheckpointError(
            f"parity index {i} of r={r} is missing from {directory}: {directory / PARITY_DIR.format(i)} {state}"
            f"{f' (missing indices: {missing})' if len(missing) > 1 else ''}. Train it with "
            f"{_train_hint(first, directory, i)}, or every missing index at once with {_train_hint(first, directory)}",
            path=directory / PARITY_DIR.format(i),
        )
    return [(subdirs[i], records[i]) for i in range(r)]


def _check_kind(directory: Path, record: ModelRecord) -> None:
    if record.kind != "parity":
        raise CheckpointMismatchError(
            f"{directory} holds a {record.kind} checkpoint, not a parity checkpoint", field="kind", expected="parity",
            got=record.kind, path=directory,
        )
