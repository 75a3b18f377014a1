"""Run an experiment file for real (``parm bench``) or simulated (``parm simulate``) and write
DIR/summary.json, DIR/results.csv, per-query records (real runs) and PNG plots.

Trials: an experiment runs ``trials`` trials (default 5) of every point. Trial t draws its own
fault realisation (``FaultSpec.for_trial(t)``: a seed derived from the file's fault seed and t)
and its own arrivals (seed ``load.seed + t``); every mode of trial t sees exactly those, and the
modes of one trial run back to back (trial by trial, not mode by mode, so slow drift of the
machine does not favour one mode). Figures pool the trials; intervals are the paired trial
bootstrap of :mod:`parm.bench.intervals`.

summary.json: ``{"kind", "experiment", "backend", "points": [{"point": {...}, "modes": {mode: stats}}],
"modes": <the first point's modes>, <mode>: <the first point's stats for that mode>, "config",
"interval_method"}``. Each mode's stats hold ``instances``, ``trials``, ``p50_ms``, ``p90_ms``,
``p99_ms``, ``p999_ms`` (failed queries count as +∞; written as null when infinite), each with
``_ci`` = [low, high] (95%), ``mean_ms``, ``max_ms`` (answered queries), ``queries``, ``ok``,
``errors``, ``rejected``, ``lost``, ``reconstructed_fraction``, ``sources``, ``per_trial`` and
(real runs on labelled data) ``accuracy``. Coded-family modes also have, for every other mode
run, ``gap_ratio_vs_<mode>`` = (p99.9 − p50 of that mode) / (p99.9 − p50 of this one) and
``median_ratio_vs_<mode>`` = p50 of this / p50 of that, each with ``_ci``; a ratio is null when
undefined (its denominator is not finite).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from parm.bench.experiment import Experiment, Point
from parm.bench.histogram import LatencyHistogram
from parm.bench.intervals import PairedBootstrap, TrialCounts
from parm.bench.runner import LoadSpec, run_mode
from parm.bench.simulate import SIM_QUERY_SHAPE, ServiceModel, simulate
from parm.bench.stats import failed_as_inf, latency_summary
from parm.errors import ConfigError
from parm.faults import FaultSpec
from parm.serving import ServingConfig, instance_roles

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 5
CODED_FAMILY = ("coded",)
INTERVAL_METHOD = ("95% paired percentile bootstrap over trials (2000 resamples; each trial its own fault "
                   "realisation and arrivals, shared by every mode of that trial); failed, rejected and lost "
                   "queries count as +inf latency")
CSV_FIELDS = ["point", "rate", "k", "batch_size", "mode", "instances", "trials", "p50_ms", "p50_ms_ci", "p90_ms",
              "p99_ms", "p99_ms_ci", "p999_ms", "p999_ms_ci", "mean_ms", "max_ms", "reconstructed_fraction", "ok",
              "errors", "rejected", "lost", "accuracy", "gap_ratio_vs_equal", "gap_ratio_vs_equal_ci",
              "median_ratio_vs_equal", "median_ratio_vs_equal_ci"]


def trial_faults(faults: FaultSpec | None, trial: int) -> FaultSpec | None:
    """Trial ``trial``'s fault realisation (the same for every mode of that trial)."""
    return None if faults is None else faults.for_trial(trial)


def _trials(exp: Experiment, section: dict[str, Any] | None = None) -> int:
    trials = int((section or {}).get("trials", exp.load.get("trials", DEFAULT_TRIALS)))
    if trials < 1:
        raise ConfigError(f"{exp.source}: trials must be >= 1; got {trials}", field="trials", value=trials)
    return trials


def _add_intervals(modes: dict[str, dict[str, Any]], counts: dict[str, TrialCounts]) -> None:
    """Pooled percentiles with intervals for every mode; ratios for the coded family."""
    boot = PairedBootstrap(counts)
    for mode, stats in modes.items():
        stats.update(boot.percentiles(mode))
    for ours in modes:
        if ours in CODED_FAMILY:
            for base in modes:
                if base != ours:
                    modes[ours].update(boot.ratios(ours, base))


def _per_trial(latencies_ms: list[float]) -> dict[str, float]:
    s = latency_summary([v for v in latencies_ms if math.isfinite(v)],
                        failed=sum(not math.isfinite(v) for v in latencies_ms))
    return {k: s[k] for k in ("p50_ms", "p99_ms", "p999_ms")}


def _merge_counts(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts added over trials; fractions and accuracies weighted by queries / answers."""
    stats: dict[str, Any] = {}
    for key in ("queries", "ok", "errors", "rejected", "lost"):
        stats[key] = sum(t.get(key, 0) for t in trials)
    stats["answered"] = stats["ok"]
    stats["sources"] = {}
    for t in trials:
        for source, count in t["sources"].items():
            stats["sources"][source] = stats["sources"].get(source, 0) + count
    stats["reconstructed_fraction"] = stats["sources"].get("reconstructed", 0) / max(stats["queries"], 1)
    restarts = [t["restarts"] for t in trials if t.get("restarts") is not None]
    stats["restarts"] = sum(restarts) if restarts else None  # instances that failed and came back
    for key in {k for t in trials for k in t if k.startswith("accuracy")}:
        weights = [t["ok"] for t in trials if key in t]
        stats[key] = sum(t[key] * t["ok"] for t in trials if key in t) / max(sum(weights), 1)
    return stats


def _parity_for(exp: Experiment, k: int) -> str | None:
    parities = exp.system.get("parities", {})
    if str(k) in parities:
        return str(parities[str(k)])
    return exp.system.get("parity")


# ---- real runs -----------------------------------------------------------------------------
def _system_spec(exp: Experiment, point: Point, mode: str, base_record: Any, backend: str = "local",
                 ray_address: str | None = None) -> Any:
    from parm.system import SystemSpec, check_checkpoints

    parity = _parity_for(exp, point.k) if mode == "coded" else None
    check_checkpoints(exp.system["base"], parity, exp.system.get("cheap") if mode == "cheap" else None,
                      point.k if parity else None, None)
    encoder = "add"
    if parity is not None:
        from parm.training.checkpoint import load_record

        encoder = load_record(parity).encoder or "add"
    serving = ServingConfig(
        query_shape=tuple(base_record.in_shape), mode=mode, k=point.k, encoder=encoder, batch_size=point.batch_size,
        batch_wait_ms=float(exp.system.get("batch_wait_ms", 1.0)),
        group_wait_ms=float(exp.system.get("group_wait_ms", 20.0)),
        stall_timeout_ms=float(exp.system.get("stall_timeout_ms", 2000.0)),
        deadline_ms=float(exp.system.get("deadline_ms", 10_000.0)), dispatch=str(exp.system.get("dispatch", "shared")))
    return SystemSpec(base=exp.system["base"], instances=int(exp.system.get("instances", 2)), serving=serving,
                      parity=parity, cheap=exp.system.get("cheap") if mode == "cheap" else None, faults=point.faults,
                      emulated_ms=float(exp.system.get("emulated_ms", 0.0)), backend=backend, ray_address=ray_address)


def _write_records(path: Path, mode: str, trial: int, records: list) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["mode", "trial", "index", "scheduled_s", "sent_s", "answered_s", "latency_ms", "instance",
                             "source", "outcome", "label"])
        for r in records:
            writer.writerow([mode, trial, r.index, f"{r.scheduled_s:.6f}", f"{r.sent_s:.6f}", f"{r.answered_s:.6f}",
                             f"{r.latency_ms:.4f}", r.instance, r.source, r.outcome, r.label])


def _bench_trial(spec: Any, load: LoadSpec, faults: FaultSpec | None, trial: int, data: tuple,
                 records_path: Path | None, progress: bool) -> tuple[dict[str, Any], list[float]]:
    """One mode, one trial: its summary and its latencies (failed as +∞, warmup dropped)."""
    load = dataclasses.replace(load, seed=load.seed + trial)
    spec = dataclasses.replace(spec, faults=trial_faults(faults, trial))
    records: list = []
    summary = asyncio.run(run_mode(spec, data[0], data[1], load, progress=progress, records=records))
    if records_path is not None:
        _write_records(records_path, spec.serving.mode, trial, records)
    return summary, failed_as_inf(records, load.warmup, missing=load.queries - len(records))


def bench_systems(specs: dict[str, Any], load: LoadSpec, faults: FaultSpec | None, trials: int, data: tuple, *,
                  records_path: Path | None = None, progress: bool = False) -> tuple[dict, dict]:
    """Run each mode's system (``specs``: mode -> SystemSpec) ``trials`` times under ``load``;
    trial t uses arrivals seeded ``load.seed + t`` and ``faults.for_trial(t)`` in every mode.
    Returns (stats by mode, with intervals and ratios; latencies by mode, failed as +∞)."""
    summaries: dict[str, list[dict[str, Any]]] = {mode: [] for mode in specs}
    latencies: dict[str, list[list[float]]] = {mode: [] for mode in specs}
    for trial in range(trials):
        for mode, spec in specs.items():  # trial by trial: every mode of a trial sees its faults and arrivals
            summary, lat = _bench_trial(spec, load, faults, trial, data, records_path, progress)
            summaries[mode].append(summary)
            latencies[mode].append(lat)
    stats: dict[str, dict[str, Any]] = {}
    for mode, spec in specs.items():
        roles = spec.roles()
        stats[mode] = {**_merge_counts(summaries[mode]), **latency_summary(
            [v for t in latencies[mode] for v in t if math.isfinite(v)],
            failed=sum(not math.isfinite(v) for t in latencies[mode] for v in t)),
            "mode": mode, "instances": len(roles), "roles": {r: roles.count(r) for r in sorted(set(roles))},
            "trials": trials, "per_trial": [_per_trial(t) for t in latencies[mode]]}
    _add_intervals(stats, {mode: TrialCounts.from_latencies(latencies[mode]) for mode in specs})
    return stats, {mode: [v for t in latencies[mode] for v in t] for mode in specs}


def _bench_point(exp: Experiment, point: Point, modes: list[str], base_record: Any, data: tuple, out: Path,
                 progress: bool, backend: str, ray_address: str | None) -> tuple[dict, dict]:
    specs = {mode: _system_spec(exp, point, mode, base_record, backend, ray_address) for mode in modes}
    load = LoadSpec(int(exp.load.get("queries", 2000)), point.rate, int(exp.load.get("seed", 0)),
                    int(exp.load.get("warmup", 0)))
    return bench_systems(specs, load, point.faults, _trials(exp), data,
                         records_path=out / f"records-{point.label}.csv", progress=progress)


def run_bench(exp: Experiment, out: Path, *, progress: bool = True,
              on_result: Callable[[str, str, dict], None] | None = None, backend: str = "local",
              ray_address: str | None = None) -> dict[str, Any]:
    """Run every point × trial × mode on the real system (``backend``: local processes or Ray
    Serve deployments); write the outputs into ``out``."""
    from parm.data import load_dataset
    from parm.training.checkpoint import load_record

    if "base" not in exp.system:
        raise ConfigError(f"{exp.source}: [system] needs base = CHECKPOINT for parm bench", field="system.base",
                          value=None)
    base_record = load_record(exp.system["base"])
    test = load_dataset(base_record.dataset, "test", data_root=exp.system.get("data_root"))
    data = (test.float_images(), test.labels)
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in exp.modes if m != "cheap" or exp.system.get("cheap")]
    if len(modes) < len(exp.modes):
        log.warning("skipping mode cheap: no [system] cheap checkpoint")
    points_out = []
    for point in exp.points():
        (out / f"records-{point.label}.csv").unlink(missing_ok=True)
        stats, latencies = _bench_point(exp, point, modes, base_record, data, out, progress, backend, ray_address)
        for mode in modes:
            if on_result:
                on_result(point.label, mode, stats[mode])
        points_out.append({"point": point.to_json(), "modes": stats})
        _plot_safely(out, point.label, latencies=latencies)
    return _finish(exp, out, "bench", points_out, backend=backend)


# ---- simulated runs ------------------------------------------------------------------------
def _sim_config(sim: dict[str, Any], mode: str, point: Point) -> ServingConfig:
    return ServingConfig(SIM_QUERY_SHAPE, mode=mode, k=point.k, batch_size=point.batch_size,
                         stall_timeout_ms=float(sim.get("stall_timeout_ms", 10_000.0)),
                         deadline_ms=float(sim.get("deadline_ms", 60_000.0)),
                         max_pending_queries=int(sim.get("max_pending_queries", 1_000_000)),
                         dispatch=str(sim.get("dispatch", "shared")))


def _simulate_point(exp: Experiment, point: Point, service: ServiceModel, m: int) -> tuple[dict, dict]:
    sim = exp.simulate
    queries = int(sim.get("queries", exp.load.get("queries", 10_000)))
    warmup = int(sim.get("warmup", exp.load.get("warmup", 0)))
    modes = list(sim.get("modes", exp.modes))
    results: dict[str, list] = {mode: [] for mode in modes}
    wall_s = {mode: 0.0 for mode in modes}
    for trial in range(_trials(exp, sim)):
        faults = trial_faults(point.faults, trial)
        for mode in modes:
            started = time.monotonic()
            results[mode].append(simulate(
                _sim_config(sim, mode, point), instance_roles(mode, m, point.k), service, queries=queries,
                rate_qps=point.rate, faults=faults, seed=int(exp.load.get("seed", 0)) + trial, warmup=warmup,
                restart_s=float(sim.get("restart_s", 1.0))))
            wall_s[mode] += time.monotonic() - started
    stats: dict[str, dict[str, Any]] = {}
    hists: dict[str, LatencyHistogram] = {}
    for mode, trials in results.items():
        hist = LatencyHistogram()
        for r in trials:
            hist.merge(r.histogram)
        roles = instance_roles(mode, m, point.k)
        per_trial = [r.summary() for r in trials]
        stats[mode] = {**_merge_counts(per_trial), "mean_ms": hist.summary()["mean_ms"],
                       "max_ms": hist.summary()["max_ms"], "mode": mode, "instances": len(roles),
                       "roles": {r: roles.count(r) for r in sorted(set(roles))}, "trials": len(trials),
                       "per_trial": [{k: t[k] for k in ("p50_ms", "p99_ms", "p999_ms")} for t in per_trial],
                       "wall_s": wall_s[mode]}
        hists[mode] = hist
    _add_intervals(stats, {mode: TrialCounts.from_histograms([r.histogram for r in trials],
                                                             [r.failed for r in trials])
                           for mode, trials in results.items()})
    return stats, hists


def run_simulation(exp: Experiment, out: Path, *, on_result: Callable[[str, str, dict], None] | None = None
                   ) -> dict[str, Any]:
    """Run every point × trial × mode in the cluster simulator; write the outputs into ``out``."""
    sim = exp.simulate
    service = ServiceModel(**sim.get("service", {}))
    m = int(sim.get("instances", exp.system.get("instances", 2)))
    out.mkdir(parents=True, exist_ok=True)
    points_out = []
    for point in exp.points(simulated=True):
        stats, hists = _simulate_point(exp, point, service, m)
        for mode in stats:
            if on_result:
                on_result(point.label, mode, stats[mode])
        points_out.append({"point": point.to_json(), "modes": stats})
        _plot_safely(out, point.label, histograms=hists)
    return _finish(exp, out, "simulate", points_out)


# ---- outputs -------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    """Non-finite floats become null (strict JSON has no Infinity or NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _finish(exp: Experiment, out: Path, kind: str, points: list[dict[str, Any]], backend: str = "simulated"
            ) -> dict[str, Any]:
    first = points[0]["modes"] if points else {}
    summary = {"kind": kind, "experiment": exp.name, "backend": backend, "points": points, "modes": first, **first,
               "config": exp.to_json(), "interval_method": INTERVAL_METHOD}
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, default=str, allow_nan=False) + "\n")
    (out / "experiment.json").write_text(json.dumps(exp.to_json(), indent=2, default=str) + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for p in points:
            for mode, stats in p["modes"].items():
                row = {k: (" ".join(_fmt(v) for v in val) if isinstance(val, list) else val)
                       for k, val in stats.items() if k in CSV_FIELDS}
                writer.writerow({**row, "mode": mode, "point": p["point"]["label"], "rate": p["point"]["rate"],
                                 "k": p["point"]["k"], "batch_size": p["point"]["batch_size"]})
    if len(points) > 1:
        _plot_safely(out, None, points=points)
    return summary


def _plot_safely(out: Path, label: str | None, **data: Any) -> None:
    try:
        from parm.bench import plots
    except ImportError as exc:  # plotting is optional
        log.warning("no plots: %s", exc)
        return
    if "points" in data:
        plots.plot_sweep(out, data["points"])
    else:
        plots.plot_cdf(out / f"cdf-{label}.png", label or "", latencies=data.get("latencies"),
                       histograms=data.get("histograms"))


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def format_with_interval(value: float | None, ci: list | None, digits: int = 2, unit: str = "") -> str:
    """``4.10× [3.20, 5.00]``; ``undefined`` for a value that is None; ``inf`` for +∞."""
    text = _fmt(value, digits) + (unit if value is not None and math.isfinite(value) else "")
    if ci and value is not None:
        text += f" [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"
    return text


def format_summary(summary: dict[str, Any]) -> str:
    """The one-screen table: a block per point, a line per mode (instances, percentiles with their
    95% intervals, outcomes), then the coded family's gap and median ratios with intervals."""
    lines = []
    for p in summary["points"]:
        lines.append(f"== {summary['experiment']} [{summary['kind']}] {p['point']['label']}")
        lines.append(f"{'mode':10s} {'inst':>4s} {'p50 ms [95% CI]':>22s} {'p99 ms [95% CI]':>26s} "
                     f"{'p99.9 ms [95% CI]':>28s} {'recon':>6s} {'ok':>7s} {'err':>5s} {'rej':>5s} {'lost':>5s} "
                     f"{'acc':>6s}")
        for mode, s in p["modes"].items():
            acc = s.get("accuracy")
            lines.append(f"{mode:10s} {s['instances']:4d} {format_with_interval(s['p50_ms'], s.get('p50_ms_ci')):>22s} "
                         f"{format_with_interval(s['p99_ms'], s.get('p99_ms_ci')):>26s} "
                         f"{format_with_interval(s['p999_ms'], s.get('p999_ms_ci')):>28s} "
                         f"{s['reconstructed_fraction']:6.3f} {s.get('ok', 0):7d} {s['errors']:5d} "
                         f"{s.get('rejected', 0):5d} {s['lost']:5d} {'' if acc is None else f'{acc:6.4f}'}")
        for ours in CODED_FAMILY:
            stats = p["modes"].get(ours, {})
            bases = [k[len("gap_ratio_vs_"):] for k in stats if k.startswith("gap_ratio_vs_") and not k.endswith("_ci")]
            if bases:
                lines.append(f"{ours} (p99.9 - p50) smaller than: " + ", ".join(
                    f"{b} {format_with_interval(stats[f'gap_ratio_vs_{b}'], stats.get(f'gap_ratio_vs_{b}_ci'), unit='x')}"
                    for b in bases))
                lines.append(f"{ours} median / baseline median: " + ", ".join(
                    f"{b} {format_with_interval(stats[f'median_ratio_vs_{b}'], stats.get(f'median_ratio_vs_{b}_ci'), 3)}"
                    for b in bases))
        trials = next(iter(p["modes"].values()), {}).get("trials")
        if trials:
            lines.append(f"({trials} trials, each its own fault realisation; [95% paired bootstrap over trials]; "
                         "failed queries count as +inf)")
    return "\n".join(lines)
