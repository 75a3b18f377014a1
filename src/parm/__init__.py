"""ParM: parity models for resilient ML prediction serving (Kosaian, Rashmi, Venkataraman, SOSP 2019)."""

from parm._version import __version__
from parm.checkpoint import ModelRecord, load_checkpoint, load_parity_set, save_checkpoint
from parm.coding import CodeConfig, decode, encode, reconstruct_each
from parm.data import ArrayDataset, load_dataset, resolve_data_root
from parm.devices import resolve_device, spread_devices
from parm.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ChecksumError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    ParmError,
    ShapeError,
    TrainingError,
)
from parm.models import build_model
from parm.serving import Frontend, Prediction, ServingConfig, Source
from parm.training import (
    EvalResult,
    OptimConfig,
    ParityConfig,
    base_recipe,
    evaluate,
    import_model,
    parity_recipe,
    train_base,
    train_parities,
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
    "import_model",
    "load_dataset",
    "load_checkpoint",
    "load_parity_set",
    "parity_recipe",
    "reconstruct_each",
    "resolve_data_root",
    "resolve_device",
    "save_checkpoint",
    "spread_devices",
    "train_base",
    "train_parities",
    "train_parity",
]
