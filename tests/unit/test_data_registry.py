"""Dataset specs, ArrayDataset, load_dataset, verify_dataset, train_val_split."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from fixtures_data import md5_file
from parm.data import DATASETS, ArrayDataset, load_dataset, train_val_split, verify_dataset
from parm.errors import ConfigError, DataError, ShapeError

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --- specs ------------------------------------------------------------------------------------


def test_known_datasets() -> None:
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10", "cifar100"}
    mnist = DATASETS["mnist"]
    assert (mnist.num_classes, mnist.channels, mnist.height, mnist.width) == (10, 1, 28, 28)
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)
    assert mnist.mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert {f.path for f in mnist.files} >= {"MNIST/raw/train-images-idx3-ubyte.gz"}
    assert DATASETS["fashion-mnist"].folder == "FashionMNIST/raw"
    cifar = DATASETS["cifar10"]
    assert cifar.files[0].path == "cifar-10-python.tar.gz" and cifar.files[0].md5 == "c58f30108f718f92721af3b95e74349a"
    assert cifar.files[0].extract and cifar.channels == 3 and len(cifar.mean) == 3
    assert DATASETS["cifar100"].files[0].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert DATASETS["cifar100"].num_classes == 100


def test_spec_validation() -> None:
    with pytest.raises(ConfigError, match="one value per channel"):
        dataclasses.replace(DATASETS["mnist"], mean=(0.1, 0.2))
    with pytest.raises(ConfigError, match="std must be > 0"):
        dataclasses.replace(DATASETS["mnist"], std=(0.0,))
    with pytest.raises(ConfigError, match="format"):
        dataclasses.replace(DATASETS["mnist"], format="zip")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASETS["mnist"].name = "x"  # type: ignore[misc]


# --- ArrayDataset -----------------------------------------------------------------------------


def _tiny(**overrides: object) -> ArrayDataset:
    fields = dict(
        name="tiny", images=torch.arange(2 * 2 * 2 * 3, dtype=torch.uint8).view(2, 2, 2, 3),
        labels=torch.tensor([0, 2]), num_classes=3, mean=(0.5, 0.25), std=(0.5, 2.0),
    )
    fields.update(overrides)
    return ArrayDataset(**fields)  # type: ignore[arg-type]


def test_float_images_normalised() -> None:
    ds = _tiny()
    x = ds.float_images()  # (2, 2, 2, 3)
    mean, std = torch.tensor([0.5, 0.25]).view(1, 2, 1, 1), torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    expected = (ds.images.float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    assert x.dtype == torch.float32
    torch.testing.assert_close(ds.float_images(torch.tensor([1])), expected[1:])
    assert len(ds) == 2 and ds.image_shape == (2, 2, 3)
    assert ds.images.dtype == torch.uint8  # not modified in place


@pytest.mark.parametrize(
    ("overrides", "error", "words"),
    [
        ({"labels": torch.tensor([0, 1, 2])}, ShapeError, "N=2"),
        ({"labels": torch.tensor([0, 1], dtype=torch.int32)}, ShapeError, "int64"),
        ({"images": torch.zeros(2, 2, 2, 3)}, ShapeError, "uint8"),
        ({"labels": torch.tensor([0, 3])}, DataError, "[0, 3)"),
        ({"labels": torch.tensor([-1, 0])}, DataError, "[-1, 0]"),
        ({"mean": (0.5,)}, ConfigError, "one value per channel"),
        ({"num_classes": 0}, ConfigError, "num_classes"),
    ],
)
def test_array_dataset_validation(overrides: dict, error: type, words: str) -> None:
    with pytest.raises(error) as err:
        _tiny(**overrides)
    assert words in str(err.value)


# --- load_dataset -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_idx_fixture(fixture_root: Path, name: str) -> None:
    train = load_dataset(name, "train", data_root=fixture_root)
    test = load_dataset(name, "test", data_root=fixture_root)
    assert (len(train), len(test)) == (1200, 300)
    assert train.images.shape == (1200, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.bincount().tolist() == [120] * 10
    assert train.mean == DATASETS[name].mean and train.num_classes == 10


@pytest.mark.parametrize("keep", [".gz", "raw"])
def test_load_accepts_gz_or_raw(fixture_root: Path, tmp_path: Path, keep: str) -> None:
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for f in (fixture_root / "MNIST" / "raw").iterdir():
        if (f.suffix == ".gz") == (keep == ".gz"):
            shutil.copy(f, folder / f.name)
    ds = load_dataset("mnist", "test", data_root=tmp_path)
    torch.testing.assert_close(ds.images, load_dataset("mnist", "test", data_root=fixture_root).images)


@pytest.mark.parametrize(("name", "n_train", "n_test"), [("cifar10", 100, 20), ("cifar100", 200, 100)])
def test_load_cifar_fixture(fixture_root: Path, name: str, n_train: int, n_test: int) -> None:
    train = load_dataset(name, "train", data_root=fixture_root)
    test = load_dataset(name, "test", data_root=fixture_root)
    assert (len(train), len(test)) == (n_train, n_test)
    assert train.image_shape == (3, 32, 32) and train.num_classes == DATASETS[name].num_classes


def test_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "test", data_root=tmp_path)
    text = str(err.value)
    for words in ("t10k-images-idx3-ubyte", str(tmp_path / "MNIST" / "raw"), "--download", "--data-root", "PARM_DATA_ROOT"):
        assert words in text
    assert err.value.path == tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"


def test_mismatched_counts(fixture_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "MNIST" / "raw"
    shutil.copytree(fixture_root / "MNIST" / "raw", folder)
    for f in folder.glob("t10k-labels*"):
        f.unlink()
    shutil.copy(fixture_root / "MNIST" / "raw" / "train-labels-idx1-ubyte", folder / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="same N"):
        load_dataset("mnist", "test", data_root=tmp_path)


def test_bad_name_and_split(fixture_root: Path) -> None:
    with pytest.raises(ConfigError, match="known: cifar10, cifar100, fashion-mnist, mnist"):
        load_dataset("svhn", "test", data_root=fixture_root)
    with pytest.raises(ConfigError, match="split"):
        load_dataset("mnist", "val", data_root=fixture_root)  # type: ignore[arg-type]


def test_data_root_loads(data_root: Path) -> None:
    """Runs on real data when PARM_DATA_ROOT is set, else on the fixtures."""
    ds = load_dataset("mnist", "test", data_root=data_root)
    assert ds.image_shape == (1, 28, 28) and len(ds) in (300, 10_000)


def test_real_mnist_test_split(real_data_root: Path | None) -> None:
    if real_data_root is None:
        pytest.skip("PARM_DATA_ROOT is not set: the real-MNIST check needs it (e.g. PARM_DATA_ROOT=/work/shared/data)")
    ds = load_dataset("mnist", "test", data_root=real_data_root)
    assert len(ds) == 10_000 and ds.images.shape == (10_000, 1, 28, 28)
    assert ds.labels.bincount().tolist() == MNIST_TEST_COUNTS


def test_fixture_is_learnable(fixture_root: Path) -> None:
    """A tiny MLP beats 80% on the generated MNIST-layout data (training code relies on this)."""
    torch.manual_seed(0)
    train = load_dataset("mnist", "train", data_root=fixture_root)
    test = load_dataset("mnist", "test", data_root=fixture_root)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = train.float_images(), train.labels  # (1200, 1, 28, 28), (1200,)
    for _ in range(2):
        for batch in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(test.float_images()).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.8


# --- verify_dataset ---------------------------------------------------------------------------


def test_verify_dataset(fixture_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "MNIST" / "raw"
    shutil.copytree(fixture_root / "MNIST" / "raw", folder)
    files = tuple(dataclasses.replace(f, md5=md5_file(tmp_path / f.path)) for f in DATASETS["mnist"].files)
    spec = dataclasses.replace(DATASETS["mnist"], files=files)
    results = dict(verify_dataset(spec, tmp_path))
    assert all(results[tmp_path / f.path] for f in files)
    assert results[folder / "t10k-images-idx3-ubyte"] is False  # raw files checked against the real md5s
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"damaged")
    assert dict(verify_dataset(spec, tmp_path))[folder / "t10k-labels-idx1-ubyte.gz"] is False


def test_verify_reports_missing(tmp_path: Path) -> None:
    results = verify_dataset("cifar10", tmp_path)
    assert results == [(tmp_path / "cifar-10-python.tar.gz", False)]


def test_verify_real_mnist(real_data_root: Path | None) -> None:
    if real_data_root is None:
        pytest.skip("PARM_DATA_ROOT is not set: checking real md5s needs it")
    results = verify_dataset("mnist", real_data_root)
    assert len(results) == 8 and all(ok for _, ok in results)


# --- train_val_split --------------------------------------------------------------------------


def test_split_deterministic_disjoint_complete() -> None:
    train, val = train_val_split(1000, val_size=100, seed=7)
    again_train, again_val = train_val_split(1000, val_size=100, seed=7)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert (len(train), len(val)) == (900, 100)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))
    assert not torch.equal(val, train_val_split(1000, val_size=100, seed=8)[1])


def test_split_with_generator() -> None:
    first = train_val_split(50, val_size=10, generator=torch.Generator().manual_seed(3))
    second = train_val_split(50, val_size=10, seed=3)
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize(("n", "val_size"), [(100, 100), (100, 200), (100, -1), (0, 0)])
def test_split_bad_sizes(n: int, val_size: int) -> None:
    with pytest.raises(ConfigError) as err:
        train_val_split(n, val_size=val_size)
    assert str(n) in str(err.value)
