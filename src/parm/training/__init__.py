"""Training and evaluation of deployed (base) models and parity models, and their metrics
(checkpoint I/O is :mod:`parm.checkpoint`, below this package)."""

from parm.training.base import train_base
from parm.training.config import OptimConfig, ParityConfig, base_recipe, parity_recipe
from parm.training.evaluate import EvalResult, evaluate
from parm.training.importing import import_model
from parm.training.metrics import default_top1, degraded_metrics, overall_accuracy, topk_correct
from parm.training.parity import train_parities, train_parity

__all__ = [
    "EvalResult",
    "OptimConfig",
    "ParityConfig",
    "base_recipe",
    "default_top1",
    "degraded_metrics",
    "evaluate",
    "import_model",
    "overall_accuracy",
    "parity_recipe",
    "topk_correct",
    "train_base",
    "train_parities",
    "train_parity",
]
