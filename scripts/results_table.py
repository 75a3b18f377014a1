"""Print the docs/RESULTS.md tables from runs/results/<recipe>/*.json and *.time.

    python scripts/results_table.py [runs/results]

The large-k table reads every seed of each default-recipe (k, encoder) — ``<ds>-k<k>-<enc>.json``
(seed 0) and ``<ds>-k<k>-<enc>-s<seed>.json`` — and prints A_d as mean ± sd over the seeds found
(sd with n − 1; n shown), with the Berrut rows from ``berrut-<ds>.json`` (``scripts/large_k.py
--json``) beside them. The first tables show the default recipe's A_d as mean ± sd over the seeds
found as well (top-5, reconstruction accuracy and CPU seconds: means). Then two base models per
dataset, both recipes on the project's and the authors' MNIST base (``scripts/recipes_on_bases.sh``),
and the training losses on validation.
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
        print("| k | encoder | A_a | A_d top-1 (mean ± sd) | A_d top-5 | recon. | CPU s |")
        print("|---|---|---|---|---|---|---|")
        for k, enc in CONFIGS:
            runs = _seeds(root / "default", f"{ds}-k{k}-{enc}")
            if runs:
                a_a = f"{runs[0][0]['available_top1']:.4f}"
                cpus = [c for _, c in runs if c is not None]
                cells = [_mean_sd([r["degraded_top1"] for r, _ in runs]),
                         f"{statistics.mean(r['degraded_top5'] for r, _ in runs):.4f}",
                         f"{statistics.mean(r['reconstruction_top1'] for r, _ in runs):.4f}",
                         f"{statistics.mean(cpus):.0f}" if cpus else "—"]
            else:
                a_a, cells = "—", ["not run", "—", "—", "—"]
            print(f"| {k} | {enc} | {a_a} | " + " | ".join(cells) + " |")


def two_bases(root: Path) -> None:
    """The same parity recipes on two base models per dataset: runs/results/default (15 epochs,
    seed 0) and runs/results/default-b2 (``TAG=-b2 BASE_ARGS="--seed 1 --epochs 30"``)."""
    bases = [("default", "base 1 (15 epochs, seed 0)"), ("default-b2", "base 2 (30 epochs, seed 1)")]
    for ds in ("mnist", "fashion-mnist"):
        configs = [(k, enc) for k, enc in ((2, "add"), (8, "tiles")) if _seeds(root / "default-b2", f"{ds}-k{k}-{enc}")]
        if not configs:
            continue
        print(f"\n### {ds}: two base models (A_d, mean ± sd over parity seeds)\n")
        print("| k | encoder | " + " | ".join(label for _, label in bases) + " |")
        print("|---|---|" + "---|" * len(bases))
        a_a = []
        for folder, _ in bases:
            runs = _seeds(root / folder, f"{ds}-k{configs[0][0]}-{configs[0][1]}")
            a_a.append(f"{runs[0][0]['available_top1']:.4f}" if runs else "—")
        print("| — | A_a | " + " | ".join(a_a) + " |")
        for k, enc in configs:
            cells = []
            for folder, _ in bases:
                runs = _seeds(root / folder, f"{ds}-k{k}-{enc}")
                cells.append(_mean_sd([r["degraded_top1"] for r, _ in runs]) if runs else "not run")
            print(f"| {k} | {enc} | " + " | ".join(cells) + " |")


def recipes_on_bases(root: Path) -> None:
    """Both recipes on the project's and the authors' MNIST base, k = 2 addition, random and
    consecutive test groups (``scripts/recipes_on_bases.sh``: runs/results/recipes)."""
    folder = root / "recipes"
    if not folder.exists():
        return
    print("\n### mnist, k = 2, addition: both recipes on two base models (test A_d, mean ± sd over seeds)\n")
    print("| base | A_a | recipe | A_d, random groups | A_d, consecutive groups | CPU s |")
    print("|---|---|---|---|---|---|")
    for base, label in (("project", "project's (normalised inputs, 15 epochs)"), ("authors", "authors' (x/255)")):
        for recipe in ("default", "paper"):
            runs = [(json.loads(p.read_text()), p) for p in sorted(folder.glob(f"{base}-{recipe}-s[0-9].json"))]
            if not runs:
                continue
            paired = [json.loads(p.with_name(p.stem + "-consecutive.json").read_text()) for _, p in runs
                      if p.with_name(p.stem + "-consecutive.json").exists()]
            cpus = [sum(map(float, p.with_suffix(".time").read_text().split()[1:])) for _, p in runs
                    if p.with_suffix(".time").exists() and p.with_suffix(".time").read_text().strip()]
            cpu = f"{statistics.mean(cpus):.0f}" if cpus and not (base == "project" and recipe == "default") else "—"
            print(f"| {label} | {runs[0][0]['available_top1']:.4f} | {recipe} | "
                  f"{_mean_sd([r['degraded_top1'] for r, _ in runs])} | "
                  f"{_mean_sd([r['degraded_top1'] for r in paired]) if paired else '—'} | {cpu} |")


def losses(root: Path) -> None:
    """The training losses on MNIST: validation metrics (what the choice is made on) of the loss
    variants (runs/mnist-mlp/loss/k<k>-<enc>-<loss>[-s<seed>]) beside the mse runs of the default
    recipe (runs/mnist-mlp/default/k<k>-<enc>[-s<seed>]), then the test A_d of each (``<run>/eval.json``
    for the loss variants, runs/results/default for mse), reported after the choice."""
    runs_root = root.parent
    loss_dir = runs_root / "mnist-mlp" / "loss"
    if not loss_dir.exists():
        return
    variants = ("mse", "kl", "mse+kl")

    def folders(k: int, enc: str, loss: str) -> list[Path]:
        parent, stem = ((runs_root / "mnist-mlp" / "default", f"k{k}-{enc}") if loss == "mse"
                        else (loss_dir, f"k{k}-{enc}-{loss}"))
        return [d for d in (parent / f"{stem}{s}" for s in ("", "-s1", "-s2")) if (d / "record.json").exists()]

    configs = ((2, "add"), (4, "add"), (8, "tiles"))
    print("\n### mnist: training loss, chosen on validation (validation reconstruction top-1, mean ± sd "
          "over seeds / validation A_d, mean)\n")
    print("| k | encoder | " + " | ".join(f"{v} (T = 2)" if "kl" in v else v for v in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for k, enc in configs:
        cells = []
        for loss in variants:
            metrics = [json.loads((d / "record.json").read_text())["metrics"] for d in folders(k, enc, loss)]
            metrics = [m for m in metrics if "val_reconstruction_top1" in m]
            cells.append(f"{_mean_sd([m['val_reconstruction_top1'] for m in metrics])} / "
                         f"{statistics.mean(m['val_degraded_top1'] for m in metrics):.4f}" if metrics else "not run")
        print(f"| {k} | {enc} | " + " | ".join(cells) + " |")
    print("\n### mnist: training loss, test A_d (mean ± sd over seeds), measured after the choice\n")
    print("| k | encoder | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for k, enc in configs:
        cells = []
        for loss in variants:
            if loss == "mse":
                found = [r["degraded_top1"] for r, _ in _seeds(root / "default", f"mnist-k{k}-{enc}")]
            else:
                found = [json.loads((d / "eval.json").read_text())["degraded_top1"] for d in folders(k, enc, loss)
                         if (d / "eval.json").exists()]
            cells.append(_mean_sd(found) if found else "not run")
        print(f"| {k} | {enc} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results")
    main(root)
    large_k(root)
    two_bases(root)
    recipes_on_bases(root)
    losses(root)
