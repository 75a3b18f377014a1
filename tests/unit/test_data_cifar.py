"""CIFAR python batches: read without running pickle; errors name the file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fixtures_data import cifar_batch, py2_pickle, write_cifar
from parm.data import read_cifar
from parm.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("variant", "split", "n"), [(10, "train", 100), (10, "test", 20), (100, "train", 200), (100, "test", 100)]
)
def test_reads_fixture(fixture_root: Path, variant: int, split: str, n: int) -> None:
    folder = fixture_root / ("cifar-10-batches-py" if variant == 10 else "cifar-100-python")
    images, labels = read_cifar(folder, split, variant)
    assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < variant


def test_accepts_data_root_and_keeps_order(fixture_root: Path) -> None:
    images, labels = read_cifar(fixture_root, "train", 10)
    batch = cifar_batch(10, 20, seed=300, prototype_seed=3)  # data_batch_1 of the fixture
    np.testing.assert_array_equal(images[:20].reshape(20, -1), batch["data"])  # (20, 3, 32, 32) -> (20, 3072)
    np.testing.assert_array_equal(labels[:20], batch["labels"])
    assert images.flags.writeable


def test_channel_major_layout(tmp_path: Path) -> None:
    batch = cifar_batch(10, 2, seed=0, prototype_seed=0)
    batch["data"][:] = 0
    batch["data"][0, 1024:2048] = 7  # the second 32x32 plane is the green channel
    write_cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(py2_pickle(batch))
    images, _ = read_cifar(tmp_path, "test", 10)
    assert (images[0, 1] == 7).all() and (images[0, 0] == 0).all() and (images[0, 2] == 0).all()


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_python3_pickles(tmp_path: Path, protocol: int) -> None:
    batch = cifar_batch(100, 5, seed=1, prototype_seed=1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(pickle.dumps(batch, protocol=protocol))
    images, labels = read_cifar(folder, "test", 100)
    np.testing.assert_array_equal(images.reshape(5, -1), batch["data"])
    np.testing.assert_array_equal(labels, batch["fine_labels"])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    path = folder / "test_batch"
    path.write_bytes(pickle.dumps({"data": _Evil(marker), "labels": [0]}, protocol=protocol))
    with pytest.raises(DataError) as err:
        read_cifar(folder, "test", 10)
    assert err.value.path == path
    assert "system" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_missing_batch_names_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_cifar(tmp_path / "cifar-10-batches-py", "train", 10)
    assert err.value.path == tmp_path / "cifar-10-batches-py" / "data_batch_1"
    assert "--download" in str(err.value)


def test_wrong_label_key(tmp_path: Path) -> None:
    batch = cifar_batch(10, 3, seed=0, prototype_seed=0)  # CIFAR-10 keys, read as CIFAR-100
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(py2_pickle(batch))
    with pytest.raises(DataError, match="fine_labels"):
        read_cifar(folder, "test", 100)


@pytest.mark.parametrize("content", [b"", b"not a pickle", py2_pickle([1, 2]), py2_pickle({"data": [1], "labels": [0]})])
def test_garbage_is_data_error(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DataError) as err:
        read_cifar(folder, "test", 10)
    assert err.value.path == folder / "test_batch"


def test_bad_arguments(fixture_root: Path) -> None:
    with pytest.raises(ConfigError, match="variant"):
        read_cifar(fixture_root, "test", 20)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="split"):
        read_cifar(fixture_root, "val", 10)  # type: ignore[arg-type]
