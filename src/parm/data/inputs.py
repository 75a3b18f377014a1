"""Unlabelled inputs of a deployed model: what ``parm train-parity --inputs`` and ``parm eval
--inputs`` read, since parity models learn from the deployed model's own outputs, not labels.

``PATH`` is one of:

- a ``.npy`` file, or a ``.safetensors`` file holding one tensor (or one named ``inputs``);
- a folder of such files (recorded traffic: ``parm serve --record-inputs DIR`` writes them), read
  in name order and concatenated;
- a folder of images (png, jpg, jpeg, bmp, gif; in it or in sub-folders, whose names are ignored),
  decoded and resized to the model's input size.

What the values mean depends on their type. **uint8** arrays and images are raw pixels (0..255),
shaped (N, C, H, W), (N, H, W) for one channel, or (N, H, W, C) with C = 1 or 3: they are scaled to
0..1 and normalised with the model's mean/std, as its dataset would be. **Floating-point** arrays
are the model's inputs as served (already normalised, as a client sends them and as recorded
traffic holds them), shaped (N, *in_shape), and are used unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from parm.data.imagefolder import IMAGE_SUFFIXES, load_image
from parm.errors import DataError, ShapeError

log = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy", ".safetensors")


def load_inputs(path: str | Path, in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]
                ) -> torch.Tensor:
    """The model inputs at ``path`` (see module docstring) as float32 (N, *in_shape)."""
    path = Path(path)
    shape = tuple(int(v) for v in in_shape)
    if path.is_file():
        parts = [_read_array(path)]
    elif path.is_dir():
        arrays = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in ARRAY_SUFFIXES)
        images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if arrays and images:
            raise DataError(f"{path} holds both arrays ({arrays[0].name}) and images ({images[0].name}); "
                            "point --inputs at a folder of one kind", path=path)
        if not arrays and not images:
            raise DataError(f"{path} holds no inputs: no {', '.join(ARRAY_SUFFIXES)} files and no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})", path=path)
        parts = [_read_array(p) for p in arrays] if arrays else [_read_images(images, shape)]
    else:
        raise DataError(f"inputs not found: {path} (a .npy or .safetensors file, or a folder of them or of "
                        "images)", path=path)
    prepared = [_prepare(a, shape, mean, std, source) for a, source in parts]
    inputs = torch.cat(prepared) if len(prepared) > 1 else prepared[0]
    if len(inputs) == 0:
        raise DataError(f"{path} holds no inputs (0 rows)", path=path)
    if not torch.isfinite(inputs).all():
        raise DataError(f"{path} holds non-finite values (NaN or inf); remove those rows", path=path)
    log.info("read %d unlabelled inputs of shape %s from %s", len(inputs), list(shape), path)
    return inputs


def _read_array(path: Path) -> tuple[np.ndarray, str]:
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False), str(path)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read {path} as a .npy array: {exc}", path=path) from exc
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"cannot read {path} as safetensors: {exc}", path=path) from exc
    if "inputs" in tensors:
        return tensors["inputs"], f"{path}[inputs]"
    if len(tensors) != 1:
        raise DataError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); keep one, or name the "
                        "inputs 'inputs'", path=path)
    return next(iter(tensors.values())), str(path)


def _read_images(files: list[Path], shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ShapeError(f"image inputs need a model taking (C, H, W) with C = 1 or 3; it takes {list(shape)}",
                         expected="(1 or 3, H, W)", got=shape)
    mode = "L" if shape[0] == 1 else "RGB"
    images = np.empty((len(files), *shape), dtype=np.uint8)  # (N, C, H, W)
    for i, path in enumerate(files):
        images[i] = load_image(path, mode, (shape[1], shape[2]))
    return images, f"{len(files)} images under {files[0].parent}"


def _prepare(array: np.ndarray, shape: tuple[int, ...], mean: Sequence[float], std: Sequence[float], source: str
             ) -> torch.Tensor:
    if array.dtype == np.uint8:
        return _normalise(_channels_first(array, shape, source), mean, std)
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{source}: inputs must be uint8 pixels or floating-point model inputs; got {array.dtype}")
    if tuple(array.shape[1:]) != shape:
        raise ShapeError(f"{source}: floating-point inputs are taken as they are and must be (N, {', '.join(map(str, shape))}) "
                         f"like the model's inputs; got {list(array.shape)}", expected=shape, got=tuple(array.shape))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _channels_first(array: np.ndarray, shape: tuple[int, ...], source: str) -> np.ndarray:
    if len(shape) == 3:
        c, h, w = shape
        if array.ndim == 3 and c == 1 and array.shape[1:] == (h, w):
            return array[:, None]  # (N, H, W) -> (N, 1, H, W)
        if array.ndim == 4 and array.shape[1:] == (c, h, w):
            return array
        if array.ndim == 4 and array.shape[1:] == (h, w, c):
            return array.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    elif tuple(array.shape[1:]) == shape:
        return array
    raise ShapeError(f"{source}: uint8 images of shape {list(array.shape)} do not fit the model's inputs {list(shape)}; "
                     "give (N, C, H, W), (N, H, W) or (N, H, W, C) at the model's size", expected=shape,
                     got=tuple(array.shape))


def _normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255.0)  # (N, C, ...)
    view = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(view)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(view)
    return x.sub_(m).div_(s)
