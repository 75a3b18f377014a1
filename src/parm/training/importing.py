"""import_model: a base checkpoint from a model trained outside ParM (its architecture and weights)."""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from parm.checkpoint import RECORD_FILE, ModelRecord, save_checkpoint
from parm.data import load_dataset
from parm.devices import resolve_device
from parm.errors import CheckpointError, CheckpointMismatchError, ConfigError
from parm.models import build_model
from parm.training.metrics import topk_correct
from parm.training.outputs import model_outputs

log = logging.getLogger(__name__)

LISTED_KEYS = 12  # keys named in a mismatch message before "... and N more"


def archive_kind(path: str | Path) -> str | None:
    """``"torchscript"`` for a TorchScript archive (``torch.jit.save``: compiled code and constants),
    ``"export"`` for a ``torch.export.save`` program (``.pt2``), else None (``torch.save``'s zip of a
    pickled object is neither)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if any(name.endswith("/archive_format") for name in names) and any("/models/" in name for name in names):
        return "export"
    return "torchscript" if any(name.endswith("/constants.pkl") for name in names) else None


def _archive_tensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript or torch.export archive (their own loaders read
    them; neither runs Python code from the file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still in use
            if kind == "torchscript":
                tensors = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            else:
                tensors = dict(torch.export.load(str(path)).state_dict)
    except Exception as exc:  # both loaders raise RuntimeError subclasses of their own
        raise CheckpointError(f"{path} looks like a {kind} archive but could not be loaded: {exc}", path=path) from exc
    return {str(k): v.detach().clone() for k, v in tensors.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors; a TorchScript (``torch.jit.save``) or ``torch.export``
    archive (its module's parameters and buffers, read by PyTorch's own loader for it); or a
    PyTorch state dict read with ``weights_only=True`` (never unpickling code). A dict holding the
    state dict under ``state_dict`` or ``model`` (as many training scripts save) is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist", field="weights", value=str(path))
    kind = archive_kind(path)
    if kind is not None:
        return _archive_tensors(path, kind)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}", path=path) from exc
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling error names what was refused
        raise CheckpointError(
            f"{path} could not be read as a PyTorch state dict with weights_only=True ({exc}); save the "
            "model's state_dict() (torch.save(model.state_dict(), path)) or convert it to safetensors", path=path,
        ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)", path=path)
    return {str(k): v for k, v in loaded.items()}


def rename_keys(tensors: Mapping[str, torch.Tensor], renames: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Replace the first matching prefix of each key: ``("module.", "")`` strips DataParallel's
    prefix, ``("nn.", "layers.")`` maps one naming to another."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        new = next((to + key[len(old):] for old, to in renames if key.startswith(old)), key)
        if new in out:
            raise ConfigError(f"renaming gives two tensors the name {new!r}; check --rename", field="rename", value=new)
        out[new] = value
    return out


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f" ... and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else "")


def load_strict(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, arch: str, source: str) -> None:
    """Load ``tensors`` into ``model`` requiring exactly its keys and shapes; an error lists the
    missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(f"{k} {list(tensors[k].shape)} (the model's: {list(own[k].shape)})" for k in set(own) & set(tensors)
                    if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or shapes:
        parts = [f"missing keys: {_listed(missing)}" if missing else "",
                 f"unexpected keys: {_listed(unexpected)}" if unexpected else "",
                 f"wrong shapes: {_listed(shapes)}" if shapes else ""]
        raise CheckpointMismatchError(
            f"the weights in {source} do not fit architecture {arch!r}: " + "; ".join(p for p in parts if p)
            + " (rename keys with --rename OLD=NEW, or check --arch, --in-shape and --classes)",
            field="weights", expected=sorted(own), got=sorted(tensors))
    model.load_state_dict(dict(tensors), strict=True)


def import_model(
    out: str | Path,
    *,
    arch: str,
    weights: str | Path,
    in_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    renames: Sequence[tuple[str, str]] = (),
    dataset: str | None = None,
    data_root: str | Path | None = None,
    download: bool = False,
    device: str | torch.device | None = "auto",
) -> ModelRecord:
    """Save a base checkpoint into ``out`` for the model ``arch`` (a built-in name or a factory
    ``module.path:function(in_shape=..., num_classes=...)``) with the tensors of ``weights``.

    ``mean``/``std`` (one value per input channel, on the 0..1 scale) are how the model's inputs
    were normalised when it was trained: every later command prepares inputs with them. With
    ``dataset``, the model's test accuracy on it (A_a) is measured and recorded, and the dataset
    is recorded for ``parm train-parity`` and ``parm eval``; without it, train parity models from
    unlabelled inputs (``parm train-parity --inputs``). ``weights`` may be a TorchScript or torch.export archive of
    the same architecture: its tensors are taken (ParM rebuilds ``arch`` in Python, as parity
    training needs fresh copies of it). The accuracy is measured on ``device``."""
    out = Path(out)
    if (out / RECORD_FILE).exists():
        raise ConfigError(f"{out} already holds a checkpoint; choose another --out or remove it first",
                          field="out", value=str(out))
    shape = tuple(int(v) for v in in_shape)
    if not shape or any(v <= 0 for v in shape) or num_classes <= 0:
        raise ConfigError(f"--in-shape and --classes must be positive; got {shape} and {num_classes}",
                          field="in_shape", value=shape)
    if len(mean) != shape[0] or len(std) != shape[0]:
        raise ConfigError(f"--mean and --std need one value per input channel ({shape[0]}); got {list(mean)} and "
                          f"{list(std)}", field="mean", value=list(mean))
    model = build_model(arch, shape, num_classes)
    tensors = rename_keys(read_state_dict(weights), renames)
    load_strict(model, tensors, arch=arch, source=str(weights))
    model.eval()
    with torch.inference_mode():
        probe = model(torch.zeros(2, *shape))
    if tuple(probe.shape) != (2, num_classes):
        raise ConfigError(f"{arch} maps inputs {list(shape)} to outputs {list(probe.shape[1:])}, not {num_classes} "
                          "class scores; check --in-shape and --classes", field="classes", value=num_classes)
    metrics: dict[str, float] = {}
    if dataset is not None:
        test = load_dataset(dataset, "test", data_root=data_root, download=download).prepared_for(
            shape, mean, std, model=f"{arch} (--in-shape {','.join(map(str, shape))})")
        if test.num_classes != num_classes:
            raise ConfigError(f"{dataset} has {test.num_classes} classes but --classes is {num_classes}",
                              field="classes", value=num_classes)
        where = device if isinstance(device, torch.device) else resolve_device(device)
        outputs = model_outputs(model.to(where), test.float_images())
        model.to("cpu")
        metrics["available_top1"] = topk_correct(outputs, test.labels).float().mean().item()
        log.info("imported %s: test accuracy on %s (A_a) %.4f", arch, dataset, metrics["available_top1"])
    record = ModelRecord(kind="base", arch=arch, in_shape=shape, num_classes=num_classes, dataset=dataset or "",
                         mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), metrics=metrics,
                         config={"imported_from": Path(weights).name, "renames": [list(r) for r in renames]})
    return save_checkpoint(out, model, record)
