"""Print the docs/EVALUATION.md tables from runs/bench/*/summary.json and runs/simulate/*/summary.json.

    python scripts/evaluation_tables.py runs/bench/load runs/simulate/load ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(path: Path) -> str:
    summary = json.loads((path / "summary.json").read_text())
    lines = [f"**{summary['experiment']}** ({summary['kind']}, `{path}`)", "",
             "| point | mode | instances | p50 ms | p99 ms | p99.9 ms | p99.9 − p50 | reconstructed | lost | accuracy | "
             "coded gap ratio vs this |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in summary["points"]:
        coded = p["modes"].get("coded", {})
        for mode, s in p["modes"].items():
            ratio = coded.get(f"gap_ratio_vs_{mode}")
            acc = s.get("accuracy")
            lines.append(
                f"| {p['point']['label']} | {mode} | {s['instances']} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                f"{s['p999_ms']:.2f} | {s['p999_ms'] - s['p50_ms']:.2f} | {s['reconstructed_fraction']:.3f} | "
                f"{s['lost']} | {'—' if acc is None else f'{acc:.4f}'} | {'' if ratio is None else f'{ratio:.2f}×'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(table(Path(arg)))
        print()
