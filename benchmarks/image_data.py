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
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss(command: list[str], env: dict[str, str]) -> tuple[int, int, str]:
    """Run ``command``; (its peak resident set size in bytes — VmHWM of /proc/PID/status, polled
    every 20 ms, so the parent's pages shared before exec are not counted —, exit code, stdout)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.02)
    out = proc.stdout.read() if proc.stdout else ""
    return peak, proc.returncode, out


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
        os.sync()  # the cache files just written reach the disk first, as they have by a later command
        laters = []
        for _ in range(3):
            start = time.perf_counter()
            load_dataset(name, "train")
            laters.append(time.perf_counter() - start)
        second = sorted(laters)[1]  # the median of three
        start = time.perf_counter()
        test = load_dataset(name, "test")
        test_s = time.perf_counter() - start
        size = train.images.numel() + test.images.numel()
        print(f"{name}: train {tuple(train.images.shape)}, test {tuple(test.images.shape)}, "
              f"{size / 1e6:.0f} MB as uint8")
        print(f"  first load of train (decode every file): {first:6.2f} s")
        print(f"  later load of train (decoded cache, median of 3): {second:6.2f} s ({second / first:.1%} of the first)")
        print(f"  first load of test (decodes test only):   {test_s:6.2f} s")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        framework, _, _ = _peak_rss([sys.executable, "-c", "import torch, parm.training, time; time.sleep(0.5)"], env)
        print(f"  Python + torch + parm.training imported, nothing loaded: peak RSS {framework / 1e6:.0f} MB")
        start = time.perf_counter()
        peak, code, out = _peak_rss([sys.executable, "-m", "parm.cli", "train-base", "--dataset", name, "--model",
                                     args.model, "--epochs", str(args.epochs), "--out", str(Path(tmp) / "base"),
                                     "--threads", "1", "--no-progress"], env)
        wall = time.perf_counter() - start
        if code != 0:
            print(out[-2000:], file=sys.stderr)
            return code
        print(f"  train-base {args.model}, {args.epochs} epoch(s): {wall:.0f} s wall, peak RSS {peak / 1e6:.0f} MB "
              f"= framework + {(peak - framework) / size:.2f}x the uint8 images; {out.strip().splitlines()[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
