"""Command line: parse arguments, build a config, call one library function, print the result."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parm.errors import ConfigError, ParmError

if TYPE_CHECKING:  # imported where used, to keep the command line quick to start
    from parm.faults import FaultSpec
    from parm.system import SystemSpec

log = logging.getLogger("parm")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, default=None,
                   help="dataset folder (default: $PARM_DATA_ROOT, else ~/.cache/parm/data)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing (checksums verified)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch intra-op threads (default: the CPUs this process may use, counting CPU affinity and "
                        "a container's CPU quota; give fewer when other work shares the machine)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_device(p: argparse.ArgumentParser, *, precision: bool = True) -> None:
    from parm.devices import DEVICE_HELP, PRECISIONS

    p.add_argument("--device", default=None, help=f"where the models run: {DEVICE_HELP}")
    if precision:
        p.add_argument("--precision", default=None, choices=PRECISIONS,
                       help="training forward passes under autocast: fp32 (default), bf16 (any device) or fp16 "
                            "(CUDA/MPS, with loss scaling); weights and checkpoints stay float32")


def _device_given(args: argparse.Namespace) -> dict[str, Any]:
    """--device/--precision of a training or evaluation command, when given (else the function's defaults)."""
    return {name: getattr(args, name) for name in ("device", "precision") if getattr(args, name, None) is not None}


def default_threads(sample_s: float = 0.2) -> int:
    """Intra-op threads for training and evaluation when ``--threads`` is not given: the CPUs this
    process may run on (affinity), capped by a cgroup v2 CPU quota (``cpu.max``) where there is one,
    and by how many of them are idle right now (measured from /proc/stat over ``sample_s``; 0: not
    measured). PyTorch's own default counts the host's cores, which oversubscribes a container given
    fewer; and threads on a core another process keeps busy wait for each other at every step (on 2
    cores with one busy, 2 threads made train-base 3.4x slower than on an idle machine)."""
    import math
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    idle = _idle_cpus(sample_s) if sample_s > 0 else None
    if idle is not None:
        cpus = min(cpus, max(1, math.floor(idle + 0.5)))
    return max(1, cpus)


def _idle_cpus(sample_s: float) -> float | None:
    """How many of this process's CPUs were idle over the next ``sample_s`` seconds (Linux), else None."""
    import os
    import time

    def ticks() -> dict[str, tuple[int, int]]:  # cpuN -> (idle incl. iowait, total)
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(v) for v in fields[:8]]
                out[name] = (values[3] + values[4], sum(values))
        return out

    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        before = ticks()
        time.sleep(sample_s)
        after = ticks()
    except (OSError, ValueError, AttributeError):
        return None
    idle = 0.0
    for cpu in mine & set(before) & set(after):
        total = after[cpu][1] - before[cpu][1]
        if total > 0:
            idle += (after[cpu][0] - before[cpu][0]) / total
    return idle


def _set_threads(args: argparse.Namespace) -> None:
    if not hasattr(args, "threads"):
        return
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1; got {args.threads}", field="threads", value=args.threads)
    import torch

    torch.set_num_threads(args.threads or default_threads())
    log.debug("intra-op threads: %d", torch.get_num_threads())


_INPUTS_HELP = ("unlabelled inputs of the deployed model instead of its dataset: a .npy/.safetensors file, a folder "
                "of them (recorded traffic) or a folder of images (uint8 = raw pixels, normalised with the base's "
                "mean/std; float = model inputs as served)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parm", description="Parity models for resilient prediction serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-base", help="train the deployed model and report its test accuracy (A_a)")
    p.add_argument("--dataset", required=True, help="mnist, fashion-mnist, cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--model", required=True, help="mlp, lenet5, resnet18, resnet18-28 or module.path:factory")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: the recipe's (15; 40 with crop-flip augmentation)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int, default=5000,
                   help="validation samples held out of the training split (default: 5000; parity training reuses it)")
    p.add_argument("--normalise", choices=["dataset", "none"], default="dataset",
                   help="inputs (x/255 - mean)/std with the training split's mean/std (dataset, default) or x/255 "
                        "alone (none, as the ParM authors' models); recorded in the checkpoint")
    p.add_argument("--augment", choices=["auto", "none", "crop-flip"], default="auto",
                   help="training-batch augmentation: crop-flip (pad 4, random crop, random left-right flip), none, "
                        "or auto (default: crop-flip for colour images, none for grey ones)")
    _add_save_every(p)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=_train_base)

    p = sub.add_parser(
        "import", help="make a base checkpoint from a model trained outside ParM (architecture + weights)",
        description="Make a base checkpoint from an existing PyTorch model: its architecture (a built-in name or "
                    "your factory module.path:function, called with in_shape= and num_classes= where it takes "
                    "them), its weights (safetensors, or a state dict read with weights_only=True), and how its "
                    "inputs were normalised when it was trained (--mean/--std on the 0..1 scale: every later "
                    "command prepares inputs with them). --dataset measures and records its test accuracy.")
    p.add_argument("--arch", required=True, help="mlp, mlp-small, lenet5, resnet18, resnet18-28 or module.path:factory")
    p.add_argument("--weights", type=Path, required=True,
                   help=".safetensors, a .pt/.pth holding a state dict, or a TorchScript archive of that architecture")
    p.add_argument("--in-shape", required=True, help="one input's shape, e.g. 1,28,28 (channels first)")
    p.add_argument("--classes", type=int, required=True, help="number of classes the model scores")
    p.add_argument("--mean", required=True, help="per-channel input mean on the 0..1 scale, e.g. 0.1307 or 0,0,0")
    p.add_argument("--std", required=True, help="per-channel input std on the 0..1 scale, e.g. 0.3081 or 1,1,1")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="replace the key prefix OLD with NEW (repeatable; 'module.=' strips DataParallel's prefix)")
    p.add_argument("--dataset", default=None, help="measure and record A_a on this dataset's test split")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to create")
    _add_device(p, precision=False)
    _add_common(p)
    p.set_defaults(func=_import)

    p = sub.add_parser(
        "train-parity", help="train the parity model(s) of a base checkpoint for one k and encoder",
        description="Train the parity model(s) of a base checkpoint. With --r 1 (default) --out is the parity "
                    "checkpoint. With --r R > 1 and no --parity-index, all R parity models are trained one after "
                    "another into --out/parity-0 ... --out/parity-<R-1> (pass --out to serving); running the same "
                    "command again resumes, skipping finished ones. --parity-index I trains only index I into --out "
                    "(to spread the R models over several machines).")
    p.add_argument("--base", type=Path, required=True, help="base checkpoint folder")
    p.add_argument("--k", type=int, required=True, help="queries per coding group")
    p.add_argument("--encoder", default="add",
                   help="add (the paper's sum), concat (tiled downsampled images, sum target) or tiles (tiled "
                        "images, a prediction per member: best at large k) (default: add)")
    p.add_argument("--r", type=int, default=1, help="parities per group (default: 1)")
    p.add_argument("--parity-index", type=int, default=None,
                   help="train only this one of the r parities, into --out itself (default: all r; "
                        "with r > 1 into --out/parity-<i>)")
    p.add_argument("--out", type=Path, required=True,
                   help="checkpoint folder (r > 1 without --parity-index: the folder of parity-<i> checkpoints)")
    p.add_argument("--recipe", default="default", choices=["default", "paper"],
                   help="default: init from base, one-cycle LR, 256 groups/step, 400 epochs; "
                        "paper (the authors'): from scratch with their N(0, 0.01) init, Adam 1e-3, 64 (k=2) or 32 "
                        "groups/step, 500 epochs")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--batch-groups", type=int, default=None, help="override the recipe's groups per step")
    p.add_argument("--lr", type=float, default=None, help="override the recipe's (peak) learning rate")
    p.add_argument("--init", choices=["scratch", "base", "authors"], default=None,
                   help="override the recipe's initialisation (authors: Linear N(0, 0.01), zero bias)")
    p.add_argument("--arch", default=None,
                   help="parity model architecture (default: the base's; tile-mlp for --encoder tiles)")
    p.add_argument("--loss", choices=["mse", "kl", "mse+kl"], default="mse",
                   help="mse on the parity output (default, the paper's); kl: KL divergence from the deployed model's "
                        "softened outputs to each member's reconstruction; mse+kl: their sum")
    p.add_argument("--loss-temperature", type=float, default=2.0, metavar="T",
                   help="softening temperature of the kl losses (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None, help="base-output cache (default: ~/.cache/parm/outputs)")
    _add_dataset_override(p)
    _add_save_every(p)
    p.add_argument("--inputs", type=Path, default=None,
                   help=_INPUTS_HELP)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=_train_parity)

    p = sub.add_parser("eval", help="available and degraded-mode accuracy of a base model and parity models")
    p.add_argument("--base", type=Path, required=True, help="base checkpoint folder")
    p.add_argument("--parity", type=Path, nargs="+", required=True, help="one or more parity checkpoint folders")
    p.add_argument("--json", type=Path, default=None,
                   help="write results here (one parity: an object; several: {'results': [...]})")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--pairing", default="random", choices=["random", "consecutive"],
                   help="test groups: a seeded random draw (default) or consecutive queries, as the ParM authors")
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_dataset_override(p)
    p.add_argument("--inputs", type=Path, default=None,
                   help=_INPUTS_HELP + "; reports reconstruction accuracy (agreement with the deployed model) only")
    _add_device(p, precision=False)
    _add_common(p)
    p.set_defaults(func=_eval)

    from parm.faults import FAULT_SPEC_HELP

    p = sub.add_parser("serve", help="serve a model with ParM over HTTP",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="fault spec (--faults):\n" + FAULT_SPEC_HELP)
    _add_system_args(p, serve=True)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    from parm.http import HttpLimits

    http_default = HttpLimits()
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help=f"largest request body (default {http_default.max_body_bytes >> 20} MiB)")
    p.add_argument("--header-timeout", type=float, default=None, metavar="S",
                   help=f"a request's headers must arrive within S seconds, else the connection is closed "
                        f"(default {http_default.header_timeout_s:g})")
    p.add_argument("--body-timeout", type=float, default=None, metavar="S",
                   help=f"a body that stalls S seconds gets 408 (default {http_default.body_timeout_s:g})")
    p.add_argument("--max-connections", type=int, default=None,
                   help=f"open connections beyond this get 503 at once (default {http_default.max_connections})")
    p.add_argument("--record-inputs", type=Path, default=None, metavar="DIR",
                   help="write a sample of served inputs to DIR (rotating .npy files) for train-parity --inputs")
    p.add_argument("--record-fraction", type=float, default=0.01, help="share of inputs recorded (default 0.01)")
    p.add_argument("--record-max-bytes", type=int, default=1 << 30,
                   help="disk used in DIR at most; the oldest files go first (default 1 GiB)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="the whole story on one machine: every mode under the same faults",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Runs the packaged experiment demo.toml (experiments/demo.toml) with parm\n"
                                   "bench's runner; an option not given is the file's, else the serving default.",
                       epilog="fault spec (--faults):\n" + FAULT_SPEC_HELP)
    _add_system_args(p, serve=False)
    p.add_argument("--modes", default=None,
                   help="comma-separated modes (default: the file's; coded and cheap are skipped without --parity "
                        "and --cheap)")
    p.add_argument("--queries", type=int, default=None, help="queries per mode and trial (default: the file's)")
    p.add_argument("--rate", type=float, default=None, help="queries per second, Poisson (default: the file's)")
    p.add_argument("--warmup", type=int, default=None, help="queries discarded at the start (default: the file's)")
    p.add_argument("--trials", type=int, default=None,
                   help="trials, each with its own fault realisation and arrivals, for the 95%% intervals "
                        "(default: the file's)")
    p.add_argument("--seed", type=int, default=None, help="arrival seed; trial t uses seed + t (default: the file's)")
    p.add_argument("--json", type=Path, default=None, help="write the summary (as summary.json) here")
    p.add_argument("--out", type=Path, default=None,
                   help="also keep summary.json, results.csv, records and plots here (default: not kept)")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_demo)

    for name, helptext in (("bench", "run an experiment file on this machine (open-loop load, every mode)"),
                           ("simulate", "run an experiment file in the cluster simulator")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("experiment", type=Path, help="experiment TOML file (see experiments/)")
        p.add_argument("--modes", default=None, help="comma-separated modes (default: the file's)")
        p.add_argument("--queries", type=int, default=None, help="queries per run (default: the file's)")
        p.add_argument("--rate", type=float, default=None, help="queries/s; replaces a rate sweep")
        p.add_argument("--trials", type=int, default=None,
                       help="trials per point, each its own fault realisation (default: the file's, else 5)")
        p.add_argument("--out", type=Path, default=None, help=f"output folder (default: runs/{name}/NAME)")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("-v", "--verbose", action="store_true")
        if name == "bench":
            _add_backend_args(p)
        p.set_defaults(func=_bench if name == "bench" else _simulate)
    return parser


def _experiment(args: argparse.Namespace, kind: str):
    from parm.bench.experiment import load_experiment

    exp = load_experiment(args.experiment)
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
    exp = exp.with_overrides(modes=modes, queries=args.queries, rate=args.rate, trials=args.trials,
                             system=_device_settings(args) if kind == "bench" else None)
    if kind == "simulate" and args.trials is not None:
        exp = dataclasses.replace(exp, simulate={**exp.simulate, "trials": args.trials})
    if kind == "simulate" and args.queries is not None:
        exp = dataclasses.replace(exp, simulate={**exp.simulate, "queries": args.queries})
    if kind == "simulate" and args.rate is not None:
        exp = dataclasses.replace(exp, simulate={**{k: v for k, v in exp.simulate.items() if k != "rates"},
                                                 "rate": args.rate})
    return exp, args.out or Path("runs") / kind / exp.name


def _print_result(label: str, mode: str, stats: dict) -> None:
    from parm.bench.run_experiment import format_progress

    print(format_progress(label, mode, stats), flush=True)


def _bench(args: argparse.Namespace) -> int:
    from parm.bench.run_experiment import format_summary, run_bench

    exp, out = _experiment(args, "bench")
    summary = run_bench(exp, out, progress=not args.no_progress, on_result=_print_result, backend=args.backend,
                        ray_address=args.ray_address)
    print(format_summary(summary))
    print(f"results in {out}/summary.json")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from parm.bench.run_experiment import format_summary, run_simulation

    exp, out = _experiment(args, "simulate")
    summary = run_simulation(exp, out, on_result=_print_result)
    print(format_summary(summary))
    print(f"results in {out}/summary.json")
    return 0


# (flag, ServingConfig field, type, help): each default is read from the dataclass, never restated
_SERVING_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--k", "k", int, "coding group size (default: the parity checkpoint's, else {})"),
    ("--batch-size", "batch_size", int, "queries per batch (default: {})"),
    ("--batch-wait-ms", "batch_wait_ms", float, "longest a query waits for its batch to fill (default: {})"),
    ("--batch-policy", "batch_policy", str,
     "wait: a partial batch forms after --batch-wait-ms; idle: also at once when a data instance is idle "
     "(dynamic batching: no wait at low load, full batches under load) (default: {})"),
    ("--group-wait-ms", "group_wait_ms", float, "longest an open coding group waits for members (default: {})"),
    ("--deadline-ms", "deadline_ms", float, "a query with no answer by then fails (default: {})"),
    ("--stall-timeout-ms", "stall_timeout_ms", float, "an instance silent this long is restarted (default: {})"),
    ("--dispatch", "dispatch", str, "shared pull queue or per-instance round_robin (default: {})"),
    ("--max-pending", "max_pending_queries", int, "pending queries before 429 (default: {})"),
    ("--request-window", "request_window", int,
     "queries of one request let into the batcher and instances at once; the rest enter as its answers come back, "
     "so a huge request cannot fill the queue ahead of small ones (default: {}, i.e. 2 × batch size × instances)"),
    ("--hedge-percentile", "hedge_percentile", float,
     "hedge, cheap, coded-hedge: a batch in service longer than this percentile of recent service times is "
     "re-sent (default: {})"),
    ("--reconstruct-percentile", "reconstruct_percentile", float,
     "coded modes: accept a reconstruction only once its batch is older than this percentile of recent original "
     "answer times, or its instance failed (default: {}, i.e. as soon as the group decodes)"),
    ("--input-envelope", "input_envelope", str,
     "coded modes: a query outside the parity model's input envelope is served uncoded (outside every coding "
     "group), refused with 422 (reject), or coded anyway (off) (default: {})"),
    ("--tenant-header", "tenant_header", str,
     "coded modes: requests with different values of this HTTP header (e.g. x-api-key) are never coded "
     "together (default: '{}', off)"),
)


def _add_system_args(p: argparse.ArgumentParser, *, serve: bool) -> None:
    """The system's options; every one defaults to None (not given), so that the defaults stay in
    ServingConfig and SystemSpec (``parm serve``) or the demo experiment (``parm demo``)."""
    from parm.serving import ServingConfig
    from parm.serving.config import BATCH_POLICIES, DISPATCH, ENVELOPE_ACTIONS, MODES
    from parm.system import SystemSpec

    def spec_default(name: str) -> str:
        return str(SystemSpec.default(name)) if serve else "the demo experiment's"

    p.add_argument("--base", type=Path, required=True, help="base (deployed) model checkpoint")
    p.add_argument("--parity", type=Path, default=None,
                   help="parity model checkpoint, or a folder of r parity-<i> checkpoints (modes coded, coded-hedge)")
    p.add_argument("--cheap", type=Path, default=None, help="approximate backup model checkpoint (mode cheap)")
    p.add_argument("--instances", type=int, default=None,
                   help=f"m: data instances the load needs (default: {spec_default('instances')})")
    if serve:
        p.add_argument("--mode", default=None,
                       help=f"{', '.join(MODES)} (default: {ServingConfig.default('mode')})")
    for flag, name, kind, text in _SERVING_FLAGS:
        choices = {"dispatch": DISPATCH, "input_envelope": ENVELOPE_ACTIONS, "batch_policy": BATCH_POLICIES}.get(name)
        p.add_argument(flag, dest=name, type=kind, default=None, choices=choices,
                       metavar=None if choices else flag[2:].replace("-", "_").upper(),
                       help=text.format(ServingConfig.default(name)))
    p.add_argument("--faults", default=None, help="fault spec, or @FILE.toml (see below); '' for none (default: "
                   + ("none)" if serve else "the demo experiment's)"))
    p.add_argument("--emulated-ms", type=float, default=None,
                   help=f"extra service time per batch emulating an accelerator (default: "
                        f"{spec_default('emulated_ms')})")
    _add_backend_args(p)


def _add_save_every(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-every-min", type=float, default=2.0, metavar="MIN",
                   help="save resumable state inside an epoch at least this often, so an interruption loses at most "
                        "that much training; Ctrl-C saves too (default: 2)")


def _add_dataset_override(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None,
                   help="where the base model's dataset is now, e.g. imagefolder:NEW/PATH after moving the folder "
                        "(default: the base checkpoint's; an image folder's files must be the same)")


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=None, choices=["local", "ray"],
                   help="local: instances are processes on this machine (default); ray: Ray Serve deployments "
                        "(pip install \"parm-serving[ray]\")")
    p.add_argument("--ray-address", default=None,
                   help="with --backend ray: a running cluster (auto, HOST:PORT or ray://HOST:10001); "
                        "default: start a local one")
    from parm.devices import DEVICE_HELP, PRECISIONS

    p.add_argument("--device", default=None,
                   help=f"where instances run: {DEVICE_HELP}, or a list such as cuda:0,cuda:1; cuda spreads the "
                        "instances round robin over every visible GPU, several per GPU when there are more "
                        "instances than GPUs (default: the experiment file's, else auto)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="instances' forward passes: fp32 (default), bf16 or fp16 (CUDA/MPS) under autocast")
    p.add_argument("--gpus-per-instance", type=float, default=None,
                   help="with --backend ray: GPUs each replica reserves (default 1 when the device is a GPU; "
                        "0.25 puts four instances on one GPU)")


def _device_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"device": args.device, "precision": args.precision, "gpus_per_instance": args.gpus_per_instance}


def _faults(text: str | None) -> FaultSpec | None:
    """The --faults option: None when not given or empty, @FILE.toml, or a spec string."""
    from parm.faults import load_fault_spec, parse_fault_spec

    if not text:
        return None
    return load_fault_spec(text[1:]) if text.startswith("@") else parse_fault_spec(text)


def _system_spec(args: argparse.Namespace) -> SystemSpec:
    from parm.system import resolve_system

    return resolve_system(args.base, parity=args.parity, cheap=args.cheap, mode=args.mode,
                          serving={name: getattr(args, name) for _, name, _, _ in _SERVING_FLAGS},
                          instances=args.instances, faults=_faults(args.faults), emulated_ms=args.emulated_ms,
                          backend=args.backend, ray_address=args.ray_address, **_device_settings(args))


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from parm.system import run_server

    spec = _system_spec(args)
    record = None
    if args.record_inputs is not None:
        from parm.serving.recorder import RecordSpec

        record = RecordSpec(args.record_inputs, fraction=args.record_fraction, max_bytes=args.record_max_bytes)
    from parm.http import HttpLimits

    given = {name: value for name, value in (("max_body_bytes", args.max_body_bytes),
                                             ("header_timeout_s", args.header_timeout),
                                             ("body_timeout_s", args.body_timeout),
                                             ("max_connections", args.max_connections)) if value is not None}
    limits = HttpLimits(**given)
    _check_bind(args.host, args.port)  # in seconds, before any instance is started

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_server(spec, args.host, args.port, stop=stop, limits=limits, record=record,
                         on_ready=lambda host, port: print(f"ready http://{host}:{port}", flush=True))

    try:
        asyncio.run(main())
    except OSError as exc:  # the port was taken between the check and the bind
        raise ConfigError(_bind_message(args.host, args.port, exc), field="port", value=args.port) from None
    print("stopped", flush=True)
    return 0


def _bind_message(host: str, port: int, exc: OSError) -> str:
    import errno

    hint = {errno.EADDRINUSE: "another process is listening there; choose another --port (0: any free one)",
            errno.EACCES: "ports below 1024 need privileges; choose --port 1024 or above",
            errno.EADDRNOTAVAIL: "this machine has no such address; use 127.0.0.1 or 0.0.0.0"}.get(
        exc.errno or 0, "check --host and --port")
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}"


def _check_bind(host: str, port: int) -> None:
    """ConfigError (one line) if ``host:port`` cannot be bound right now."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host!r}: {exc}", field="host", value=host) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(_bind_message(host, port, exc), field="port", value=port) from None


def _demo(args: argparse.Namespace) -> int:
    """The packaged demo experiment with the command line's overrides, run by parm bench's runner."""
    import tempfile

    from parm.bench.experiment import demo_experiment
    from parm.bench.run_experiment import format_summary, json_summary, run_bench
    from parm.serving import CODED_MODES

    exp = demo_experiment()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else list(exp.modes)
    needs = [("cheap", args.cheap, "--cheap")] + [(mode, args.parity, "--parity") for mode in CODED_MODES]
    for mode, given, flag in needs:
        if given is None and mode in modes:
            log.info("skipping mode %r: no %s checkpoint given", mode, flag)
            modes.remove(mode)
    if not modes:
        raise ConfigError("no mode left to run (coded and coded-hedge need --parity, cheap needs --cheap)",
                          field="modes", value=[])
    paths = {"base": args.base, "parity": args.parity, "cheap": args.cheap, "data_root": args.data_root}
    system = {**{key: None if path is None else str(path) for key, path in paths.items()},
              "instances": args.instances, "emulated_ms": args.emulated_ms, **_device_settings(args),
              **{name: getattr(args, name) for _, name, _, _ in _SERVING_FLAGS}}
    exp = exp.with_overrides(modes=modes, queries=args.queries, rate=args.rate, trials=args.trials,
                             warmup=args.warmup, seed=args.seed, system=system)
    if args.faults is not None:
        exp = dataclasses.replace(exp, faults=_faults(args.faults))
    faults = exp.faults.to_text() if exp.faults else "none"
    print(f"demo: modes {', '.join(exp.modes)}; m={exp.system['instances']} data instances, {exp.load['queries']} "
          f"queries at {exp.load['rate']:g}/s x {exp.load['trials']} trials (each its own fault realisation), "
          f"emulated {exp.system['emulated_ms']:g} ms per batch, faults: {faults}", flush=True)
    with tempfile.TemporaryDirectory(prefix="parm-demo-") as scratch:
        summary = run_bench(exp, args.out or Path(scratch), progress=not args.no_progress, on_result=_print_result,
                            backend=args.backend, ray_address=args.ray_address, kind="demo")
    print(format_summary(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json_summary(summary))
    return 0


def _train_base(args: argparse.Namespace) -> int:
    from parm.training import train_base

    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr))
                 if v is not None}
    overrides.update(seed=args.seed, val_size=args.val_size)
    record = train_base(args.dataset, args.model, args.out, recipe_overrides=overrides, data_root=args.data_root,
                        download=args.download, progress=not args.no_progress, normalise=args.normalise == "dataset",
                        save_every_s=args.save_every_min * 60, augment=args.augment, **_device_given(args))
    print(f"{record.arch} on {record.dataset}: test accuracy (A_a) {record.metrics['available_top1']:.4f}, "
          f"best epoch {record.metrics['best_epoch']}; saved to {args.out}")
    return 0


def _train_parity(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from parm.checkpoint import parity_set_dirs
    from parm.coding import CodeConfig
    from parm.training import ParityConfig, parity_recipe, train_parities, train_parity

    code = CodeConfig(k=args.k, r=args.r, encoder=args.encoder)
    optim, init = parity_recipe(args.recipe, args.k, args.epochs, args.seed)
    if code.per_query and init == "base" and args.arch is None:
        init = "scratch"  # the tiles code's tile-mlp has no base weights to start from
    overrides = {k: v for k, v in (("batch_size", args.batch_groups), ("lr", args.lr)) if v is not None}
    optim = replace(optim, **overrides)
    common: dict[str, Any] = dict(recipe=args.recipe, data_root=args.data_root, download=args.download,
                                  cache_dir=args.cache_dir, progress=not args.no_progress, inputs=args.inputs,
                                  dataset=args.dataset, save_every_s=args.save_every_min * 60, **_device_given(args))
    if args.parity_index is None and code.r > 1:
        records = train_parities(args.base, args.out, code, optim, arch=args.arch, init=args.init or init,
                                 loss=args.loss, temperature=args.loss_temperature, **common)
        folders = parity_set_dirs(args.out, code.r)
    else:
        parity = ParityConfig(code=code, parity_index=args.parity_index or 0, arch=args.arch, init=args.init or init,
                              loss=args.loss, temperature=args.loss_temperature)
        records, folders = [train_parity(args.base, args.out, parity, optim, **common)], [args.out]
    for record, folder in zip(records, folders):
        m = record.metrics
        which = f" parity {record.parity_index} of r={record.r}" if (record.r or 1) > 1 else ""
        degraded = f"degraded top-1 {m['val_degraded_top1']:.4f}, " if "val_degraded_top1" in m else ""
        print(f"parity k={record.k} encoder={record.encoder}{which}: best epoch {m['best_epoch']}, validation "
              f"{degraded}reconstruction top-1 {m['val_reconstruction_top1']:.4f}; saved to {folder}")
    return 0


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else "—" if r[c] is None else str(r[c]) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _numbers(text: str, flag: str, kind: type = float) -> list[Any]:
    try:
        return [kind(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, e.g. 1,28,28; got {text!r}", field=flag,
                          value=text) from None


def _import(args: argparse.Namespace) -> int:
    from parm.training import import_model

    renames = []
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise ConfigError(f"--rename takes OLD=NEW (a key prefix and its replacement); got {item!r}",
                              field="rename", value=item)
        renames.append((old, new))
    record = import_model(args.out, arch=args.arch, weights=args.weights, in_shape=_numbers(args.in_shape, "--in-shape", int),
                          num_classes=args.classes, mean=_numbers(args.mean, "--mean"), std=_numbers(args.std, "--std"),
                          renames=renames, dataset=args.dataset, data_root=args.data_root, download=args.download,
                          **_device_given(args))
    accuracy = record.metrics.get("available_top1")
    measured = f"; test accuracy on {record.dataset} (A_a) {accuracy:.4f}" if accuracy is not None else ""
    print(f"imported {record.arch} (input {list(record.in_shape)}, "
          f"{record.num_classes} classes){measured}; saved to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from parm.training import evaluate

    results = [r.to_json() for r in evaluate(args.base, args.parity, split=args.split, data_root=args.data_root,
                                             download=args.download, cache_dir=args.cache_dir, inputs=args.inputs,
                                             pairing=args.pairing, dataset=args.dataset, **_device_given(args))]
    print(_table(results, ["dataset", "model", "k", "encoder", "available_top1", "degraded_top1",
                           "degraded_top5", "reconstruction_top1", "default_top1", "num_test_groups"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = results[0] if len(results) == 1 else {"results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = args.command in ("serve", "demo", "bench", "simulate")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _set_threads(args)
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
