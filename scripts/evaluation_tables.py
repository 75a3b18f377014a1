"""Print the docs/EVALUATION.md tables from runs/bench/*/summary.json and runs/simulate/*/summary.json.

    python scripts/evaluation_tables.py runs/bench/load runs/simulate/load ...

Every figure is printed with its 95% interval over trials (`[low, high]`); `inf` is a percentile
reached by failed queries, `undefined` a ratio whose denominator is not finite; `resent` is re-sent
data batches per measured query (the warm-up's re-sends included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from parm.bench.run_experiment import CODED_FAMILY, format_with_interval


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
    return "\n".join(lines + (ratios if len(ratios) > 3 else []))


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(table(Path(arg)))
        print()
