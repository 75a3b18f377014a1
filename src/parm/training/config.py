"""Training configurations and the named parity-training recipes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from parm.coding import CodeConfig
from parm.errors import ConfigError

SCHEDULES: tuple[str, ...] = ("constant", "onecycle", "cosine")
INITS: tuple[str, ...] = ("scratch", "base", "authors")
"""Parity-model initialisation: ``scratch`` (PyTorch's default), ``base`` (a copy of the base
model's weights), ``authors`` (the ParM authors' scheme: Linear weights N(0, 0.01²) with zero
biases, conv weights Xavier-uniform with ReLU gain and zero biases, batch norm 1 and 0)."""
LOSSES: tuple[str, ...] = ("mse", "kl", "mse+kl")
"""Parity-training loss: ``mse`` on the parity output against Σ w_j F(X_j) (the paper's); ``kl``:
the KL divergence, averaged over every member j of a group as if it alone were missing, from the
deployed model's softened output softmax(F(X_j)/T) to the reconstruction's, times T²; ``mse+kl``:
their sum. The reconstruction of member j differs from F(X_j) by the parity output's error, so
MSE weighs every logit alike, and KL only what moves the softmax."""


@dataclass(frozen=True)
class OptimConfig:
    """Adam with an LR schedule; shared by base and parity training."""

    epochs: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 1e-5
    schedule: str = "constant"
    seed: int = 0
    val_size: int = 5000

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {name}={value!r}", field=name, value=value)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0; got lr={self.lr!r}", field="lr", value=self.lr)
        if self.weight_decay < 0:
            raise ConfigError(
                f"weight_decay must be >= 0; got weight_decay={self.weight_decay!r}",
                field="weight_decay", value=self.weight_decay,
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"schedule must be one of {', '.join(SCHEDULES)}; got schedule={self.schedule!r}",
                field="schedule", value=self.schedule,
            )
        if self.val_size < 1:
            raise ConfigError(f"val_size must be >= 1; got val_size={self.val_size}", field="val_size", value=self.val_size)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParityConfig:
    """What to train: the code, which parity of it, the parity model's architecture and init."""

    code: CodeConfig
    parity_index: int = 0
    arch: str | None = None  # None: the base model's architecture
    init: str = "scratch"
    loss: str = "mse"  # one of LOSSES
    temperature: float = 2.0  # the softening T of the kl losses

    def __post_init__(self) -> None:
        if not 0 <= self.parity_index < self.code.r:
            raise ConfigError(
                f"parity_index must be in [0, r={self.code.r}); got parity_index={self.parity_index}",
                field="parity_index", value=self.parity_index,
            )
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got init={self.init!r}", field="init", value=self.init)
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}; got loss={self.loss!r}", field="loss",
                              value=self.loss)
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0; got temperature={self.temperature!r}", field="temperature",
                              value=self.temperature)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.code.k, "r": self.code.r, "encoder": self.code.encoder,
                               "parity_index": self.parity_index, "arch": self.arch, "init": self.init}
        if self.loss != "mse":  # the paper's loss is left out, so runs trained before losses existed still resume
            out.update(loss=self.loss, temperature=self.temperature)
        return out


def base_recipe(epochs: int | None = None, seed: int = 0, augment: str = "none") -> OptimConfig:
    """Deployed-model training: Adam 1e-3, batch 128, cosine decay; 15 epochs unless told, 40 with
    crop-flip augmentation (chosen on validation: LeNet-5 on CIFAR-10 reaches 0.650 validation
    accuracy in 40 augmented epochs against 0.628 for 40 plain ones, which peak at epoch 17, and
    0.598 for 15 augmented ones; docs/DATA.md)."""
    default = 40 if augment == "crop-flip" else 15
    return OptimConfig(epochs=epochs or default, batch_size=128, lr=1e-3, weight_decay=0.0, schedule="cosine",
                       seed=seed)


def parity_recipe(name: str, k: int, epochs: int | None = None, seed: int = 0) -> tuple[OptimConfig, str]:
    """(optimiser config, init) of a named recipe.

    ``paper``: the authors' recipe in full: parity model trained from scratch with their
    initialisation (``authors``: Linear weights N(0, 0.01²), zero biases), Adam lr 1e-3, weight
    decay 1e-5, constant LR, 64 groups per step for k = 2 and 32 for k >= 3, 500 epochs. (Their
    inputs are x/255, unnormalised: that is the base model's choice, ``train-base --normalise
    none``, which every later command follows.)

    ``default``: initialise the parity model from the base model's weights, 256 groups per step,
    Adam with a one-cycle schedule peaking at 2e-3, 400 epochs: higher degraded-mode accuracy than
    the paper recipe in about a third of its time (docs/RESULTS.md shows both).
    """
    if name == "paper":
        batch = 64 if k == 2 else 32
        return OptimConfig(epochs=epochs or 500, batch_size=batch, lr=1e-3, weight_decay=1e-5,
                           schedule="constant", seed=seed), "authors"
    if name == "default":
        return OptimConfig(epochs=epochs or 400, batch_size=256, lr=2e-3, weight_decay=1e-5,
                           schedule="onecycle", seed=seed), "base"
    raise ConfigError(f"unknown recipe {name!r}; choose 'default' or 'paper'", field="recipe", value=name)
