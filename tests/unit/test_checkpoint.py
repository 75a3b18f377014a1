"""Checkpoints: round trip, hash check, crash safety, mismatch errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parm.checkpoint import (
    ModelRecord,
    check_parity_matches,
    load_checkpoint,
    load_record,
    save_checkpoint,
)
from parm.errors import CheckpointError, CheckpointMismatchError
from parm.models import build_model


def _record(kind: str = "base", **kw) -> ModelRecord:
    fields = dict(kind=kind, arch="mlp", in_shape=(1, 28, 28), num_classes=10, dataset="mnist",
                  mean=(0.1307,), std=(0.3081,))
    return ModelRecord(**{**fields, **kw})


def test_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10)
    saved = save_checkpoint(tmp_path / "ck", model, _record(metrics={"available_top1": 0.5}))
    loaded, record = load_checkpoint(tmp_path / "ck")
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert record == saved and record.weights_sha256 and record.parm_version
    assert record.in_shape == (1, 28, 28) and record.metrics == {"available_top1": 0.5}
    assert load_record(tmp_path / "ck") == record


def test_resave_leaves_one_weights_file(tmp_path: Path) -> None:
    model = build_model("mlp", (1, 28, 28), 10)
    save_checkpoint(tmp_path, model, _record())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    record = save_checkpoint(tmp_path, model, _record())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [record.weights_file]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """New weights written but the record not yet replaced: the old checkpoint still loads."""
    model = build_model("mlp", (1, 28, 28), 10)
    first = save_checkpoint(tmp_path, model, _record())
    (tmp_path / "model-0123456789abcdef.safetensors").write_bytes(b"partial")
    (tmp_path / ".record.json.123.tmp").write_text("{")
    _, record = load_checkpoint(tmp_path)
    assert record.weights_sha256 == first.weights_sha256


def test_damaged_weights_are_detected(tmp_path: Path) -> None:
    record = save_checkpoint(tmp_path, build_model("mlp", (1, 28, 28), 10), _record())
    path = tmp_path / record.weights_file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path)


def test_missing_and_foreign_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="record.json is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "record.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="ParM checkpoint"):
        load_checkpoint(tmp_path)


def test_weights_of_other_architecture(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, build_model("mlp", (1, 28, 28), 10), _record())
    data = json.loads((tmp_path / "record.json").read_text())
    data["arch"] = "lenet5"
    (tmp_path / "record.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(tmp_path)
    assert info.value.field == "arch"


def test_parity_mismatch_names_field() -> None:
    base = _record(weights_sha256="a" * 64)
    parity = _record("parity", k=2, r=1, parity_index=0, encoder="add", base_sha256="a" * 64)
    check_parity_matches(base, parity, k=2, encoder="add")
    for kwargs, field in (({"k": 3}, "k"), ({"encoder": "concat"}, "encoder")):
        with pytest.raises(CheckpointMismatchError) as info:
            check_parity_matches(base, parity, **kwargs)
        assert info.value.field == field
    with pytest.raises(CheckpointMismatchError) as info:
        check_parity_matches(_record(weights_sha256="b" * 64), parity)
    assert info.value.field == "base_sha256"
    with pytest.raises(CheckpointMismatchError) as info:
        check_parity_matches(base, _record("parity", dataset="fashion-mnist", base_sha256="a" * 64, k=2))
    assert info.value.field == "dataset"
    with pytest.raises(CheckpointMismatchError) as info:
        check_parity_matches(base, base)
    assert info.value.field == "kind"
