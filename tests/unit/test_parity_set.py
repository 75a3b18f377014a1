"""Parity sets: train all r parity models in one call / one command, and load_parity_set's checks."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

import parm
import parm.training.parity as parity_module
from parm.checkpoint import ModelRecord, load_parity_set, load_record, parity_set_dirs, save_checkpoint
from parm.cli import main
from parm.coding import CodeConfig
from parm.errors import CheckpointError, CheckpointMismatchError
from parm.training import OptimConfig, train_parities

OPTIM = OptimConfig(epochs=1, batch_size=256, val_size=200)


def _stamps(folder: Path) -> dict[str, int]:
    """mtime of every file under ``folder`` (weights, records, resume state)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def r2_set(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: tuple[Path, Path], data_root: Path) -> Path:
    out = tmp_path_factory.mktemp("r2") / "k2-r2"
    records = train_parities(tiny_checkpoints[0], out, CodeConfig(k=2, r=2), OPTIM, init="base",
                             data_root=data_root, progress=False)
    assert [r.parity_index for r in records] == [0, 1]
    return out


def test_public_api_exports() -> None:
    assert parm.train_parities is train_parities and parm.load_parity_set is load_parity_set
    assert {"train_parities", "load_parity_set"} <= set(parm.__all__)


def test_layout() -> None:
    assert parity_set_dirs("d", 1) == [Path("d")]
    assert parity_set_dirs("d", 3) == [Path("d/parity-0"), Path("d/parity-1"), Path("d/parity-2")]


def test_train_parities_writes_one_checkpoint_per_index(r2_set: Path, tiny_checkpoints: tuple[Path, Path]) -> None:
    base = load_record(tiny_checkpoints[0])
    assert sorted(p.name for p in r2_set.iterdir()) == ["parity-0", "parity-1"]
    loaded = load_parity_set(r2_set)
    assert [path for path, _ in loaded] == [r2_set / "parity-0", r2_set / "parity-1"]
    for i, (path, record) in enumerate(loaded):
        assert record == load_record(path)
        assert (record.kind, record.k, record.r, record.parity_index, record.encoder) == ("parity", 2, 2, i, "add")
        assert record.base_sha256 == base.weights_sha256
        assert record.config["parity"]["parity_index"] == i
    assert loaded[0][1].weights_sha256 != loaded[1][1].weights_sha256


def test_rerun_skips_finished_indices(r2_set: Path, tiny_checkpoints: tuple[Path, Path], data_root: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    before = _stamps(r2_set)

    def no_training(*args: object, **kwargs: object) -> ModelRecord:
        raise AssertionError("a finished index was trained again")

    monkeypatch.setattr(parity_module, "train_parity", no_training)
    records = train_parities(tiny_checkpoints[0], r2_set, CodeConfig(k=2, r=2), OPTIM, init="base",
                             data_root=data_root, progress=False)
    assert records == [record for _, record in load_parity_set(r2_set)]
    assert _stamps(r2_set) == before


def test_rerun_trains_only_the_missing_index(r2_set: Path, tiny_checkpoints: tuple[Path, Path], data_root: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "set"
    shutil.copytree(r2_set, out)
    shutil.rmtree(out / "parity-1")
    kept = _stamps(out / "parity-0")
    trained: list[int] = []
    real = parity_module.train_parity

    def counting(base_dir, folder, parity, optim, **kw):
        trained.append(parity.parity_index)
        return real(base_dir, folder, parity, optim, **kw)

    monkeypatch.setattr(parity_module, "train_parity", counting)
    records = train_parities(tiny_checkpoints[0], out, CodeConfig(k=2, r=2), OPTIM, init="base",
                             data_root=data_root, progress=False)
    assert trained == [1]
    assert _stamps(out / "parity-0") == kept
    assert [r.parity_index for r in records] == [0, 1]
    assert [r for _, r in load_parity_set(out)] == records


def test_rerun_with_another_configuration_is_refused(r2_set: Path, tiny_checkpoints: tuple[Path, Path],
                                                     data_root: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match="epochs") as info:
        train_parities(tiny_checkpoints[0], r2_set, CodeConfig(k=2, r=2), dataclasses.replace(OPTIM, epochs=2),
                       init="base", data_root=data_root, progress=False)
    assert info.value.field == "epochs"


def test_cli_trains_every_index(tiny_checkpoints: tuple[Path, Path], data_root: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-r2"
    argv = ["train-parity", "--base", str(tiny_checkpoints[0]), "--k", "2", "--r", "2", "--out", str(out),
            "--epochs", "1", "--batch-groups", "256", "--data-root", str(data_root)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "train-parity k=2 add p0/2" in captured.err and "train-parity k=2 add p1/2" in captured.err
    assert "parity 0 of r=2" in captured.out and f"saved to {out / 'parity-1'}" in captured.out
    assert [(r.r, r.parity_index) for _, r in load_parity_set(out)] == [(2, 0), (2, 1)]
    before = _stamps(out)
    assert main([*argv, "--no-progress"]) == 0
    assert _stamps(out) == before
    assert "parity 1 of r=2" in capsys.readouterr().out


def test_cli_parity_index_trains_one_into_out(tiny_checkpoints: tuple[Path, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--parity-index keeps the one-model behaviour; r=1 without it trains into --out itself."""
    calls: list[tuple[Path, int, int]] = []

    def fake(base_dir, out, parity, optim, **kw):
        calls.append((Path(out), parity.code.r, parity.parity_index))
        raise CheckpointError("stop here")

    monkeypatch.setattr("parm.training.train_parity", fake)
    base = str(tiny_checkpoints[0])
    assert main(["train-parity", "--base", base, "--k", "2", "--r", "2", "--parity-index", "1",
                 "--out", str(tmp_path / "p1"), "--no-progress"]) == 1
    assert main(["train-parity", "--base", base, "--k", "2", "--out", str(tmp_path / "r1"), "--no-progress"]) == 1
    assert calls == [(tmp_path / "p1", 2, 1), (tmp_path / "r1", 1, 0)]


# ---------------------------------------------------------------------------------------------
# load_parity_set on hand-made records


def _record(**kw: object) -> ModelRecord:
    fields: dict[str, object] = dict(kind="parity", arch="mlp", in_shape=(1, 28, 28), num_classes=10, dataset="mnist",
                                     mean=(0.1307,), std=(0.3081,), k=2, r=2, parity_index=0, encoder="add",
                                     base_sha256="ab" * 32)
    return ModelRecord(**{**fields, **kw})


def _save(folder: Path, **kw: object) -> ModelRecord:
    return save_checkpoint(folder, torch.nn.Linear(1, 1), _record(**kw))


def test_single_r1_checkpoint_is_a_set_of_one(tiny_checkpoints: tuple[Path, Path]) -> None:
    parity = tiny_checkpoints[1]
    assert load_parity_set(parity) == [(parity, load_record(parity))]


def test_missing_index_names_it_and_the_command(tmp_path: Path) -> None:
    _save(tmp_path / "parity-0")
    with pytest.raises(CheckpointError, match="parity index 1 of r=2 is missing") as info:
        load_parity_set(tmp_path)
    message = str(info.value)
    assert "parity-1 does not exist" in message
    assert f"--r 2 --parity-index 1 --out {tmp_path / 'parity-1'}" in message
    assert f"--k 2 --encoder add --r 2 --out {tmp_path}'" in message
    assert not isinstance(info.value, CheckpointMismatchError)


def test_unfinished_index_is_reported_as_missing(tmp_path: Path) -> None:
    _save(tmp_path / "parity-1", parity_index=1)
    (tmp_path / "parity-0" / "resume").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="parity index 0 of r=2 is missing.*has no record.json yet"):
        load_parity_set(tmp_path)


@pytest.mark.parametrize("name, value", [("k", 3), ("r", 3), ("encoder", "concat"), ("base_sha256", "cd" * 32)])
def test_members_must_agree(tmp_path: Path, name: str, value: object) -> None:
    _save(tmp_path / "parity-0")
    _save(tmp_path / "parity-1", parity_index=1, **{name: value})
    with pytest.raises(CheckpointMismatchError, match=f"disagree on {name}") as info:
        load_parity_set(tmp_path)
    assert info.value.field == name and info.value.got == value
    assert "parity-0" in str(info.value) and "parity-1" in str(info.value)


def test_index_appearing_twice(tmp_path: Path) -> None:
    _save(tmp_path / "parity-0")
    _save(tmp_path / "parity-1", parity_index=0)
    with pytest.raises(CheckpointMismatchError, match="parity index 0 appears twice.*parity-0 and parity-1") as info:
        load_parity_set(tmp_path)
    assert info.value.field == "parity_index"


def test_folder_name_and_index_must_agree(tmp_path: Path) -> None:
    _save(tmp_path / "parity-0", parity_index=1)
    _save(tmp_path / "parity-1", parity_index=0)
    with pytest.raises(CheckpointMismatchError, match="holds parity_index=1, but its name says 0"):
        load_parity_set(tmp_path)


def test_index_beyond_r(tmp_path: Path) -> None:
    _save(tmp_path / "parity-0")
    _save(tmp_path / "parity-1", parity_index=1)
    _save(tmp_path / "parity-2", parity_index=2)
    with pytest.raises(CheckpointMismatchError, match="holds parity-2 but its parity models are for r=2"):
        load_parity_set(tmp_path)
    shutil.rmtree(tmp_path / "parity-2")
    (tmp_path / "parity-2").mkdir()
    with pytest.raises(CheckpointMismatchError, match="holds parity-2 but its parity models are for r=2"):
        load_parity_set(tmp_path)


def test_single_checkpoint_of_an_r2_code(tmp_path: Path) -> None:
    _save(tmp_path / "p1", parity_index=1)
    with pytest.raises(CheckpointError, match="holds parity index 1 of an r=2 code: only one of the 2 parity models"):
        load_parity_set(tmp_path / "p1")


@pytest.mark.parametrize("make", ["empty", "absent", "unrelated"])
def test_folder_with_neither(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "set"
    if make != "absent":
        folder.mkdir()
    if make == "unrelated":
        (folder / "parity-x").mkdir()
        (folder / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=f"no parity checkpoint at {folder}: no record.json and no parity-<i>"):
        load_parity_set(folder)


def test_subfolders_without_records(tmp_path: Path) -> None:
    (tmp_path / "parity-0" / "resume").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="subfolders hold no record.json yet"):
        load_parity_set(tmp_path)


def test_base_checkpoint_is_not_a_parity_set(tiny_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match="holds a base checkpoint, not a parity checkpoint"):
        load_parity_set(tiny_checkpoints[0])
    shutil.copytree(tiny_checkpoints[0], tmp_path / "parity-0")
    with pytest.raises(CheckpointMismatchError, match="not a parity checkpoint") as info:
        load_parity_set(tmp_path)
    assert info.value.field == "kind"
