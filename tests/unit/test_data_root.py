"""Data root resolution: argument, then PARM_DATA_ROOT, then the user cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from parm.data import resolve_data_root


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.delenv("PARM_DATA_ROOT", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_argument_wins(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PARM_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_env_next(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PARM_DATA_ROOT", str(tmp_path / "env"))
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root("") == tmp_path / "env"


def test_xdg_cache(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root() == tmp_path / "xdg" / "parm" / "data"


def test_home_cache_last(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PARM_DATA_ROOT", "")
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "parm" / "data"


def test_tilde_expanded(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_data_root("~/d") == tmp_path / "home" / "d"
    assert not (tmp_path / "home").exists()  # resolving never creates folders
