"""Seconds per epoch of parity training, MNIST MLP k = 2: ParM's in-memory tensor loop against
the common DataLoader loops over per-sample items.

    PARM_DATA_ROOT=/path/to/data python benchmarks/parity_epoch_speed.py [--epochs 3] [--threads 1]

Every loop does the same work per step: form groups of k, encode with the addition encoder,
run the parity MLP, MSE against the sum of base outputs, Adam step. The baselines:

- *per-sample tensors*: the training split as a list of per-sample tensors; ``__getitem__``
  builds one group and the default collate stacks them (the cheapest DataLoader loop).
- *authors' path*: what the authors' training code does for MNIST: a DataLoader over single
  samples whose ``__getitem__`` goes through the torchvision-style dataset (uint8 array ->
  PIL image -> ToTensor, emulated here with Pillow and numpy since torchvision is not used),
  with the cached base output looked up per sample; batches of B·k samples are regrouped.

Weights do not change the cost of an epoch, so the base model is an untrained MLP.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from parm.coding import CodeConfig
from parm.data import load_dataset, train_val_split
from parm.models import build_model
from parm.training.config import OptimConfig, ParityConfig
from parm.training.loop import make_optimizer
from parm.training.outputs import model_outputs
from parm.training.parity import CodedData, _batches, parity_inputs, parity_targets


class PerSampleGroups(Dataset):
    """Item i = (k images, k base outputs) of group i, gathered sample by sample."""

    def __init__(self, images: list[torch.Tensor], outputs: list[torch.Tensor], k: int, seed: int) -> None:
        self.images, self.outputs, self.k = images, outputs, k
        self.order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return len(self.images) // self.k

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order[i * self.k:(i + 1) * self.k]
        return torch.stack([self.images[j] for j in idx]), torch.stack([self.outputs[j] for j in idx])


class AuthorsPathSamples(Dataset):
    """Item i = (flattened image tensor, base output, label) via a PIL image, like torchvision's MNIST."""

    def __init__(self, images_u8: np.ndarray, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.images_u8, self.outputs, self.labels = images_u8, outputs, labels

    def __len__(self) -> int:
        return len(self.images_u8)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = Image.fromarray(self.images_u8[i], mode="L")  # torchvision MNIST.__getitem__
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(1, *self.images_u8.shape[1:])  # ToTensor
        return x.float().div(255).view(-1), self.outputs[i], self.labels[i]


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def tensor_epoch(parity: ParityConfig, data: CodedData, batch_groups: int, epoch: int, **_: object) -> float:
    model = build_model("mlp", tuple(data.images.shape[1:]), data.outputs.shape[1])
    opt = make_optimizer(model, OptimConfig(epochs=1, batch_size=batch_groups))  # as parm's training loop
    gen = torch.Generator().manual_seed(epoch)
    start = time.perf_counter()
    for x, y in _batches(parity, data, batch_groups)(gen):
        _step(model, opt, x, y)
    return time.perf_counter() - start


def dataloader_epoch(parity: ParityConfig, data: CodedData, batch_groups: int, epoch: int, **_: object) -> float:
    model = build_model("mlp", tuple(data.images.shape[1:]), data.outputs.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, outputs = list(data.images.unbind(0)), list(data.outputs.unbind(0))  # per-sample tensors
    start = time.perf_counter()
    dataset = PerSampleGroups(images, outputs, parity.code.k, seed=epoch)  # groups re-drawn each epoch
    for xs, ys in DataLoader(dataset, batch_size=batch_groups, shuffle=True):  # (B, k, C, H, W), (B, k, C)
        _step(model, opt, parity_inputs(parity, xs), parity_targets(parity, ys))
    return time.perf_counter() - start


def authors_epoch(parity: ParityConfig, data: CodedData, batch_groups: int, epoch: int,
                  images_u8: np.ndarray | None = None) -> float:
    assert images_u8 is not None
    k = parity.code.k
    model = build_model("mlp", tuple(data.images.shape[1:]), data.outputs.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dataset = AuthorsPathSamples(images_u8, data.outputs, data.labels)
    torch.manual_seed(epoch)
    start = time.perf_counter()
    for xs, ys, _ in DataLoader(dataset, batch_size=batch_groups * k, shuffle=True, drop_last=True):
        xs = xs.view(batch_groups, k, *data.images.shape[1:])  # (B*k, D) -> (B, k, C, H, W)
        _step(model, opt, parity_inputs(parity, xs), parity_targets(parity, ys.view(batch_groups, k, -1)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per loop (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = load_dataset("mnist", "train")
    train_idx, _ = train_val_split(len(train), 5000, 0)
    images = train.float_images(train_idx)  # (55000, 1, 28, 28)
    base = build_model("mlp", tuple(images.shape[1:]), train.num_classes)
    data = CodedData(images, model_outputs(base, images), train.labels[train_idx])
    parity = ParityConfig(CodeConfig(k=2))
    print(f"MNIST MLP k=2, {len(images)} training samples, {args.threads} torch thread(s), "
          f"median of {args.epochs} epochs, data root {os.environ.get('PARM_DATA_ROOT', '(default)')}")
    images_u8 = train.images[train_idx, 0].numpy()  # (55000, 28, 28) uint8
    rows = [("parm tensor loop, 64 groups/step (paper batch)", tensor_epoch, 64),
            ("parm tensor loop, 256 groups/step (default recipe)", tensor_epoch, 256),
            ("DataLoader, per-sample tensors, 64 groups/step", dataloader_epoch, 64),
            ("DataLoader, authors' path (PIL per sample), 64 groups/step", authors_epoch, 64)]
    results = {}
    for name, fn, batch in rows:
        times = sorted(fn(parity, data, batch, e, images_u8=images_u8) for e in range(args.epochs))
        results[name] = times[len(times) // 2]
        print(f"  {name:60s} {results[name]:7.2f} s/epoch")
    ours64, ours256 = results[rows[0][0]], results[rows[1][0]]
    for name, _, _ in rows[2:]:
        print(f"speed-up over '{name}': {results[name] / ours64:.1f}x at the same batch, "
              f"{results[name] / ours256:.1f}x with the default recipe's batch")


if __name__ == "__main__":
    main()
