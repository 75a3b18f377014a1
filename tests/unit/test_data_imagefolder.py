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
    assert train.num_classes == 3 and train.mean != test.mean  # each split's own statistics
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


def test_a_folder_is_decoded_once_and_a_changed_file_is_decoded_again(tmp_path: Path, monkeypatch) -> None:
    """The second read of the same files comes from the decoded cache, without opening any image;
    rewriting one image (new size and time) makes the next read decode the folder again."""
    import os

    from parm.data import imagefolder

    write_image_folder(tmp_path / "data", per_class=3)
    cache = tmp_path / "cache"
    first = imagefolder.read_image_folder_cached(tmp_path / "data", cache)
    assert len(list(cache.glob("*.json"))) == 1 and len(list(cache.glob("*.npy"))) == 2
    opened = []
    real_open = imagefolder._open
    monkeypatch.setattr(imagefolder, "_open", lambda path: opened.append(path) or real_open(path))
    again = imagefolder.read_image_folder_cached(tmp_path / "data", cache)
    assert opened == [] and np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and first[3] == again[3]  # class names and statistics kept too
    victim = sorted((tmp_path / "data" / "cat").iterdir())[0]
    Image.new("RGB", (10, 12), (255, 0, 0)).save(victim)
    os.utime(victim, ns=(1, 1))
    changed = imagefolder.read_image_folder_cached(tmp_path / "data", cache)
    assert len(opened) == len(first[1]) and not np.array_equal(first[0], changed[0])
    for entry in cache.glob("*.npy"):  # a damaged entry is decoded again
        entry.write_bytes(b"garbage")
    assert np.array_equal(imagefolder.read_image_folder_cached(tmp_path / "data", cache)[0], changed[0])


def test_the_test_split_loads_without_decoding_the_training_split(fixture_root: Path, monkeypatch) -> None:
    from parm.data import imagefolder

    base = fixture_root / "imagefolder"
    monkeypatch.setenv("PARM_DECODE_CACHE", "0")
    decoded = []
    real = imagefolder.read_image_folder
    monkeypatch.setattr(imagefolder, "read_image_folder", lambda root, **kw: decoded.append(Path(root).name) or real(root, **kw))
    load_dataset(f"imagefolder:{base}", "test")
    assert decoded == ["test"]


def test_channel_stats_in_chunks_equal_the_whole_computation() -> None:
    from parm.data.imagefolder import channel_stats

    images = np.random.default_rng(0).integers(0, 256, size=(1000, 3, 8, 8), dtype=np.uint8)
    mean, std = channel_stats(images, chunk=77)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-6)


def test_a_copied_or_moved_folder_keeps_its_identity_and_an_edit_changes_it(tmp_path: Path) -> None:
    import shutil

    from parm.data.registry import dataset_identity

    write_image_folder(tmp_path / "root" / "shapes" / "train", per_class=2)
    write_image_folder(tmp_path / "root" / "shapes" / "test", per_class=1)
    name, fingerprint = dataset_identity("imagefolder:shapes", data_root=tmp_path / "root")
    assert name == "imagefolder:shapes" and len(fingerprint) == 64  # relative to the data root: portable
    shutil.copytree(tmp_path / "root", tmp_path / "elsewhere")  # new modification times
    assert dataset_identity("imagefolder:shapes", data_root=tmp_path / "elsewhere") == (name, fingerprint)
    outside = dataset_identity(f"imagefolder:{tmp_path / 'elsewhere' / 'shapes'}", data_root=tmp_path / "root")
    assert outside[1] == fingerprint and outside[0].endswith("elsewhere/shapes")
    (tmp_path / "elsewhere" / "shapes" / "test" / "cat" / "extra.png").write_bytes(
        (tmp_path / "root" / "shapes" / "test" / "cat").iterdir().__next__().read_bytes())
    assert dataset_identity("imagefolder:shapes", data_root=tmp_path / "elsewhere")[1] != fingerprint
    assert dataset_identity("mnist") == ("mnist", "")
