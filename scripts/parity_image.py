"""Save a parity query as a PNG, to look at what an encoder makes of k real images.

    python scripts/parity_image.py --dataset imagefolder:PATH/cifar10-jpeg --k 4 --encoder concat \
        --out runs/parity-k4-concat.png [--data-root DIR] [--scale 4]

Takes the first k test images, encodes them as the serving path does (on the 0..1 pixel scale, so the
picture is the images themselves; a parity model sees the same layout after normalisation), and writes
the k inputs side by side followed by the parity image, each enlarged ``--scale`` times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--encoder", default="concat", choices=["add", "concat", "tiles"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--scale", type=int, default=4)
    args = parser.parse_args(argv)
    from parm.coding import CodeConfig, encode
    from parm.data import load_dataset

    test = load_dataset(args.dataset, "test", data_root=args.data_root)
    members = test.images[: args.k].to(torch.float32) / 255.0  # (k, C, H, W) on the 0..1 scale
    parity = encode(CodeConfig(k=args.k, encoder=args.encoder), members[None])[0, 0]  # (C, H, W)
    if args.encoder == "add":
        parity = parity / args.k  # the sum, shown as the mean so that it fits 0..1
    tiles = [*members, torch.ones_like(members[0]), parity]  # the inputs, a white gap, the parity image
    strip = torch.cat(tiles, dim=2).clamp(0, 1)  # (C, H, (k + 2)·W)
    pixels = (strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W', C)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    image = image.resize((image.width * args.scale, image.height * args.scale), Image.Resampling.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"{args.k} test images of {test.name} and their {args.encoder} parity image: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
