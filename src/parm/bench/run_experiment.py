"""Run an experiment file for real (``parm bench``) or simulated (``parm simulate``) and write
DIR/summary.json, DIR/results.csv, per-query records (real runs) and PNG plots.

summary.json: ``{"kind", "experiment", "backend", "points": [{"point": {...}, "modes": {mode: stats}}],
"modes": <the first point's modes>, <mode>: <the first point's stats for that mode>, "config"}``.
Each mode's stats hold ``instances``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``p999_ms``, ``mean_ms``,
``max_ms``, ``reconstructed_fraction``, ``errors``, ``lost``, ``sources`` and (real runs on
labelled data) ``accuracy``; ``coded`` also has ``gap_ratio_vs_<baseline>`` =
(p99.9 − p50 of the baseline) / (p99.9 − p50 of coded) for every other mode run.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from parm.bench.experiment import Experiment, Point
from parm.bench.histogram import LatencyHistogram
from parm.bench.runner import LoadSpec, gap_ratio, run_mode
from parm.bench.simulate import SIM_QUERY_SHAPE, ServiceModel, simulate
from parm.bench.stats import latency_summary
from parm.errors import ConfigError
from parm.serving import ServingConfig, instance_roles

log = logging.getLogger(__name__)

CSV_FIELDS = ["point", "rate", "k", "batch_size", "mode", "instances", "p50_ms", "p90_ms", "p99_ms", "p999_ms",
              "mean_ms", "max_ms", "reconstructed_fraction", "errors", "lost", "accuracy", "gap_ratio_vs_equal"]


def _add_ratios(modes: dict[str, dict[str, Any]]) -> None:
    if "coded" in modes:
        for baseline in modes:
            if baseline != "coded":
                modes["coded"][f"gap_ratio_vs_{baseline}"] = gap_ratio(modes, baseline)


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


def _merge_trials(trials: list[dict[str, Any]], latencies_ms: list[float]) -> dict[str, Any]:
    """One summary from per-trial summaries: percentiles over all latencies, counts added,
    fractions and accuracies weighted by queries / answers."""
    stats: dict[str, Any] = latency_summary(latencies_ms)
    for key in ("queries", "answered", "errors", "rejected", "lost"):
        stats[key] = sum(t[key] for t in trials)
    stats["sources"] = {}
    for t in trials:
        for source, count in t["sources"].items():
            stats["sources"][source] = stats["sources"].get(source, 0) + count
    stats["reconstructed_fraction"] = stats["sources"].get("reconstructed", 0) / max(stats["queries"], 1)
    restarts = [t["restarts"] for t in trials if t.get("restarts") is not None]
    stats["restarts"] = sum(restarts) if restarts else None  # instances that failed and came back
    for key in {k for t in trials for k in t if k.startswith("accuracy")}:
        weights = [t["answered"] for t in trials if key in t]
        stats[key] = sum(t[key] * t["answered"] for t in trials if key in t) / max(sum(weights), 1)
    return stats


def _bench_mode(exp: Experiment, point: Point, mode: str, base_record: Any, data: tuple, out: Path,
                progress: bool, backend: str = "local", ray_address: str | None = None
                ) -> tuple[dict[str, Any], list[float]]:
    spec = _system_spec(exp, point, mode, base_record, backend, ray_address)
    trials, latencies = [], []
    for trial in range(int(exp.load.get("trials", 1))):
        load = LoadSpec(int(exp.load.get("queries", 2000)), point.rate, int(exp.load.get("seed", 0)) + trial,
                        int(exp.load.get("warmup", 0)))
        records: list = []
        trials.append(asyncio.run(run_mode(spec, data[0], data[1], load, progress=progress, records=records)))
        _write_records(out / f"records-{point.label}.csv", mode, trial, records)
        latencies += [r.latency_ms for r in records if r.index >= load.warmup and r.outcome == "ok"]
    roles = spec.roles()
    stats = _merge_trials(trials, latencies)
    stats.update(mode=mode, instances=len(roles), roles={r: roles.count(r) for r in sorted(set(roles))},
                 trials=len(trials))
    return stats, latencies


def run_bench(exp: Experiment, out: Path, *, progress: bool = True,
              on_result: Callable[[str, str, dict], None] | None = None, backend: str = "local",
              ray_address: str | None = None) -> dict[str, Any]:
    """Run every point × mode × trial on the real system (``backend``: local processes or Ray
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
    points_out = []
    for point in exp.points():
        modes: dict[str, dict[str, Any]] = {}
        latencies: dict[str, list[float]] = {}
        for mode in exp.modes:
            if mode == "cheap" and not exp.system.get("cheap"):
                log.warning("skipping mode cheap: no [system] cheap checkpoint")
                continue
            modes[mode], latencies[mode] = _bench_mode(exp, point, mode, base_record, data, out, progress,
                                                       backend, ray_address)
            if on_result:
                on_result(point.label, mode, modes[mode])
        _add_ratios(modes)
        points_out.append({"point": point.to_json(), "modes": modes})
        _plot_safely(out, point.label, latencies=latencies)
    return _finish(exp, out, "bench", points_out, backend=backend)


# ---- simulated runs ------------------------------------------------------------------------
def run_simulation(exp: Experiment, out: Path, *, on_result: Callable[[str, str, dict], None] | None = None
                   ) -> dict[str, Any]:
    """Run every point × mode × trial in the cluster simulator; write the outputs into ``out``."""
    sim = exp.simulate
    service = ServiceModel(**sim.get("service", {}))
    m = int(sim.get("instances", exp.system.get("instances", 2)))
    queries = int(sim.get("queries", exp.load.get("queries", 10_000)))
    trials = int(sim.get("trials", exp.load.get("trials", 1)))
    warmup = int(sim.get("warmup", exp.load.get("warmup", 0)))
    out.mkdir(parents=True, exist_ok=True)
    points_out = []
    for point in exp.points(simulated=True):
        modes: dict[str, dict[str, Any]] = {}
        hists: dict[str, LatencyHistogram] = {}
        for mode in exp.modes:
            config = ServingConfig(SIM_QUERY_SHAPE, mode=mode, k=point.k, batch_size=point.batch_size,
                                   stall_timeout_ms=float(sim.get("stall_timeout_ms", 10_000.0)),
                                   deadline_ms=float(sim.get("deadline_ms", 60_000.0)),
                                   max_pending_queries=int(sim.get("max_pending_queries", 1_000_000)),
                                   dispatch=str(sim.get("dispatch", "shared")))
            roles = instance_roles(mode, m, point.k)
            hist = LatencyHistogram()
            totals = {"errors": 0, "lost": 0, "queries": 0, "restarts": 0}
            sources: dict[str, int] = {}
            started = time.monotonic()
            for trial in range(trials):
                result = simulate(config, roles, service, queries=queries, rate_qps=point.rate, faults=point.faults,
                                  seed=int(exp.load.get("seed", 0)) + trial, warmup=warmup, histogram=hist,
                                  restart_s=float(sim.get("restart_s", 1.0)))
                for key in totals:
                    totals[key] += getattr(result, key)
                for source, count in result.sources.items():
                    sources[source] = sources.get(source, 0) + count
            stats = {**hist.summary(), **totals, "sources": sources, "mode": mode, "instances": len(roles),
                     "roles": {r: roles.count(r) for r in sorted(set(roles))}, "trials": trials,
                     "reconstructed_fraction": sources.get("reconstructed", 0) / max(totals["queries"], 1),
                     "wall_s": time.monotonic() - started}
            modes[mode], hists[mode] = stats, hist
            if on_result:
                on_result(point.label, mode, stats)
        _add_ratios(modes)
        points_out.append({"point": point.to_json(), "modes": modes})
        _plot_safely(out, point.label, histograms=hists)
    return _finish(exp, out, "simulate", points_out)


# ---- outputs -------------------------------------------------------------------------------
def _finish(exp: Experiment, out: Path, kind: str, points: list[dict[str, Any]], backend: str = "simulated"
            ) -> dict[str, Any]:
    first = points[0]["modes"] if points else {}
    summary = {"kind": kind, "experiment": exp.name, "backend": backend, "points": points, "modes": first, **first,
               "config": exp.to_json()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "experiment.json").write_text(json.dumps(exp.to_json(), indent=2, default=str) + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for p in points:
            for mode, stats in p["modes"].items():
                writer.writerow({**stats, "mode": mode, "point": p["point"]["label"], "rate": p["point"]["rate"],
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


def format_summary(summary: dict[str, Any]) -> str:
    """The one-screen table: a block per point, a line per mode, with the instance count."""
    lines = []
    for p in summary["points"]:
        lines.append(f"== {summary['experiment']} [{summary['kind']}] {p['point']['label']}")
        lines.append(f"{'mode':10s} {'inst':>4s} {'p50 ms':>9s} {'p99 ms':>9s} {'p99.9 ms':>9s} {'mean ms':>8s} "
                     f"{'recon':>6s} {'err':>4s} {'lost':>4s} {'acc':>6s}")
        for mode, s in p["modes"].items():
            acc = s.get("accuracy")
            lines.append(f"{mode:10s} {s['instances']:4d} {s['p50_ms']:9.2f} {s['p99_ms']:9.2f} {s['p999_ms']:9.2f} "
                         f"{s['mean_ms']:8.2f} {s['reconstructed_fraction']:6.3f} {s['errors']:4d} {s['lost']:4d} "
                         f"{'' if acc is None else f'{acc:6.4f}'}")
        coded = p["modes"].get("coded", {})
        ratios = [f"{k[len('gap_ratio_vs_'):]} {v:.2f}x" for k, v in coded.items()
                  if k.startswith("gap_ratio_vs_") and v is not None]
        if ratios:
            lines.append("coded (p99.9 - p50) smaller than: " + ", ".join(ratios))
    return "\n".join(lines)

