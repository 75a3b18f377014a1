"""Command line: parse arguments, build a config, call one library function, print the result."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from parm.errors import ConfigError, ParmError

log = logging.getLogger("parm")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, default=None,
                   help="dataset folder (default: $PARM_DATA_ROOT, else ~/.cache/parm/data)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing (checksums verified)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parm", description="Parity models for resilient prediction serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-base", help="train the deployed model and report its test accuracy (A_a)")
    p.add_argument("--dataset", required=True, help="mnist, fashion-mnist, cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--model", required=True, help="mlp, lenet5, resnet18, resnet18-28 or module.path:factory")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (15)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int, default=5000,
                   help="validation samples held out of the training split (default: 5000; parity training reuses it)")
    _add_common(p)
    p.set_defaults(func=_train_base)

    p = sub.add_parser("train-parity", help="train the parity model of a base checkpoint for one k and encoder")
    p.add_argument("--base", type=Path, required=True, help="base checkpoint folder")
    p.add_argument("--k", type=int, required=True, help="queries per coding group")
    p.add_argument("--encoder", default="add", help="add or concat (default: add)")
    p.add_argument("--r", type=int, default=1, help="parities per group (default: 1)")
    p.add_argument("--parity-index", type=int, default=0, help="which of the r parities to train (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--recipe", default="default", choices=["default", "paper"],
                   help="default: init from base, one-cycle LR, 256 groups/step, 150 epochs; "
                        "paper: from scratch, Adam 1e-3, 64 (k=2) or 32 groups/step, 500 epochs")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--batch-groups", type=int, default=None, help="override the recipe's groups per step")
    p.add_argument("--lr", type=float, default=None, help="override the recipe's (peak) learning rate")
    p.add_argument("--init", choices=["scratch", "base"], default=None, help="override the recipe's initialisation")
    p.add_argument("--arch", default=None, help="parity model architecture (default: the base's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None, help="base-output cache (default: ~/.cache/parm/outputs)")
    _add_common(p)
    p.set_defaults(func=_train_parity)

    p = sub.add_parser("eval", help="available and degraded-mode accuracy of a base model and parity models")
    p.add_argument("--base", type=Path, required=True, help="base checkpoint folder")
    p.add_argument("--parity", type=Path, nargs="+", required=True, help="one or more parity checkpoint folders")
    p.add_argument("--json", type=Path, default=None,
                   help="write results here (one parity: an object; several: {'results': [...]})")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_common(p)
    p.set_defaults(func=_eval)
    return parser


def _train_base(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from parm.training import base_recipe, train_base

    optim = base_recipe(args.epochs, args.seed)
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    optim = replace(optim, val_size=args.val_size, **overrides)
    record = train_base(args.dataset, args.model, args.out, optim=optim, data_root=args.data_root,
                        download=args.download, progress=not args.no_progress)
    print(f"{record.arch} on {record.dataset}: test accuracy (A_a) {record.metrics['available_top1']:.4f}, "
          f"best epoch {record.metrics['best_epoch']}; saved to {args.out}")
    return 0


def _train_parity(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from parm.coding import CodeConfig
    from parm.training import ParityConfig, parity_recipe, train_parity

    code = CodeConfig(k=args.k, r=args.r, encoder=args.encoder)
    optim, init = parity_recipe(args.recipe, args.k, args.epochs, args.seed)
    overrides = {k: v for k, v in (("batch_size", args.batch_groups), ("lr", args.lr)) if v is not None}
    optim = replace(optim, **overrides)
    parity = ParityConfig(code=code, parity_index=args.parity_index, arch=args.arch, init=args.init or init)
    record = train_parity(args.base, args.out, parity, optim, recipe=args.recipe, data_root=args.data_root,
                          download=args.download, cache_dir=args.cache_dir, progress=not args.no_progress)
    m = record.metrics
    print(f"parity k={record.k} encoder={record.encoder}: best epoch {m['best_epoch']}, validation "
          f"degraded top-1 {m['val_degraded_top1']:.4f}, reconstruction top-1 {m['val_reconstruction_top1']:.4f}; "
          f"saved to {args.out}")
    return 0


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from parm.training import evaluate

    results = [r.to_json() for r in evaluate(args.base, args.parity, split=args.split, data_root=args.data_root,
                                             download=args.download, cache_dir=args.cache_dir)]
    print(_table(results, ["dataset", "model", "k", "encoder", "available_top1", "degraded_top1",
                           "degraded_top5", "reconstruction_top1", "default_top1", "num_test_groups"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = results[0] if len(results) == 1 else {"results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"parm: error: {exc}", file=sys.stderr)
        return 2
    except ParmError as exc:
        print(f"parm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("parm: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
