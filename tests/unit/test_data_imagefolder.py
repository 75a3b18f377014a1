"""Image-folder reader and the imagefolder:PATH dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import write_image_folder
from parm.data import load_dataset, read_image_folder
from parm.errors import ConfigError, DataError


def test_reads_classes_in_sorted_order(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=("b", "a", "c"), per_class=3, size_hw=(12, 10))
    images, labels, names = read_image_folder(tmp_path)
    assert names == ["a", "b", "c"]
    assert images.shape == (9, 3, 12, 10) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    expected = np.asarray(Image.open(tmp_path / "a" / "000.png")).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    np.testing.assert_array_equal(images[0], expected)


def test_all_grey_gives_one_channel(tmp_path: Path) -> None:
    write_image_folder(tmp_path, mode="L", per_class=2)
    images, _, _ = read_image_folder(tmp_path)
    assert images.shape[1] == 1


def test_mixed_modes_become_rgb(tmp_path: Path) -> None:
    write_image_folder(tmp_path, mode="L", per_class=2, size_hw=(8, 8))
    Image.new("RGBA", (8, 8), (10, 20, 30, 40)).save(tmp_path / "cat" / "rgba.png")
    Image.new("P", (8, 8)).save(tmp_path / "dog" / "pal.gif")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "eel" / "x.JPG")
    (tmp_path / "eel" / "notes.txt").write_text("ignored")
    images, labels, _ = read_image_folder(tmp_path)
    assert images.shape == (9, 3, 8, 8)
    assert np.bincount(labels).tolist() == [3, 3, 3]


def test_mixed_sizes_name_first_odd_file(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=2, size_hw=(12, 10))
    odd = tmp_path / "dog" / "001.png"
    Image.new("RGB", (7, 5)).save(odd)
    Image.new("RGB", (9, 9)).save(tmp_path / "eel" / "001.png")
    with pytest.raises(DataError) as err:
        read_image_folder(tmp_path)
    assert err.value.path == odd
    assert str(odd) in str(err.value) and "size=" in str(err.value)


def test_resize(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=2, size_hw=(12, 10))
    Image.new("RGB", (7, 5)).save(tmp_path / "dog" / "001.png")
    images, _, _ = read_image_folder(tmp_path, size=(6, 4))
    assert images.shape == (6, 3, 6, 4)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        read_image_folder(tmp_path)
    with pytest.raises(ConfigError, match="size"):
        read_image_folder(tmp_path, size=(0, 3))


def test_corrupt_image_named(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=1)
    bad = tmp_path / "cat" / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        read_image_folder(tmp_path)
    assert err.value.path == bad


def test_imagefolder_dataset(fixture_root: Path) -> None:
    base = fixture_root / "imagefolder"
    train = load_dataset(f"imagefolder:{base}", "train")
    test = load_dataset(f"imagefolder:{base}", "test")
    assert (len(train), len(test)) == (18, 6)
    assert train.class_names == test.class_names == ("cat", "dog", "eel")
    assert train.num_classes == 3 and train.mean == test.mean
    x = train.float_images()  # (18, 3, 12, 10)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-3, rtol=0)


def test_imagefolder_relative_to_data_root(fixture_root: Path) -> None:
    assert len(load_dataset("imagefolder:imagefolder", "test", data_root=fixture_root)) == 6


def test_imagefolder_split_mismatch(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", classes=("a", "b"), per_class=1)
    write_image_folder(tmp_path / "test", classes=("a", "c"), per_class=1)
    with pytest.raises(DataError, match="does not match"):
        load_dataset(f"imagefolder:{tmp_path}", "test")
