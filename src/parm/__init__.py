"""ParM: parity models for resilient ML prediction serving (Kosaian, Rashmi, Venkataraman, SOSP 2019)."""

__version__ = "0.1.0"

from parm.coding import CodeConfig, decode, encode, reconstruct_each  # noqa: E402
from parm.data import ArrayDataset, load_dataset, resolve_data_root  # noqa: E402
from parm.errors import (  # noqa: E402
    ChecksumError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    ParmError,
    ShapeError,
    TrainingError,
)
from parm.models import build_model  # noqa: E402
from parm.serving import Frontend, Prediction, ServingConfig, Source  # noqa: E402
from parm.training import (  # noqa: E402
    EvalResult,
    ModelRecord,
    OptimConfig,
    ParityConfig,
    base_recipe,
    evaluate,
    load_checkpoint,
    parity_recipe,
    save_checkpoint,
    train_base,
    train_parity,
)

__all__ = [
    "ArrayDataset",
    "CheckpointError",
    "CheckpointMismatchError",
    "ChecksumError",
    "CodeConfig",
    "ConfigError",
    "DataError",
    "EvalResult",
    "Frontend",
    "ModelRecord",
    "NonFiniteLossError",
    "OptimConfig",
    "ParityConfig",
    "ParmError",
    "Prediction",
    "ServingConfig",
    "ShapeError",
    "Source",
    "TrainingError",
    "__version__",
    "base_recipe",
    "build_model",
    "decode",
    "encode",
    "evaluate",
    "load_dataset",
    "load_checkpoint",
    "parity_recipe",
    "reconstruct_each",
    "resolve_data_root",
    "save_checkpoint",
    "train_base",
    "train_parity",
]
