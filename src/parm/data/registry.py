"""The datasets ParM knows, and loading one split of them into memory.

A :class:`DatasetSpec` says what a dataset is (classes, image shape, normalisation) and where its
files live under the data root and on the mirrors. :func:`load_dataset` reads one split into an
:class:`ArrayDataset` (uint8 images + int64 labels as torch tensors). Files are md5-checked when
downloaded (:func:`download_dataset`) or on request (:func:`verify_dataset`), not at every load,
so loading stays fast (MNIST train from ``.gz``: ~0.25 s).

Names accepted by :func:`load_dataset`: the keys of :data:`DATASETS`, or ``imagefolder:PATH``
where ``PATH/train`` and ``PATH/test`` each hold one sub-folder per class (PATH absolute, relative
to the working folder, or else relative to the data root); its mean/std come from the train split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from parm.data.cache import resolve_cache_dir
from parm.data.cifar import CIFAR_LAYOUTS, read_cifar
from parm.data.download import RemoteFile, download_files, md5_file
from parm.data.idx import read_idx
from parm.data.imagefolder import folder_fingerprint, list_image_folder, read_image_folder_cached
from parm.data.root import resolve_data_root
from parm.errors import ConfigError, DataError, ShapeError

logger = logging.getLogger(__name__)

IMAGEFOLDER_PREFIX = "imagefolder:"
SPLITS = ("train", "test")
DatasetFormat = Literal["idx", "cifar"]
Split = Literal["train", "test"]


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is and where its files are.

    folder: the folder (relative to the data root) holding the split files.
    train_files / test_files: split files relative to ``folder``. IDX: (images, labels), each read
      from ``NAME.gz`` if present else ``NAME``. CIFAR: the python batches, in order.
    files: what :func:`download_dataset` fetches (relative to the data root, with md5s).
    mirrors: base URLs tried in order; a file's URL is ``mirror + basename``.
    derived_md5: (relative path, md5) of files made from the downloads (the decompressed IDX
      files), checked by :func:`verify_dataset` when present.
    """

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    format: DatasetFormat
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    mirrors: tuple[str, ...]
    derived_md5: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("num_classes", "channels", "height", "width"):
            _require(getattr(self, name) > 0, f"{self.name}: {name} must be > 0", name, getattr(self, name))
        _check_norm(self.name, self.channels, self.mean, self.std)
        _require(self.format in ("idx", "cifar"), f"{self.name}: format must be 'idx' or 'cifar'", "format", self.format)
        if self.format == "idx":
            ok = len(self.train_files) == 2 and len(self.test_files) == 2
            _require(ok, f"{self.name}: IDX splits need (images, labels) files", "train_files", self.train_files)
        _require(bool(self.files), f"{self.name}: a dataset spec needs files to download", "files", self.files)
        _require(bool(self.mirrors), f"{self.name}: a dataset spec needs at least one mirror", "mirrors", self.mirrors)

    def split_files(self, split: str) -> tuple[str, ...]:
        return {"train": self.train_files, "test": self.test_files}[_check_split(split)]


def _require(ok: bool, what: str, field_name: str, value: object) -> None:
    """Raise ConfigError('<what>; got <field>=<value>') unless ok."""
    if not ok:
        raise ConfigError(f"{what}; got {field_name}={value!r}", field=field_name, value=value)


def _check_norm(name: str, channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    both = len(mean) == channels and len(std) == channels
    _require(both, f"{name}: mean and std need one value per channel ({channels}); std={std}", "mean", mean)
    _require(all(s > 0 for s in std), f"{name}: std must be > 0 per channel", "std", std)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split must be 'train' or 'test'; got split={split!r}", field="split", value=split)
    return split


# ---------------------------------------------------------------------------------------------
# The known datasets

_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_spec(
    name: str,
    folder: str,
    gz_md5: dict[str, str],
    raw_md5: dict[str, str],
    mirrors: tuple[str, ...],
    mean: float,
    std: float,
) -> DatasetSpec:
    files = tuple(
        RemoteFile(path=f"{folder}/{base}.gz", md5=md5, provides=(f"{folder}/{base}",))
        for base, md5 in gz_md5.items()
    )
    return DatasetSpec(
        name=name, num_classes=10, channels=1, height=28, width=28, mean=(mean,), std=(std,), format="idx",
        folder=folder, train_files=_IDX_NAMES["train"], test_files=_IDX_NAMES["test"], files=files, mirrors=mirrors,
        derived_md5=tuple((f"{folder}/{base}", md5) for base, md5 in raw_md5.items()),
    )


def _cifar_spec(
    name: str, variant: int, tarball: str, md5: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> DatasetSpec:
    layout = CIFAR_LAYOUTS[variant]
    members = tuple(f"{layout.folder}/{f}" for f in (*layout.train_files, *layout.test_files))
    return DatasetSpec(
        name=name, num_classes=variant, channels=3, height=32, width=32, mean=mean, std=std, format="cifar",
        folder=layout.folder, train_files=layout.train_files, test_files=layout.test_files,
        files=(RemoteFile(path=tarball, md5=md5, provides=members, extract=True),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
    )


DATASETS: dict[str, DatasetSpec] = {
    "mnist": _idx_spec(
        "mnist", "MNIST/raw",
        gz_md5={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        raw_md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        mean=0.1307, std=0.3081,
    ),
    "fashion-mnist": _idx_spec(
        "fashion-mnist", "FashionMNIST/raw",
        gz_md5={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        raw_md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        mean=0.2860, std=0.3530,
    ),
    "cifar10": _cifar_spec(
        "cifar10", 10, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _cifar_spec(
        "cifar100", 100, "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    ),
}


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The spec of a known dataset (a DatasetSpec is passed through)."""
    if isinstance(name, DatasetSpec):
        return name
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise ConfigError(
            f"unknown dataset {name!r}; known: {known}, or imagefolder:PATH", field="dataset", value=name
        )
    return DATASETS[name]


# ---------------------------------------------------------------------------------------------
# In-memory dataset


@dataclass(frozen=True)
class ArrayDataset:
    """One split in memory. images: uint8 (N, C, H, W); labels: int64 (N,) in [0, num_classes).

    mean/std (one value per channel, on the 0..1 scale) normalise :meth:`float_images`.
    class_names is optional (empty for the built-in datasets).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        self._check_tensors()
        _require(self.num_classes > 0, f"{self.name}: num_classes must be > 0", "num_classes", self.num_classes)
        _check_norm(self.name, self.images.shape[1], self.mean, self.std)
        self._check_label_range()
        names_ok = not self.class_names or len(self.class_names) == self.num_classes
        _require(names_ok, f"{self.name}: need num_classes={self.num_classes} class names", "class_names", self.class_names)

    def _check_tensors(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.dim() != 4:
            got = (images.dtype, tuple(images.shape))
            want = "uint8 (N, C, H, W)"
            raise ShapeError(f"{self.name}: images must be {want}; got {got}", expected=want, got=got)
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            got, n = (labels.dtype, tuple(labels.shape)), images.shape[0]
            want = f"int64 ({n},)"
            raise ShapeError(f"{self.name}: labels must be {want} like images (N={n}); got {got}", expected=want, got=got)

    def _check_label_range(self) -> None:
        if len(self.labels) == 0:
            return
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= self.num_classes:
            raise DataError(
                f"{self.name}: labels must lie in [0, {self.num_classes}); found [{low}, {high}]. "
                "Check the label file or num_classes."
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        _, c, h, w = self.images.shape
        return c, h, w

    def prepared_for(self, in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float], *,
                     model: str) -> ArrayDataset:
        """This split as the model named ``model`` expects its inputs: the same images, normalised
        with the model's own ``mean``/``std`` (its checkpoint record's, not the dataset's). Images of
        another shape than the model's ``in_shape`` (C, H, W) are an error naming both."""
        want = tuple(int(v) for v in in_shape)
        if self.image_shape != want:
            raise ShapeError(
                f"{self.name} images are {_shape_text(self.image_shape)} but {model} takes inputs of "
                f"{_shape_text(want)}; use a dataset whose images fit the model (channels and size)",
                expected=want, got=self.image_shape)
        mean_t, std_t = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        _check_norm(f"{model} (its record)", self.image_shape[0], mean_t, std_t)
        return dataclasses.replace(self, mean=mean_t, std=std_t)

    def float_images(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Images (all, or ``self.images[index]``) as float32 (n, C, H, W), normalised (x/255 - mean)/std."""
        x = self.images if index is None else self.images[index]  # (n, C, H, W) uint8
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        return x.to(torch.float32).div_(255.0).sub_(mean).div_(std)  # (n, C, H, W)


def _shape_text(shape: Sequence[int]) -> str:
    if len(shape) != 3:
        return "shape " + "x".join(str(v) for v in shape)
    c, h, w = shape
    return f"{c} channel{'s' if c != 1 else ''} of {h}x{w}"


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(name: str, split: Split, *, data_root: str | Path | None = None, download: bool = False) -> ArrayDataset:
    """Load one split of a dataset (a key of DATASETS or ``imagefolder:PATH``).

    Missing files raise DataError naming the file and the folder searched, unless ``download``
    is true, in which case :func:`download_dataset` fetches them first.
    """
    _check_split(split)
    if name.startswith(IMAGEFOLDER_PREFIX):
        return _load_image_folder(name, split, data_root)
    spec = get_spec(name)
    root = resolve_data_root(data_root)
    missing = _missing(spec, root, split)
    if missing and download:
        download_dataset(spec, root)
        missing = _missing(spec, root, split)
    if missing:
        raise _missing_error(spec, root, split, missing)
    images, labels = _read_split(spec, root, split)
    _check_shape(spec, images, root / spec.folder)
    logger.info("loaded %s %s: %d images from %s", spec.name, split, len(labels), root / spec.folder)
    return ArrayDataset(
        name=spec.name, images=torch.from_numpy(images), labels=torch.from_numpy(labels),
        num_classes=spec.num_classes, mean=spec.mean, std=spec.std,
    )


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.exists():
            return candidate
    return None


def _missing(spec: DatasetSpec, root: Path, split: str) -> list[str]:
    folder = root / spec.folder
    if spec.format == "idx":
        return [n for n in spec.split_files(split) if _idx_file(folder, n) is None]
    return [n for n in spec.split_files(split) if not (folder / n).exists()]


def _missing_error(spec: DatasetSpec, root: Path, split: str, missing: list[str]) -> DataError:
    folder = root / spec.folder
    looked = " (as NAME.gz or NAME)" if spec.format == "idx" else ""
    return DataError(
        f"{spec.name} {split} split: missing {', '.join(missing)}{looked} in {folder}. Run again with --download "
        f"(download=True) to fetch it, or pass --data-root DIR / set PARM_DATA_ROOT to a folder that holds {spec.folder}/.",
        path=folder / missing[0],
    )


def _read_split(spec: DatasetSpec, root: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 (N, C, H, W), labels int64 (N,)."""
    folder = root / spec.folder
    if spec.format == "cifar":
        return read_cifar(folder, split, 100 if spec.num_classes == 100 else 10)
    image_name, label_name = spec.split_files(split)
    image_file, label_file = _idx_file(folder, image_name), _idx_file(folder, label_name)
    assert image_file is not None and label_file is not None  # load_dataset checked _missing() first
    images = read_idx(image_file)  # (N, H, W)
    labels = read_idx(label_file)  # (N,)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{folder}: {image_name} has shape {images.shape} and {label_name} has {labels.shape}; expected "
            "(N, H, W) images and (N,) labels of the same N. Delete the files and run again with --download.",
            path=folder / image_name,
        )
    return images[:, None], labels.astype(np.int64)  # (N, H, W) -> (N, 1, H, W)


def _check_shape(spec: DatasetSpec, images: np.ndarray, folder: Path) -> None:
    expected = (spec.channels, spec.height, spec.width)
    if images.shape[1:] != expected:
        raise DataError(
            f"{spec.name} images in {folder} have shape {images.shape[1:]}, expected {expected}. "
            "The files belong to another dataset or are damaged: check --data-root, or delete them and re-download.",
            path=folder,
        )


def _load_image_folder(name: str, split: str, data_root: str | Path | None) -> ArrayDataset:
    """One split of ``imagefolder:PATH``, decoded once (:func:`read_image_folder_cached`); a test
    split never decodes the training split: class names come from the train folder's listing.
    mean/std are the loaded split's own (models use their checkpoint record's)."""
    base = _image_folder_base(name[len(IMAGEFOLDER_PREFIX):], data_root)
    images, labels, class_names, (mean, std) = read_image_folder_cached(base / split, decoded_cache_dir())
    if split != "train":
        train_names = list_image_folder(base / "train")[0]
        if class_names != train_names:
            raise DataError(
                f"{base / split} does not match {base / 'train'}: classes {class_names} vs {train_names}. Both "
                "splits need the same class folders.", path=base / split)
    return ArrayDataset(
        name=f"{IMAGEFOLDER_PREFIX}{base}", images=torch.from_numpy(images), labels=torch.from_numpy(labels),
        num_classes=len(class_names), mean=mean, std=std, class_names=tuple(class_names),
    )


def decoded_cache_dir() -> Path | None:
    """Where decoded image folders are kept: ``decoded/`` in the cache directory
    (:func:`parm.data.cache.resolve_cache_dir`); None when ``PARM_DECODE_CACHE=0``."""
    if os.environ.get("PARM_DECODE_CACHE", "1") == "0":
        return None
    return resolve_cache_dir() / "decoded"


def dataset_identity(name: str, data_root: str | Path | None = None) -> tuple[str, str]:
    """(portable name, content fingerprint) of a dataset: built-in names as they are, with no
    fingerprint; ``imagefolder:PATH`` with PATH relative to the data root where it lies under it
    (else as given), and the fingerprint of its train and test folders' file names and sizes."""
    if not name.startswith(IMAGEFOLDER_PREFIX):
        return name, ""
    base = _image_folder_base(name[len(IMAGEFOLDER_PREFIX):], data_root).resolve()
    root = resolve_data_root(data_root).resolve()
    shown = base.relative_to(root).as_posix() if base.is_relative_to(root) else str(base)
    digest = hashlib.sha256()
    for split in ("train", "test"):
        if (base / split).is_dir():
            digest.update(f"{split}:{folder_fingerprint(base / split)}\n".encode())
    return f"{IMAGEFOLDER_PREFIX}{shown}", digest.hexdigest()


def _image_folder_base(path_text: str, data_root: str | Path | None) -> Path:
    """PATH as given (absolute or relative to the working folder), else relative to the data root."""
    if not path_text:
        raise ConfigError("imagefolder needs a path: imagefolder:PATH", field="dataset", value=IMAGEFOLDER_PREFIX)
    path = Path(path_text).expanduser()
    if path.is_absolute() or path.exists():
        return path
    under_root = resolve_data_root(data_root) / path
    return under_root if under_root.exists() else path


# ---------------------------------------------------------------------------------------------
# Download and verification


def download_dataset(
    name: str | DatasetSpec,
    data_root: str | Path | None = None,
    *,
    mirrors: list[str] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Fetch the dataset's missing files (md5-checked) and return the data root.

    ``mirrors`` replaces the spec's mirror list (tried in order). ``timeout_s`` bounds each network
    wait (connect, each read), not the whole download. Files already present are md5-checked and a
    mismatch raises ChecksumError (they are left untouched). See :mod:`parm.data.download`.
    """
    spec = get_spec(name)
    root = resolve_data_root(data_root)
    download_files(spec.files, root, tuple(mirrors) if mirrors is not None else spec.mirrors, timeout_s)
    return root


def verify_dataset(name: str | DatasetSpec, data_root: str | Path | None = None) -> list[tuple[Path, bool]]:
    """md5-check a dataset's files on disk: a list of (path, ok).

    Every file with a known md5 (downloads and decompressed IDX files) that exists is checked.
    A download that is absent while its content is also absent is listed as not ok; one that
    is absent but whose decompressed or extracted content is present is not listed.
    """
    spec = get_spec(name)
    root = resolve_data_root(data_root)
    results: list[tuple[Path, bool]] = []
    for remote in spec.files:
        path = root / remote.path
        if path.exists():
            results.append((path, md5_file(path) == remote.md5))
        elif not (remote.provides and all((root / p).exists() for p in remote.provides)):
            results.append((path, False))
    for rel, md5 in spec.derived_md5:
        if (root / rel).exists():
            results.append((root / rel, md5_file(root / rel) == md5))
    for path, ok in results:
        logger.info("verify %s: %s", path, "ok" if ok else "MISSING" if not path.exists() else "BAD md5")
    return results


# ---------------------------------------------------------------------------------------------
# Splitting


def train_val_split(
    n: int, val_size: int = 5000, seed: int = 0, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split range(n) into (train index, val index), both sorted int64, disjoint, covering range(n).

    The permutation comes from ``generator`` if given, else from ``torch.Generator().manual_seed(seed)``,
    so the same (n, val_size, seed) always gives the same split.
    """
    if n <= 0:
        raise ConfigError(f"cannot split an empty dataset; got n={n}", field="n", value=n)
    if not 0 <= val_size < n:
        raise ConfigError(
            f"val_size must be in [0, n) so that training keeps at least one sample; got val_size={val_size}, n={n}. "
            "Pass a smaller val_size (CLI: --val-size).",
            field="val_size",
            value=val_size,
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)  # (n,)
    return perm[val_size:].sort().values, perm[:val_size].sort().values  # (n - val_size,), (val_size,)
