"""Built-in architectures and user factories."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from parm.errors import ConfigError
from parm.models import build_model


@pytest.mark.parametrize(
    "arch, shape",
    [("mlp", (1, 28, 28)), ("lenet5", (1, 28, 28)), ("lenet5", (3, 32, 32)),
     ("resnet18", (3, 32, 32)), ("resnet18-28", (1, 28, 28))],
)
def test_builtin_shapes(arch: str, shape: tuple[int, ...]) -> None:
    model = build_model(arch, shape, 10).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_mlp_is_the_papers() -> None:
    model = build_model("mlp", (1, 28, 28), 10)
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [(784, 200), (200, 100), (100, 10)]


def test_resnet_variant_checks_input_size() -> None:
    with pytest.raises(ConfigError, match="28x28"):
        build_model("resnet18", (1, 28, 28), 10)


def test_user_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        def tiny(in_shape, num_classes):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes))
        def fixed():
            return torch.nn.Linear(4, 3)
        def not_a_module(**kwargs):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("my_models:tiny", (1, 4, 4), 7)(torch.randn(2, 1, 4, 4)).shape == (2, 7)
    assert isinstance(build_model("my_models:fixed", (1, 2, 2), 3), torch.nn.Linear)
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        build_model("my_models:not_a_module", (1, 2, 2), 3)
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        build_model("my_models:nope", (1, 2, 2), 3)
    with pytest.raises(ConfigError, match="cannot import module"):
        build_model("no_such_module_xyz:f", (1, 2, 2), 3)
    with pytest.raises(ConfigError, match="unknown architecture 'vgg'"):
        build_model("vgg", (1, 2, 2), 3)
