"""A model defined and trained outside ParM — a new architecture in the user's own module, trained
on x/255 (its own normalisation) — goes through the documented sequence (docs/IMPORT.md):
``parm import`` (A_a equal to the user's own evaluation), ``parm train-parity --inputs`` on
unlabelled inputs, ``parm eval --inputs``, and ``parm serve`` over real HTTP."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_data import train_outside_parm
from parm.data import load_dataset

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    def tiny_cnn(in_shape, num_classes):
        c, h, w = in_shape
        return nn.Sequential(nn.Conv2d(c, 4, 5, stride=2), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * ((h - 5) // 2 + 1) * ((w - 5) // 2 + 1), num_classes))
''')


def _parm(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "parm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def user_model(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, dict[str, str], float]:
    """The user's module, weights trained outside ParM on x/255, their own test accuracy, and an env
    whose PYTHONPATH finds the module (the server's worker processes need it too)."""
    work = tmp_path_factory.mktemp("user")
    (work / "user_models.py").write_text(USER_MODULE)
    sys.path.insert(0, str(work))
    try:
        import user_models  # the user's module, as they would import it
    finally:
        sys.path.remove(str(work))
    train, test = (load_dataset("mnist", split, data_root=data_root) for split in ("train", "test"))
    x, y = train.images.float() / 255.0, train.labels  # the user's own normalisation: x/255, no mean/std
    torch.manual_seed(0)
    model = train_outside_parm(user_models.tiny_cnn((1, 28, 28), 10), x, y, steps=300, lr=3e-3)
    with torch.inference_mode():
        own = (model(test.images.float() / 255.0).argmax(-1) == test.labels).float().mean().item()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, work / "weights.pt")
    np.save(work / "traffic.npy", train.images[:6000, 0].numpy())  # unlabelled raw pixels (N, 28, 28) uint8
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]),
           "PARM_DATA_ROOT": str(data_root), "OMP_NUM_THREADS": "1"}
    return work, env, own


def test_import_train_parity_without_labels_eval_and_serve(user_model, tmp_path: Path) -> None:
    work, env, own_accuracy = user_model
    base, parity = tmp_path / "base", tmp_path / "parity"
    out = _parm("import", "--arch", "user_models:tiny_cnn", "--weights", str(work / "weights.pt"), "--rename", "module.=",
                "--in-shape", "1,28,28", "--classes", "10", "--mean", "0", "--std", "1", "--dataset", "mnist",
                "--out", str(base), env=env)
    assert f"(A_a) {own_accuracy:.4f}" in out, out  # the same accuracy as the user's own evaluation
    record = json.loads((base / "record.json").read_text())
    assert record["mean"] == [0.0] and record["std"] == [1.0] and record["arch"] == "user_models:tiny_cnn"

    out = _parm("train-parity", "--base", str(base), "--k", "2", "--inputs", str(work / "traffic.npy"), "--epochs", "2",
                "--out", str(parity), "--no-progress", env=env)
    assert "reconstruction top-1" in out and "degraded" not in out, out  # no labels: agreement only
    parity_record = json.loads((parity / "record.json").read_text())
    assert parity_record["config"]["inputs"]["count"] == len(np.load(work / "traffic.npy"))

    out = _parm("eval", "--base", str(base), "--parity", str(parity), "--inputs", str(work / "traffic.npy"), env=env)
    header, row = out.strip().splitlines()[-2:]
    values = dict(zip(header.split(), row.split()))
    assert values["available_top1"] == "—" and 0.0 < float(values["reconstruction_top1"]) <= 1.0

    proc = subprocess.Popen([sys.executable, "-m", "parm.cli", "serve", "--base", str(base), "--parity", str(parity),
                             "--mode", "coded", "--instances", "2", "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, line = time.monotonic() + 120, ""
        while time.monotonic() < deadline and not line.startswith("ready") and proc.poll() is None:
            line = proc.stdout.readline()
        assert line.startswith("ready http://127.0.0.1:"), proc.stderr.read()[-3000:] if proc.poll() is not None else line
        port = int(line.strip().rsplit(":", 1)[1])
        test = load_dataset("mnist", "test", data_root=Path(env["PARM_DATA_ROOT"]))
        x = (test.images[:8].float() / 255.0).reshape(8, -1)  # queries in the model's own normalisation
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/predict", body=json.dumps({"inputs": x.tolist()}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answers = json.loads(response.read())["outputs"]
        conn.close()
        assert response.status == 200 and len(answers) == 8
        assert all(a["source"] in ("original", "reconstructed") and len(a["scores"]) == 10 for a in answers)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
