"""Print the docs/EVALUATION.md tables from runs/bench/*/summary.json and runs/simulate/*/summary.json.

    python scripts/evaluation_tables.py runs/bench/load runs/simulate/load ...
    python scripts/evaluation_tables.py --verdicts runs/bench/default runs/simulate/default ...

Every figure is printed with its 95% interval over trials (`[low, high]`); `inf` is a percentile
reached by failed queries, `undefined` a ratio whose denominator is not finite; `resent` is re-sent
data batches per measured query (the warm-up's re-sends included). The last table of each file
gives, per point, the best ParM variant against the better of Equal-Resources and hedging (verdict
``better``/``worse`` when the gap ratio's interval lies above/below 1, else ``tie``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from parm.bench.run_experiment import CODED_FAMILY, best_against_better, format_with_interval


def _ci(stats: dict, key: str, digits: int = 2, unit: str = "") -> str:
    value = stats.get(key)
    if value is None and key.startswith("p"):
        value = float("inf")  # a null percentile in summary.json: failed queries reach that rank
    return format_with_interval(value, stats.get(f"{key}_ci"), digits, unit)


def _per_trial_ratios(base: dict, ours: dict) -> str:
    """The gap ratio of each trial on its own (its fault realisation alone), as a spread to read
    beside the pooled figure."""
    out = []
    for b, o in zip(base.get("per_trial", []), ours.get("per_trial", [])):
        gap_b = (b["p999_ms"] if b["p999_ms"] is not None else float("inf")) - b["p50_ms"]
        gap_o = (o["p999_ms"] if o["p999_ms"] is not None else float("inf")) - o["p50_ms"]
        out.append("undefined" if not (0 < gap_o < float("inf")) else f"{gap_b / gap_o:.2f}")
    return ", ".join(out)


def table(path: Path) -> str:
    summary = json.loads((path / "summary.json").read_text())
    trials = {s.get("trials") for p in summary["points"] for s in p["modes"].values()}
    lines = [f"**{summary['experiment']}** ({summary['kind']}, `{path}`, {'/'.join(map(str, sorted(trials)))} "
             "trials per mode, 95% intervals)", "",
             "| point | mode | inst | p50 ms | p99 ms | p99.9 ms | ok / err / rej / lost | recon | resent | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = ["", "| point | ParM | vs | gap ratio (p99.9 − p50 of baseline / of ParM) | ParM median / baseline median "
              "| gap ratio in each trial |", "|---|---|---|---|---|---|"]
    for p in summary["points"]:
        for mode, s in p["modes"].items():
            acc, resends = s.get("accuracy"), s.get("resends")
            resent = "—" if resends is None else f"{resends / max(s['queries'], 1):.3f}"
            lines.append(f"| {p['point']['label']} | {mode} | {s['instances']} | {_ci(s, 'p50_ms')} | "
                         f"{_ci(s, 'p99_ms')} | {_ci(s, 'p999_ms')} | {s.get('ok', 0)} / {s['errors']} / "
                         f"{s.get('rejected', 0)} / {s['lost']} | {s['reconstructed_fraction']:.3f} | {resent} | "
                         f"{'—' if acc is None else f'{acc:.4f}'} |")
        for ours in CODED_FAMILY:
            stats = p["modes"].get(ours, {})
            for base in p["modes"]:
                if base != ours and f"gap_ratio_vs_{base}" in stats:
                    ratios.append(f"| {p['point']['label']} | {ours} | {base} | "
                                  f"{_ci(stats, f'gap_ratio_vs_{base}', unit='×')} | "
                                  f"{_ci(stats, f'median_ratio_vs_{base}', 3)} | "
                                  f"{_per_trial_ratios(p['modes'][base], stats)} |")
    verdicts = ["", "| point " + _VERDICT_HEAD, "|---" + "|---" * 7 + "|"]
    for p in summary["points"]:
        best = best_against_better(p["modes"])
        if best is not None:
            verdicts.append(f"| {p['point']['label']} {_verdict_cells(best)}")
    return "\n".join(lines + (ratios if len(ratios) > 3 else []) + (verdicts if len(verdicts) > 3 else []))


def verdicts(paths: list[Path]) -> str:
    """One table over many runs: each point's best ParM variant against the better of
    Equal-Resources and hedging (``--verdicts DIR...``)."""
    lines = ["| experiment | point " + _VERDICT_HEAD, "|---|---" + "|---" * 7 + "|"]
    for path in paths:
        summary = json.loads((path / "summary.json").read_text())
        for p in summary["points"]:
            best = best_against_better(p["modes"])
            if best is not None:
                lines.append(f"| {summary['experiment']} ({summary['kind']}) | {p['point']['label']} {_verdict_cells(best)}")
    return "\n".join(lines)


_VERDICT_HEAD = ("| best ParM | better of equal and hedge | gap ratio | verdict | the other: gap ratio, verdict | overall "
                 "| ParM median / equal's |")


def _verdict_cells(best: dict) -> str:
    """The cells of one point's verdict row, from its best_against_better()."""
    return (f"| {best['parm']} | {best['baseline']} | {format_with_interval(best['gap_ratio'], best['gap_ratio_ci'], unit='×')} "
            f"| {best['verdict']} | {_other(best)} | {best['overall']} | "
            f"{format_with_interval(best['median_vs_equal'], best['median_vs_equal_ci'], 3)} |")


def _other(best: dict) -> str:
    """The verdict against the baseline with the larger pooled gap: ``hedge 0.68× [0.68, 0.86], worse``."""
    return "; ".join(f"{name} {format_with_interval(a['gap_ratio'], a['gap_ratio_ci'], unit='×')}, {a['verdict']}"
                     for name, a in best["against"].items() if name != best["baseline"]) or "—"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--verdicts"]:
        print(verdicts([Path(a) for a in sys.argv[2:]]))
    else:
        for arg in sys.argv[1:]:
            print(table(Path(arg)))
            print()
