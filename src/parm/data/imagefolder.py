"""Reader for an image-folder dataset: one sub-folder per class, image files inside.

::

    root/
      cat/  a.png b.jpg ...
      dog/  c.png ...

Class names are the sub-folder names in sorted order; label ids follow that order. Files with
the suffixes in :data:`IMAGE_SUFFIXES` (any case) are read with Pillow; other files are skipped.
All images are converted to one mode: ``L`` when every image is grey, else ``RGB`` (alpha is
dropped, palettes expanded). With ``size`` they are resized; without it they must all share
one size, and the first file that differs is named in the error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from parm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def read_image_folder(
    root: str | Path, *, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read every image under ``root/<class>/``.

    ``size`` is (height, width) of the output; None keeps the images' own size, which must then
    be the same for all. Returns images uint8 (N, C, H, W) with C = 1 (all grey) or 3,
    labels int64 (N,), and the sorted class names (label i is class_names[i]).
    """
    root = Path(root)
    _check_size(size)
    class_names = _class_names(root)
    files, labels = _list_files(root, class_names)
    modes, sizes_wh = _probe(files)
    mode = "L" if all(m in GREY_MODES for m in modes) else "RGB"
    height, width = size if size is not None else _common_size(files, sizes_wh)
    images = np.empty((len(files), 1 if mode == "L" else 3, height, width), dtype=np.uint8)  # (N, C, H, W)
    for i, path in enumerate(files):
        images[i] = _load(path, mode, (height, width))
    logger.info("read %d images of %d classes from %s (%s, %dx%d)", len(files), len(class_names), root, mode, height, width)
    return images, np.asarray(labels, dtype=np.int64), class_names


def _check_size(size: tuple[int, int] | None) -> None:
    if size is None:
        return
    if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
        raise ConfigError(f"size must be (height, width) with positive ints; got size={size!r}", field="size", value=size)


def _class_names(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}. Pass a folder with one sub-folder per class.", path=root)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root} has no class sub-folders; put each class's images in root/<class name>/.", path=root)
    return names


def _list_files(root: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        found = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(
                f"class folder {root / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add images or remove the folder.",
                path=root / name,
            )
        files.extend(found)
        labels.extend([label] * len(found))
    return files, labels


def _probe(files: list[Path]) -> tuple[list[str], list[tuple[int, int]]]:
    """Mode and (width, height) of each file, reading headers only."""
    modes, sizes = [], []
    for path in files:
        with _open(path) as img:
            modes.append(img.mode)
            sizes.append(img.size)
    return modes, sizes


def _common_size(files: list[Path], sizes_wh: list[tuple[int, int]]) -> tuple[int, int]:
    """(height, width) shared by all images; DataError naming the first file that differs."""
    first_w, first_h = sizes_wh[0]
    for path, (w, h) in zip(files, sizes_wh):
        if (w, h) != (first_w, first_h):
            raise DataError(
                f"{path} is {h}x{w} (HxW) but {files[0]} is {first_h}x{first_w}; images differ in size. "
                "Pass size=(height, width) to resize them all, or make the files the same size.",
                path=path,
            )
    return first_h, first_w


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.", path=path) from exc


def _load(path: Path, mode: str, size_hw: tuple[int, int]) -> np.ndarray:
    """One image as uint8 (C, H, W) in ``mode`` at ``size_hw``."""
    with _open(path) as img:
        try:
            img = img.convert(mode)
        except OSError as exc:
            raise DataError(f"cannot decode image {path}: {exc}. Remove or replace the file.", path=path) from exc
        if img.size != (size_hw[1], size_hw[0]):
            img = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, 3)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # -> (C, H, W)
