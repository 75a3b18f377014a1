"""Run an experiment file for real (``parm bench``) or simulated (``parm simulate``) and write
DIR/summary.json, DIR/results.csv, per-query records (real runs) and PNG plots.

Trials: an experiment runs ``trials`` trials (default 5) of every point. Trial t draws its own
fault realisation (``FaultSpec.for_trial(t)``: a seed derived from the file's fault seed and t)
and its own arrivals (seed ``load.seed + t``); every mode of trial t sees exactly those, and the
modes of one trial run back to back (trial by trial, not mode by mode, so slow drift of the
machine does not favour one mode). Figures pool the trials; intervals are the paired trial
bootstrap of :mod:`parm.bench.intervals`.

Each system is resolved by :func:`parm.system.resolve_system` from only the [system] keys the
file gives; real runs and the simulator drive their load with the same open-loop driver
(:mod:`parm.bench.loadgen`) and summarise with the same :func:`parm.bench.stats.summarize`.

summary.json: ``{"kind", "experiment", "backend", "trials", "points": [{"point": {...}, "modes":
{mode: stats}}], "modes": <the first point's modes>, <mode>: <the first point's stats for that
mode>, "config", "interval_method"}``. Each mode's stats hold ``instances``, ``roles``,
``trials``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``p999_ms`` (failed queries count as +∞; written
as null when infinite), each with ``_ci`` = [low, high] (95%), ``mean_ms``, ``max_ms`` (answered
queries), ``queries``, ``ok``, ``errors``, ``rejected``, ``lost``, ``reconstructed_fraction``,
``sources`` (every measured query by where its answer came from; ``error`` and ``lost`` for the
others), ``restarts``, ``per_trial`` and (real runs on labelled data) ``accuracy``. Coded-family
modes also have, for every other mode run, ``gap_ratio_vs_<mode>`` = (p99.9 − p50 of that mode) /
(p99.9 − p50 of this one) and ``median_ratio_vs_<mode>`` = p50 of this / p50 of that, each with
``_ci``; a ratio is null when undefined (its denominator is not finite).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from parm.bench.experiment import SIM_SERVING_KEYS, Experiment, Point
from parm.bench.intervals import PairedBootstrap, TrialCounts
from parm.bench.loadgen import QueryResult, RecordSink, Sink
from parm.bench.runner import LoadSpec, run_mode
from parm.bench.simulate import ServiceModel, sim_serving_config, simulate
from parm.bench.stats import pooled_latencies, summarize, trial_counts
from parm.errors import ConfigError
from parm.faults import FaultSpec
from parm.serving import CODED_MODES, ServingConfig, instance_roles
from parm.system import SERVING_KEYS, SystemSpec, count_roles, resolve_system

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 5
CODED_FAMILY = CODED_MODES
INTERVAL_METHOD = ("95% paired percentile bootstrap over trials (2000 resamples; each trial its own fault "
                   "realisation and arrivals, shared by every mode of that trial); failed, rejected and lost "
                   "queries count as +inf latency")
CSV_FIELDS = ["point", "rate", "k", "batch_size", "mode", "instances", "trials", "p50_ms", "p50_ms_ci", "p90_ms",
              "p99_ms", "p99_ms_ci", "p999_ms", "p999_ms_ci", "mean_ms", "max_ms", "reconstructed_fraction", "resends", "ok",
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


def _mode_stats(mode: str, roles: dict[str, int], trials: Sequence[Sink], labels: Sequence[int] | None = None
                ) -> dict[str, Any]:
    """One mode's entry of summary.json, real or simulated alike: its summary over the trials and
    its instance layout."""
    return {**summarize(trials, labels=labels), "mode": mode, "instances": sum(roles.values()), "roles": roles}


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


def _parity_for(exp: Experiment, k: int) -> str | None:
    parities = exp.system.get("parities", {})
    if str(k) in parities:
        return str(parities[str(k)])
    return exp.system.get("parity")


# ---- real runs -----------------------------------------------------------------------------
def _system_specs(exp: Experiment, point: Point, modes: list[str], backend: str | None,
                  ray_address: str | None) -> tuple[Point, dict[str, SystemSpec]]:
    """Every mode's system at ``point`` (each resolved once, from only the keys the file gives), and
    the point with its k: the file's (or the sweep's); else the parity checkpoint's, which every
    mode then uses; else the serving default."""
    system = exp.system
    settings = {key: system[key] for key in SERVING_KEYS if key in system}
    settings.update(batch_size=point.batch_size, k=point.k, **point.settings)
    given: dict[str, Any] = dict(instances=system.get("instances"), faults=point.faults,
                                 emulated_ms=system.get("emulated_ms"), backend=backend, ray_address=ray_address,
                                 zones=system.get("zones"), device=system.get("device"),
                                 precision=system.get("precision"), gpus_per_instance=system.get("gpus_per_instance"))
    specs: dict[str, SystemSpec] = {}
    coded = [mode for mode in modes if mode in CODED_MODES]
    if coded:
        parity = _parity_for(exp, point.k if point.k is not None else ServingConfig.default("k"))
        for mode in coded:
            specs[mode] = resolve_system(system["base"], parity=parity, mode=mode, serving=settings, **given)
        settings["k"], settings["r"] = specs[coded[0]].serving.k, specs[coded[0]].serving.r  # equal cost for all
    for mode in modes:
        if mode not in CODED_MODES:
            specs[mode] = resolve_system(system["base"], cheap=system.get("cheap") if mode == "cheap" else None,
                                         mode=mode, serving=settings, **given)
    specs = {mode: specs[mode] for mode in modes}
    return dataclasses.replace(point, k=next(iter(specs.values())).serving.k), specs


def _write_records(path: Path, mode: str, trial: int, records: list[QueryResult]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["mode", "trial", "index", "scheduled_s", "sent_s", "answered_s", "latency_ms", "instance",
                             "source", "outcome", "label"])
        for r in records:
            writer.writerow([mode, trial, r.index, f"{r.scheduled_s:.6f}", f"{r.sent_s:.6f}", f"{r.answered_s:.6f}",
                             f"{r.latency_ms:.4f}", r.instance, r.source, r.outcome, r.label])


def _bench_trials(specs: dict[str, SystemSpec], load: LoadSpec, trials: int, inputs: torch.Tensor,
                  records_path: Path, progress: bool) -> dict[str, list[RecordSink]]:
    """Run each mode's system ``trials`` times; trial t uses arrivals seeded ``load.seed + t`` and
    its own fault realisation in every mode. The modes of one trial run back to back."""
    sinks: dict[str, list[RecordSink]] = {mode: [] for mode in specs}
    for trial in range(trials):
        for mode, spec in specs.items():
            trial_spec = dataclasses.replace(spec, faults=trial_faults(spec.faults, trial))
            sink = asyncio.run(run_mode(trial_spec, inputs, dataclasses.replace(load, seed=load.seed + trial),
                                        progress=progress))
            _write_records(records_path, mode, trial, sink.records)
            sinks[mode].append(sink)
    return sinks


def run_bench(exp: Experiment, out: Path, *, progress: bool = True,
              on_result: Callable[[str, str, dict], None] | None = None, backend: str | None = None,
              ray_address: str | None = None, kind: str = "bench") -> dict[str, Any]:
    """Run every point × trial × mode on the real system (``backend``: local processes or Ray
    Serve deployments; None: the default); write the outputs into ``out``. ``kind`` labels the
    summary (``parm demo`` runs its experiment through here as ``demo``)."""
    from parm.checkpoint import load_record
    from parm.data import load_dataset

    if "base" not in exp.system:
        raise ConfigError(f"{exp.source}: [system] needs base = CHECKPOINT for parm bench", field="system.base",
                          value=None)
    base_record = load_record(exp.system["base"])
    test = load_dataset(base_record.dataset, "test", data_root=exp.system.get("data_root")).prepared_for(
        base_record.in_shape, base_record.mean, base_record.std, model=f"the base model in {exp.system['base']}")
    inputs, labels = test.float_images(), test.labels.tolist()
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in exp.modes if m != "cheap" or exp.system.get("cheap")]
    if len(modes) < len(exp.modes):
        log.warning("skipping mode cheap: no [system] cheap checkpoint")
    queries, seed, warmup = (int(exp.load.get(key, default)) for key, default in
                             (("queries", 2000), ("seed", 0), ("warmup", 0)))
    trials = _trials(exp)
    points_out = []
    for point in exp.points():
        point, specs = _system_specs(exp, point, modes, backend, ray_address)
        records_path = out / f"records-{point.label}.csv"
        records_path.unlink(missing_ok=True)
        sinks = _bench_trials(specs, LoadSpec(queries, point.rate, seed, warmup, exp.spike()), trials, inputs,
                              records_path, progress)
        stats = {mode: _mode_stats(mode, specs[mode].role_counts(), sinks[mode], labels) for mode in modes}
        _add_intervals(stats, {mode: trial_counts(sinks[mode]) for mode in modes})
        for mode in modes:
            stats[mode]["devices"] = specs[mode].instance_devices()  # where each instance slot ran
            if on_result:
                on_result(point.label, mode, stats[mode])
        points_out.append({"point": point.to_json(), "modes": stats})
        _plot_safely(out, point.label, tails={mode: pooled_latencies(sinks[mode]) for mode in modes})
    return _finish(exp, out, kind, points_out, trials, backend=next(iter(specs.values())).backend)


# ---- simulated runs ------------------------------------------------------------------------
def _simulate_point(exp: Experiment, point: Point, service: ServiceModel, m: int) -> tuple[Point, dict, dict]:
    """Every trial × mode of one point in the simulator: (the point with its k, stats by mode,
    pooled histograms by mode)."""
    sim = exp.simulate
    queries = int(sim.get("queries", exp.load.get("queries", 10_000)))
    warmup = int(sim.get("warmup", exp.load.get("warmup", 0)))
    modes = list(sim.get("modes", exp.modes))
    settings = {key: sim[key] for key in SIM_SERVING_KEYS if key in sim}
    settings.update(k=point.k, batch_size=point.batch_size, **point.settings)
    configs = {mode: sim_serving_config(mode, settings=settings) for mode in modes}
    point = dataclasses.replace(point, k=configs[modes[0]].k) if modes else point
    roles = {mode: instance_roles(mode, m, configs[mode].k, configs[mode].r) for mode in modes}
    restart: dict[str, Any] = {"restart_s": float(sim["restart_s"])} if "restart_s" in sim else {}
    sinks: dict[str, list[Sink]] = {mode: [] for mode in modes}
    wall_s = {mode: 0.0 for mode in modes}
    for trial in range(_trials(exp, sim)):
        faults = trial_faults(point.faults, trial)
        for mode in modes:
            started = time.monotonic()
            sinks[mode].append(simulate(configs[mode], roles[mode], service, queries=queries, rate_qps=point.rate,
                                        faults=faults, seed=int(exp.load.get("seed", 0)) + trial, warmup=warmup,
                                        spike=exp.spike(simulated=True),
                                        **restart))
            wall_s[mode] += time.monotonic() - started
    stats = {mode: {**_mode_stats(mode, count_roles(roles[mode]), sinks[mode]), "wall_s": wall_s[mode]}
             for mode in modes}
    _add_intervals(stats, {mode: trial_counts(sinks[mode]) for mode in modes})
    return point, stats, {mode: pooled_latencies(sinks[mode]) for mode in modes}


def run_simulation(exp: Experiment, out: Path, *, on_result: Callable[[str, str, dict], None] | None = None
                   ) -> dict[str, Any]:
    """Run every point × trial × mode in the cluster simulator; write the outputs into ``out``."""
    sim = exp.simulate
    service = ServiceModel(**sim.get("service", {}))
    m = int(sim.get("instances", exp.system.get("instances", SystemSpec.default("instances"))))
    out.mkdir(parents=True, exist_ok=True)
    points_out = []
    for point in exp.points(simulated=True):
        point, stats, tails = _simulate_point(exp, point, service, m)
        for mode in stats:
            if on_result:
                on_result(point.label, mode, stats[mode])
        points_out.append({"point": point.to_json(), "modes": stats})
        _plot_safely(out, point.label, tails=tails)
    return _finish(exp, out, "simulate", points_out, _trials(exp, sim))


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


def json_summary(summary: dict[str, Any]) -> str:
    """summary.json's text: strict JSON, a non-finite figure written as null."""
    return json.dumps(_json_safe(summary), indent=2, default=str, allow_nan=False) + "\n"


def _finish(exp: Experiment, out: Path, kind: str, points: list[dict[str, Any]], trials: int,
            backend: str = "simulated") -> dict[str, Any]:
    first = points[0]["modes"] if points else {}
    summary = {"kind": kind, "experiment": exp.name, "backend": backend, "trials": trials, "points": points,
               "modes": first, **first, "config": exp.to_json(), "interval_method": INTERVAL_METHOD}
    (out / "summary.json").write_text(json_summary(summary))
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
        if any(p["point"].get("settings") for p in data["points"]):
            plots.plot_tradeoff(out, data["points"])
    else:
        plots.plot_cdf(out / f"cdf-{label}.png", label or "", data["tails"])


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


def format_progress(label: str, mode: str, stats: dict[str, Any]) -> str:
    """One line as each mode of a point finishes (the numbers formatted as in the table)."""
    return (f"  {label:>10s} {mode:11s} instances={stats['instances']:<3d} p50={_fmt(stats['p50_ms'])} ms "
            f"p99={_fmt(stats['p99_ms'])} ms p99.9={_fmt(stats['p999_ms'])} ms lost={stats['lost']}")


BASELINES = ("equal", "hedge")  # the schemes at equal cost a ParM variant must not lose to


def _gap(stats: dict[str, Any]) -> float:
    p999 = stats.get("p999_ms")
    return (float("inf") if p999 is None else float(p999)) - float(stats["p50_ms"])


def best_against_better(modes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The best ParM variant (smallest pooled p99.9 − p50 among the coded modes run) against the
    better of Equal-Resources and hedging (the smaller gap of those run): the gap ratio with its 95%
    interval, a verdict (``better``: the interval lies above 1; ``worse``: below 1; else ``tie``),
    and the variant's median against Equal-Resources'. ``against`` holds the same for each of the two
    run, and ``overall`` combines them: ``worse`` if it is worse than either, ``better`` if better
    than both, else ``tie`` (a loss to the baseline with the larger pooled gap is not hidden). None
    when either side was not run."""
    ours = [m for m in CODED_FAMILY if m in modes]
    bases = [m for m in BASELINES if m in modes]
    if not ours or not bases:
        return None
    best = min(ours, key=lambda m: _gap(modes[m]))
    base = min(bases, key=lambda m: _gap(modes[m]))
    stats = modes[best]
    against = {}
    for name in bases:
        ratio, ci = stats.get(f"gap_ratio_vs_{name}"), stats.get(f"gap_ratio_vs_{name}_ci")
        verdict = "undefined" if ratio is None or not ci or None in ci else \
            "better" if ci[0] > 1 else "worse" if ci[1] < 1 else "tie"
        against[name] = {"gap_ratio": ratio, "gap_ratio_ci": ci, "verdict": verdict}
    verdicts = [a["verdict"] for a in against.values()]
    overall = next((v for v in ("undefined", "worse") if v in verdicts), "better" if set(verdicts) == {"better"} else "tie")
    return {"parm": best, "baseline": base, **against[base], "against": against, "overall": overall,
            "median_vs_equal": stats.get("median_ratio_vs_equal"), "median_vs_equal_ci": stats.get("median_ratio_vs_equal_ci")}


def format_best(best: dict[str, Any]) -> str:
    median = "" if best["median_vs_equal"] is None else \
        f"; its median {format_with_interval(best['median_vs_equal'], best['median_vs_equal_ci'], 3)} x equal's"
    others = "".join(f"; vs {name} {format_with_interval(a['gap_ratio'], a['gap_ratio_ci'], unit='x')}, {a['verdict']}"
                     for name, a in best.get("against", {}).items() if name != best["baseline"])
    return (f"best ParM ({best['parm']}) vs better baseline ({best['baseline']}): "
            f"{format_with_interval(best['gap_ratio'], best['gap_ratio_ci'], unit='x')} gap ratio, {best['verdict']}"
            f"{others}; overall {best.get('overall', best['verdict'])}{median}")


def format_summary(summary: dict[str, Any]) -> str:
    """The one-screen table: a block per point, a line per mode (instances, percentiles with their
    95% intervals, outcomes), then the coded family's gap and median ratios with intervals."""
    lines = []
    for p in summary["points"]:
        lines.append(f"== {summary['experiment']} [{summary['kind']}] {p['point']['label']}")
        lines.append(f"{'mode':11s} {'inst':>4s} {'p50 ms [95% CI]':>22s} {'p99 ms [95% CI]':>26s} "
                     f"{'p99.9 ms [95% CI]':>28s} {'recon':>6s} {'resent':>6s} {'ok':>7s} {'err':>5s} {'rej':>5s} "
                     f"{'lost':>5s} {'acc':>6s}")
        for mode, s in p["modes"].items():
            acc, resends = s.get("accuracy"), s.get("resends")
            resent = "" if resends is None else f"{resends / max(s['queries'], 1):6.3f}"
            lines.append(f"{mode:11s} {s['instances']:4d} {format_with_interval(s['p50_ms'], s.get('p50_ms_ci')):>22s} "
                         f"{format_with_interval(s['p99_ms'], s.get('p99_ms_ci')):>26s} "
                         f"{format_with_interval(s['p999_ms'], s.get('p999_ms_ci')):>28s} "
                         f"{s['reconstructed_fraction']:6.3f} {resent:>6s} {s.get('ok', 0):7d} {s['errors']:5d} "
                         f"{s.get('rejected', 0):5d} {s['lost']:5d} {'' if acc is None else f'{acc:6.4f}'}")
        for ours in CODED_FAMILY:
            stats = p["modes"].get(ours, {})
            bases = [k[len("gap_ratio_vs_"):] for k in stats if k.startswith("gap_ratio_vs_") and not k.endswith("_ci")]
            if bases:
                gap, med = "gap_ratio_vs_", "median_ratio_vs_"
                lines.append(f"{ours} (p99.9 - p50) smaller than: " + ", ".join(
                    f"{b} {format_with_interval(stats[gap + b], stats.get(f'{gap}{b}_ci'), unit='x')}" for b in bases))
                lines.append(f"{ours} median / baseline median: " + ", ".join(
                    f"{b} {format_with_interval(stats[med + b], stats.get(f'{med}{b}_ci'), 3)}" for b in bases))
        best = best_against_better(p["modes"])
        if best is not None:
            lines.append(format_best(best))
        first: dict[str, Any] = next(iter(p["modes"].values()), {})
        trials = first.get("trials")
        if trials:
            lines.append(f"({trials} trials, each its own fault realisation; [95% paired bootstrap over trials]; "
                         "failed queries count as +inf)")
    return "\n".join(lines)
