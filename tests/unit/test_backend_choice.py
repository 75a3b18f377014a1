"""Choosing a backend: validation, and the install hint where Ray is missing."""

from __future__ import annotations

import importlib
import sys

import pytest

from parm.errors import ConfigError
from parm.serving import ServingConfig
from parm.system import SystemSpec, default_backend_factory

SPEC = dict(base="runs/base", instances=2, serving=ServingConfig((1, 28, 28), mode="none"))


def test_unknown_backend_and_stray_ray_address_are_refused() -> None:
    with pytest.raises(ConfigError, match="backend must be one of"):
        SystemSpec(**SPEC, backend="kubernetes")
    with pytest.raises(ConfigError, match="--backend ray"):
        SystemSpec(**SPEC, ray_address="auto")
    assert SystemSpec(**SPEC, backend="ray", ray_address="auto").ray_address == "auto"


def test_without_ray_the_ray_backend_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "parm.backends.ray_serve", raising=False)
    with pytest.raises(ImportError, match=r'pip install "parm-serving\[ray\]"'):
        importlib.import_module("parm.backends.ray_serve")
    with pytest.raises(ConfigError, match=r'pip install "parm-serving\[ray\]"'):
        default_backend_factory(SystemSpec(**SPEC, backend="ray"))
