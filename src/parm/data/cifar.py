"""Reader for the CIFAR-10 / CIFAR-100 "python version" batches, without running pickle.

The batches are Python pickles (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``;
``cifar-100-python/train``, ``test``): a dict with ``data`` (uint8 ndarray (N, 3072), channel-major
32x32 planes) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100).

The pickles are decoded by :func:`parm.data.safe_pickle.safe_unpickle`, which never runs
pickle (see there).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from parm.data.safe_pickle import safe_unpickle
from parm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CIFAR_IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its batches (relative to the data root) and its label key."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int


CIFAR_LAYOUTS: dict[int, CifarLayout] = {
    10: CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
    ),
    100: CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
    ),
}


def read_cifar(
    folder: str | Path, split: Literal["train", "test"], variant: Literal[10, 100]
) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR split: images uint8 (N, 3, 32, 32) and labels int64 (N,).

    ``folder`` is the batch folder (``.../cifar-10-batches-py`` or ``.../cifar-100-python``) or
    the data root that contains it. The pickles are decoded without running pickle (see the
    module docstring); anything outside the data-only subset raises DataError.
    """
    layout = _layout(variant)
    files = _split_files(layout, split)
    batch_dir = _batch_dir(Path(folder), layout.folder)
    parts = [_read_batch(batch_dir / name, layout) for name in files]
    images = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])  # (N,)
    logger.debug("read CIFAR-%d %s: %d images from %s", variant, split, len(labels), batch_dir)
    return images, labels


def _layout(variant: int) -> CifarLayout:
    if variant not in CIFAR_LAYOUTS:
        raise ConfigError(f"CIFAR variant must be 10 or 100; got variant={variant!r}", field="variant", value=variant)
    return CIFAR_LAYOUTS[variant]


def _split_files(layout: CifarLayout, split: str) -> tuple[str, ...]:
    if split == "train":
        return layout.train_files
    if split == "test":
        return layout.test_files
    raise ConfigError(f"split must be 'train' or 'test'; got split={split!r}", field="split", value=split)


def _batch_dir(folder: Path, expected_name: str) -> Path:
    """Accept the batch folder itself or a data root holding it."""
    if folder.name != expected_name and (folder / expected_name).is_dir():
        return folder / expected_name
    return folder


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"CIFAR batch not found: {path}. Run again with --download, or point --data-root / "
            f"PARM_DATA_ROOT at the folder that holds {layout.folder}/.",
            path=path,
        ) from None
    batch = safe_unpickle(content, path, hint=_FIX_HINT)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a CIFAR batch dict, found {type(batch).__name__}. {_FIX_HINT}", path=path)
    data = _field(batch, "data", path)
    labels = _field(batch, layout.label_key, path)
    return _check_batch(data, labels, layout, path)


def _field(batch: dict, key: str, path: Path) -> Any:
    """batch[key], accepting the Python 2 byte-string key (b'data') as well as 'data'."""
    for candidate in (key, key.encode("latin-1")):
        if candidate in batch:
            return batch[candidate]
    found = sorted(k.decode("latin-1") if isinstance(k, bytes) else str(k) for k in batch)
    raise DataError(f"{path}: CIFAR batch has no {key!r} entry (found {found}). {_FIX_HINT}", path=path)


def _check_batch(data: Any, labels: Any, layout: CifarLayout, path: Path) -> tuple[np.ndarray, np.ndarray]:
    pixels = math.prod(CIFAR_IMAGE_SHAPE)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 (N, {pixels}); got {got}. {_FIX_HINT}", path=path)
    label_array = np.asarray(labels, dtype=np.int64)  # (N,)
    if label_array.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but labels of shape {label_array.shape}. {_FIX_HINT}", path=path)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= layout.num_classes):
        raise DataError(
            f"{path}: labels must lie in [0, {layout.num_classes}); "
            f"found [{label_array.min()}, {label_array.max()}]. {_FIX_HINT}",
            path=path,
        )
    images = np.ascontiguousarray(data.reshape((data.shape[0], *CIFAR_IMAGE_SHAPE)))  # (N, 3072) -> (N, 3, 32, 32)
    return images, label_array


_FIX_HINT = (
    "The file is damaged or not a CIFAR python batch: delete the folder and fetch a fresh copy "
    "(run again with --download), or check --data-root / PARM_DATA_ROOT."
)
