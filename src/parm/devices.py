"""Where models run: choosing a torch device, spreading serving instances over GPUs, and mixed
precision.

A device is named as PyTorch names it — ``cpu``, ``cuda``, ``cuda:N``, ``mps`` — or ``auto``
(the default everywhere): the first CUDA GPU when PyTorch sees one, else Apple's MPS, else the
CPU. Serving takes a comma-separated list too (``cuda:0,cuda:2``). Every path that runs a model
(training, evaluation, serving instances) takes its device from here; nothing calls ``.cuda()``.

Precision ``fp32`` (default), ``bf16`` or ``fp16`` runs the model's forward pass under
:func:`torch.autocast` with that type; weights stay float32 (checkpoints never change), and the
outputs a caller sees are float32. ``fp16`` needs a CUDA or MPS device (training it scales the loss
with a GradScaler); ``bf16`` works on every device, the CPU included.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

import torch

from parm.errors import ConfigError

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DEVICE_HELP = "auto (default: the first CUDA GPU, else MPS, else the CPU), cpu, cuda, cuda:N or mps"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NAME = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | None = "auto") -> torch.device:
    """The torch device ``name`` stands for on this machine (see the module docstring), or a
    ConfigError saying what is missing: an unknown name, no CUDA GPU visible, an index past the
    visible GPUs, no MPS. ``cuda`` without an index stays ``cuda`` (PyTorch's current GPU)."""
    text = (name or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    match = _NAME.fullmatch(text)
    if match is None:
        raise ConfigError(f"unknown device {name!r}; use {DEVICE_HELP}", field="device", value=name)
    kind, index = match.group(1), None if match.group(2) is None else int(match.group(2))
    if kind == "cpu":
        if index not in (None, 0):
            raise ConfigError(f"device {name!r}: the CPU has no index; use cpu", field="device", value=name)
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise ConfigError(f"device {name!r}: PyTorch sees no Apple MPS device here; use --device cpu",
                              field="device", value=name)
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r}: PyTorch sees no CUDA GPU (torch {torch.__version__}, "
            f"{'built for CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'}); use --device "
            f"cpu, or install a CUDA build of torch on a machine with a GPU", field="device", value=name)
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ConfigError(f"device {name!r}: only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1}); "
                          f"check CUDA_VISIBLE_DEVICES", field="device", value=name)
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def spread_devices(name: str | None, count: int) -> list[str]:
    """Devices for ``count`` serving instances, instance i at position i.

    ``cuda`` (or ``auto`` on a GPU machine) spreads the instances round robin over every visible
    GPU (cuda:0, cuda:1, ..., cuda:0, ...: several instances share a GPU when there are more
    instances than GPUs); ``cuda:N``, ``cpu`` and ``mps`` put every instance there; a
    comma-separated list (``cuda:0,cuda:2``) is cycled."""
    parts = [part.strip() for part in (name or "auto").split(",") if part.strip()] or ["auto"]
    if len(parts) > 1:
        devices = [str(resolve_device(part)) for part in parts]
    else:
        device = resolve_device(parts[0])
        if device.type == "cuda" and device.index is None:
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            devices = [str(device)]
    return [devices[i % len(devices)] for i in range(count)]


def check_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` if it can run on ``device``, else a ConfigError naming what can."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}",
                          field="precision", value=precision)
    kind = torch.device(device).type
    if precision == "fp16" and kind not in ("cuda", "mps"):
        raise ConfigError(f"precision fp16 needs a CUDA or MPS device, not {kind}; use bf16 (or fp32) on the CPU",
                          field="precision", value=precision)
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's context for ``precision`` on ``device``: nothing for fp32, else autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A loss scaler for training: active for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def describe(devices: Sequence[str]) -> str:
    """'cuda:0 x2, cuda:1 x1' for a list of instance devices (logs and summaries)."""
    counts: dict[str, int] = {}
    for device in devices:
        counts[device] = counts.get(device, 0) + 1
    return ", ".join(f"{device} x{n}" for device, n in counts.items())
