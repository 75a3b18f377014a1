"""A training-free systematic code from Berrut's rational interpolant (after ApproxIFER).

The k queries of a group are the values at nodes α_1..α_k of a rational function u(z) (Berrut's
first-form interpolant, pole-free for any sorted nodes); each of the r parity queries is u at
one more node β_i: a weighted mix Σ_j ℓ_j(β_i)·X_j of the group's inputs (the weights sum to 1).
The parity instances run the *deployed model itself* on it — no parity model is trained. A
missing output F(X_j) is then approximated by interpolating z ↦ F(u(z)) through every output
that did arrive (the other originals at their α's and the parity outputs at the β's) and
evaluating at α_j. The code is systematic: originals are exact, only missing answers are
approximate. Nodes are the n = k + r Chebyshev points of the first kind, cos((2i+1)π/(2n));
the parities take evenly spread positions among them (r = 1: the middle one).

Unlike ApproxIFER, which sends every query through the interpolant (non-systematic, so every
answer is approximate), only late answers are approximated here.
"""

from __future__ import annotations

import math

import torch

from parm.errors import ShapeError


def berrut_nodes(k: int, r: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(α (k,), β (r,)) float64: data and parity nodes among the k + r Chebyshev points."""
    if k < 2 or r < 1:
        raise ShapeError(f"a Berrut code needs k >= 2 and r >= 1; got k={k}, r={r}", expected="k>=2, r>=1",
                         got=(k, r))
    n = k + r
    points = torch.cos((2 * torch.arange(n, dtype=torch.float64) + 1) * math.pi / (2 * n)).flip(0)  # ascending
    parity_at = sorted({int(round((i + 1) * n / (r + 1) - 0.5)) for i in range(r)})  # evenly spread positions
    data_at = [i for i in range(n) if i not in parity_at]
    return points[data_at], points[parity_at]


def berrut_weights(nodes: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Weights (len(at), len(nodes)) of Berrut's interpolant through ``nodes`` evaluated at each
    point of ``at``: value(z) = Σ_i weight[z, i]·f(nodes[i]). Rows sum to 1; a point equal to
    a node gets that node's value exactly."""
    order = torch.argsort(nodes)
    signs = torch.empty(len(nodes), dtype=torch.float64)
    signs[order] = torch.tensor([(-1.0) ** i for i in range(len(nodes))], dtype=torch.float64)
    diff = at[:, None].to(torch.float64) - nodes[None, :].to(torch.float64)  # (A, N)
    exact = diff == 0
    terms = signs[None, :] / torch.where(exact, torch.ones_like(diff), diff)
    weights = terms / terms.sum(dim=1, keepdim=True)
    hit = exact.any(dim=1)
    weights[hit] = exact[hit].to(torch.float64)
    return weights


def berrut_encode(x: torch.Tensor, r: int = 1) -> torch.Tensor:
    """Parity queries of groups x (G, k, *S): (G, r, *S), parity i = Σ_j ℓ_j(β_i)·X_j."""
    if x.dim() < 3:
        raise ShapeError(f"berrut_encode needs (groups, k, *query_shape); got {tuple(x.shape)}",
                         expected="(G, k, ...)", got=tuple(x.shape))
    alpha, beta = berrut_nodes(x.shape[1], r)
    w = berrut_weights(alpha, beta).to(x.dtype).to(x.device)  # (r, k)
    flat = x.reshape(x.shape[0], x.shape[1], -1)  # (G, k, D)
    return torch.einsum("rk,gkd->grd", w, flat).reshape(x.shape[0], r, *x.shape[2:])


def berrut_decode(data_out: torch.Tensor, available: torch.Tensor, parity_out: torch.Tensor) -> torch.Tensor:
    """Fill in missing outputs: data_out (G, k, C) (missing rows ignored), available (G, k) bool,
    parity_out (G, r, C) (the deployed model's outputs on the parity queries) -> (G, k, C), the
    available rows unchanged and each missing one interpolated from everything that arrived."""
    groups, k, _ = data_out.shape
    r = parity_out.shape[1]
    if available.shape != (groups, k) or parity_out.shape[0] != groups:
        raise ShapeError(f"berrut_decode shapes do not match: outputs {tuple(data_out.shape)}, available "
                         f"{tuple(available.shape)}, parity {tuple(parity_out.shape)}", expected=(groups, k),
                         got=tuple(available.shape))
    alpha, beta = berrut_nodes(k, r)
    out = data_out.clone()
    for pattern in torch.unique(available, dim=0):  # one interpolant per availability pattern
        rows = (available == pattern).all(dim=1).nonzero().flatten()
        missing = (~pattern).nonzero().flatten()
        if len(missing) == 0:
            continue
        have = pattern.nonzero().flatten()
        nodes = torch.cat([alpha[have], beta])
        w = berrut_weights(nodes, alpha[missing]).to(data_out.dtype).to(data_out.device)  # (M, |have| + r)
        values = torch.cat([data_out[rows][:, have], parity_out[rows]], dim=1)  # (g, |have| + r, C)
        out[rows[:, None], missing[None, :]] = torch.einsum("mn,gnc->gmc", w, values)
    return out


def berrut_reconstruct_each(data_out: torch.Tensor, parity_out: torch.Tensor) -> torch.Tensor:
    """Reconstruction of every position j of every group when it alone is missing: (G, k, C)."""
    groups, k, _ = data_out.shape
    recon = torch.empty_like(data_out)
    for j in range(k):
        available = torch.ones(groups, k, dtype=torch.bool, device=data_out.device)
        available[:, j] = False
        recon[:, j] = berrut_decode(data_out, available, parity_out)[:, j]
    return recon
