"""Decoders: rebuild unavailable outputs from the parity outputs and the available outputs.

With r = 1 and the addition code this is the paper's subtraction decoder,
F(X_j) ≈ F_P(P) − Σ_{i≠j} F(X_i). For r > 1 the missing outputs solve a small linear
system with the generator coefficients of :class:`CodeConfig`. With the ``tiles`` code the
parity output (k·C) holds a prediction per member: a missing output is its slice.
"""

from __future__ import annotations

import torch

from parm.coding.config import CodeConfig
from parm.errors import ShapeError


def _check_outputs(config: CodeConfig, data_out: torch.Tensor, parity_out: torch.Tensor) -> None:
    if data_out.dim() != 3 or data_out.shape[1] != config.k:
        raise ShapeError(
            f"data outputs must be (groups, k={config.k}, classes); got {tuple(data_out.shape)}",
            expected=("G", config.k, "C"), got=tuple(data_out.shape),
        )
    width = data_out.shape[-1] * (config.k if config.per_query else 1)
    if parity_out.shape[0] != data_out.shape[0] or parity_out.shape[-1] != width:
        raise ShapeError(
            f"parity outputs {tuple(parity_out.shape)} do not match data outputs "
            f"{tuple(data_out.shape)} in groups or classes"
            + (f" (the {config.encoder} code's parity model outputs k·classes = {width})" if config.per_query else ""),
            expected=(data_out.shape[0], width), got=tuple(parity_out.shape),
        )


def reconstruct_each(
    config: CodeConfig, data_out: torch.Tensor, parity_out: torch.Tensor, parity_index: int = 0
) -> torch.Tensor:
    """Reconstruct every position of every group as if it alone were missing.

    data_out (G, k, C), parity_out (G, C) from parity ``parity_index`` -> (G, k, C), where
    entry [g, j] = (F_P(P)_g − Σ_{l≠j} w_l F(X_l)) / w_j. Used to evaluate degraded mode over
    every erased position at once.
    """
    _check_outputs(config, data_out, parity_out)
    if config.per_query:  # the parity model's own prediction of each member
        return parity_out.reshape(data_out.shape)  # (G, k·C) -> (G, k, C)
    w = config.weights(dtype=data_out.dtype)[parity_index].to(data_out.device)  # (k,)
    weighted = data_out * w[None, :, None]  # (G, k, C)
    rest = weighted.sum(dim=1, keepdim=True) - weighted  # (G, k, C): Σ_{l≠j} w_l F(X_l)
    return (parity_out[:, None, :] - rest) / w[None, :, None]  # (G, k, C)


def subtract(config: CodeConfig, parity_out: torch.Tensor, known: list[torch.Tensor], missing: int) -> torch.Tensor:
    """The serving path's decoder for r = 1: F(X_j) = (F_P(P) − Σ_{l≠j} w_l F(X_l)) / w_j.

    parity_out (B, C); ``known`` the k − 1 other outputs (B, C) in position order; ``missing``
    the position j. A handful of tensor ops, no allocation beyond the result. (With the
    ``tiles`` code, parity_out is (B, k·C) and the answer is its slice j; ``known`` is unused.)
    """
    if config.per_query:
        return member_prediction(config, parity_out, missing)
    w = config.weights(torch.float64)[0]  # (k,)
    others = [i for i in range(config.k) if i != missing]
    out = parity_out.clone()
    for i, value in zip(others, known):
        out.sub_(value, alpha=float(w[i])) if float(w[i]) != 1.0 else out.sub_(value)
    return out if float(w[missing]) == 1.0 else out.div_(float(w[missing]))


def member_prediction(config: CodeConfig, parity_out: torch.Tensor, position: int) -> torch.Tensor:
    """The ``tiles`` code: member ``position``'s output as the parity model predicted it, (B, C)
    out of the parity output (B, k·C)."""
    classes = parity_out.shape[-1] // config.k
    return parity_out[:, position * classes:(position + 1) * classes].clone()


def decode(
    config: CodeConfig,
    data_out: torch.Tensor,
    data_available: torch.Tensor,
    parity_out: torch.Tensor,
    parity_available: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill every unavailable data output of each group.

    data_out (G, k, C) with anything in unavailable slots; data_available (G, k) bool;
    parity_out (G, r, C); parity_available (G, r) bool (all available if None).
    Returns (G, k, C) with available outputs unchanged and missing ones decoded.
    Raises ShapeError if a group has more missing outputs than available parities.
    """
    groups = data_out.shape[0]
    if parity_out.dim() != 3 or parity_out.shape[1] != config.r:
        raise ShapeError(
            f"parity outputs must be (groups, r={config.r}, classes); got {tuple(parity_out.shape)}",
            expected=("G", config.r, "C"), got=tuple(parity_out.shape),
        )
    _check_outputs(config, data_out, parity_out[:, 0])
    if parity_available is None:
        parity_available = torch.ones(groups, config.r, dtype=torch.bool)
    data_available = data_available.bool()
    parity_available = parity_available.bool()
    missing = (~data_available).sum(dim=1)  # (G,)
    too_many = missing > parity_available.sum(dim=1) * (config.k if config.per_query else 1)
    if bool(too_many.any()):
        g = int(too_many.nonzero()[0])
        raise ShapeError(
            f"group {g} has {int(missing[g])} unavailable outputs but only "
            f"{int(parity_available[g].sum())} available parity outputs (r={config.r}); re-send instead",
            expected=f"<= {int(parity_available[g].sum())} missing", got=int(missing[g]),
        )
    if config.per_query:  # r = 1: each missing member is its slice of the parity output
        each = parity_out[:, 0].reshape(data_out.shape)  # (G, k·C) -> (G, k, C)
        return torch.where(data_available[..., None], data_out, each)
    if config.r == 1:
        return _decode_one_parity(config, data_out, data_available, parity_out[:, 0])
    out = data_out.clone()
    patterns = torch.cat([data_available, parity_available], dim=1)  # (G, k + r)
    for pattern in torch.unique(patterns[missing > 0], dim=0):
        rows = (patterns == pattern).all(dim=1).nonzero().squeeze(1)  # groups with this pattern
        out[rows] = _decode_pattern(config, out[rows], parity_out[rows], pattern)
    return out


def _decode_one_parity(config: CodeConfig, data_out: torch.Tensor, available: torch.Tensor,
                       parity_out: torch.Tensor) -> torch.Tensor:
    """r = 1, at most one missing per group: plain subtraction, no linear solve."""
    w = config.weights(dtype=data_out.dtype)[0].to(data_out.device)  # (k,)
    keep = available[..., None].to(data_out.dtype) * w[None, :, None]  # (G, k, 1)
    rest = (data_out * keep).sum(dim=1)  # (G, C): Σ_{available l} w_l F(X_l)
    missing_w = (w[None, :] * (~available).to(data_out.dtype)).sum(dim=1, keepdim=True)  # (G, 1)
    recon = (parity_out - rest) / missing_w.clamp_min(torch.finfo(data_out.dtype).tiny)  # (G, C)
    return torch.where(available[..., None], data_out, recon[:, None, :])  # (G, k, C)


def _decode_pattern(
    config: CodeConfig, data_out: torch.Tensor, parity_out: torch.Tensor, pattern: torch.Tensor
) -> torch.Tensor:
    """Decode groups that share one erasure pattern: data_out (B, k, C), parity_out (B, r, C)."""
    k = config.k
    w = config.weights(dtype=torch.float64)  # (r, k)
    have, lost = pattern[:k], ~pattern[:k]
    use = pattern[k:].nonzero().squeeze(1)[: int(lost.sum())]  # parities to use, (e,)
    known = data_out[:, have].double()  # (B, k - e, C)
    rhs = parity_out[:, use].double() - torch.einsum("ek,bkc->bec", w[use][:, have], known)  # (B, e, C)
    system = w[use][:, lost]  # (e, e)
    solved = torch.linalg.solve(system, rhs)  # (e, e) @ (B, e, C) -> (B, e, C)
    out = data_out.clone()
    out[:, lost] = solved.to(data_out.dtype)
    return out
