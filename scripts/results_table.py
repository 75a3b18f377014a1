"""Print the docs/RESULTS.md tables from runs/results/<recipe>/*.json and *.time.

    python scripts/results_table.py [runs/results]

The large-k table reads every seed of each default-recipe (k, encoder) — ``<ds>-k<k>-<enc>.json``
(seed 0) and ``<ds>-k<k>-<enc>-s<seed>.json`` — and prints A_d as mean ± sd over the seeds found
(sd with n − 1; n shown), with the Berrut rows from ``berrut-<ds>.json`` (``scripts/large_k.py
--json``) beside them.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

CONFIGS = [(2, "add"), (3, "add"), (4, "add"), (2, "concat"), (4, "concat")]
LARGE_KS = (2, 4, 8, 10, 12)
LARGE_ENCODERS = ("add", "concat", "tiles")


def _seeds(folder: Path, stem: str) -> list[tuple[dict, float | None]]:
    """(eval result, CPU seconds or None) of every seed of one configuration."""
    found = []
    for path in [folder / f"{stem}.json", *sorted(folder.glob(f"{stem}-s*.json"))]:
        if path.exists():
            timing = path.with_suffix(".time")
            cpu = sum(map(float, timing.read_text().split()[1:])) if timing.exists() and timing.read_text().strip() \
                else None
            found.append((json.loads(path.read_text()), cpu))
    return found


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f} (n = 1)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n = {len(values)})"


def large_k(root: Path) -> None:
    for ds in ("mnist", "fashion-mnist"):
        berrut_file = root / f"berrut-{ds}.json"
        rows = json.loads(berrut_file.read_text())["rows"] if berrut_file.exists() else []
        berrut = {(row["k"], row["code"].split()[1]): row for row in rows}  # (k, "r=1")
        print(f"\n### {ds}: A_d by k (default recipe; mean ± sd over seeds)\n")
        print("| k | " + " | ".join(f"{enc}" for enc in LARGE_ENCODERS) + " | Berrut r = 1 | Berrut r = 2 | CPU s tiles |")
        print("|---" * (len(LARGE_ENCODERS) + 4) + "|")
        for k in LARGE_KS:
            cells, tiles_cpu = [], "—"
            for enc in LARGE_ENCODERS:
                runs = _seeds(root / "default", f"{ds}-k{k}-{enc}")
                cells.append(_mean_sd([r["degraded_top1"] for r, _ in runs]) if runs else "not run")
                cpus = [c for _, c in runs if c is not None]
                if enc == "tiles" and cpus:
                    tiles_cpu = f"{statistics.mean(cpus):.0f}"
            for r in ("r=1", "r=2"):
                b = berrut.get((k, r))
                cells.append(f"{b['degraded_top1']:.4f}" if b else "not run")
            print(f"| {k} | " + " | ".join(cells) + f" | {tiles_cpu} |")


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


def two_bases(root: Path) -> None:
    """The same parity recipes on two MNIST base models: runs/results/default (15 epochs, seed 0) and
    runs/results/default-b2 (``TAG=-b2 BASE_ARGS="--seed 1 --epochs 30"``)."""
    bases = [("default", "base 1 (15 epochs, seed 0)"), ("default-b2", "base 2 (30 epochs, seed 1)")]
    print("\n### mnist: two base models (A_d, mean ± sd over parity seeds)\n")
    print("| k | encoder | " + " | ".join(label for _, label in bases) + " |")
    print("|---|---|" + "---|" * len(bases))
    a_a = []
    for folder, _ in bases:
        runs = _seeds(root / folder, "mnist-k2-add")
        a_a.append(f"{runs[0][0]['available_top1']:.4f}" if runs else "—")
    print("| — | A_a | " + " | ".join(a_a) + " |")
    for k, enc in ((2, "add"), (8, "tiles")):
        cells = []
        for folder, _ in bases:
            runs = _seeds(root / folder, f"mnist-k{k}-{enc}")
            cells.append(_mean_sd([r["degraded_top1"] for r, _ in runs]) if runs else "not run")
        print(f"| {k} | {enc} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results")
    main(root)
    large_k(root)
    two_bases(root)
