"""Measure coding-group isolation on real serving processes: does client A's hostile input spoil
client B's reconstructed answers?

    python scripts/input_isolation.py --base runs/mnist-mlp/base --parity runs/mnist-mlp/k2-add [--data-root DIR]

Serves mode coded (m = 2, k = 2) with data instance 0 a straggler (10x slower), so many of client
B's batches are reconstructed. Client B sends test images prepared as the model expects; client
A, interleaved query by query, sends other test images' raw 0..255 pixels. Prints, for B alone, B
beside A with the input envelope (default), B beside A with ``--input-envelope off``, and B beside A
with the envelope off but tenant grouping on (A and B are two tenants): how many of B's answers were
reconstructed and how many of those agree with the deployed model's own answer; and how A was answered.
Also prints how many test images lie outside the envelope.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch


async def _run(base: Path, parity: Path, action: str, good: torch.Tensor, bad: torch.Tensor | None,
               rate: float, tenants: bool) -> tuple[list, list]:
    from parm.faults import parse_fault_spec
    from parm.system import build_system, resolve_system

    spec = resolve_system(base, parity=parity, mode="coded", instances=2, emulated_ms=2.0,
                          faults=parse_fault_spec("straggler:instance=0,factor=10"),
                          serving={"input_envelope": action, "tenant_header": "x-api-key" if tenants else ""})
    frontend = build_system(spec)
    await frontend.start()
    try:
        futures_good, futures_bad = [], []
        for i in range(len(good)):
            if bad is not None:
                futures_bad.append(frontend.submit(bad[i], tenant="a"))
            futures_good.append(frontend.submit(good[i], tenant="b"))
            await asyncio.sleep(1 / rate)
        return (await asyncio.gather(*futures_good, return_exceptions=True),
                await asyncio.gather(*futures_bad, return_exceptions=True))
    finally:
        await frontend.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--parity", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--queries", type=int, default=400, help="client B's queries (and A's) per run")
    parser.add_argument("--rate", type=float, default=150.0, help="client B's queries per second")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from parm.checkpoint import load_checkpoint, load_envelope, load_parity_set
    from parm.data import load_dataset
    from parm.serving.types import Prediction, Source

    model, record = load_checkpoint(args.base)
    test = load_dataset(record.dataset, "test", data_root=args.data_root)
    images = test.prepared_for(record.in_shape, record.mean, record.std, model=str(args.base)).float_images()
    envelope = load_envelope(load_parity_set(args.parity)[0][0], record.in_shape)
    if envelope is None:
        print(f"{args.parity} has no input envelope: run its parm train-parity command again to add one",
              file=sys.stderr)
        return 2
    outside = int((~envelope.contains(images)).sum())
    print(f"test images outside the envelope: {outside} of {len(images)} ({outside / len(images):.2%})")
    n = min(args.queries, len(images))
    good, raw = images[:n], test.images[:n].to(torch.float32).roll(1, dims=0)
    with torch.inference_mode():
        want = model(good).argmax(-1)
    for name, action, bad, tenants in (("B alone", "uncoded", None, False),
                                       ("B beside A, envelope on", "uncoded", raw, False),
                                       ("B beside A, --input-envelope off", "off", raw, False),
                                       ("B beside A, envelope off, tenants", "off", raw, True)):
        answers, bad_answers = asyncio.run(_run(args.base, args.parity, action, good, bad, args.rate, tenants))
        recon = [i for i, a in enumerate(answers) if isinstance(a, Prediction) and a.source is Source.RECONSTRUCTED]
        agree = sum(answers[i].label == int(want[i]) for i in recon) / max(len(recon), 1)
        failed = sum(not isinstance(a, Prediction) for a in answers)
        a_sources = {}
        for a in bad_answers:
            key = a.source.value if isinstance(a, Prediction) else type(a).__name__
            a_sources[key] = a_sources.get(key, 0) + 1
        print(f"{name:34s} B: {len(recon):3d}/{n} reconstructed, {agree:.3f} agree with the model, {failed} failed"
              + (f"; A answered: {a_sources}" if bad is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
