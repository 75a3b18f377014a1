"""IDX reader: round trips (gz and raw, every dtype) and clear errors naming the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fixtures_data import idx_bytes, write_idx
from parm.data import read_idx
from parm.errors import DataError


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_round_trip(tmp_path: Path, suffix: str, dtype: str) -> None:
    array = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"x-idx3{suffix}", array)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype).newbyteorder("=")
    assert got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable


def test_labels_1d(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l.gz", labels)), labels)


def test_gz_and_raw_fixture_agree(fixture_root: Path) -> None:
    folder = fixture_root / "MNIST" / "raw"
    gz = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    raw = read_idx(folder / "t10k-images-idx3-ubyte")
    assert gz.shape == (300, 28, 28) and gz.dtype == np.uint8
    np.testing.assert_array_equal(gz, raw)


def _assert_names(err: pytest.ExceptionInfo[DataError], path: Path, *words: str) -> None:
    assert err.value.path == path
    text = str(err.value)
    assert str(path) in text
    for word in words:
        assert word in text


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(12))
    with pytest.raises(DataError) as err:
        read_idx(path)
    _assert_names(err, path, "0x12340803", "--download")


def test_unknown_dtype_code(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(DataError) as err:
        read_idx(path)
    _assert_names(err, path, "magic")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_payload(tmp_path: Path, suffix: str) -> None:
    data = idx_bytes(np.zeros((5, 4, 4), np.uint8))[:-10]
    path = tmp_path / f"t-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(DataError) as err:
        read_idx(path)
    _assert_names(err, path, "truncated", "80 payload bytes", "found 70")


def test_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"xx")
    with pytest.raises(DataError) as err:
        read_idx(path)
    _assert_names(err, path, "longer than its header says")


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "h-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataError) as err:
        read_idx(path)
    _assert_names(err, path, "header")


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(4000, dtype=np.uint8).reshape(40, 10, 10)))[:-30])
    with pytest.raises(DataError) as err:
        read_idx(path)
    _assert_names(err, path, "cannot read")


def test_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "plain-idx1-ubyte.gz"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError) as err:
        read_idx(path)
    _assert_names(err, path)


def test_multi_member_gzip(tmp_path: Path) -> None:
    data = idx_bytes(np.arange(100, dtype=np.uint8))
    path = tmp_path / "mm-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(data[:50]) + gzip.compress(data[50:]))
    np.testing.assert_array_equal(read_idx(path), np.arange(100))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope-idx1-ubyte.gz"
    with pytest.raises(DataError) as err:
        read_idx(path)
    _assert_names(err, path, "not found", "--download", "PARM_DATA_ROOT")
