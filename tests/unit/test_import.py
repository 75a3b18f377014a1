"""parm import (weights of a model trained elsewhere) and unlabelled inputs (--inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from parm.checkpoint import load_checkpoint
from parm.data import load_inputs
from parm.errors import CheckpointError, CheckpointMismatchError, ConfigError, DataError, ShapeError
from parm.models import build_model
from parm.training import import_model
from parm.training.importing import read_state_dict, rename_keys


def _mlp_weights(prefix: str = "") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {prefix + k: v for k, v in build_model("mlp", (1, 28, 28), 10).state_dict().items()}


def test_import_round_trip_with_renames_and_a_wrapped_state_dict(tmp_path: Path) -> None:
    weights = {k.replace("net.", "nn."): v for k, v in _mlp_weights("module.").items()}
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "w.pt")
    record = import_model(tmp_path / "ck", arch="mlp", weights=tmp_path / "w.pt", in_shape=(1, 28, 28),
                          num_classes=10, mean=(0.0,), std=(1.0,), renames=[("module.nn.", "net.")])
    model, loaded = load_checkpoint(tmp_path / "ck")
    for key, value in _mlp_weights().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert loaded == record and record.mean == (0.0,) and record.dataset == "" and "available_top1" not in record.metrics


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated in favour of torch.export
def test_import_takes_the_weights_of_a_torchscript_or_export_archive(tmp_path: Path) -> None:
    """A model shipped as TorchScript (torch.jit.save) or as a torch.export program imports like a
    state dict: its tensors go into the named architecture, which then answers as the archive does."""
    from parm.training.importing import archive_kind

    torch.manual_seed(1)
    original = build_model("mlp", (1, 28, 28), 10).eval()
    x = torch.randn(5, 1, 28, 28)
    torch.jit.save(torch.jit.script(original), str(tmp_path / "model.ts.pt"))
    torch.export.save(torch.export.export(original, (x,)), str(tmp_path / "model.pt2"))
    torch.save(original.state_dict(), tmp_path / "state.pt")  # also a zip, but neither archive
    assert [archive_kind(tmp_path / n) for n in ("model.ts.pt", "model.pt2", "state.pt")] == ["torchscript", "export", None]
    with torch.inference_mode():
        want = original(x)
    for name in ("model.ts.pt", "model.pt2"):
        import_model(tmp_path / f"ck-{name}", arch="mlp", weights=tmp_path / name, in_shape=(1, 28, 28),
                     num_classes=10, mean=(0.1307,), std=(0.3081,))
        model, _ = load_checkpoint(tmp_path / f"ck-{name}")
        with torch.inference_mode():
            torch.testing.assert_close(model(x), want)
    with pytest.raises(CheckpointMismatchError, match="do not fit architecture 'lenet5'"):
        import_model(tmp_path / "ck2", arch="lenet5", weights=tmp_path / "model.ts.pt", in_shape=(1, 28, 28),
                     num_classes=10, mean=(0.1307,), std=(0.3081,))


def test_import_measures_a_a_on_the_dataset_with_the_models_own_normalisation(tmp_path: Path,
                                                                               fixture_root: Path) -> None:
    from parm.data import load_dataset

    save_file(_mlp_weights(), str(tmp_path / "w.safetensors"))
    record = import_model(tmp_path / "ck", arch="mlp", weights=tmp_path / "w.safetensors", in_shape=(1, 28, 28),
                          num_classes=10, mean=(0.0,), std=(1.0,), dataset="mnist", data_root=fixture_root)
    test = load_dataset("mnist", "test", data_root=fixture_root)
    model = build_model("mlp", (1, 28, 28), 10)
    model.load_state_dict(_mlp_weights())
    with torch.inference_mode():
        own = (model.eval()(test.images.float() / 255.0).argmax(-1) == test.labels).float().mean().item()
    assert record.metrics["available_top1"] == pytest.approx(own) and record.dataset == "mnist"


def test_a_key_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    weights = _mlp_weights()
    weights["extra.bias"] = torch.zeros(3)
    del weights["net.5.bias"]
    weights["net.1.weight"] = torch.zeros(7, 784)
    save_file(weights, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        import_model(tmp_path / "ck", arch="mlp", weights=tmp_path / "w.safetensors", in_shape=(1, 28, 28),
                     num_classes=10, mean=(0.0,), std=(1.0,))
    message = str(err.value)
    assert "missing keys: net.5.bias" in message and "unexpected keys: extra.bias" in message
    assert "net.1.weight [7, 784] (the model's: [200, 784])" in message and "--rename" in message
    assert not (tmp_path / "ck").exists()  # nothing half-written


def test_import_refuses_bad_input_clearly(tmp_path: Path) -> None:
    save_file(_mlp_weights(), str(tmp_path / "w.safetensors"))
    common = dict(arch="mlp", weights=tmp_path / "w.safetensors", in_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ConfigError, match="one value per input channel"):
        import_model(tmp_path / "a", **common, mean=(0.0, 0.0), std=(1.0,))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="does not exist"):
        import_model(tmp_path / "b", **{**common, "weights": tmp_path / "nope.pt"}, mean=(0.0,), std=(1.0,))
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(tmp_path / "junk.pt")
    import_model(tmp_path / "c", **common, mean=(0.0,), std=(1.0,))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        import_model(tmp_path / "c", **common, mean=(0.0,), std=(1.0,))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="two tensors the name"):
        rename_keys({"a.x": torch.zeros(1), "b.x": torch.zeros(1)}, [("a.", ""), ("b.", "")])


def test_cli_import_prints_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from parm.cli import main

    save_file(_mlp_weights(), str(tmp_path / "w.safetensors"))
    args = ["import", "--arch", "mlp", "--weights", str(tmp_path / "w.safetensors"), "--classes", "10",
            "--mean", "0", "--std", "1", "--out", str(tmp_path / "ck")]
    assert main([*args, "--in-shape", "1,28,x"]) == 2
    assert "--in-shape takes comma-separated numbers" in capsys.readouterr().err
    assert main([*args, "--in-shape", "1,28,28", "--rename", "nodelimiter"]) == 2
    assert main([*args, "--in-shape", "1,28,28"]) == 0
    assert "imported mlp" in capsys.readouterr().out
    assert json.loads((tmp_path / "ck" / "record.json").read_text())["std"] == [1.0]


# ---- unlabelled inputs ------------------------------------------------------------------------
def test_uint8_inputs_are_pixels_normalised_with_the_models_constants(tmp_path: Path) -> None:
    pixels = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28).astype(np.uint8)
    np.save(tmp_path / "hw.npy", pixels)  # (N, H, W)
    np.save(tmp_path / "hwc.npy", pixels[..., None])  # (N, H, W, 1)
    want = (torch.from_numpy(pixels).float()[:, None] / 255.0 - 0.5) / 0.25
    for name in ("hw.npy", "hwc.npy"):
        torch.testing.assert_close(load_inputs(tmp_path / name, (1, 28, 28), (0.5,), (0.25,)), want)


def test_float_inputs_are_taken_as_served(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    save_file({"inputs": torch.from_numpy(x), "other": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    torch.testing.assert_close(load_inputs(tmp_path / "x.safetensors", (1, 28, 28), (0.1,), (0.3,)),
                               torch.from_numpy(x))
    np.save(tmp_path / "flat.npy", x.reshape(5, -1))
    with pytest.raises(ShapeError, match="taken as they are"):
        load_inputs(tmp_path / "flat.npy", (1, 28, 28), (0.1,), (0.3,))


def test_a_folder_of_images_without_classes(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "any").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((30, 30), 51 * i, dtype=np.uint8)).save(tmp_path / "imgs" / ("any" if i else "") / f"{i}.png")
    x = load_inputs(tmp_path / "imgs", (1, 28, 28), (0.0,), (1.0,))  # resized to the model's 28x28
    assert x.shape == (3, 1, 28, 28)
    assert sorted(round(float(v), 3) for v in x.amax(dim=(1, 2, 3))) == [0.0, 0.2, 0.4]


def test_bad_inputs_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="inputs not found"):
        load_inputs(tmp_path / "missing", (1, 28, 28), (0.0,), (1.0,))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no inputs"):
        load_inputs(tmp_path / "empty", (1, 28, 28), (0.0,), (1.0,))
    np.save(tmp_path / "nan.npy", np.full((2, 1, 28, 28), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="non-finite"):
        load_inputs(tmp_path / "nan.npy", (1, 28, 28), (0.0,), (1.0,))
    np.save(tmp_path / "ints.npy", np.zeros((2, 1, 28, 28), dtype=np.int32))
    with pytest.raises(DataError, match="uint8 pixels or floating-point"):
        load_inputs(tmp_path / "ints.npy", (1, 28, 28), (0.0,), (1.0,))
