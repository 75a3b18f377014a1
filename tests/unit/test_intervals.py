"""Intervals over trials (parm.bench.intervals) and the per-trial fault realisations of runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from parm.bench import run_experiment
from parm.bench.experiment import load_experiment
from parm.bench.histogram import LatencyHistogram
from parm.bench.intervals import PairedBootstrap, TrialCounts
from parm.bench.simulate import simulate as real_simulate


def _trials(rng: np.random.Generator, n_trials: int, sigma: float, n: int = 2000, failed: int = 0) -> list[list[float]]:
    return [rng.lognormal(np.log(10.0), sigma, n).tolist() + [math.inf] * failed for _ in range(n_trials)]


def test_point_figures_pool_the_trials_and_lie_inside_their_intervals() -> None:
    rng = np.random.default_rng(0)
    trials = _trials(rng, 5, 0.5)
    boot = PairedBootstrap({"equal": TrialCounts.from_latencies(trials)})
    stats = boot.percentiles("equal")
    pooled = np.sort(np.concatenate(trials))
    assert stats["p50_ms"] == pooled[math.ceil(0.5 * pooled.size) - 1]
    for name in ("p50_ms", "p99_ms", "p999_ms"):
        low, high = stats[f"{name}_ci"]
        assert low <= stats[name] <= high and low < high


def test_one_trial_gives_no_spread_and_failures_give_an_infinite_tail() -> None:
    rng = np.random.default_rng(1)
    boot = PairedBootstrap({"coded": TrialCounts.from_latencies(_trials(rng, 1, 0.3, n=998, failed=2))})
    stats = boot.percentiles("coded")
    assert stats["p50_ms_ci"][0] == stats["p50_ms_ci"][1] == stats["p50_ms"]
    assert math.isinf(stats["p999_ms"]) and math.isfinite(stats["p99_ms"])


def test_gap_ratio_is_undefined_when_the_coded_tail_is_infinite() -> None:
    rng = np.random.default_rng(2)
    modes = {"equal": TrialCounts.from_latencies(_trials(rng, 5, 1.0)),
             "coded": TrialCounts.from_latencies(_trials(rng, 5, 0.2, n=998, failed=2))}
    ratios = PairedBootstrap(modes).ratios("coded", "equal")
    assert ratios["gap_ratio_vs_equal"] is None
    assert ratios["gap_ratio_vs_equal_ci"] == [0.0, 0.0]  # every resample: coded's gap is infinite
    assert ratios["median_ratio_vs_equal"] == pytest.approx(1.0, abs=0.05)


def test_ratios_are_paired_over_trials() -> None:
    """Trials differ a lot from each other but coded is always half of equal in the same trial:
    the paired ratio's interval is tight although each mode's own interval is wide."""
    rng = np.random.default_rng(3)
    scales = [1.0, 3.0, 10.0, 0.5, 6.0]
    equal = [(rng.lognormal(np.log(10.0), 0.3, 3000) * s).tolist() for s in scales]
    coded = [[v / 2 for v in t] for t in equal]
    boot = PairedBootstrap({"equal": TrialCounts.from_latencies(equal), "coded": TrialCounts.from_latencies(coded)})
    low, high = boot.percentiles("equal")["p50_ms_ci"]
    assert high / low > 3
    ratios = boot.ratios("coded", "equal")
    assert ratios["median_ratio_vs_equal"] == pytest.approx(0.5)
    assert ratios["median_ratio_vs_equal_ci"] == pytest.approx([0.5, 0.5])
    assert ratios["gap_ratio_vs_equal_ci"] == pytest.approx([2.0, 2.0])


def test_histograms_give_the_same_figures_as_raw_latencies() -> None:
    rng = np.random.default_rng(4)
    trials = _trials(rng, 4, 0.6)
    hists = []
    for t in trials:
        h = LatencyHistogram()
        h.record_many(t)
        hists.append(h)
    exact = PairedBootstrap({"m": TrialCounts.from_latencies([t + [math.inf] for t in trials])}).percentiles("m")
    binned = PairedBootstrap({"m": TrialCounts.from_histograms(hists, [1] * 4)}).percentiles("m")
    for name in ("p50_ms", "p99_ms", "p999_ms"):
        assert binned[name] == pytest.approx(exact[name], rel=2e-3)
        assert binned[f"{name}_ci"] == pytest.approx(exact[f"{name}_ci"], rel=2e-3)


EXPERIMENT = """\
name = "trials"
modes = ["equal", "coded"]
[load]
seed = 3
[faults]
seed = 11
[[faults.fault]]
kind = "slow"
rate_hz = 0.5
duration_s = 0.5
factor = 10
[simulate]
instances = 2
queries = 300
rate = 50
trials = 3
[simulate.service]
kind = "constant"
median_ms = 5.0
"""


def test_every_trial_draws_new_faults_shared_by_the_modes_of_that_trial(tmp_path, monkeypatch) -> None:
    seen: list[tuple[str, int, int]] = []

    def spy(config, roles, service, *, faults, seed, **kw):
        seen.append((config.mode, seed, faults.seed))
        return real_simulate(config, roles, service, faults=faults, seed=seed, **kw)

    monkeypatch.setattr(run_experiment, "simulate", spy)
    path = tmp_path / "trials.toml"
    path.write_text(EXPERIMENT)
    summary = run_experiment.run_simulation(load_experiment(path), tmp_path / "out")
    by_trial = [seen[i:i + 2] for i in range(0, len(seen), 2)]
    assert len(by_trial) == 3
    fault_seeds = [trial[0][2] for trial in by_trial]
    assert len(set(fault_seeds)) == 3 and 11 not in fault_seeds  # a new realisation per trial
    for trial, pair in enumerate(by_trial):
        assert [m for m, _, _ in pair] == ["equal", "coded"]
        assert pair[0][1:] == pair[1][1:] == (3 + trial, fault_seeds[trial])  # same arrivals and faults
    coded = summary["coded"]
    assert coded["trials"] == 3 and len(coded["per_trial"]) == 3
    for key in ("p50_ms_ci", "p99_ms_ci", "p999_ms_ci", "gap_ratio_vs_equal_ci", "median_ratio_vs_equal_ci"):
        assert len(coded[key]) == 2, key
    for key in ("ok", "errors", "rejected", "lost"):
        assert key in coded and key in summary["equal"]


def test_trials_default_to_five(tmp_path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(EXPERIMENT.replace("trials = 3\n", ""))
    assert run_experiment._trials(load_experiment(path), load_experiment(path).simulate) == 5


def _stats(p50: float, p999: float | None, **ratios: object) -> dict:
    return {"p50_ms": p50, "p999_ms": p999, **ratios}


def test_best_parm_is_judged_against_the_better_baseline_by_its_interval() -> None:
    modes = {
        "equal": _stats(7.0, 400.0),
        "hedge": _stats(7.0, 100.0),  # the better baseline: the smaller gap
        "coded": _stats(7.2, 300.0, gap_ratio_vs_hedge=0.3, gap_ratio_vs_hedge_ci=[0.2, 0.4]),
        "coded-hedge": _stats(7.4, 60.0, gap_ratio_vs_hedge=1.7, gap_ratio_vs_hedge_ci=[1.2, 1.8],
                              median_ratio_vs_equal=1.06, median_ratio_vs_equal_ci=[1.01, 1.1]),
    }
    best = run_experiment.best_against_better(modes)
    assert best is not None
    assert (best["parm"], best["baseline"], best["verdict"]) == ("coded-hedge", "hedge", "better")
    assert best["median_vs_equal"] == 1.06
    modes["coded-hedge"]["gap_ratio_vs_hedge_ci"] = [0.8, 1.9]
    assert run_experiment.best_against_better(modes)["verdict"] == "tie"  # type: ignore[index]
    modes["coded-hedge"]["gap_ratio_vs_hedge_ci"] = [0.5, 0.9]
    assert run_experiment.best_against_better(modes)["verdict"] == "worse"  # type: ignore[index]
    modes["equal"]["p999_ms"] = None  # failed queries: an infinite gap is never the better baseline
    assert run_experiment.best_against_better(modes)["baseline"] == "hedge"  # type: ignore[index]
    assert run_experiment.best_against_better({"equal": modes["equal"]}) is None  # no ParM run
    # a loss to the baseline with the larger pooled gap is not hidden by a tie with the better one
    modes["equal"]["p999_ms"] = 400.0
    modes["coded-hedge"].update(gap_ratio_vs_hedge_ci=[0.8, 1.9], gap_ratio_vs_equal=0.7, gap_ratio_vs_equal_ci=[0.6, 0.9])
    best = run_experiment.best_against_better(modes)
    assert best is not None and (best["baseline"], best["verdict"], best["overall"]) == ("hedge", "tie", "worse")
    assert best["against"]["equal"]["verdict"] == "worse"
    assert "vs equal 0.70x [0.60, 0.90], worse; overall worse" in run_experiment.format_best(best)
    assert "best ParM (coded-hedge) vs better baseline (hedge)" in run_experiment.format_best(
        run_experiment.best_against_better(modes))  # type: ignore[arg-type]


def test_a_load_spike_compresses_the_same_arrivals_inside_its_window() -> None:
    from parm.bench.loadgen import Spike, poisson_gaps_s
    from parm.errors import ConfigError

    plain = poisson_gaps_s(20_000, 100.0, seed=3)
    np.testing.assert_array_equal(poisson_gaps_s(20_000, 100.0, seed=3, spike=None), plain)
    spike = Spike(at_s=50.0, duration_s=20.0, factor=2.0)
    times = np.cumsum(poisson_gaps_s(20_000, 100.0, seed=3, spike=spike))
    base = np.cumsum(plain)
    assert np.all(np.diff(times) >= 0) and len(times) == len(base)
    np.testing.assert_array_equal(times[base < 50.0], base[base < 50.0])  # untouched before the spike
    inside = ((times >= 50.0) & (times < 70.0)).sum()
    before = ((times >= 30.0) & (times < 50.0)).sum()
    assert 1.8 < inside / before < 2.2  # twice the rate during the spike
    after = times[base >= 90.0] - (base[base >= 90.0] - 20.0)  # after it, the base rate, 20 s sooner
    np.testing.assert_allclose(after, 0.0, atol=1e-9)
    with pytest.raises(ConfigError):
        Spike(at_s=1.0, duration_s=0.0, factor=2.0)
