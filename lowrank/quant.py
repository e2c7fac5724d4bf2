"""Group-wise integer quantization for Q-GaLore: INT8 weights, INT4/INT8 projection matrices.

Q-GaLore (arXiv 2407.08296) stores the linear weights in INT8 and the GaLore projection matrices
in INT4, both asymmetric in groups of 256 consecutive elements, and updates the INT8 weights with
stochastic rounding so that updates smaller than one quantization step still count on average.

Layout. A tensor is flattened row-major and cut into groups of `group_size` consecutive elements
(the last group may be shorter: no padding, no divisibility requirement). Group g has a scale s_g
and an offset o_g, both fp16, and each element a code q in [0, 2^bits - 1]:

    x ≈ q · s_g + o_g          o_g ≤ min(group), s_g ≥ (max(group) - o_g) / (2^bits - 1)

o_g is rounded *down* and s_g *up* to fp16, so every value of the group maps into [0, 2^bits - 1]
without clamping: round-to-nearest is off by at most s_g / 2 and stochastic rounding is unbiased.
A float offset (not an integer zero point) keeps the full grid for groups of one sign.

Bytes per element (G = group size; scale and offset are 2 bytes each):

    INT8            1   + 4/G     G = 256: 1.015625   (fp16 weights: 2, a saving of 49 %)
    INT4 (packed)   1/2 + 4/G     G = 256: 0.515625   two codes per byte, low nibble first
    16 bits         2             stored as fp16 (projections are orthonormal: |x| ≤ 1)

Everything works in blocks of `estimator.constants.QUANT_BLOCK` elements, so fp32 work space stays a few MB
whatever the matrix size; the only full-size tensors are the inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from estimator import constants
from estimator.constants import QUANT_CONSTANT_DTYPE, torch_dtype

CONSTANT_DTYPE = torch_dtype(QUANT_CONSTANT_DTYPE)  # scales and offsets
SMALLEST_SCALE = 2.0**-24  # the smallest positive fp16 (a constant group still gets a valid grid)
QUANT_BITS = (4, 8)


# ----------------------------------------------------------------------------- checks and layout
def _check_bits(bits: int, allowed: tuple[int, ...] = QUANT_BITS) -> None:
    if bits not in allowed:
        raise ValueError(f"bits={bits!r} is not supported; use one of {', '.join(map(str, allowed))}")


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a whole number ≥ 1 (Q-GaLore uses 256)")


def _concrete(t: Tensor) -> bool:
    """False for fake and meta tensors (dry runs), whose values cannot be checked."""
    return not is_fake(t) and t.device.type != "meta"


def num_groups(numel: int, group_size: int) -> int:
    """Groups of `group_size` consecutive elements; the last one may be shorter."""
    return -(-numel // group_size)


def _blocks(numel: int, group_size: int, fake: bool = False) -> Iterator[tuple[int, int, int, int, int]]:
    """(first element, end element, first group, end group, group width) of each work block.

    Full groups come in blocks of about constants.QUANT_BLOCK elements; a shorter last group is its own block,
    so every block is a (groups, width) view of the flat tensor without padding.
    fake=True (a dry run, lowrank/dryrun.py): only the first block of full groups and the short
    last group. Each later block allocates and frees temporaries no larger than the first one's,
    so the memory traced is the same, without thousands of blocks per pass over a 7B model.
    """
    full = numel // group_size
    per_block = max(1, constants.QUANT_BLOCK // group_size)
    for g0 in range(0, full, per_block):
        g1 = min(full, g0 + per_block)
        yield g0 * group_size, g1 * group_size, g0, g1, group_size
        if fake:
            break
    if numel % group_size:
        yield full * group_size, numel, full, full + 1, numel - full * group_size


def _round_down_fp16(t: Tensor) -> Tensor:
    h = t.to(CONSTANT_DTYPE)
    return torch.where(h.float() > t, torch.nextafter(h, torch.full_like(h, -float("inf"))), h)


def _round_up_fp16(t: Tensor) -> Tensor:
    h = t.to(CONSTANT_DTYPE)
    return torch.where(h.float() < t, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _grid(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """fp16 (scale, offset) per group such that [lo, hi] maps into [0, 2^bits - 1]."""
    offset = _round_down_fp16(lo)
    span = (hi - offset.float()) * (1 + 2.0**-20) / (2**bits - 1)  # tiny margin for fp32 rounding
    scale = _round_up_fp16(span).clamp_(min=SMALLEST_SCALE)
    return scale, offset


def _round_codes(v: Tensor, bits: int, stochastic: bool, generator: torch.Generator | None = None) -> Tensor:
    """Codes from code-space values v (in place): floor(v + U[0,1)) is unbiased; else nearest."""
    if stochastic:
        v.add_(torch.rand(v.shape, generator=generator, device=v.device)).floor_()
    else:
        v.round_()
    return v.clamp_(0, 2**bits - 1).to(torch.uint8)


# ----------------------------------------------------------------------------- quantize / dequantize
@torch.no_grad()
def quantize(x: Tensor, bits: int = 8, group_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest group quantization.

    Returns codes (uint8, one code per byte, shape of x), scales and offsets (fp16, (groups,)).
    The error of every element is at most its group's scale / 2.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    if not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got dtype={x.dtype}")
    flat = x.reshape(-1)
    n = num_groups(flat.numel(), group_size)
    codes = torch.empty(flat.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(n, dtype=CONSTANT_DTYPE, device=x.device)
    offsets = torch.empty(n, dtype=CONSTANT_DTYPE, device=x.device)
    for a, b, g0, g1, width in _blocks(flat.numel(), group_size, not _concrete(x)):
        v = flat[a:b].view(g1 - g0, width).to(torch.float32, copy=True)  # (groups, width) work block
        lo, hi = v.amin(1), v.amax(1)
        if _concrete(v) and not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError(f"cannot quantize a tensor with NaN or inf values (in groups {g0}..{g1 - 1}); "
                             "fix the diverged weights first")
        scale, offset = _grid(lo, hi, bits)
        if _concrete(scale) and not torch.isfinite(scale).all():
            raise ValueError(f"values up to {hi.abs().max().item():.3g} exceed the fp16 range of the scales; "
                             "quantize weights of magnitude < 60000")
        v.sub_(offset.float()[:, None]).div_(scale.float()[:, None])
        codes[a:b] = _round_codes(v, bits, stochastic=False).view(-1)
        scales[g0:g1], offsets[g0:g1] = scale, offset
        del v
    return codes.view(x.shape), scales, offsets


@torch.no_grad()
def dequantize(codes: Tensor, scales: Tensor, offsets: Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """x = q · s + o per group, computed in fp32 block by block, returned in `dtype` (codes' shape)."""
    _check_group_size(group_size)
    flat = codes.reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype, device=codes.device)
    for a, b, g0, g1, width in _blocks(flat.numel(), group_size, not _concrete(codes)):
        v = flat[a:b].view(g1 - g0, width).float()
        v.mul_(scales[g0:g1].float()[:, None]).add_(offsets[g0:g1].float()[:, None])
        out[a:b] = v.view(-1)
        del v  # free this block before the next one is made
    return out.view(codes.shape)


@torch.no_grad()
def stochastic_update_(codes: Tensor, scales: Tensor, offsets: Tensor, update: Tensor, group_size: int,
                       bits: int = 8, generator: torch.Generator | None = None, beta: float = 1.0) -> None:
    """In place: codes, scales, offsets ← quantize(beta · dequantize(...) + update), stochastic rounding.

    beta ≠ 1 applies decoupled weight decay (beta = 1 - lr·wd) without dequantizing the weight.
    Works in code space, v = beta·q + (beta-1)·o/s + update/s, so a zero update with beta = 1
    gives back the same codes exactly.
    A group keeps its grid while its new values fit in it and either span half of it or did not
    shrink; otherwise it gets a fresh grid from its new min and max (as a first quantization would).
    Either way E[new value] = old value + update: floor(v + U[0,1)) is unbiased and never clamps.
    Work space: three fp32 blocks of constants.QUANT_BLOCK elements; no full-size temporary.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    if update.shape != codes.shape:
        raise ValueError(f"update has shape {tuple(update.shape)} but the quantized weight is "
                         f"{tuple(codes.shape)}; pass a full-size update")
    qmax = 2**bits - 1
    flat_codes, flat_update = codes.view(-1), update.reshape(-1)
    for a, b, g0, g1, width in _blocks(flat_codes.numel(), group_size, not _concrete(codes)):
        q = flat_codes[a:b].view(g1 - g0, width)
        s, o = scales[g0:g1].float(), offsets[g0:g1].float()
        v = flat_update[a:b].view(g1 - g0, width).to(torch.float32, copy=True)
        v.div_(s[:, None])  # the new values in the old grid's code space
        if beta == 1.0:
            v.add_(q)
        else:  # beta·(q·s + o) - o = (beta·q + (beta - 1)·o/s)·s
            v.add_(q.float().mul_(beta).add_(((beta - 1) * o / s)[:, None]))
        vmin, vmax = v.amin(1), v.amax(1)
        used = (q.amax(1) - q.amin(1)).float()  # the range the codes used before the update
        keep = (vmin >= 0) & (vmax <= qmax) & ((vmax - vmin >= qmax / 2) | (vmax - vmin >= used))
        new_s, new_o = _grid(vmin * s + o, vmax * s + o, bits)
        new_s = torch.where(keep, scales[g0:g1], new_s)
        new_o = torch.where(keep, offsets[g0:g1], new_o)
        # v in the new grid: (v·s + o - o') / s'  — exactly v for the groups that keep their grid
        ratio = s / new_s.float()
        shift = (o - new_o.float()) / new_s.float()
        v.mul_(ratio[:, None]).add_(shift[:, None])
        q.copy_(_round_codes(v, bits, stochastic=True, generator=generator))
        scales[g0:g1], offsets[g0:g1] = new_s, new_o
        del v


# ----------------------------------------------------------------------------- INT4 packing
def pack_int4(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte, flat: element 2i in the low nibble, 2i+1 in the high nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """The flat uint8 codes (numel,) that `pack_int4` packed."""
    if packed.dtype != torch.uint8 or packed.numel() != -(-numel // 2):
        raise ValueError(f"packed has {packed.numel()} elements of {packed.dtype}; {numel} codes need "
                         f"{-(-numel // 2)} bytes of torch.uint8")
    out = torch.empty(2 * packed.numel(), dtype=torch.uint8, device=packed.device)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:numel]


# ----------------------------------------------------------------------------- the store
@dataclass
class QuantizedMatrix:
    """A matrix stored in 4 bits (packed), 8 bits, or 16 bits (fp16) — GaLore's projections.

    codes: bits 4 -> uint8 (ceil(numel/2),) packed; bits 8 -> uint8 (shape); bits 16 -> fp16 (shape).
    scales, offsets: fp16 (groups,) for 4 and 8 bits; None for 16.
    """

    codes: Tensor
    scales: Tensor | None
    offsets: Tensor | None
    shape: tuple[int, ...]
    bits: int
    group_size: int

    @classmethod
    @torch.no_grad()
    def from_float(cls, t: Tensor, bits: int = 4, group_size: int = 256) -> QuantizedMatrix:
        _check_bits(bits, (*QUANT_BITS, 16))
        _check_group_size(group_size)
        if bits == 16:
            codes = t.to(torch.float16, copy=True)
            if _concrete(codes) and not torch.isfinite(codes).all():
                raise ValueError(f"values up to {t.abs().max().item():.3g} overflow fp16; use bits=4 or 8")
            return cls(codes, None, None, tuple(t.shape), 16, group_size)
        codes, scales, offsets = quantize(t, bits, group_size)
        if bits == 4:
            codes = pack_int4(codes)
        return cls(codes, scales, offsets, tuple(t.shape), bits, group_size)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.bits == 16:
            return self.codes.to(dtype)
        codes = unpack_int4(self.codes, self.numel) if self.bits == 4 else self.codes
        return dequantize(codes, self.scales, self.offsets, self.group_size, dtype).view(self.shape)

    def state_tensors(self) -> list[Tensor]:
        """Every tensor this store holds (what memory tracking counts)."""
        return [t for t in (self.codes, self.scales, self.offsets) if t is not None]

    @property
    def nbytes(self) -> int:
        """Exact bytes of codes + scales + offsets."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    def to(self, device: torch.device | str) -> QuantizedMatrix:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedMatrix(move(self.codes), move(self.scales), move(self.offsets),
                               self.shape, self.bits, self.group_size)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints (loads with torch.load(weights_only=True))."""
        return {"codes": self.codes, "scales": self.scales, "offsets": self.offsets,
                "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> QuantizedMatrix:
        """Inverse of state_dict; constants go back to fp16 if a loader cast them."""
        fp16 = lambda t: None if t is None else t.to(CONSTANT_DTYPE)  # noqa: E731
        codes = state["codes"].to(torch.float16) if state["bits"] == 16 else state["codes"]
        return cls(codes, fp16(state["scales"]), fp16(state["offsets"]), tuple(state["shape"]),
                   int(state["bits"]), int(state["group_size"]))
