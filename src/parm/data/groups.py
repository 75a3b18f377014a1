"""Coding-group sampling: which k samples are coded together."""

from __future__ import annotations

import torch

from parm.errors import ConfigError


def sample_groups(indices: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Shuffle ``indices`` (N,) and cut them into ⌊N/k⌋ groups: -> (G, k). The remainder is dropped."""
    groups = len(indices) // k
    if groups < 1:
        raise ConfigError(
            f"cannot form one coding group of k={k} from {len(indices)} samples",
            field="k", value=k,
        )
    order = torch.randperm(len(indices), generator=generator)  # (N,)
    return indices[order[: groups * k]].view(groups, k)  # (N,) -> (G, k)


def fixed_groups(indices: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The same (G, k) groups every time for a given seed: used for validation and evaluation."""
    return sample_groups(indices, k, torch.Generator().manual_seed(seed))
