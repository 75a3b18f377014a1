"""What a fault spec injects, per instance: expected and realised figures for a run's log."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from parm.errors import ConfigError
from parm.faults.schedule import InstanceFaults, _shuffle_candidates
from parm.faults.spec import FaultSpec, RandomDelay, Shuffle, SlowEpisodes, Straggler

_GRID = 4096  # midpoints used to average the expected slowdown over [0, horizon_s)


def _expected_slowdown(spec: FaultSpec, instance: int, horizon_s: float) -> tuple[float, float]:
    """(expected fraction of time slowed, expected mean slowdown) over [0, horizon_s).

    An episode of rate λ and length d is active at t with probability 1 − exp(−λ·min(t, d))
    (episodes start at t = 0 at the earliest); faults are independent, stragglers deterministic.
    """
    t_s = (np.arange(_GRID) + 0.5) * (horizon_s / _GRID)  # (G,)
    p_calm = np.ones_like(t_s)  # (G,) probability no factor > 1 acts
    mean = np.ones_like(t_s)  # (G,) expected product of factors
    for _, fault in spec.for_instance(instance):
        if isinstance(fault, SlowEpisodes) and fault.factor > 1:
            p_on = 1.0 - np.exp(-fault.rate_hz * np.minimum(t_s, fault.duration_s))  # (G,)
            p_calm *= 1.0 - p_on
            mean *= 1.0 + (fault.factor - 1.0) * p_on
        elif isinstance(fault, Straggler) and fault.factor > 1:
            on = t_s >= fault.from_s  # (G,)
            p_calm *= ~on
            mean *= np.where(on, fault.factor, 1.0)
    return float(1.0 - p_calm.mean()), float(mean.mean())


def _union_length_s(intervals: list[tuple[float, float]], horizon_s: float) -> float:
    total, reach = 0.0, 0.0
    for start_s, end_s in sorted(intervals):
        start_s, end_s = max(start_s, reach), min(end_s, horizon_s)
        if end_s > start_s:
            total += end_s - start_s
            reach = end_s
    return total


def _realised(schedule: InstanceFaults) -> dict[str, float]:
    horizon_s = schedule.horizon_s
    slowed = [(s, e) for s, e, f in schedule.episodes() if f > 1]
    slowed += [(from_s, horizon_s) for from_s, f in schedule.stragglers if f > 1]
    return {
        "slowed_fraction": _union_length_s(slowed, horizon_s) / horizon_s,
        "stalled_fraction": _union_length_s(list(schedule.stalls), horizon_s) / horizon_s,
    }


def _expected_shuffle(spec: FaultSpec, instance: int, n_instances: int) -> dict[str, float]:
    """Expected shuffle figures at any t in [0, horizon_s) (slots run back to back from 0).

    A shuffle touches an instance among n candidates with probability 2/n, so with c concurrent
    shuffles P(in none) = (1 − 2/n)^c and the mean count is 2c/n; faults are independent. A
    megabyte (1e6 bytes) in s shuffles of a link of L Mb/s takes 8·s/L extra seconds.
    """
    p_none, extra_ms = 1.0, 0.0
    for fault in spec.faults:
        if isinstance(fault, Shuffle):
            candidates = _shuffle_candidates(fault, n_instances)
            if instance in candidates:
                p_touch = 2.0 / len(candidates)
                p_none *= (1.0 - p_touch) ** fault.concurrent
                extra_ms += 8e3 * p_touch * fault.concurrent / fault.link_mbps
    return {"shuffled_fraction_expected": 1.0 - p_none, "transfer_ms_per_mb_expected": extra_ms}


def _realised_shuffle(schedule: InstanceFaults) -> dict[str, Any]:
    horizon_s = schedule.horizon_s
    runs = [(s, e) for s, e, _ in schedule.shuffles()]
    extra_ms = sum(
        8e3 * count * (min(end_s, horizon_s) - start_s) / timeline.link_mbps
        for timeline in schedule.shuffle for start_s, end_s, count in timeline.runs() if start_s < horizon_s
    )
    return {
        "shuffled_fraction": _union_length_s(runs, horizon_s) / horizon_s,
        "transfer_ms_per_mb": extra_ms / horizon_s,
        "shuffles": sum(t.raw_count for t in schedule.shuffle),
    }


def _delay_figures(spec: FaultSpec, instance: int) -> dict[str, float]:
    delays = [f for _, f in spec.for_instance(instance) if isinstance(f, RandomDelay)]
    return {
        "delay_prob": 1.0 - math.prod(1.0 - d.prob for d in delays),
        "delay_mean_ms": sum(d.prob * d.mean_ms for d in delays),
    }


def _instance_summary(spec: FaultSpec, instance: int, horizon_s: float, n_instances: int) -> dict[str, Any]:
    schedule = InstanceFaults.build(spec, instance, horizon_s, n_instances)
    expected_fraction, expected_mean = _expected_slowdown(spec, instance, horizon_s)
    return {
        "instance": instance,
        "slowed_fraction_expected": expected_fraction,
        "mean_slowdown_expected": expected_mean,
        **_realised(schedule),
        "slow_episodes": sum(t.raw_count for t in schedule.slow),
        **_delay_figures(spec, instance),
        **_expected_shuffle(spec, instance, n_instances),
        **_realised_shuffle(schedule),
        "crash_at_s": schedule.crash_at_s,
        "stall_windows": [list(w) for w in schedule.stalls],
    }


def summarize(spec: FaultSpec, instances: int, horizon_s: float, n_instances: int | None = None) -> dict[str, Any]:
    """What ``spec`` injects into the first ``instances`` instances of a run over ``horizon_s``
    seconds; ``n_instances`` is the run's instance count, among which ``shuffle`` pairs are
    drawn (default: ``instances``).

    Per instance: expected fraction of time slowed and expected mean slowdown (from the
    rates), the realised slowed/stalled fractions and episode count of this seed's schedule,
    the probability a batch is delayed and the mean extra delay per batch (ms), the expected
    and realised fraction of time in >= 1 shuffle and extra transfer time per megabyte (ms),
    the number of shuffles touching it, the crash time and the stall windows.
    ``out_of_range`` lists faults naming instances the run lacks.
    """
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ConfigError(
            f"instances must be an integer >= 1; got instances={instances!r}", field="instances", value=instances
        )
    n_instances = instances if n_instances is None else n_instances
    if isinstance(n_instances, bool) or not isinstance(n_instances, int) or n_instances < instances:
        raise ConfigError(
            f"n_instances must be an integer >= instances={instances}; got n_instances={n_instances!r}",
            field="n_instances", value=n_instances,
        )
    return {
        "seed": spec.seed,
        "horizon_s": float(horizon_s),
        "instances": instances,
        "faults": [f.to_text() for f in spec.faults],
        "out_of_range": [f.to_text() for f in spec.out_of_range(n_instances)],
        "per_instance": [_instance_summary(spec, i, horizon_s, n_instances) for i in range(instances)],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for a :func:`summarize` result (for the CLI to print)."""
    if not summary["faults"]:
        return "faults: none"
    head = f"faults (seed={summary['seed']}, horizon {summary['horizon_s']:g} s): "
    lines = [head + "; ".join(summary["faults"])]
    lines += [f"  ignored (no such instance): {text}" for text in summary["out_of_range"]]
    lines += [_format_row(row) for row in summary["per_instance"]]
    return "\n".join(lines)


def _format_row(row: dict[str, Any]) -> str:
    shuffled = ""
    if row.get("shuffled_fraction_expected") or row.get("shuffles"):
        shuffled = (
            f"in shuffles {row['shuffled_fraction']:.1%} (expected {row['shuffled_fraction_expected']:.1%}), "
            f"transfers +{row['transfer_ms_per_mb']:.1f} ms/MB (expected {row['transfer_ms_per_mb_expected']:.1f}), "
        )
    return (
        f"  instance {row['instance']}: slowed {row['slowed_fraction']:.1%} "
        f"(expected {row['slowed_fraction_expected']:.1%}, "
        f"mean slowdown {row['mean_slowdown_expected']:.2f}x), "
        f"delay p={row['delay_prob']:.2f} mean {row['delay_mean_ms']:.2f} ms/batch, {shuffled}"
        f"crash_at_s={row['crash_at_s']}, stalls={row['stall_windows']}"
    )
