"""Encoders and decoders: exactness on linear models, shapes, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from parm.coding import CodeConfig, decode, encode, reconstruct_each
from parm.errors import ConfigError, ShapeError

C, H, W, CLASSES = 2, 8, 6, 5


def _linear(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(CLASSES, C * H * W, generator=g, dtype=torch.float64)
    bias = torch.randn(CLASSES, generator=g, dtype=torch.float64)
    return weight, bias


def _groups(groups: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(groups, k, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("k, r", [(k, r) for k in (2, 3, 4, 5) for r in (1, 2, 3) if r <= k])
def test_add_code_is_exact_for_linear_model(k: int, r: int) -> None:
    """F(x) = Wx + b: parity i's exact model is W x + (Σ_j w_ij) b; every erasure pattern of up to r decodes."""
    code = CodeConfig(k=k, r=r)
    weight, bias = _linear()
    x = _groups(7, k)  # (G, k, C, H, W)
    data_out = torch.einsum("cd,gkd->gkc", weight, x.flatten(2)) + bias  # (G, k, classes)
    parity_in = encode(code, x)  # (G, r, C, H, W)
    coeff = code.weights(torch.float64).sum(dim=1)  # (r,)
    parity_out = torch.einsum("cd,grd->grc", weight, parity_in.flatten(2)) + coeff[:, None] * bias  # (G, r, classes)
    for lost in itertools.chain.from_iterable(itertools.combinations(range(k), e) for e in range(1, r + 1)):
        available = torch.ones(7, k, dtype=torch.bool)
        available[:, list(lost)] = False
        garbage = data_out.clone()
        garbage[:, list(lost)] = 1e6
        decoded = decode(code, garbage, available, parity_out)
        torch.testing.assert_close(decoded, data_out, rtol=1e-9, atol=1e-9)
    for i in range(r):
        torch.testing.assert_close(reconstruct_each(code, data_out, parity_out[:, i], i),
                                   data_out, rtol=1e-9, atol=1e-9)


def _pooled_linear(code: CodeConfig):
    """A linear model that sees the image through the concat tile's block mean, and its exact parity model."""
    block = (1, 2) if code.k == 2 else (2, 2)
    th, tw = H // block[0], W // block[1]
    weight, bias = _linear()
    v = weight[:, : C * th * tw]  # (classes, C*th*tw)

    def model(x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, classes)
        return F.avg_pool2d(x, block).flatten(1) @ v.T + bias

    def parity_model(p: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, classes)
        out = code.k * bias.expand(p.shape[0], -1).clone()
        for j in range(code.k):
            row, col = divmod(j, 2)
            out = out + p[:, :, row * th:(row + 1) * th, col * tw:(col + 1) * tw].flatten(1) @ v.T
        return out

    return model, parity_model


@pytest.mark.parametrize("k", [2, 3, 4])
def test_concat_code_is_exact_for_block_linear_model(k: int) -> None:
    code = CodeConfig(k=k, encoder="concat")
    model, parity_model = _pooled_linear(code)
    x = _groups(5, k)
    data_out = model(x.flatten(0, 1)).view(5, k, CLASSES)  # (G, k, classes)
    parity_out = parity_model(encode(code, x)[:, 0])  # (G, classes)
    torch.testing.assert_close(reconstruct_each(code, data_out, parity_out), data_out, rtol=1e-9, atol=1e-9)
    for j in range(k):
        available = torch.ones(5, k, dtype=torch.bool)
        available[:, j] = False
        torch.testing.assert_close(decode(code, data_out, available, parity_out[:, None]), data_out)


def test_concat_layout_k4_and_empty_tile_k3() -> None:
    x = torch.zeros(1, 4, 1, 4, 4)
    for j in range(4):
        x[0, j] = j + 1.0
    out = encode(CodeConfig(k=4, encoder="concat"), x)[0, 0, 0]  # (4, 4)
    assert out[:2, :2].eq(1).all() and out[:2, 2:].eq(2).all() and out[2:, :2].eq(3).all() and out[2:, 2:].eq(4).all()
    out3 = encode(CodeConfig(k=3, encoder="concat"), x[:, :3])[0, 0, 0]
    assert out3[2:, 2:].eq(0).all() and out3[2:, :2].eq(3).all()
    out2 = encode(CodeConfig(k=2, encoder="concat"), x[:, :2])[0, 0, 0]
    assert out2.shape == (4, 4) and out2[:, :2].eq(1).all() and out2[:, 2:].eq(2).all()


def test_add_keeps_shape_and_channels() -> None:
    x = torch.randn(3, 2, 3, 4, 4)
    p = encode(CodeConfig(k=2), x)
    assert p.shape == (3, 1, 3, 4, 4)
    torch.testing.assert_close(p[:, 0], x[:, 0] + x[:, 1])
    flat = torch.randn(3, 2, 784)
    assert encode(CodeConfig(k=2), flat).shape == (3, 1, 784)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"k": 1}, "k"), ({"k": 2, "r": 0}, "r"), ({"k": 2, "encoder": "xor"}, "encoder"),
     ({"k": 5, "encoder": "concat"}, "k"), ({"k": 2, "r": 2, "encoder": "concat"}, "r")],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        CodeConfig(**kwargs)
    assert info.value.field == field and str(kwargs[field]) in str(info.value)


def test_concat_message_carries_values() -> None:
    with pytest.raises(ConfigError, match=r"concat encoder supports k in \{2, 3, 4\}; got k=5"):
        CodeConfig(k=5, encoder="concat")


def test_shape_errors() -> None:
    with pytest.raises(ShapeError, match="k=3"):
        encode(CodeConfig(k=3), torch.randn(2, 2, 4))
    with pytest.raises(ShapeError, match="must be even"):
        encode(CodeConfig(k=2, encoder="concat"), torch.randn(1, 2, 1, 4, 5))
    with pytest.raises(ShapeError, match="must be even"):
        encode(CodeConfig(k=4, encoder="concat"), torch.randn(1, 4, 1, 5, 4))
    with pytest.raises(ShapeError, match="images"):
        encode(CodeConfig(k=2, encoder="concat"), torch.randn(1, 2, 16))
    with pytest.raises(ShapeError, match="floating"):
        encode(CodeConfig(k=2), torch.ones(1, 2, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match="do not match"):
        reconstruct_each(CodeConfig(k=2), torch.randn(3, 2, 5), torch.randn(4, 5))


def test_decode_refuses_too_many_erasures() -> None:
    code = CodeConfig(k=3)
    available = torch.tensor([[True, False, False]])
    with pytest.raises(ShapeError, match="re-send"):
        decode(code, torch.randn(1, 3, 4), available, torch.randn(1, 1, 4))
    with pytest.raises(ShapeError, match="re-send"):
        decode(code, torch.randn(1, 3, 4), torch.tensor([[True, False, True]]), torch.randn(1, 1, 4),
               torch.tensor([[False]]))


def test_decode_mixed_patterns_in_one_batch() -> None:
    code = CodeConfig(k=3)
    out = torch.randn(4, 3, 5)
    parity = out.sum(1, keepdim=True)  # (G, 1, C): the ideal parity output
    available = torch.tensor([[True, True, True], [False, True, True], [True, False, True], [True, True, False]])
    torch.testing.assert_close(decode(code, out * available[..., None], available, parity), out)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_subtract_matches_general_decoder(k: int) -> None:
    from parm.coding import subtract

    code = CodeConfig(k=k)
    out = torch.randn(5, k, 7)  # (B, k, C)
    parity = out.sum(dim=1)  # (B, C)
    for j in range(k):
        known = [out[:, i] for i in range(k) if i != j]
        torch.testing.assert_close(subtract(code, parity, known, j), out[:, j], rtol=1e-5, atol=1e-5)
    assert subtract(code, parity, [out[:, i] for i in range(1, k)], 0) is not parity  # never in place
