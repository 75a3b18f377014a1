"""The whole training story through the real CLI in real processes: train-base -> train-parity -> eval.

Uses the real MNIST files when PARM_DATA_ROOT is set, generated IDX fixtures otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EVAL_KEYS = {"dataset", "model", "k", "encoder", "available_top1", "degraded_top1", "degraded_top5",
             "reconstruction_top1", "default_top1", "num_test_groups"}


def parm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parm.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    work = tmp_path_factory.mktemp("pipeline")
    result = parm("train-base", "--dataset", "mnist", "--model", "mlp", "--out", work / "base", "--epochs", "2",
                  "--val-size", "200", "--data-root", data_root, "--no-progress", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "test accuracy (A_a)" in result.stdout
    return work


def test_train_parity_and_eval(trained: Path, data_root: Path) -> None:
    for k, encoder in ((2, "add"), (4, "concat"), (8, "tiles")):
        result = parm("train-parity", "--base", trained / "base", "--k", k, "--encoder", encoder,
                      "--out", trained / f"k{k}-{encoder}", "--epochs", "2", "--data-root", data_root,
                      "--no-progress", cwd=trained)
        assert result.returncode == 0, result.stderr
    result = parm("eval", "--base", trained / "base", "--parity", trained / "k2-add", "--json", trained / "out.json",
                  "--data-root", data_root, cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "degraded_top1" in result.stdout
    out = json.loads((trained / "out.json").read_text())
    assert EVAL_KEYS <= set(out)
    assert out["dataset"] == "mnist" and out["model"] == "mlp" and out["k"] == 2 and out["encoder"] == "add"
    assert out["available_top1"] > 0.8
    assert out["default_top1"] < out["degraded_top1"] <= out["degraded_top5"] <= 1.0
    assert out["num_test_groups"] == out["num_test_samples"] // 2
    both = parm("eval", "--base", trained / "base", "--parity", trained / "k2-add", trained / "k4-concat",
                "--json", trained / "both.json", "--data-root", data_root, cwd=trained)
    assert both.returncode == 0, both.stderr
    rows = json.loads((trained / "both.json").read_text())["results"]
    assert [(r["k"], r["encoder"]) for r in rows] == [(2, "add"), (4, "concat")]
    tiles = parm("eval", "--base", trained / "base", "--parity", trained / "k8-tiles", "--pairing", "consecutive",
                 "--json", trained / "tiles.json", "--data-root", data_root, cwd=trained)
    assert tiles.returncode == 0, tiles.stderr
    out = json.loads((trained / "tiles.json").read_text())
    record = json.loads((trained / "k8-tiles" / "record.json").read_text())
    assert (out["k"], out["encoder"], out["pairing"], record["arch"]) == (8, "tiles", "consecutive", "tile-mlp")
    assert out["default_top1"] < out["degraded_top1"]  # two epochs of the tile MLP already beat a constant


def test_rerun_resumes_instead_of_restarting(trained: Path, data_root: Path) -> None:
    args = ["train-parity", "--base", trained / "base", "--k", "3", "--out", trained / "k3", "--epochs", "2",
            "--data-root", data_root, "--no-progress", "-v"]
    assert parm(*args, cwd=trained).returncode == 0
    again = parm(*args, cwd=trained)
    assert again.returncode == 0 and "resuming" in again.stderr
    other = parm(*args[:-4], "--epochs", "3", "--data-root", data_root, cwd=trained)
    assert other.returncode == 1 and "epochs" in other.stderr and "another --out" in other.stderr


def test_parity_of_another_base_is_refused(trained: Path, data_root: Path, tmp_path: Path) -> None:
    other = parm("train-base", "--dataset", "mnist", "--model", "mlp", "--out", tmp_path / "base2", "--epochs", "1",
                 "--seed", "7", "--val-size", "200", "--data-root", data_root, "--no-progress", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    if not (trained / "k2-add" / "record.json").exists():
        pytest.fail("test_train_parity_and_eval must run first in this module")
    result = parm("eval", "--base", tmp_path / "base2", "--parity", trained / "k2-add", "--data-root", data_root,
                  cwd=tmp_path)
    assert result.returncode == 1
    assert "base_sha256" not in result.stdout and "trained for base weights" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [(["--k", "1"], "k must be an integer >= 2"),
     (["--k", "5", "--r", "2", "--encoder", "concat"], "concat encoder supports r=1 only"),
     (["--k", "2", "--encoder", "xor"], "unknown encoder 'xor'")],
)
def test_bad_code_arguments(trained: Path, args: list[str], message: str) -> None:
    result = parm("train-parity", "--base", trained / "base", "--out", trained / "bad", *args, cwd=trained)
    assert result.returncode == 2 and message in result.stderr
    assert not (trained / "bad").exists()


def test_missing_and_corrupt_data_files(tmp_path: Path, fixture_root: Path) -> None:
    empty = parm("train-base", "--dataset", "mnist", "--model", "mlp", "--out", tmp_path / "b",
                 "--data-root", tmp_path / "nowhere", cwd=tmp_path)
    assert empty.returncode == 1 and "--download" in empty.stderr and "train-images-idx3-ubyte" in empty.stderr
    corrupt = tmp_path / "corrupt" / "MNIST" / "raw"
    corrupt.mkdir(parents=True)
    for f in (fixture_root / "MNIST" / "raw").iterdir():
        if not f.name.endswith(".gz"):
            (corrupt / f.name).write_bytes(f.read_bytes()[:-100] if "train-images" in f.name else f.read_bytes())
    result = parm("train-base", "--dataset", "mnist", "--model", "mlp", "--out", tmp_path / "b",
                  "--data-root", tmp_path / "corrupt", cwd=tmp_path)
    assert result.returncode == 1 and "train-images-idx3-ubyte" in result.stderr
    assert not (tmp_path / "b" / "record.json").exists()


def test_nan_loss_stops_with_clear_error(trained: Path, data_root: Path, tmp_path: Path) -> None:
    (tmp_path / "nan_models.py").write_text(textwrap.dedent("""
        import torch
        class Exploding(torch.nn.Module):
            def __init__(self, in_shape, num_classes):
                super().__init__()
                self.lin = torch.nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes)
            def forward(self, x):
                return self.lin(x.flatten(1)) * float("nan")
        def exploding(in_shape, num_classes):
            return Exploding(in_shape, num_classes)
    """))
    result = parm("train-parity", "--base", trained / "base", "--k", "2", "--arch", "nan_models:exploding",
                  "--init", "scratch", "--out", tmp_path / "nan", "--epochs", "2", "--data-root", data_root,
                  "--no-progress", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    assert "loss became nan" in result.stderr and "nothing was saved" in result.stderr
    assert not (tmp_path / "nan" / "record.json").exists()


def test_second_parity_of_an_r2_code(trained: Path, data_root: Path) -> None:
    """--r 2 --parity-index 1 trains the parity that targets Σ_j (j+1)·F(X_j); eval reconstructs with it."""
    result = parm("train-parity", "--base", trained / "base", "--k", "2", "--r", "2", "--parity-index", "1",
                  "--out", trained / "k2-r2-p1", "--epochs", "2", "--data-root", data_root, "--no-progress",
                  cwd=trained)
    assert result.returncode == 0, result.stderr
    record = json.loads((trained / "k2-r2-p1" / "record.json").read_text())
    assert (record["k"], record["r"], record["parity_index"]) == (2, 2, 1)
    out = parm("eval", "--base", trained / "base", "--parity", trained / "k2-r2-p1", "--json", trained / "r2.json",
               "--data-root", data_root, cwd=trained)
    assert out.returncode == 0, out.stderr
    assert json.loads((trained / "r2.json").read_text())["degraded_top1"] > 0.3


def test_a_checkpoint_trained_on_an_image_folder_evaluates_after_the_folder_moves(tmp_path: Path) -> None:
    """The record names the folder relative to the data root with a content fingerprint: after
    `mv`, --data-root NEW finds it; a folder holding other images is refused with what to do."""
    import shutil

    from fixtures_data import write_image_folder

    for split, n in (("train", 40), ("test", 8)):
        write_image_folder(tmp_path / "root-a" / "shapes" / split, per_class=n, size_hw=(8, 8))
    result = parm("train-base", "--dataset", "imagefolder:shapes", "--model", "mlp", "--out", tmp_path / "base",
                  "--epochs", "1", "--val-size", "20", "--data-root", tmp_path / "root-a", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "base" / "record.json").read_text())
    assert record["dataset"] == "imagefolder:shapes" and len(record["dataset_fingerprint"]) == 64
    result = parm("train-parity", "--base", tmp_path / "base", "--k", "2", "--out", tmp_path / "k2", "--epochs", "1",
                  "--data-root", tmp_path / "root-a", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shutil.move(tmp_path / "root-a", tmp_path / "root-b")
    moved = parm("eval", "--base", tmp_path / "base", "--parity", tmp_path / "k2", "--data-root", tmp_path / "root-b",
                 cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    elsewhere = parm("eval", "--base", tmp_path / "base", "--parity", tmp_path / "k2", "--dataset",
                     f"imagefolder:{tmp_path / 'root-b' / 'shapes'}", cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr
    write_image_folder(tmp_path / "other" / "shapes" / "test", per_class=3, size_hw=(8, 8))
    write_image_folder(tmp_path / "other" / "shapes" / "train", per_class=3, size_hw=(8, 8))
    wrong = parm("eval", "--base", tmp_path / "base", "--parity", tmp_path / "k2", "--data-root", tmp_path / "other",
                 cwd=tmp_path)
    assert wrong.returncode != 0 and "does not hold the images" in wrong.stderr and "--data-root" in wrong.stderr
    assert "Traceback" not in wrong.stderr
