"""Print the docs/RESULTS.md tables from runs/results/<recipe>/*.json and *.time.

    python scripts/results_table.py [runs/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIGS = [(2, "add"), (3, "add"), (4, "add"), (2, "concat"), (4, "concat")]


def main(root: Path) -> None:
    for ds in ("mnist", "fashion-mnist"):
        print(f"\n### {ds} (MLP)\n")
        print("| k | encoder | A_a | A_d default (top-1 / top-5) | recon. default | CPU s default "
              "| A_d paper (top-1 / top-5) | CPU s paper |")
        print("|---|---|---|---|---|---|---|---|")
        for k, enc in CONFIGS:
            cells = []
            a_a = None
            for recipe in ("default", "paper"):
                result = root / recipe / f"{ds}-k{k}-{enc}.json"
                timing = root / recipe / f"{ds}-k{k}-{enc}.time"
                if result.exists() and timing.exists() and timing.read_text().strip():
                    r = json.loads(result.read_text())
                    wall, user, system = map(float, timing.read_text().split())
                    a_a = r["available_top1"]
                    cells.append(f"{r['degraded_top1']:.4f} / {r['degraded_top5']:.4f}")
                    if recipe == "default":
                        cells.append(f"{r['reconstruction_top1']:.4f}")
                    cells.append(f"{user + system:.0f}")
                else:
                    cells += ["not run", "—"] if recipe == "paper" else ["not run", "—", "—"]
            print(f"| {k} | {enc} | {a_a if a_a is None else f'{a_a:.4f}'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results"))
