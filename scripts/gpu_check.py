"""Exercise ParM on a CUDA machine: training, evaluation and serving on the GPU(s), in every precision.

    python scripts/gpu_check.py --data-root DATA [--out runs/gpu-check] [--instances 4]

(``--device cpu`` runs the same checks on the CPU, without fp16: a dry run of the script itself.)

Needs MNIST under DATA (or --download) and a CUDA build of torch. Runs, timing each step:

1. ``parm train-base`` (MLP, 3 epochs) with ``--device cuda`` in fp32, and 1 epoch each in bf16 and
   fp16 (loss scaling): each must learn (test accuracy above 0.9);
2. ``parm train-parity --device cuda --precision fp16`` (k = 2, 20 epochs);
3. ``parm eval`` of the fp32 base and the parity model on the GPU and on the CPU: the accuracies
   must agree to 0.002;
4. serving (modes coded and coded-hedge, ``device="cuda"``: the instances spread round robin over
   the visible GPUs) in fp32 and bf16: 1,000 test images answered; the original (not reconstructed)
   answers are compared with the CPU model's (fp32: the same class for 99.9%; bf16: 99%).

Prints one line per check and exits 1 if any failed, 2 if no GPU is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch


def _timed(label: str, fn, results: list[tuple[str, bool, str]], check=lambda value: (True, "")):  # noqa: ANN001, ANN202
    start = time.perf_counter()
    try:
        value = fn()
        ok, detail = check(value)
    except Exception as exc:  # a failed step is reported, and the others still run
        value, ok, detail = None, False, f"{type(exc).__name__}: {exc}"
    results.append((label, ok, f"{time.perf_counter() - start:6.1f} s  {detail}"))
    print(f"{'ok  ' if ok else 'FAIL'} {label}: {results[-1][2]}", flush=True)
    return value


async def _serve(base: Path, parity: Path, mode: str, precision: str, instances: int, images: torch.Tensor,
                 device: str):
    from parm.system import build_system, resolve_system

    spec = resolve_system(base, parity=parity, mode=mode, instances=instances, device=device, precision=precision)
    frontend = build_system(spec)
    await frontend.start()
    try:
        answers = []
        for i in range(0, len(images), 50):
            answers += await frontend.predict(images[i:i + 50])
    finally:
        await frontend.stop()
    exact = torch.tensor([a.source.value in ("original", "retried") for a in answers])  # reconstructions are approximate
    return spec.instance_devices(), torch.stack([a.scores for a in answers]), exact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--instances", type=int, default=4, help="data instances m when serving")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False): nothing to check",
              file=sys.stderr)
        return 2
    from parm.checkpoint import load_checkpoint
    from parm.cli import main as parm
    from parm.data import load_dataset
    from parm.training import evaluate
    from parm.training.outputs import model_outputs

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu else []
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs: {', '.join(gpus) or 'none (dry run)'}",
          flush=True)
    device, low = args.device, "fp16" if gpu else "bf16"  # the lowest precision the device runs
    data = [] if args.data_root is None else ["--data-root", str(args.data_root)]
    data += ["--download"] if args.download else []
    out, results = args.out, []
    base, parity = out / "base-fp32", out / f"parity-{low}"

    def learned(precision: str):  # noqa: ANN202
        def check(code: int) -> tuple[bool, str]:
            from parm.checkpoint import load_record

            value = load_record(out / f"base-{precision}").metrics["available_top1"]
            return code == 0 and value > 0.9, f"exit {code}, test accuracy {value:.4f}"
        return check

    for precision, epochs in (("fp32", 3), ("bf16", 1), ("fp16", 1))[:3 if gpu else 2]:
        _timed(f"train-base mlp {epochs} epoch(s) on {device}, {precision}",
               lambda p=precision, e=epochs: parm(["train-base", "--dataset", "mnist", "--model", "mlp", "--out",
                                                   str(out / f"base-{p}"), "--epochs", str(e), "--device", device,
                                                   "--precision", p, "--no-progress", *data]),
               results, learned(precision))
    _timed(f"train-parity k=2, 20 epochs on {device}, {low}",
           lambda: parm(["train-parity", "--base", str(base), "--k", "2", "--out", str(parity), "--epochs", "20",
                         "--device", device, "--precision", low, "--no-progress", *data]),
           results, lambda code: (code == 0, f"exit {code}"))
    on = {}
    for where in dict.fromkeys((device, "cpu")):
        on[where] = _timed(f"eval on {where}", lambda d=where: evaluate(
            base, [parity], data_root=args.data_root, download=args.download, device=d)[0], results,
            lambda r: (True, f"A_a {r.available_top1:.4f}, A_d {r.degraded_top1:.4f}"))
    if on.get(device) and on.get("cpu"):
        gap = max(abs(on[device].available_top1 - on["cpu"].available_top1),
                  abs(on[device].degraded_top1 - on["cpu"].degraded_top1))
        results.append((f"eval agrees on {device} and cpu", gap <= 0.002, f"largest difference {gap:.4f}"))
        print(f"{'ok  ' if gap <= 0.002 else 'FAIL'} eval agrees on {device} and cpu: largest difference {gap:.4f}")

    test = load_dataset("mnist", "test", data_root=args.data_root, download=args.download)
    model, record = load_checkpoint(base)
    test = test.prepared_for(record.in_shape, record.mean, record.std, model=str(base))
    images = test.float_images()[:1000]
    want = model_outputs(model, images).argmax(-1)
    for mode in ("coded", "coded-hedge"):
        for precision, bar in (("fp32", 0.999), ("bf16", 0.99)):
            def check(value, bar=bar):  # noqa: ANN001, ANN202
                devices, scores, exact = value
                same = scores.argmax(-1) == want
                agree = same[exact].float().mean().item()
                recon = f"; {int((~exact).sum())} reconstructed, {same[~exact].float().mean().item():.4f} of them" \
                    if (~exact).any() else ""
                return agree >= bar, (f"instances on {', '.join(devices)}; original answers with the CPU's class: "
                                      f"{agree:.4f}{recon}")
            _timed(f"serve {mode}, {precision}, m={args.instances}",
                   lambda m=mode, p=precision: asyncio.run(_serve(base, parity, m, p, args.instances, images, device)),
                   results, check)
    failed = [label for label, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
