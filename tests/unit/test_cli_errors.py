"""A new user's first mistakes get one line, early: an unknown model before any data is read, a
port in use or needing privileges before any instance starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from parm.cli import _check_bind, default_threads, main
from parm.errors import ConfigError


def test_an_unknown_model_fails_before_the_dataset_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train-base", "--dataset", "mnist", "--model", "mlp-huge", "--out", str(tmp_path / "b"),
                 "--data-root", str(tmp_path / "no-data-here"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown architecture 'mlp-huge'" in err and "mlp-small" in err
    assert "no-data-here" not in err and err.count("\n") == 1  # not a missing-dataset error; one line


def test_a_port_in_use_is_one_line_before_anything_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: .*choose another --port"):
            _check_bind("127.0.0.1", port)
    _check_bind("127.0.0.1", 0)  # any free port: fine


def test_default_threads_is_at_least_one_and_at_most_the_cpus() -> None:
    import os

    assert 1 <= default_threads() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("command", [
    ["train-base", "--dataset", "mnist", "--model", "mlp", "--out", "{tmp}/b"],
    ["train-parity", "--base", "{base}", "--k", "2", "--out", "{tmp}/p"],
    ["eval", "--base", "{base}", "--parity", "{parity}"],
    ["serve", "--base", "{base}", "--mode", "equal", "--port", "0"],
])
def test_a_gpu_that_is_not_there_is_one_line(command: list[str], tmp_path: Path, tiny_checkpoints: tuple[Path, Path],
                                           capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base, parity = tiny_checkpoints
    args = [a.format(tmp=tmp_path, base=base, parity=parity) for a in command]
    code = main([*args, "--device", "cuda:0", "--data-root", str(tmp_path / "no-data-here"), "--no-progress"]
                if command[0] != "serve" else [*args, "--device", "cuda:0"])
    err = capsys.readouterr().err
    assert code == 2 and "device 'cuda:0': PyTorch sees no CUDA GPU" in err and "--device cpu" in err
    assert err.count("\n") == 1 and not (tmp_path / "b").exists() and not (tmp_path / "p").exists()


def test_default_threads_leaves_busy_cores_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import parm.cli as cli

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cli, "_idle_cpus", lambda s: 0.2)
    assert default_threads() == 1  # nothing idle: still one thread
    monkeypatch.setattr(cli, "_idle_cpus", lambda s: cpus - 0.6)  # one core mostly busy elsewhere
    assert default_threads() == max(1, cpus - 1)
    monkeypatch.setattr(cli, "_idle_cpus", lambda s: None)  # not measurable: every CPU we may use
    assert default_threads() == cpus
    assert cli._idle_cpus(0.05) is None or 0 <= cli._idle_cpus(0.05) <= cpus  # the real measurement
