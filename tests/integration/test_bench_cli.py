"""`parm bench` and `parm simulate` as real processes on a tiny experiment file: exit codes,
summary.json fields, results.csv rows, per-query records and PNG plots; a bad file exits 2."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODE_FIELDS = ("instances", "trials", "p50_ms", "p99_ms", "p999_ms", "p50_ms_ci", "p99_ms_ci", "p999_ms_ci",
               "mean_ms", "reconstructed_fraction", "ok", "errors", "rejected", "lost")

EXPERIMENT = """\
name = "tiny-bench"
modes = ["none", "coded"]

[system]
base = "{base}"
parity = "{parity}"
instances = 2
k = 2
emulated_ms = 2.0

[load]
queries = 300
rate = 100
warmup = 20
trials = 2
seed = 0

[faults]
seed = 1
[[faults.fault]]
kind = "slow"
rate_hz = 0.5
duration_s = 0.5
factor = 20

[simulate]
instances = 4
queries = 3000
rates = [100, 200]
[simulate.service]
kind = "lognormal"
median_ms = 5.0
sigma = 0.2
"""


def _parm(args: list[str], env_extra: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "parm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: tuple[Path, Path]) -> Path:
    base, parity = tiny_checkpoints
    path = tmp_path_factory.mktemp("bench-exp") / "tiny.toml"
    path.write_text(EXPERIMENT.format(base=base.as_posix(), parity=parity.as_posix()))
    return path


def _check_modes(summary: dict, instances: dict[str, int]) -> None:
    for mode, count in instances.items():
        stats = summary[mode]
        for field in MODE_FIELDS:
            assert field in stats, f"{mode} lacks {field}: {sorted(stats)}"
        assert stats["instances"] == count
        assert stats["lost"] == 0 and stats["errors"] == 0 and stats["rejected"] == 0
        assert stats["trials"] == 2 and stats["ok"] == stats["queries"]
        assert 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["p999_ms"]
        for name in ("p50_ms", "p99_ms", "p999_ms"):
            low, high = stats[f"{name}_ci"]
            assert low <= stats[name] <= high
        assert 0 <= stats["reconstructed_fraction"] <= 1
    assert summary["none"]["reconstructed_fraction"] == 0
    ratio = summary["coded"]["gap_ratio_vs_none"]
    assert isinstance(ratio, float) and ratio > 0 and math.isfinite(ratio)
    low, high = summary["coded"]["gap_ratio_vs_none_ci"]
    assert low <= ratio <= high
    low, high = summary["coded"]["median_ratio_vs_none_ci"]
    assert low <= summary["coded"]["median_ratio_vs_none"] <= high


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_bench_runs_the_experiment(experiment: Path, tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "bench"
    proc = _parm(["bench", str(experiment), "--out", str(out), "--no-progress"],
                 {"PARM_DATA_ROOT": str(data_root)}, timeout_s=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"results in {out}/summary.json" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "bench" and summary["experiment"] == "tiny-bench"
    _check_modes(summary, {"none": 2, "coded": 3})
    for mode in ("none", "coded"):
        assert summary[mode]["queries"] == 2 * (300 - 20)  # warmup discarded, 2 trials
        assert 0 <= summary[mode]["accuracy"] <= 1
    assert summary["config"]["system"]["instances"] == 2
    assert (out / "experiment.json").exists()

    rows = _csv_rows(out / "results.csv")
    assert [(r["mode"], r["point"], r["instances"]) for r in rows] == [("none", "100qps", "2"),
                                                                      ("coded", "100qps", "3")]
    records = _csv_rows(out / "records-100qps.csv")
    assert len(records) == 2 * 2 * 300  # modes x trials x queries
    assert {r["trial"] for r in records} == {"0", "1"}
    assert {r["source"] for r in records if r["mode"] == "none"} == {"original"}
    assert (out / "cdf-100qps.png").stat().st_size > 1000


def test_simulate_runs_the_experiment(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    proc = _parm(["simulate", str(experiment), "--out", str(out)], {}, timeout_s=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "simulate"
    _check_modes(summary, {"none": 4, "coded": 6})  # coded: 4 data + ceil(4/2) parity
    assert [p["point"]["rate"] for p in summary["points"]] == [100.0, 200.0]
    for point in summary["points"]:
        _check_modes(point["modes"], {"none": 4, "coded": 6})
        assert point["modes"]["coded"]["queries"] == 2 * (3000 - 20)  # [load] warmup and trials apply

    rows = _csv_rows(out / "results.csv")
    assert [(r["point"], r["mode"]) for r in rows] == [("100qps", "none"), ("100qps", "coded"),
                                                      ("200qps", "none"), ("200qps", "coded")]
    for name in ("cdf-100qps.png", "cdf-200qps.png", "sweep_latency.png", "sweep_gap_ratio.png"):
        assert (out / name).stat().st_size > 1000, name


@pytest.mark.parametrize("command", ["bench", "simulate"])
def test_bad_experiment_file_exits_2(tmp_path: Path, command: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('modes = ["none", "warp-drive"]\n')
    proc = _parm([command, str(path), "--out", str(tmp_path / "out")], {}, timeout_s=60)
    assert proc.returncode == 2, proc.stderr
    assert "warp-drive" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_experiment_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    proc = _parm(["simulate", str(missing)], {}, timeout_s=60)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and str(missing) in proc.stderr


def test_demo_prints_every_mode_with_intervals_over_trials(tiny_checkpoints: tuple[Path, Path], data_root: Path,
                                                           tmp_path: Path) -> None:
    """The README's main command ends with `parm demo`: real processes, trials with their own
    fault realisations, a table with intervals, and strict JSON (no Infinity)."""
    base, parity = tiny_checkpoints
    out = tmp_path / "demo.json"
    proc = _parm(["demo", "--base", str(base), "--parity", str(parity), "--modes", "equal,coded,hedge",
                  "--queries", "200", "--warmup", "20", "--trials", "2", "--emulated-ms", "2",
                  "--faults", "slow:rate_hz=0.5,duration_s=0.5,factor=20;seed=1", "--json", str(out), "--no-progress"],
                 {"PARM_DATA_ROOT": str(data_root)}, timeout_s=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials" in proc.stdout and "coded (p99.9 - p50) smaller than: equal" in proc.stdout
    assert "coded median / baseline median: equal" in proc.stdout
    summary = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert summary["trials"] == 2 and summary["kind"] == "demo" and summary["experiment"] == "demo"
    for mode in ("equal", "coded", "hedge"):
        stats = summary["modes"][mode]
        assert stats["trials"] == 2 and stats["queries"] == 2 * 180 and len(stats["p999_ms_ci"]) == 2
    assert "gap_ratio_vs_hedge_ci" in summary["modes"]["coded"]
