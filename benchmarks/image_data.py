"""Image-folder datasets: decode time of the first command, load time of later ones (decoded
cache), and the peak memory of `parm train-base` against the size of the images as uint8.

    python benchmarks/image_data.py --folder /path/to/cifar10-jpeg [--model lenet5] [--epochs 1]

The folder holds ``train/<class>/`` and ``test/<class>/`` (e.g. the CIFAR-10 JPEG copy, extracted).
A fresh cache directory is used (``PARM_CACHE_DIR`` points at a temporary folder), so the first
load really decodes every file. The train-base run is a separate process whose peak resident set
size (``ru_maxrss``) is reported; one torch thread.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PARM_CACHE_DIR"] = str(Path(tmp) / "cache")
        from parm.data import load_dataset

        name = f"imagefolder:{args.folder.resolve()}"
        start = time.perf_counter()
        train = load_dataset(name, "train")
        first = time.perf_counter() - start
        start = time.perf_counter()
        load_dataset(name, "train")
        second = time.perf_counter() - start
        start = time.perf_counter()
        test = load_dataset(name, "test")
        test_s = time.perf_counter() - start
        size = train.images.numel() + test.images.numel()
        print(f"{name}: train {tuple(train.images.shape)}, test {tuple(test.images.shape)}, "
              f"{size / 1e6:.0f} MB as uint8")
        print(f"  first load of train (decode every file): {first:6.2f} s")
        print(f"  second load of train (decoded cache):     {second:6.2f} s ({second / first:.1%} of the first)")
        print(f"  load of test (cached, train not read):    {test_s:6.2f} s")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", "import torch, parm.training, parm.cli"], env=env, check=True)
        framework = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # bytes: Python + torch + parm
        print(f"  Python + torch + parm imported, nothing loaded: peak RSS {framework / 1e6:.0f} MB")
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "parm.cli", "train-base", "--dataset", name, "--model", args.model,
                              "--epochs", str(args.epochs), "--out", str(Path(tmp) / "base"), "--threads", "1",
                              "--no-progress"], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            print(run.stderr[-2000:], file=sys.stderr)
            return run.returncode
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # bytes (ru_maxrss is KiB on Linux)
        print(f"  train-base {args.model}, {args.epochs} epoch(s): {wall:.0f} s wall, peak RSS {peak / 1e6:.0f} MB "
              f"= framework + {(peak - framework) / size:.2f}x the uint8 images; {run.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
