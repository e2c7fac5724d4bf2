"""Group quantization: error bounds, stochastic rounding, INT4 packing, the QuantizedMatrix store."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from estimator.constants import quantized_nbytes
from lowrank.quant import (
    QuantizedMatrix,
    dequantize,
    num_groups,
    pack_int4,
    quantize,
    stochastic_update_,
    unpack_int4,
)


def group_scales(scales: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    """The scale of each element's group, flat (numel,)."""
    return scales.float().repeat_interleave(group_size)[:numel]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, group_size", [((64, 32), 256), ((37, 29), 16), ((5, 7), 64), ((1, 1), 4)])
def test_quantize_error_at_most_half_a_step(bits, shape, group_size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, scales, offsets = quantize(x, bits, group_size)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and int(codes.max()) < 2**bits
    assert scales.dtype == offsets.dtype == torch.float16
    assert scales.numel() == num_groups(x.numel(), group_size)
    err = (dequantize(codes, scales, offsets, group_size) - x).abs().reshape(-1)
    assert torch.all(err <= group_scales(scales, x.numel(), group_size) * (0.5 + 1e-3))


def test_quantize_one_sign_and_constant_groups():
    x = torch.cat([torch.linspace(0.5, 0.6, 16), torch.full((16,), 0.1), torch.zeros(16)])
    codes, scales, offsets = quantize(x, 8, 16)
    back = dequantize(codes, scales, offsets, 16)
    assert float(scales[0]) <= 0.1 / 255 * 1.01  # the grid spans [0.5, 0.6], not [0, 0.6]
    assert torch.allclose(back[16:32], x[16:32], atol=1e-6) and torch.equal(back[32:], x[32:])


def test_quantize_does_not_touch_input_and_rejects_nan():
    x = torch.randn(8, 8)
    before = x.clone()
    quantize(x, 8, 16)
    assert torch.equal(x, before)
    x[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize(x, 8, 16)
    with pytest.raises(ValueError, match="bits=3"):
        quantize(x, 3, 16)
    with pytest.raises(ValueError, match="group_size=0"):
        quantize(x, 8, 0)


def test_dequantize_in_requested_dtype():
    x = torch.randn(16, 16)
    codes, scales, offsets = quantize(x, 8, 32)
    fp32 = dequantize(codes, scales, offsets, 32)
    bf16 = dequantize(codes, scales, offsets, 32, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, fp32.to(torch.bfloat16))


# ----------------------------------------------------------------------------- stochastic rounding
def tiled_group(draws: int, group_size: int = 256) -> tuple[torch.Tensor, ...]:
    """One group repeated on `draws` rows: each row is an independent draw of the same update."""
    row = torch.randn(group_size, generator=torch.Generator().manual_seed(1)) * 0.02
    codes, scales, offsets = quantize(row.expand(draws, group_size).contiguous(), 8, group_size)
    return codes, scales, offsets


@pytest.mark.parametrize("push", [0.0, 3.0], ids=["same-grid", "regrid"])
def test_stochastic_rounding_is_unbiased(push):
    draws, group_size = 4000, 256
    codes, scales, offsets = tiled_group(draws, group_size)
    s = float(scales[0])
    start = dequantize(codes, scales, offsets, group_size)[0]
    # 0.3 step everywhere, toward the middle of the grid; plus (regrid) one element pushed far outside
    update = torch.where(codes[0] > 127, -0.3 * s, 0.3 * s)
    update[7] += push * 255 * s
    stochastic_update_(codes, scales, offsets, update.expand(draws, group_size).contiguous(), group_size,
                       generator=torch.Generator().manual_seed(2))
    assert torch.all(scales == scales[0])  # every draw chose the same grid
    assert (float(scales[0]) > s) == (push > 0)  # and regridded only when pushed out of it
    new = dequantize(codes, scales, offsets, group_size)
    exact = start + update
    # one draw is off by < 1 step (std ≤ step/2): the mean of `draws` has std ≤ step / (2 √draws)
    step = float(scales[0])
    tol = 5 * step / (2 * draws**0.5)
    assert (new.mean(0) - exact).abs().max() <= tol
    assert tol < 0.05 * step  # round-to-nearest in the old grid moves nothing: off by 0.3 step, fails


def test_zero_update_is_an_exact_round_trip():
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, scales, offsets = quantize(x, 8, 64)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # also after stochastic updates
        stochastic_update_(codes, scales, offsets, torch.randn(x.shape, generator=gen) * 1e-3, 64, generator=gen)
        before = codes.clone(), scales.clone(), offsets.clone()
        stochastic_update_(codes, scales, offsets, torch.zeros_like(x), 64, generator=gen)
        assert all(torch.equal(a, b) for a, b in zip(before, (codes, scales, offsets)))


def test_stochastic_update_beta_scales_the_weight():
    """beta = 1 - lr·wd (decoupled weight decay) without dequantizing: unbiased like the update."""
    draws = 2000
    codes, scales, offsets = tiled_group(draws)
    start = dequantize(codes, scales, offsets, 256)[0]
    stochastic_update_(codes, scales, offsets, torch.zeros(draws, 256), 256,
                       generator=torch.Generator().manual_seed(4), beta=0.99)
    step = float(scales.float().max())
    new = dequantize(codes, scales, offsets, 256)
    assert (new.mean(0) - 0.99 * start).abs().max() <= 5 * step / (2 * draws**0.5)


def test_stochastic_update_with_generator_is_reproducible():
    x = torch.randn(16, 64) * 0.02
    update = torch.randn(16, 64) * 1e-4
    results = []
    for seed in (5, 5, 6):
        codes, scales, offsets = quantize(x, 8, 64)
        stochastic_update_(codes, scales, offsets, update, 64, generator=torch.Generator().manual_seed(seed))
        results.append(codes)
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def test_stochastic_update_regrids_on_growth_and_shrink():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, scales, offsets = quantize(x, 8, 64)
    old = dequantize(codes, scales, offsets, 64)
    stochastic_update_(codes, scales, offsets, old, 64)  # W ← 2 W: leaves the grid
    grown = scales.clone()
    assert torch.allclose(grown.float(), 2 * quantize(x, 8, 64)[1].float(), rtol=0.01)
    new = dequantize(codes, scales, offsets, 64)
    stochastic_update_(codes, scales, offsets, -0.9 * new, 64)  # W ← 0.1 W: shrinks inside the grid
    assert torch.all(scales.float() < 0.2 * grown.float())
    assert (dequantize(codes, scales, offsets, 64) - 0.1 * new).abs().max() <= scales.float().max()


def test_stochastic_update_rejects_wrong_shape():
    codes, scales, offsets = quantize(torch.randn(8, 8), 8, 16)
    with pytest.raises(ValueError, match=r"update has shape \(8,\) but the quantized weight is \(8, 8\)"):
        stochastic_update_(codes, scales, offsets, torch.zeros(8), 16)


def test_works_on_fake_tensors():
    """Dry runs (`--dry-run`) trace the real code on fake tensors: no value may be read."""
    with FakeTensorMode():
        x = torch.randn(300, 70)
        codes, scales, offsets = quantize(x, 8, 256)
        stochastic_update_(codes, scales, offsets, torch.randn(300, 70), 256)
        assert dequantize(codes, scales, offsets, 256, torch.bfloat16).shape == (300, 70)
        assert QuantizedMatrix.from_float(x, 4, 256).dequantize().shape == (300, 70)


# ----------------------------------------------------------------------------- INT4 packing
@pytest.mark.parametrize("numel", [1, 2, 3, 16, 17, 255])
def test_pack_unpack_int4_round_trip(numel):
    codes = (torch.arange(numel) * 7 % 16).to(torch.uint8)  # every code 0..15 once numel ≥ 16
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int4(packed, numel), codes)


def test_pack_int4_layout_and_all_pairs():
    codes = torch.cartesian_prod(torch.arange(16), torch.arange(16)).reshape(-1).to(torch.uint8)
    packed = pack_int4(codes)
    assert torch.equal(packed, (codes[0::2] | codes[1::2] << 4))  # low nibble first
    assert packed.unique().numel() == 256 and torch.equal(unpack_int4(packed, codes.numel()), codes)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_int4(packed[:1], 3)


# ----------------------------------------------------------------------------- the store
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_quantized_matrix_round_trip_and_bytes(bits):
    p = torch.linalg.qr(torch.randn(300, 24, generator=torch.Generator().manual_seed(0)))[0]  # like U[:, :r]
    qm = QuantizedMatrix.from_float(p, bits, 256)
    back = qm.dequantize(torch.float32)
    assert back.shape == p.shape
    assert qm.nbytes == quantized_nbytes(p.numel(), bits, 256)
    assert qm.nbytes == sum(t.numel() * t.element_size() for t in qm.state_tensors())
    if bits == 16:
        assert torch.allclose(back, p, atol=1e-3)
    else:
        err = (back - p).abs().reshape(-1)
        assert torch.all(err <= group_scales(qm.scales, p.numel(), 256) * (0.5 + 1e-3))


def test_int4_is_packed():
    p = torch.randn(1000, 33)
    int4, int8 = QuantizedMatrix.from_float(p, 4, 256), QuantizedMatrix.from_float(p, 8, 256)
    assert int4.nbytes <= 0.55 * int8.nbytes  # int8 = one code per byte, same constants
    assert int4.nbytes == -(-p.numel() // 2) + 4 * num_groups(p.numel(), 256)


def test_quantized_matrix_state_dict(tmp_path):
    qm = QuantizedMatrix.from_float(torch.randn(40, 8), 4, 64)
    torch.save(qm.state_dict(), tmp_path / "qm.pt")
    state = torch.load(tmp_path / "qm.pt", weights_only=True)
    state["scales"] = state["scales"].float()  # as an optimizer's load_state_dict may cast it
    again = QuantizedMatrix.from_state_dict(state)
    assert again.scales.dtype == torch.float16 and torch.equal(again.dequantize(), qm.dequantize())
    with pytest.raises(ValueError, match="bits=2"):
        QuantizedMatrix.from_float(torch.randn(4, 4), 2, 64)
