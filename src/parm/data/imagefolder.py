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
    files, labels, _ = _scan(root, class_names)
    return files, labels


def _scan(root: Path, class_names: list[str]) -> tuple[list[Path], list[int], list[tuple[int, int]]]:
    """Image files, labels and (size, mtime_ns) of each, with one stat per file (os.scandir)."""
    files: list[Path] = []
    labels: list[int] = []
    stats: list[tuple[int, int]] = []
    for label, name in enumerate(class_names):
        found = []
        with os.scandir(root / name) as entries:
            for entry in entries:
                if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    st = entry.stat()
                    found.append((entry.name, st.st_size, st.st_mtime_ns))
        found.sort()
        if not found:
            raise DataError(
                f"class folder {root / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add images or remove the folder.",
                path=root / name,
            )
        folder = root / name
        files.extend(folder / f for f, _, _ in found)
        stats.extend((size, mtime) for _, size, mtime in found)
        labels.extend([label] * len(found))
    return files, labels, stats


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


def _listing(root: Path, with_mtime: bool) -> tuple[list[str], bytes]:
    """(class names, one line per image file: class/name, size and, with ``with_mtime``, mtime).
    Plain strings from os.scandir, one stat per file: this is the whole cost of a cached load."""
    class_names = _class_names(root)
    lines = []
    for name in class_names:
        found = []
        with os.scandir(root / name) as entries:
            for entry in entries:
                if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    st = entry.stat()
                    found.append(f"{name}/{entry.name}\t{st.st_size}\t{st.st_mtime_ns}" if with_mtime
                                 else f"{name}/{entry.name}\t{st.st_size}")
        found.sort()
        lines += found
    return class_names, "\n".join(lines).encode()


def folder_fingerprint(root: str | Path) -> str:
    """sha256 (hex) of ``root``'s image files' relative names and sizes: the same for a copy or
    a moved folder, different when an image is added, removed, renamed or rewritten in size."""
    return hashlib.sha256(_listing(Path(root), with_mtime=False)[1]).hexdigest()


Stats = tuple[tuple[float, ...], tuple[float, ...]]


def read_image_folder_cached(root: str | Path, cache_dir: Path | None
                             ) -> tuple[np.ndarray, np.ndarray, list[str], Stats]:
    """:func:`read_image_folder` plus the images' :func:`channel_stats`, decoding at most once per
    folder content: arrays and statistics are kept in ``cache_dir`` (None: no cache) under a key of
    every file's name, size and modification time, written atomically; an unreadable entry is
    decoded again. Entries are ``<key>.images.npy``, ``<key>.labels.npy`` and ``<key>.json`` (written
    last, so a half-written entry is never read)."""
    root = Path(root)
    if cache_dir is None:
        images, labels, names = read_image_folder(root)
        return images, labels, names, channel_stats(images)
    _, listing = _listing(root, with_mtime=True)
    key = hashlib.sha256(f"v{DECODED_VERSION}\n".encode() + listing).hexdigest()[:32]
    paths = {part: cache_dir / f"{key}.{part}" for part in ("images.npy", "labels.npy", "json")}
    if paths["json"].exists():  # written last: the entry is complete
        try:
            meta = json.loads(paths["json"].read_text())
            images, labels = np.load(paths["images.npy"]), np.load(paths["labels.npy"])  # one read each, no copy
            mean, std = (tuple(float(v) for v in values) for values in meta["stats"])
            if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images),):
                raise ValueError(f"arrays of shape {images.shape} and {labels.shape}")
            logger.info("read %d decoded images of %s from the cache %s", len(labels), root, paths["images.npy"])
            return images, labels, list(meta["class_names"]), (mean, std)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable decoded-image cache entry %s (%s); decoding again", paths["json"], exc)
    images, labels, names = read_image_folder(root)
    stats = channel_stats(images)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for part, array in (("images.npy", images), ("labels.npy", labels)):
        tmp = paths[part].with_name(f".{paths[part].name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, paths[part])
    tmp = paths["json"].with_name(f".{paths['json'].name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"class_names": names, "stats": stats, "folder": str(root), "count": len(labels)}))
    os.replace(tmp, paths["json"])
    return images, labels, names, stats


def channel_stats(images: np.ndarray, chunk: int = 4096) -> Stats:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the 0..1 scale (a zero std becomes 1),
    summed in chunks of ``chunk`` images (no full float copy)."""
    channels = images.shape[1]
    total = np.zeros(channels, dtype=np.float64)
    squares = np.zeros(channels, dtype=np.float64)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].astype(np.float64)  # (c, C, H, W), one chunk at a time
        total += x.sum(axis=(0, 2, 3))
        squares += np.square(x).sum(axis=(0, 2, 3))
    count = max(images.shape[0] * images.shape[2] * images.shape[3], 1)
    mean = total / count / 255.0
    std = np.sqrt(np.maximum(squares / count / 255.0**2 - mean**2, 0.0))
    if np.any(std == 0):
        logger.warning("some channel is constant (std 0); using std 1 for it")
    return tuple(float(m) for m in mean), tuple(float(s) if s > 0 else 1.0 for s in std)
