"""One vocabulary: every number both halves use is defined once (estimator/constants.py), and the
estimator's number for a quantity equals the implementation's actual bytes for it.

Each formula is checked against real tensors at sizes that cross its block boundaries (a slice,
a work block, a quantization group, the 8-bit threshold); the two work-space sizes lowrank's own
kernels choose are also shrunk on the fly, and both halves must follow. A copy of a constant on
either side would fail here.
"""

from __future__ import annotations

import pytest
import torch

from estimator import constants
from estimator import estimate as est
from estimator import memory as mem
from estimator.config import GaLoreConfig
from estimator.constants import CATEGORIES, adam8bit_nbytes, nf4_nbytes, quantized_nbytes
from lowrank.galore import GaLoreAdamW
from lowrank.memory import MemoryTracker
from lowrank.methods import Prepared
from lowrank.quant import QuantizedMatrix, stochastic_update_
from lowrank.step import measure_optimizer_step


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_one_list_of_categories_everywhere():
    from lowrank import memory, report
    from ui import charts

    assert memory.CATEGORIES is report.CATEGORIES is est.CATEGORIES is CATEGORIES
    assert list(charts.CATEGORY_COLORS)[:len(CATEGORIES)] == list(CATEGORIES)


@pytest.mark.parametrize("numel", [1000, 64 * 256, 64 * 256 + 1, 70_001])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_are_what_bitsandbytes_stores(numel, double_quant):
    import bitsandbytes as bnb  # noqa: F401  (registers the quantization ops)
    from bitsandbytes.functional import quantize_4bit

    weight = torch.randn(numel, dtype=torch.bfloat16)
    codes, state = quantize_4bit(weight, blocksize=constants.NF4_BLOCK, compress_statistics=double_quant,
                                 quant_type="nf4")
    tensors = [codes, state.absmax, state.code]
    if double_quant:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    assert nf4_nbytes(numel, double_quant) == storage_bytes(tensors)


@pytest.mark.parametrize("numel", [4095, 4096, 5000, 70_001])
def test_8bit_moments_are_what_both_8bit_adams_store(numel):
    import bitsandbytes as bnb

    from lowrank.full import build_optimizer

    predicted = mem.optimizer_state_bytes([numel], None, 4, "adamw8bit")
    for make in (lambda p: build_optimizer([p], "adamw8bit", 1e-3),
                 lambda p: GaLoreAdamW([p], lr=1e-3, optim_bits=8)):
        p = torch.nn.Parameter(torch.randn(numel))
        optimizer = make(p)
        p.grad = torch.randn(numel)
        optimizer.step()
        lowrank = optimizer if isinstance(optimizer, GaLoreAdamW) else None
        state = Prepared(torch.nn.Linear(1, 1), optimizer, GaLoreConfig(), lowrank=lowrank).state_tensors()
        assert storage_bytes(state) == predicted, type(optimizer).__name__
        if numel >= constants.ADAM8_MIN_SIZE:
            assert predicted == 2 * adam8bit_nbytes(numel) + 2 * constants.QMAP_BYTES
    assert isinstance(build_optimizer([torch.nn.Parameter(torch.zeros(8))], "adamw8bit", 1e-3), bnb.optim.AdamW8bit)


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("numel", [255, 256 * 3 + 1, (1 << 20) + 300])
def test_group_quantized_bytes_are_what_lowrank_quant_stores(bits, numel):
    matrix = QuantizedMatrix.from_float(torch.randn(numel), bits=bits, group_size=256)
    assert matrix.nbytes == quantized_nbytes(numel, bits, 256)


def test_int8_weight_bytes_are_what_the_layer_stores():
    from lowrank.qgalore import Int8Linear

    layer = Int8Linear.from_linear(torch.nn.Linear(300, 7, bias=False), group_size=64)
    assert storage_bytes(layer.buffers()) == mem.int8_weight_bytes(300 * 7, 64)


def plain_update_transient(numel: int, optim_bits: int, dtype: torch.dtype) -> int:
    """Measured temporaries of lowrank.galore's AdamW on one non-projected tensor (steady state)."""
    model = torch.nn.Module()
    model.weight = p = torch.nn.Parameter(torch.randn(numel, dtype=dtype))
    optimizer = GaLoreAdamW([p], lr=1e-3, optim_bits=optim_bits)
    prepared = Prepared(model, optimizer, GaLoreConfig(), lowrank=optimizer)
    for _ in range(2):  # the second step is the steady state: the moments exist
        p.grad = torch.randn_like(p)
        measured = measure_optimizer_step(prepared)
    return measured.breakdown["transient"]


@pytest.mark.parametrize("optimizer,dtype", [("adamw", torch.float32), ("adamw8bit", torch.float32),
                                             ("adamw8bit", torch.bfloat16)])
@pytest.mark.parametrize("shrink", [False, True], ids=["as-shipped", "slice-shrunk"])
def test_galore_slices_bound_the_update_as_the_estimate_says(monkeypatch, optimizer, dtype, shrink):
    if shrink:
        monkeypatch.setattr(constants, "GALORE_SLICE", 8192)
    numel = constants.GALORE_SLICE + 4096  # two slices, the second one short
    d = 4 if dtype == torch.float32 else 2
    predicted = est.galore_plain_temps(numel, GaLoreConfig(optimizer=optimizer), d)
    measured = plain_update_transient(numel, 8 if optimizer == "adamw8bit" else 32, dtype)
    assert measured == pytest.approx(predicted, abs=64)  # the estimate leaves out the norm's scalars


@pytest.mark.parametrize("shrink", [False, True], ids=["as-shipped", "block-shrunk"])
def test_quant_blocks_bound_rounding_and_dequantizing_as_the_estimate_says(monkeypatch, shrink):
    from lowrank.quant import dequantize, quantize

    if shrink:
        monkeypatch.setattr(constants, "QUANT_BLOCK", 1 << 14)
    numel = constants.QUANT_BLOCK + 256 * 5 + 7  # more than one block, and a short last group
    codes, scales, offsets = quantize(torch.randn(numel), 8, 256)
    update = torch.randn(numel) * 1e-3
    tracker = MemoryTracker()
    tracker.watch([codes, scales, offsets], "weights")
    tracker.watch([update], "transient")
    base = tracker.current_bytes
    with tracker:
        stochastic_update_(codes, scales, offsets, update, 256)
    assert tracker.result().peak_bytes - base == pytest.approx(est.stochastic_rounding_temps(numel), rel=0.01)

    tracker = MemoryTracker()
    tracker.watch([codes, scales, offsets], "weights")
    base = tracker.current_bytes
    with tracker:
        dequantize(codes, scales, offsets, 256, torch.bfloat16)
    assert tracker.result().peak_bytes - base == pytest.approx(est.int8_dequant_temps(numel, 2), rel=0.01)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_qgalore_projected_update_is_what_the_estimate_says(monkeypatch, optimizer):
    """One INT8 weight's Q-GaLore update (bf16 weights, steady state): its largest temporaries are
    the update direction (ℓ) beside the full-size update and the stochastic rounding's work blocks —
    the fp32 denominator the direction was divided in is freed first (it used to wait beside them)."""
    from estimator.config import QGaLoreConfig
    from estimator.spec import LinearShape
    from lowrank.qgalore import Int8Linear, QGaLoreAdamW

    monkeypatch.setattr(constants, "QUANT_BLOCK", 1 << 14)  # the rounding's blocks below the weight's size
    cfg = QGaLoreConfig(rank=16, optimizer=optimizer, layerwise=False)
    model = torch.nn.Sequential(Int8Linear.from_linear(torch.nn.Linear(256, 2048, dtype=torch.bfloat16)))
    layer = model[0]
    group = {"params": [layer.weight_codes], "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
             "scale": cfg.scale, "proj_type": cfg.proj_type, "svd": cfg.svd, "stagger": cfg.stagger}
    optimizer_ = QGaLoreAdamW([group, {"params": [layer.bias]}], {layer.weight_codes: layer}, cfg, torch.bfloat16,
                              lr=1e-3, optim_bits=8 if optimizer == "adamw8bit" else 32)
    for _ in range(2):  # the second step is the steady state: the moments and the projection exist
        layer.weight_grad = torch.randn(2048, 256, dtype=torch.bfloat16)
        layer.bias.grad = torch.randn(2048, dtype=torch.bfloat16)
        tracker = MemoryTracker()
        tracker.watch_model(model)
        tracker.watch(Prepared(model, optimizer_, cfg, lowrank=optimizer_).state_tensors(), "optimizer")
        tracker.watch([layer.weight_grad, layer.bias.grad], "gradients")
        with tracker:
            tracker.phase("optimizer")
            optimizer_.step()
    predicted = est.galore_update_temps(LinearShape("0", None, 256, 2048, True, 1), cfg, 2)
    assert tracker.result().breakdown["transient"] == pytest.approx(predicted, rel=0.01)
