"""Reader for an image-folder dataset: one sub-folder per class, image files inside.

::

    root/
      cat/  a.png b.jpg ...
      dog/  c.png ...

Class names are the sub-folder names in sorted order; label ids follow that order. Files with
the suffixes in :data:`IMAGE_SUFFIXES` (any case) are read with Pillow, each opened once; other
files are skipped. All images end in one mode: ``L`` when every image is grey, else ``RGB``
(alpha is dropped, palettes expanded, grey images repeated into three channels). With ``size``
they are resized; without it they must all share one size, and the first file that differs is
named in the error.

:func:`read_image_folder_cached` decodes a folder once: later reads of the same files (same
names, sizes and modification times) load the decoded arrays from the cache directory.
:func:`folder_fingerprint` identifies a folder's images by names and sizes only, so that a
copied or moved folder keeps its identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from parm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def read_image_folder(
    root: str | Path, *, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read every image under ``root/<class>/``, opening each file once.

    ``size`` is (height, width) of the output; None keeps the images' own size, which must then
    be the same for all. Returns images uint8 (N, C, H, W) with C = 1 (all grey) or 3,
    labels int64 (N,), and the sorted class names (label i is class_names[i]).
    """
    root = Path(root)
    _check_size(size)
    class_names = _class_names(root)
    files, labels = _list_files(root, class_names)
    images: np.ndarray | None = None  # grey (N, 1, H, W) until the first colour image, then (N, 3, H, W)
    first = files[0]
    for i, path in enumerate(tqdm(files, desc=f"decode {root.name}", unit="img", leave=False, disable=len(files) < 5000)):
        pixels = _decode(path, size, first if size is None else None, images)  # (c, H, W), c = 1 or 3
        if images is None:
            images = np.empty((len(files), *pixels.shape), dtype=np.uint8)
        elif pixels.shape[0] > images.shape[1]:  # the first colour image: the grey ones so far become RGB
            images = np.repeat(images, 3, axis=1)
        images[i] = pixels if pixels.shape[0] == images.shape[1] else np.repeat(pixels, 3, axis=0)
    assert images is not None
    logger.info("read %d images of %d classes from %s (%s, %dx%d)", len(files), len(class_names), root,
                "L" if images.shape[1] == 1 else "RGB", images.shape[2], images.shape[3])
    return images, np.asarray(labels, dtype=np.int64), class_names


def list_image_folder(root: str | Path) -> tuple[list[str], list[Path], list[int]]:
    """(class names, image files, labels) of ``root/<class>/`` without decoding anything."""
    root = Path(root)
    class_names = _class_names(root)
    files, labels = _list_files(root, class_names)
    return class_names, files, labels


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


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.", path=path) from exc


def load_image(path: Path, mode: str, size_hw: tuple[int, int]) -> np.ndarray:
    """One image as uint8 (C, H, W) in ``mode`` (``L`` or ``RGB``) at ``size_hw`` (resized if needed)."""
    with _open(path) as img:
        try:
            img = img.convert(mode)
        except OSError as exc:
            raise DataError(f"cannot decode image {path}: {exc}. Remove or replace the file.", path=path) from exc
        if img.size != (size_hw[1], size_hw[0]):
            img = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, 3)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # -> (C, H, W)


def _decode(path: Path, size_hw: tuple[int, int] | None, first: Path | None, so_far: np.ndarray | None) -> np.ndarray:
    """One image as uint8 (C, H, W), C = 1 for a grey mode else 3 (alpha dropped, palettes
    expanded), resized to ``size_hw`` if given; else it must match the size of the images so far."""
    with _open(path) as img:
        try:
            img = img.convert("L" if img.mode in GREY_MODES else "RGB")
        except OSError as exc:
            raise DataError(f"cannot decode image {path}: {exc}. Remove or replace the file.", path=path) from exc
        if size_hw is not None and img.size != (size_hw[1], size_hw[0]):
            img = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, 3)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # -> (C, H, W)
    if so_far is not None and size_hw is None and pixels.shape[1:] != so_far.shape[2:]:
        (h, w), (fh, fw) = pixels.shape[1:], so_far.shape[2:]
        raise DataError(
            f"{path} is {h}x{w} (HxW) but {first} is {fh}x{fw}; images differ in size. "
            "Pass size=(height, width) to resize them all, or make the files the same size.",
            path=path,
        )
    return pixels


DECODED_VERSION = 1  # bump when decoding changes, so old cache entries are not reused


def _listing(root: Path, files: list[Path], with_mtime: bool) -> bytes:
    lines = []
    for path in files:
        st = path.stat()
        rel = path.relative_to(root).as_posix()
        lines.append(f"{rel}\t{st.st_size}" + (f"\t{st.st_mtime_ns}" if with_mtime else ""))
    return "\n".join(lines).encode()


def folder_fingerprint(root: str | Path) -> str:
    """sha256 (hex) of ``root``'s image files' relative names and sizes: the same for a copy or
    a moved folder, different when an image is added, removed, renamed or rewritten in size."""
    root = Path(root)
    _, files, _ = list_image_folder(root)
    return hashlib.sha256(_listing(root, files, with_mtime=False)).hexdigest()


def read_image_folder_cached(root: str | Path, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`read_image_folder`, decoding at most once per folder content: the arrays are kept in
    ``cache_dir`` (None: no cache) under a key of every file's name, size and modification time,
    written atomically; an unreadable entry is decoded again."""
    root = Path(root)
    if cache_dir is None:
        return read_image_folder(root)
    class_names, files, _ = list_image_folder(root)
    key = hashlib.sha256(f"v{DECODED_VERSION}\n".encode() + _listing(root, files, with_mtime=True)).hexdigest()[:32]
    path = cache_dir / f"{key}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), framework="numpy") as fh:
                names = json.loads(fh.metadata()["class_names"])
                images, labels = fh.get_tensor("images"), fh.get_tensor("labels")
            logger.info("read %d decoded images of %s from the cache %s", len(labels), root, path)
            return images, labels, names
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            logger.warning("ignoring unreadable decoded-image cache entry %s (%s); decoding again", path, exc)
    images, labels, names = read_image_folder(root)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"images": images, "labels": labels}, str(tmp), metadata={"class_names": json.dumps(names),
                                                                          "folder": str(root)})
    os.replace(tmp, path)
    return images, labels, names
