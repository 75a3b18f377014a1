"""Model outputs over a whole split, computed in chunks and cached by model hash."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from parm.data import ArrayDataset
from parm.data.cache import OutputCache, resolve_cache_dir
from parm.devices import module_device

log = logging.getLogger(__name__)


@torch.inference_mode()
def model_outputs(model: nn.Module, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """images (N, *S) -> raw outputs (N, C) as float32 on the CPU, in eval mode, chunk by chunk on the
    model's own device (each chunk is moved there and its outputs back)."""
    model.eval()
    device = module_device(model)
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


def inputs_digest(inputs: torch.Tensor) -> str:
    """A content hash of model inputs (N, *S): names their cached outputs and a parity run's inputs."""
    return hashlib.sha256(inputs.contiguous().numpy().tobytes()).hexdigest()


def cached_input_outputs(model: nn.Module, weights_sha256: str, inputs: torch.Tensor, digest: str,
                         cache_dir: str | Path | None = None) -> torch.Tensor:
    """Outputs (N, C) of the model with hash ``weights_sha256`` on unlabelled ``inputs`` (N, *S)
    whose :func:`inputs_digest` is ``digest``; computed once (on the model's device; the cache does
    not tell devices apart: their outputs differ by float rounding only)."""
    cache = OutputCache(resolve_cache_dir(cache_dir))
    key = f"{weights_sha256[:24]}-inputs-{digest[:24]}-{len(inputs)}"
    outputs = cache.get(key)
    if outputs is not None and outputs.shape[0] == len(inputs):
        log.info("base outputs for the inputs read from cache %s", cache.directory)
        return outputs
    outputs = model_outputs(model, inputs)
    cache.put(key, outputs)
    return outputs


def cached_outputs(
    model: nn.Module, weights_sha256: str, data: ArrayDataset, split: str, cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """Outputs (N, C) of the model with hash ``weights_sha256`` on ``data``; computed once."""
    cache = OutputCache(resolve_cache_dir(cache_dir))
    norm = hashlib.sha256(repr((data.mean, data.std)).encode()).hexdigest()[:8]  # outputs depend on the inputs' normalisation
    key = f"{weights_sha256[:24]}-{data.name.replace('/', '_').replace(':', '_')}-{split}-{len(data)}-{norm}"
    outputs = cache.get(key)
    if outputs is not None and outputs.shape[0] == len(data):
        log.info("base outputs for %s/%s read from cache %s", data.name, split, cache.directory)
        return outputs
    outputs = model_outputs(model, data.float_images())
    cache.put(key, outputs)
    return outputs
