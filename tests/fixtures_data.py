"""Writers of small generated datasets in the real on-disk layouts (for tests; no network, no real data).

- IDX (MNIST / Fashion-MNIST layout, ``.gz`` and raw): ``<root>/MNIST/raw/...``, ``<root>/FashionMNIST/raw/...``.
  The images are LEARNABLE: each class has a fixed random prototype pattern; a sample is that
  pattern at a random intensity, shifted by up to one pixel, plus Gaussian noise. A tiny MLP
  reaches well over 80% test accuracy in a few epochs, so training code can be tested on them.
- CIFAR-10 / CIFAR-100 python batches (tiny), written byte-for-byte in the Python 2 pickle style
  of the real release (``numpy.core.multiarray._reconstruct`` with BINSTRING data and keys).
- An image folder of PNGs (``root/train/<class>/*.png``, ``root/test/<class>/*.png``).

Everything is deterministic (seeded numpy Generators, gzip mtime 0), so md5s are stable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

IDX_FOLDERS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_SEEDS = {"mnist": 1, "fashion-mnist": 2}
CIFAR_FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}
CIFAR_TARBALLS = {10: "cifar-10-python.tar.gz", 100: "cifar-100-python.tar.gz"}
N_TRAIN, N_TEST = 1200, 300


def md5_file(path: str | Path) -> str:
    """Lowercase hex md5 of a file."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Learnable images


def learnable_images(
    n: int, num_classes: int, *, channels: int = 1, size: int = 28, seed: int = 0, prototype_seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (n, channels, size, size) and balanced, shuffled labels int64 (n,).

    Class prototypes depend only on ``prototype_seed`` (default ``seed``), so train and test
    splits made with different ``seed`` but one ``prototype_seed`` share their classes.
    """
    proto_rng = np.random.default_rng(seed if prototype_seed is None else prototype_seed)
    prototypes = (proto_rng.random((num_classes, channels, size, size)) < 0.3).astype(np.float32)  # (K, C, S, S)
    rng = np.random.default_rng(seed + 1000)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)  # (n,)
    intensity = rng.uniform(120, 220, size=(n, 1, 1, 1)).astype(np.float32)  # (n, 1, 1, 1)
    images = prototypes[labels] * intensity  # (n, C, S, S)
    shifts = rng.integers(-1, 2, size=(n, 2))
    for i, (dy, dx) in enumerate(shifts):
        images[i] = np.roll(images[i], (int(dy), int(dx)), axis=(1, 2))
    images += rng.normal(0, 45, size=images.shape).astype(np.float32)
    return np.clip(images, 0, 255).astype(np.uint8), labels


# ---------------------------------------------------------------------------------------------
# IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """An array encoded as an IDX file (uint8, int8, int16, int32, float32, float64)."""
    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    code = codes[array.dtype.str[1:]]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as IDX; gzip-compressed (deterministically) when the name ends in ``.gz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def write_idx_dataset(
    root: str | Path, name: str = "mnist", *, n_train: int = N_TRAIN, n_test: int = N_TEST, gz: bool = True, raw: bool = True
) -> Path:
    """Write a learnable 10-class 28x28 dataset in the MNIST raw layout; return its folder."""
    folder = Path(root) / IDX_FOLDERS[name]
    seed = IDX_SEEDS[name]
    for split, n, split_seed in (("train", n_train, seed * 10), ("test", n_test, seed * 10 + 1)):
        images, labels = learnable_images(n, 10, seed=split_seed, prototype_seed=seed)
        image_name, label_name = IDX_FILES[split]
        for base, array in ((image_name, images[:, 0]), (label_name, labels.astype(np.uint8))):
            if gz:
                write_idx(folder / f"{base}.gz", array)
            if raw:
                write_idx(folder / base, array)
    return folder


# ---------------------------------------------------------------------------------------------
# CIFAR python batches, in the Python 2 pickle style of the real files


def _py2_str(data: bytes) -> bytes:
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data  # SHORT_BINSTRING
    return b"T" + struct.pack("<I", len(data)) + data  # BINSTRING


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)  # BININT2
    return b"J" + struct.pack("<i", value)  # BININT


def _py2_ndarray(array: np.ndarray) -> bytes:
    """numpy's own pickle of a uint8 array as Python 2 wrote it."""
    shape = b"".join(_py2_int(n) for n in array.shape) + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[array.ndim]
    dtype = (
        b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
        + b"(K\x01" + shape + dtype + b"\x89" + _py2_str(array.astype(np.uint8).tobytes()) + b"tb"
    )


def _py2_value(value: object) -> bytes:
    if isinstance(value, np.ndarray):
        return _py2_ndarray(value)
    if isinstance(value, (bytes, str)):
        return _py2_str(value.encode("latin-1") if isinstance(value, str) else value)
    if isinstance(value, int):
        return _py2_int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_py2_value(v) for v in value) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(_py2_value(k) + _py2_value(v) for k, v in value.items()) + b"u"
    raise TypeError(f"cannot write {type(value).__name__} in the Python 2 pickle style")


def py2_pickle(value: object) -> bytes:
    """Protocol-2 pickle of dicts/lists/str/int/uint8 arrays, as Python 2's cPickle wrote CIFAR."""
    return b"\x80\x02" + _py2_value(value) + b"."


def write_cifar(root: str | Path, variant: int = 10, *, per_batch: int = 20, seed: int = 3) -> Path:
    """Write tiny CIFAR-``variant`` python batches under ``root``; return the batch folder.

    CIFAR-10: data_batch_1..5 and test_batch with ``per_batch`` images each (100 train, 20 test).
    CIFAR-100: train (2 * 100 images) and test (100 images), every class present.
    """
    folder = Path(root) / CIFAR_FOLDERS[variant]
    folder.mkdir(parents=True, exist_ok=True)
    if variant == 10:
        names_sizes = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", per_batch)]
    else:
        names_sizes = [("train", 200), ("test", 100)]
    for i, (name, n) in enumerate(names_sizes):
        (folder / name).write_bytes(py2_pickle(cifar_batch(variant, n, seed=seed * 100 + i, prototype_seed=seed)))
    (folder / ("batches.meta" if variant == 10 else "meta")).write_bytes(py2_pickle({"label_names": ["c"] * variant}))
    return folder


def cifar_batch(variant: int, n: int, *, seed: int, prototype_seed: int) -> dict:
    """One batch dict as in the real files (data (n, 3072) uint8 + labels + names)."""
    images, labels = learnable_images(n, variant, channels=3, size=32, seed=seed, prototype_seed=prototype_seed)
    batch: dict = {"batch_label": f"batch {seed}", "data": images.reshape(n, 3 * 32 * 32)}
    if variant == 10:
        batch["labels"] = labels.tolist()
    else:
        batch["fine_labels"] = labels.tolist()
        batch["coarse_labels"] = (labels // 5).tolist()
    batch["filenames"] = [f"img_{seed}_{i}.png" for i in range(n)]
    return batch


def write_cifar_tarball(root: str | Path, variant: int, out_dir: str | Path) -> Path:
    """Pack ``root``'s CIFAR folder into ``out_dir/<canonical tarball name>`` (deterministic)."""
    source = Path(root) / CIFAR_FOLDERS[variant]
    tar_path = Path(out_dir) / CIFAR_TARBALLS[variant]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in [source, *sorted(source.iterdir())]:
            info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with (path.open("rb") if path.is_file() else io.BytesIO()) as f:
                tar.addfile(info, f if path.is_file() else None)
    tar_path.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    return tar_path


# ---------------------------------------------------------------------------------------------
# Image folder


def write_image_folder(
    root: str | Path, *, classes: tuple[str, ...] = ("cat", "dog", "eel"), per_class: int = 6,
    size_hw: tuple[int, int] = (12, 10), mode: str = "RGB", seed: int = 4,
) -> Path:
    """Write ``root/<class>/<i>.png`` images of one size; return root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=(size_hw[0], size_hw[1], channels))
        for i in range(per_class):
            pixels = np.clip(base + rng.integers(-20, 21, size=base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(root / name / f"{i:03d}.png")
    return root


def write_image_folder_dataset(root: str | Path) -> Path:
    """``root/imagefolder/{train,test}/<class>/*.png``; return ``root/imagefolder``."""
    base = Path(root) / "imagefolder"
    write_image_folder(base / "train", per_class=6, seed=4)
    write_image_folder(base / "test", per_class=2, seed=5)
    return base


# ---------------------------------------------------------------------------------------------
# Everything


def write_all(root: str | Path) -> Path:
    """Write every fixture dataset under ``root`` (the same layout as a real data root); return root."""
    root = Path(root)
    write_idx_dataset(root, "mnist")
    write_idx_dataset(root, "fashion-mnist")
    write_cifar(root, 10)
    write_cifar(root, 100)
    write_image_folder_dataset(root)
    return root


def train_outside_parm(model, x, y, *, steps: int, lr: float, seed: int = 0):  # type: ignore[no-untyped-def]
    """Train ``model`` briefly on inputs ``x`` (N, ...) and labels ``y`` (N,) with a plain Adam loop
    of its own, as a user would outside ParM; returns it in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()
