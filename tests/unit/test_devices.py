"""Devices: choosing one, spreading serving instances over GPUs, mixed precision, and the device
reaching every place a model runs. CI has no GPU: GPUs are faked where only the bookkeeping is
under test (torch.cuda.is_available / device_count), and everything that really runs, runs on the
CPU (bf16 autocast included); scripts/gpu_check.py covers a real GPU."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from parm.backends import InstanceSpec, ModelRef
from parm.backends.worker import ModelRunner
from parm.devices import autocast, check_precision, grad_scaler, resolve_device, spread_devices
from parm.errors import ConfigError

SRC = Path(__file__).resolve().parents[2] / "src" / "parm"


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("parm.devices._mps_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_without_an_accelerator(no_gpu: None) -> None:
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")


def test_auto_prefers_a_gpu(two_gpus: None) -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize(("name", "message"), [
    ("gpu", r"unknown device 'gpu'; use auto .* cpu, cuda, cuda:N or mps"),
    ("cpu:1", r"the CPU has no index"),
    ("cuda", r"PyTorch sees no CUDA GPU .*use --device cpu"),
    ("cuda:0", r"PyTorch sees no CUDA GPU"),
    ("mps", r"no Apple MPS device"),
])
def test_a_device_that_is_not_there_is_a_clear_error(no_gpu: None, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_device(name)


def test_an_index_past_the_visible_gpus_names_them(two_gpus: None) -> None:
    with pytest.raises(ConfigError, match=r"only 2 CUDA GPU\(s\) are visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_instances_spread_round_robin_over_every_gpu(two_gpus: None) -> None:
    assert spread_devices("cuda", 5) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert spread_devices("auto", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert spread_devices("cuda:1", 3) == ["cuda:1"] * 3  # several instances on one GPU
    assert spread_devices("cuda:1, cpu", 3) == ["cuda:1", "cpu", "cuda:1"]


def test_instances_stay_on_the_cpu_without_a_gpu(no_gpu: None) -> None:
    assert spread_devices(None, 3) == ["cpu"] * 3
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        spread_devices("cpu,cuda:0", 2)


def test_fp16_needs_an_accelerator_and_bf16_runs_anywhere() -> None:
    assert check_precision("bf16", "cpu") == "bf16"
    assert check_precision("fp16", "cuda:0") == "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA or MPS device, not cpu; use bf16"):
        check_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        check_precision("fp8", "cpu")
    assert not grad_scaler("cpu", "bf16").is_enabled()


def test_bf16_autocast_runs_a_linear_layer_in_bf16_on_the_cpu() -> None:
    layer = torch.nn.Linear(4, 3)
    with autocast("cpu", "bf16"):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_no_module_picks_a_device_behind_the_users_back() -> None:
    """Every model, tensor and replica takes its device from parm.devices or an InstanceSpec: no
    ``.cuda()``, no literal 'cuda:N', no torch.device('cuda') anywhere else in the package."""
    hidden = re.compile(r"\.cuda\(|['\"]cuda:\d|torch\.device\(\s*['\"]cuda|\.to\(\s*['\"](cuda|mps)")
    offenders = [f"{path.relative_to(SRC)}:{n}: {line.strip()}"
                 for path in SRC.rglob("*.py") if path.name != "devices.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if hidden.search(line)]
    assert not offenders, "device chosen outside parm.devices:\n" + "\n".join(offenders)


def _runner(device: str, precision: str) -> ModelRunner:
    spec = InstanceSpec(0, "data", ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": (4,)}),
                        device=device, precision=precision)
    return ModelRunner(spec, t0_wall_s=0.0)


def test_an_instance_runs_on_its_device_and_precision_and_answers_float32() -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    exact = _runner("cpu", "fp32")
    half = _runner("cpu", "bf16")
    assert exact.device == torch.device("cpu") and next(half.model.parameters()).device == torch.device("cpu")
    want = exact.run(x.tobytes(), x.shape)
    got = half.run(x.tobytes(), x.shape)
    assert got.dtype == np.float32 and want.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)  # bf16 keeps ~3 significant digits
    assert not np.array_equal(got, want)  # it really ran in bf16


def test_an_instance_spec_refuses_an_unknown_precision() -> None:
    with pytest.raises(ConfigError, match="precision must be one of"):
        InstanceSpec(0, "data", ModelRef(factory="parm.models.toy:linear"), precision="half")


# ---- serving systems: where each instance runs ---------------------------------------------------
def _system(**fields):
    from parm.serving import ServingConfig
    from parm.system import SystemSpec

    return SystemSpec(base="unused", serving=ServingConfig(query_shape=(4,), mode="equal"), instances=2, **fields)


def test_local_instances_are_spread_over_the_gpus_and_carry_device_and_precision(two_gpus: None) -> None:
    from parm.system import instance_specs

    spec = _system(device="cuda", precision="fp16")
    assert spec.instance_devices() == ["cuda:0", "cuda:1", "cuda:0"]  # m = 2 plus equal's one extra instance
    specs = instance_specs(spec)
    assert [s.device for s in specs] == ["cuda:0", "cuda:1", "cuda:0"]
    assert {s.precision for s in specs} == {"fp16"}
    assert spec.to_json()["devices"] == ["cuda:0", "cuda:1", "cuda:0"]


def test_a_missing_gpu_fails_when_the_system_is_described_not_when_a_worker_starts(no_gpu: None) -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        _system(device="cuda")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA or MPS device"):
        _system(device="auto", precision="fp16")
    assert _system().instance_devices() == ["cpu"] * 3


def test_ray_replicas_take_the_gpu_ray_reserves_for_them(no_gpu: None) -> None:
    """On Ray the frontend's machine need not have the GPUs: devices are decided in the replica."""
    assert _system(backend="ray", gpus_per_instance=0.5).instance_devices() == ["cuda"] * 3
    assert _system(backend="ray", device="cuda").instance_devices() == ["cuda"] * 3
    assert _system(backend="ray").instance_devices() == ["cpu"] * 3
    with pytest.raises(ConfigError, match="gpus_per_instance .* is for the ray backend"):
        _system(gpus_per_instance=1.0)


def test_ray_replicas_request_whole_or_fractional_gpus() -> None:
    pytest.importorskip("ray")
    from parm.backends.ray_serve import RayServeBackend

    gpu = InstanceSpec(0, "data", ModelRef(factory="parm.models.toy:linear"), device="cuda")
    cpu = InstanceSpec(1, "data", ModelRef(factory="parm.models.toy:linear"))
    assert RayServeBackend([gpu, cpu], num_cpus=1.0).actor_options(gpu) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert RayServeBackend([gpu], num_cpus=0.0, num_gpus=0.25).actor_options(gpu) == {"num_cpus": 0.0, "num_gpus": 0.25}
    assert "num_gpus" not in RayServeBackend([cpu], num_cpus=1.0).actor_options(cpu)
    with pytest.raises(ConfigError, match="must be >= 0"):
        RayServeBackend([gpu], num_gpus=-1.0)


# ---- training and evaluation take the device and precision they are given -------------------------
def test_training_and_eval_run_on_the_given_device_in_bf16(tmp_path: Path, fixture_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """train-base, train-parity and eval with device='cpu' and bf16 autocast (the CPU's mixed
    precision): every model the loop trains is moved to the device it was given."""
    from parm.coding import CodeConfig
    from parm.training import OptimConfig, ParityConfig, evaluate, loop, train_base, train_parity

    seen: list[tuple[str, str]] = []
    real_init = loop._Fitter.__init__

    def spy(self, model, spec):  # noqa: ANN001, ANN202
        real_init(self, model, spec)
        seen.append((str(next(self.model.parameters()).device), spec.precision))

    monkeypatch.setattr(loop._Fitter, "__init__", spy)
    base = train_base("mnist", "mlp", tmp_path / "base", optim=OptimConfig(epochs=1, batch_size=128, val_size=200),
                      data_root=fixture_root, progress=False, device="cpu", precision="bf16")
    assert base.metrics["available_top1"] > 0.5  # bf16 training still learns the fixtures
    train_parity(tmp_path / "base", tmp_path / "parity", ParityConfig(CodeConfig(k=2), init="base"),
                 OptimConfig(epochs=1, batch_size=256, val_size=200), data_root=fixture_root, progress=False,
                 device=torch.device("cpu"), precision="bf16")
    assert seen == [("cpu", "bf16"), ("cpu", "bf16")]
    (result,) = evaluate(tmp_path / "base", [tmp_path / "parity"], data_root=fixture_root, device="cpu")
    assert result.available_top1 == pytest.approx(base.metrics["available_top1"])


def test_training_on_a_missing_gpu_fails_before_reading_data(tmp_path: Path, no_gpu: None) -> None:
    from parm.training import train_base

    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train_base("mnist", "mlp", tmp_path / "base", data_root=tmp_path / "no-data-here", device="cuda")
    assert not (tmp_path / "base").exists()
