"""Encoders and decoders: exactness on linear models, shapes, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from parm.coding import CodeConfig, concat_grid, decode, encode, reconstruct_each, subtract
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
    """A linear model that sees the image through the concat tile's area mean, and its exact parity model."""
    rows, cols = concat_grid(code.k)
    th, tw = H // rows, W // cols
    weight, bias = _linear()
    v = weight[:, : C * th * tw]  # (classes, C*th*tw)

    def model(x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, classes)
        return F.adaptive_avg_pool2d(x, (th, tw)).flatten(1) @ v.T + bias

    def parity_model(p: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, classes)
        out = code.k * bias.expand(p.shape[0], -1).clone()
        for j in range(code.k):
            row, col = divmod(j, cols)
            out = out + p[:, :, row * th:(row + 1) * th, col * tw:(col + 1) * tw].flatten(1) @ v.T
        return out

    return model, parity_model


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 10, 12])
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


def test_concat_grids_grow_with_k_and_stay_near_square() -> None:
    assert [concat_grid(k) for k in (2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13)] == \
        [(1, 2), (2, 2), (2, 2), (2, 3), (2, 3), (3, 3), (3, 3), (3, 3), (3, 4), (3, 4), (4, 4)]
    x = torch.arange(1.0, 9.0).view(1, 8, 1, 1, 1).expand(1, 8, 1, 28, 28).contiguous()  # image j is all j + 1
    out = encode(CodeConfig(k=8, encoder="concat"), x)[0, 0, 0]  # (28, 28): a 3x3 grid of 9x9 tiles
    for j in range(8):
        row, col = divmod(j, 3)
        assert out[row * 9:(row + 1) * 9, col * 9:(col + 1) * 9].eq(j + 1).all()
    assert out[18:27, 18:27].eq(0).all() and out[27].eq(0).all() and out[:, 27].eq(0).all()  # unused: zero


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
     ({"k": 2, "r": 2, "encoder": "concat"}, "r")],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        CodeConfig(**kwargs)
    assert info.value.field == field and str(kwargs[field]) in str(info.value)


def test_concat_message_carries_values() -> None:
    with pytest.raises(ConfigError, match=r"concat encoder supports r=1 only \(one tiled parity image\); got r=2"):
        CodeConfig(k=5, r=2, encoder="concat")


def test_shape_errors() -> None:
    with pytest.raises(ShapeError, match="k=3"):
        encode(CodeConfig(k=3), torch.randn(2, 2, 4))
    with pytest.raises(ShapeError, match="too many for a 2x2 image"):
        encode(CodeConfig(k=12, encoder="concat"), torch.randn(1, 12, 1, 2, 2))
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


@pytest.mark.parametrize("k", [2, 5, 8, 12])
def test_the_tiles_code_decodes_any_missing_members_from_one_parity_output(k: int) -> None:
    """The tiles code's parity model predicts each member: with the exact one (the block-linear
    model applied per tile), every subset of missing members decodes exactly from one output."""
    from parm.models.toy import pooled_linear, pooled_linear_tiles

    code = CodeConfig(k=k, encoder="tiles")
    assert code.per_query and code.decodable(1) == k and CodeConfig(k=k).decodable(1) == 1
    shape = (2, 12, 12)
    model, parity_model = pooled_linear(shape, CLASSES, k).double(), pooled_linear_tiles(shape, CLASSES, k).double()
    x = torch.randn(4, k, *shape, dtype=torch.float64)
    with torch.no_grad():
        data_out = model(x.flatten(0, 1)).view(4, k, CLASSES)
        parity_out = parity_model(encode(code, x)[:, 0])  # (G, k·C)
    assert parity_out.shape == (4, k * CLASSES)
    torch.testing.assert_close(reconstruct_each(code, data_out, parity_out), data_out)
    available = torch.rand(4, k, generator=torch.Generator().manual_seed(k)) < 0.4  # several missing at once
    garbage = torch.where(available[..., None], data_out, torch.full_like(data_out, 1e6))
    torch.testing.assert_close(decode(code, garbage, available, parity_out[:, None]), data_out)
    assert torch.equal(subtract(code, parity_out, [], 1), parity_out[:, CLASSES:2 * CLASSES])
    with pytest.raises(ShapeError, match="k·classes"):
        reconstruct_each(code, data_out, parity_out[:, :CLASSES])


def test_the_tile_mlp_sees_each_tile_alone() -> None:
    """Member j's prediction depends on tile j only, and the model is as cheap as promised."""
    from parm.models import build_model

    model = build_model("tile-mlp", (1, 28, 28), 8 * 10, k=8).eval()
    p = encode(CodeConfig(k=8, encoder="tiles"), torch.randn(2, 8, 1, 28, 28))[:, 0]
    changed = p.clone()
    changed[:, :, 9:18, 0:9] += 1.0  # tile 3 (row 1, col 0) of the 3x3 grid
    with torch.no_grad():
        a, b = model(p).view(2, 8, 10), model(changed).view(2, 8, 10)
    moved = (a - b).abs().amax(dim=(0, 2)) > 0
    assert moved.tolist() == [j == 3 for j in range(8)]
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(m.in_features * m.out_features for m in linear) * 8 < 784 * 200 + 200 * 100 + 100 * 10


@pytest.mark.parametrize("encoder", ["concat", "tiles"])
def test_tiled_rgb_parity_images_keep_channels_aligned(encoder: str) -> None:
    """Each member's red, green and blue planes land in the same tile of the red, green and blue
    planes of the parity image: channels are never permuted or mixed across members."""
    k = 4
    x = torch.zeros(1, k, 3, 32, 32)
    for j in range(k):
        for c in range(3):
            x[0, j, c] = 10 * j + c + 1  # member j, channel c: a constant plane
    parity = encode(CodeConfig(k=k, encoder=encoder), x)[0, 0]  # (3, 32, 32): a 2x2 grid of 16x16 tiles
    for j in range(k):
        row, col = divmod(j, 2)
        for c in range(3):
            assert parity[c, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16].eq(10 * j + c + 1).all(), (j, c)
