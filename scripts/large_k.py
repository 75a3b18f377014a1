"""Degraded-mode accuracy at large k: trained parity models (addition, concatenation) beside the
training-free Berrut code, on one base model's test split.

    python scripts/large_k.py --base runs/mnist-mlp/base --parity runs/largek/mnist-k8-add \
        runs/largek/mnist-k8-concat --berrut-k 2 4 8 10 12 [--data-root DIR] [--json FILE]

Every row is one systematic code: originals are exact, and the A_d column is the top-1 accuracy of
a reconstruction when one query of its group is missing (averaged over every test group and every
position; random groups, seed 0, as ``parm eval``). Berrut rows run the deployed model itself on
the parity query (no parity model), with r parity queries per group (``--berrut-r``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _berrut_rows(base: Path, ks: list[int], rs: list[int], data_root: Path | None) -> list[dict]:
    from parm.checkpoint import load_checkpoint
    from parm.coding.berrut import berrut_encode, berrut_reconstruct_each
    from parm.data import load_dataset
    from parm.data.groups import fixed_groups
    from parm.training.evaluate import EVAL_GROUP_SEED

    model, record = load_checkpoint(base)
    test = load_dataset(record.dataset, "test", data_root=data_root)
    images = test.prepared_for(record.in_shape, record.mean, record.std, model=str(base)).float_images()
    rows = []
    with torch.inference_mode():
        outputs = model(images)  # (N, C)
        for k in ks:
            groups = fixed_groups(torch.arange(len(images)), k, EVAL_GROUP_SEED)  # (G, k)
            for r in rs:
                parity = berrut_encode(images[groups], r)  # (G, r, *S)
                parity_out = model(parity.flatten(0, 1)).view(len(groups), r, -1)  # (G, r, C)
                recon = berrut_reconstruct_each(outputs[groups].double(), parity_out.double())  # (G, k, C)
                rows.append({"dataset": record.dataset, "code": f"berrut r={r} (no training)", "k": k,
                             "extra_cost": r / k,
                             "degraded_top1": (recon.argmax(-1) == test.labels[groups]).float().mean().item(),
                             "reconstruction_top1": (recon.argmax(-1) == outputs[groups].argmax(-1)).float().mean().item()})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--parity", type=Path, nargs="*", default=[], help="parity checkpoints (any k, encoder)")
    parser.add_argument("--berrut-k", type=int, nargs="*", default=[2, 4, 8, 10, 12])
    parser.add_argument("--berrut-r", type=int, nargs="*", default=[1])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from parm.training import evaluate

    rows = []
    for result in evaluate(args.base, [str(p) for p in args.parity], data_root=args.data_root, device="cpu"):
        rows.append({"dataset": result.dataset, "code": f"{result.encoder} (parity model)", "k": result.k,
                     "extra_cost": 1 / result.k, "degraded_top1": result.degraded_top1,
                     "reconstruction_top1": result.reconstruction_top1})
    rows += _berrut_rows(args.base, args.berrut_k, args.berrut_r, args.data_root)
    rows.sort(key=lambda row: (row["k"], row["code"]))
    print(f"{'dataset':14s} {'k':>3s} {'code':28s} {'extra cost':>10s} {'A_d':>7s} {'recon.':>7s}")
    for row in rows:
        print(f"{row['dataset']:14s} {row['k']:3d} {row['code']:28s} {row['extra_cost']:10.3f} "
              f"{row['degraded_top1']:7.4f} {row['reconstruction_top1']:7.4f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
