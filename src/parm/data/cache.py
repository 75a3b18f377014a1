"""On-disk cache of base-model outputs (logits), so parity training computes them once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Argument, else $PARM_CACHE_DIR, else $XDG_CACHE_HOME/parm/outputs, else ~/.cache/parm/outputs."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("PARM_CACHE_DIR"):
        return Path(os.environ["PARM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "parm" / "outputs"


class OutputCache:
    """Tensors stored as ``<dir>/<key>.safetensors``, written atomically (temp file + rename)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor, or None when absent or unreadable (an unreadable entry is removed)."""
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return load_file(str(path))["outputs"]
        except (SafetensorError, KeyError, OSError) as exc:
            log.warning("ignoring unreadable cache entry %s (%s); it will be recomputed", path, exc)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, outputs: torch.Tensor) -> Path:
        path = self._path(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"outputs": outputs.contiguous()}, str(tmp))
        os.replace(tmp, path)
        return path
