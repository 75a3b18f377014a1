"""The training-free Berrut code: nodes, interpolation weights, encoding and decoding."""

from __future__ import annotations

import itertools

import pytest
import torch

from parm.coding.berrut import berrut_decode, berrut_encode, berrut_nodes, berrut_reconstruct_each, berrut_weights
from parm.errors import ShapeError


@pytest.mark.parametrize("k, r", [(2, 1), (4, 1), (8, 1), (8, 2), (12, 3)])
def test_nodes_are_distinct_chebyshev_points_with_parities_spread_among_them(k: int, r: int) -> None:
    alpha, beta = berrut_nodes(k, r)
    assert alpha.shape == (k,) and beta.shape == (r,)
    allnodes = torch.cat([alpha, beta])
    assert len(torch.unique(allnodes)) == k + r and float(allnodes.abs().max()) < 1
    assert bool((alpha[1:] > alpha[:-1]).all())
    if r == 1:  # the parity node sits in the middle of the data nodes
        assert int((alpha < beta[0]).sum()) in (k // 2, (k + 1) // 2)


def test_weights_interpolate_at_the_nodes_and_sum_to_one() -> None:
    nodes = torch.tensor([0.3, -0.9, 0.1, 0.7], dtype=torch.float64)  # any order
    torch.testing.assert_close(berrut_weights(nodes, nodes), torch.eye(4, dtype=torch.float64))
    between = berrut_weights(nodes, torch.tensor([-0.5, 0.2, 0.5, 0.95], dtype=torch.float64))
    torch.testing.assert_close(between.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert bool(torch.isfinite(between).all())


def test_a_group_of_equal_queries_decodes_exactly_for_any_missing_set() -> None:
    """Berrut's interpolant reproduces constants: k equal queries give the parity query X itself,
    and any missing outputs decode to F(X) exactly — for any model F."""
    k, r = 6, 2
    x = torch.randn(3, 1, 5, dtype=torch.float64).expand(3, k, 5)
    parity = berrut_encode(x, r)
    torch.testing.assert_close(parity, x[:, :r])
    out = torch.tanh(x @ torch.randn(5, 4, dtype=torch.float64))  # any model: (3, k, 4)
    for missing in itertools.combinations(range(k), 2):
        available = torch.ones(3, k, dtype=torch.bool)
        available[:, list(missing)] = False
        garbage = out.clone()
        garbage[:, list(missing)] = 1e6  # unavailable rows are never read
        torch.testing.assert_close(berrut_decode(garbage, available, out[:, :r]), out)


def test_available_outputs_are_kept_and_reconstruct_each_fills_every_position() -> None:
    data_out, parity_out = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 1, 5, dtype=torch.float64)
    available = torch.tensor([[True, False, True]] * 4)
    decoded = berrut_decode(data_out, available, parity_out)
    torch.testing.assert_close(decoded[:, [0, 2]], data_out[:, [0, 2]])
    each = berrut_reconstruct_each(data_out, parity_out)
    torch.testing.assert_close(each[:, 1], decoded[:, 1])
    with pytest.raises(ShapeError, match="do not match"):
        berrut_decode(data_out, available[:, :2], parity_out)
    with pytest.raises(ShapeError, match="k >= 2"):
        berrut_nodes(1)
