"""The epoch loop shared by base and parity training: LR schedule, NaN guard, best-epoch
selection, and resumable state.

Resume state lives in ``<out>/resume/`` (``state.json`` + hash-named safetensors, written
atomically like a checkpoint): model and Adam tensors, the sampling generator's state, the
epoch reached, the best score so far and the history. It is written after every epoch, every
``save_every_s`` seconds inside an epoch (then with the step reached, the epoch's running loss
and the generator's state at the epoch's start, so the epoch's batches are drawn again and the
ones already trained on are skipped), and on Ctrl-C. Running the same command again continues
where the state left off — an interruption loses at most ``save_every_s`` of training; a
different configuration is refused by field. The progress bar counts steps, with rate and ETA.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from parm.checkpoint import load_tensors, save_tensors
from parm.devices import autocast, grad_scaler
from parm.errors import CheckpointMismatchError, NonFiniteLossError
from parm.training.config import OptimConfig

log = logging.getLogger(__name__)

STATE_RECORD = "state.json"
Batches = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: str) -> float:
    """Learning rate at ``step`` of ``total_steps``: constant, cosine decay, or one-cycle
    (30% cosine warm-up from peak/25, then cosine decay to peak/2.5e5)."""
    if schedule == "constant":
        return peak_lr
    t = min(step / max(total_steps, 1), 1.0)
    if schedule == "cosine":
        return peak_lr * 0.5 * (1 + math.cos(math.pi * t))
    warm, start, end = 0.3, peak_lr / 25, peak_lr / 25 / 1e4
    if t < warm:
        return start + (peak_lr - start) * 0.5 * (1 - math.cos(math.pi * t / warm))
    return end + (peak_lr - end) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (1 - warm)))


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    epochs_run: int = 0


@dataclass
class FitSpec:
    """What ``fit`` needs besides the model: data, loss, validation, saving, identity."""

    optim: OptimConfig
    steps_per_epoch: int
    batches: Batches
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    validate: Callable[[nn.Module], dict[str, float]]  # must return a 'score' (higher is better)
    save_best: Callable[[nn.Module, dict[str, float]], None]
    state_dir: Path
    fingerprint: dict[str, Any]  # resuming requires an identical fingerprint (optim is added to it)
    best_path: Path
    progress: bool = True
    desc: str = "train"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the model trains
    precision: str = "fp32"  # the forward pass's autocast type (parm.devices); weights stay float32
    save_every_s: float = 120.0  # resumable state inside an epoch at least this often (wall clock)


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {
        f"optim.{pid}.{name}": (value if torch.is_tensor(value) else torch.tensor(value))
        for pid, state in sd["state"].items()
        for name, value in state.items()
    }
    return tensors, sd["param_groups"]


def _restore_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def _fused_ok(model: nn.Module) -> bool:
    """The fused Adam kernel (one op for all parameters) when every parameter is a float tensor
    on a device that has it; the reference implementation otherwise."""
    params = list(model.parameters())
    return bool(params) and all(p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda")
                                for p in params)


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """Adam with the config's LR and weight decay (fused kernel where possible)."""
    return torch.optim.Adam(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, fused=_fused_ok(model))


class _Fitter:
    def __init__(self, model: nn.Module, spec: FitSpec) -> None:
        self.model, self.spec = model.to(spec.device), spec
        self.opt = make_optimizer(self.model, spec.optim)
        self.scaler = grad_scaler(spec.device, spec.precision)
        self.gen = torch.Generator().manual_seed(spec.optim.seed)
        self.total_steps = spec.optim.epochs * spec.steps_per_epoch
        self.epoch = 0
        self.result = FitResult(best_epoch=-1, best_metrics={"score": -math.inf})
        self.fingerprint = {**spec.fingerprint, **spec.optim.to_json()}
        # inside an epoch: steps done, running loss, the generator's state when the epoch began
        self.step, self.loss_total, self.loss_count = 0, 0.0, 0
        self.epoch_rng: torch.Tensor | None = None
        self.bar: Any = None
        self.last_save = time.monotonic()

    def save_state(self) -> None:
        """Resumable state: at an epoch boundary (step 0), or inside an epoch (step > 0)."""
        opt_tensors, groups = _optim_tensors(self.opt)
        inside = self.step > 0 and self.epoch_rng is not None
        tensors = {**{f"model.{k}": v for k, v in self.model.state_dict().items()}, **opt_tensors,
                   "rng": self.epoch_rng if inside else self.gen.get_state()}
        record = {"epoch": self.epoch, "best_epoch": self.result.best_epoch, "best_metrics": self.result.best_metrics,
                  "history": self.result.history, "param_groups": groups, "fingerprint": self.fingerprint,
                  "step": self.step if inside else 0, "loss_total": self.loss_total, "loss_count": self.loss_count}
        save_tensors(self.spec.state_dir, "state", tensors, record, STATE_RECORD)
        self.last_save = time.monotonic()

    def try_resume(self) -> None:
        if not (self.spec.state_dir / STATE_RECORD).exists():
            return
        record, tensors = load_tensors(self.spec.state_dir, STATE_RECORD)
        for name, want in self.fingerprint.items():
            got = record["fingerprint"].get(name)
            if got != want:
                raise CheckpointMismatchError(
                    f"{self.spec.state_dir} holds a run with {name}={got!r} but this run has {name}={want!r}; "
                    f"use another --out folder (or delete that one) to start afresh",
                    field=name, expected=want, got=got, path=self.spec.state_dir,
                )
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_optim(self.opt, tensors, record["param_groups"])
        self.gen.set_state(tensors["rng"])
        self.epoch = int(record["epoch"])
        self.result = FitResult(best_epoch=record["best_epoch"], best_metrics=record["best_metrics"],
                                history=record["history"])
        self.step = int(record.get("step", 0))
        if self.step:
            self.loss_total, self.loss_count = float(record["loss_total"]), int(record["loss_count"])
            log.info("resuming %s inside epoch %d at step %d of %d", self.spec.desc, self.epoch + 1, self.step,
                     self.spec.steps_per_epoch)
        else:
            log.info("resuming %s after epoch %d (best so far: epoch %d)", self.spec.desc, self.epoch,
                     self.result.best_epoch)

    def run_epoch(self) -> float:
        self.model.train()
        skip = self.step  # > 0 when resuming inside this epoch: its first batches were trained on
        if skip == 0:
            self.loss_total, self.loss_count = 0.0, 0
        self.epoch_rng = self.gen.get_state()  # the epoch's batches can be drawn again from here
        for step, (inputs, targets) in enumerate(self.spec.batches(self.gen)):
            if step < skip:
                continue
            global_step = self.epoch * self.spec.steps_per_epoch + step
            for group in self.opt.param_groups:
                group["lr"] = lr_at(global_step, self.total_steps, self.spec.optim.lr, self.spec.optim.schedule)
            inputs = inputs.to(self.spec.device, non_blocking=True)
            targets = targets.to(self.spec.device, non_blocking=True)
            with autocast(self.spec.device, self.spec.precision):
                outputs = self.model(inputs)
            loss = self.spec.loss_fn(outputs.float(), targets)  # the loss in float32 whatever the precision
            value = loss.item()
            if not math.isfinite(value):
                self._non_finite(value, step)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # the scaler is a pass-through except for fp16
            self.scaler.step(self.opt)
            self.scaler.update()
            self.loss_total, self.loss_count, self.step = self.loss_total + value, self.loss_count + 1, step + 1
            if self.bar is not None:
                self.bar.update(1)
            if time.monotonic() - self.last_save >= self.spec.save_every_s:
                self.save_state()
        self.step = 0
        return self.loss_total / max(self.loss_count, 1)

    def _non_finite(self, value: float, step: int) -> None:
        kept = self.spec.best_path if self.result.best_epoch >= 0 else None
        where = (f"the last good checkpoint is kept at {kept} (epoch {self.result.best_epoch + 1})" if kept
                 else "nothing was saved")
        raise NonFiniteLossError(
            f"training loss became {value} at epoch {self.epoch + 1}, step {step}; stopped, {where}. "
            f"Lower --lr or check the inputs for NaN/inf.",
            epoch=self.epoch + 1, step=step, last_good=kept,
        )

    def end_epoch(self, loss: float) -> dict[str, float]:
        metrics = {"epoch": self.epoch, "train_loss": loss, **self.spec.validate(self.model)}
        self.result.history.append(metrics)
        if metrics["score"] > self.result.best_metrics["score"]:
            self.result.best_epoch, self.result.best_metrics = self.epoch, metrics
            self.spec.save_best(self.model, metrics)
        self.epoch += 1
        self.save_state()
        return metrics


def finished(state_dir: Path, fingerprint: dict[str, Any], optim: OptimConfig) -> bool:
    """Whether ``state_dir`` holds a run with this fingerprint (as in :class:`FitSpec`) that already
    ran all ``optim.epochs`` epochs, so ``fit`` would train nothing. Reads only the state record."""
    try:
        record = json.loads((state_dir / STATE_RECORD).read_text())
        saved, epoch = record["fingerprint"], int(record["epoch"])
    except (OSError, ValueError, TypeError, KeyError):
        return False
    want = {**fingerprint, **optim.to_json()}
    return epoch >= optim.epochs and all(saved.get(name) == value for name, value in want.items())


def fit(model: nn.Module, spec: FitSpec) -> FitResult:
    """Train ``model`` for ``spec.optim.epochs`` epochs (resuming if state exists)."""
    fitter = _Fitter(model, spec)
    fitter.try_resume()
    start = fitter.epoch
    epochs = spec.optim.epochs
    bar = tqdm(total=epochs * spec.steps_per_epoch, initial=start * spec.steps_per_epoch + fitter.step,
               desc=spec.desc, disable=not spec.progress, unit="step", dynamic_ncols=True)
    fitter.bar = bar
    last = ""  # the last finished epoch's figures
    try:
        while fitter.epoch < epochs:
            bar.set_postfix_str(f"epoch {fitter.epoch + 1}/{epochs}{last}")
            metrics = fitter.end_epoch(fitter.run_epoch())
            last = (f", loss {metrics['train_loss']:.4g}, val {metrics['score']:.4f}, "
                    f"best {fitter.result.best_metrics['score']:.4f}")
    except KeyboardInterrupt:
        if fitter.step > 0:  # keep what this epoch trained: the same command resumes here
            fitter.save_state()
            log.warning("interrupted inside epoch %d at step %d; state saved in %s, run the same command to resume",
                        fitter.epoch + 1, fitter.step, spec.state_dir)
        raise
    finally:
        bar.close()
    fitter.result.epochs_run = fitter.epoch - start
    return fitter.result
