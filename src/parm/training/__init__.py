"""Training and evaluation of deployed (base) models and parity models; checkpoints; metrics."""

from parm.training.base import train_base
from parm.training.checkpoint import (
    ModelRecord,
    check_parity_matches,
    load_checkpoint,
    load_record,
    save_checkpoint,
)
from parm.training.config import OptimConfig, ParityConfig, base_recipe, parity_recipe
from parm.training.evaluate import EvalResult, evaluate
from parm.training.metrics import default_top1, degraded_metrics, overall_accuracy, topk_correct
from parm.training.parity import train_parity

__all__ = [
    "EvalResult",
    "ModelRecord",
    "OptimConfig",
    "ParityConfig",
    "base_recipe",
    "check_parity_matches",
    "default_top1",
    "degraded_metrics",
    "evaluate",
    "load_checkpoint",
    "load_record",
    "overall_accuracy",
    "parity_recipe",
    "save_checkpoint",
    "topk_correct",
    "train_base",
    "train_parity",
]
