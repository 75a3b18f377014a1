"""Shared fixtures: where test datasets live.

- ``fixture_root``: always a session-wide temporary data root filled by ``fixtures_data.write_all``
  (small generated MNIST / Fashion-MNIST / CIFAR / image-folder datasets in the real layouts).
- ``data_root``: ``Path($PARM_DATA_ROOT)`` when that variable is set (real data), else ``fixture_root``.
  Tests that need facts only real data has (e.g. MNIST's label counts) check
  ``real_data_root`` and are skipped with a stated reason when it is None.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make tests/fixtures_data.py importable everywhere

import fixtures_data  # noqa: E402


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with every generated fixture dataset (never real data)."""
    return fixtures_data.write_all(tmp_path_factory.mktemp("parm-data"))


@pytest.fixture(scope="session")
def real_data_root() -> Path | None:
    """``Path($PARM_DATA_ROOT)`` when set, else None."""
    env = os.environ.get("PARM_DATA_ROOT", "")
    return Path(env) if env else None


@pytest.fixture(scope="session")
def data_root(real_data_root: Path | None, request: pytest.FixtureRequest) -> Path:
    """Real data when PARM_DATA_ROOT is set, else the generated fixture root."""
    if real_data_root is not None:
        return real_data_root
    return request.getfixturevalue("fixture_root")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Base-output caches go to a temporary folder, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARM_CACHE_DIR", str(tmp_path_factory.mktemp("parm-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, Path]:
    """A base MLP and its k=2 addition parity model, one epoch each (MNIST: real or generated)."""
    from parm.coding import CodeConfig
    from parm.training import OptimConfig, ParityConfig, train_base, train_parity

    work = tmp_path_factory.mktemp("tiny-ckpt")
    train_base("mnist", "mlp", work / "base", optim=OptimConfig(epochs=1, batch_size=128, val_size=200),
               data_root=data_root, progress=False)
    train_parity(work / "base", work / "parity", ParityConfig(CodeConfig(k=2), init="base"),
                 OptimConfig(epochs=1, batch_size=256, val_size=200), data_root=data_root, progress=False)
    return work / "base", work / "parity"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (with Serve, no HTTP proxy) for every Ray test of the session:
    starting one costs ~5 s and ~1 GB. Skipped with the install hint where Ray is missing."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install \"parm-serving[ray]\"")
    from parm.backends.ray_serve import connect, shutdown_cluster

    connect(None, num_cpus=16)  # logical CPUs: one per replica the tests deploy at once
    yield
    shutdown_cluster()
