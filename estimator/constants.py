"""The vocabulary's numbers, defined once: the estimator predicts with them and lowrank/ allocates
with them, so a prediction and a run cannot drift apart by construction.

    CATEGORIES    what every byte is counted as, in this order, everywhere (estimate, tracker,
                  CLIs, app): weights, adapters, gradients, optimizer, activations, transient
    DTYPE_BYTES   the dtypes a setup names, and `torch_dtype(name)` for the tensors

Work-space sizes of lowrank's own kernels (the estimator's transient terms use the same ones,
read at call time: `constants.GALORE_SLICE`, never a copy):

    GALORE_SLICE  lowrank.galore updates a non-projected tensor in flat slices of this many elements
    QUANT_BLOCK   lowrank.quant (Q-GaLore) quantizes, dequantizes and rounds in blocks of this many

Storage formats, with the byte formula of each (tests/test_vocabulary.py checks every formula
against the bytes of real tensors, at sizes that cross each block boundary):

    nf4_nbytes        a bitsandbytes 4-bit weight (QLoRA), with or without double quantization
    adam8bit_nbytes   one 8-bit Adam moment (bitsandbytes' AdamW8bit and lowrank.galore's)
    quantized_nbytes  a Q-GaLore group-quantized tensor (INT8 weights, INT4 projections)
"""

from __future__ import annotations

from math import ceil

CATEGORIES = ("weights", "adapters", "gradients", "optimizer", "activations", "transient")
PHASES = ("forward", "backward", "optimizer")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this many bytes

# lowrank's own work spaces
GALORE_SLICE = 1 << 20  # lowrank.galore: elementwise AdamW on flat slices (4 MiB of fp32 at most)
QUANT_BLOCK = 1 << 20  # lowrank.quant: elements per work block (4 MiB of fp32 temporaries)

# bitsandbytes 4-bit weights (Dettmers et al. 2023, arXiv 2305.14314 §3)
NF4_BLOCK = 64  # weights sharing one absmax
NF4_DQ_BLOCK = 256  # double quantization: 8-bit absmax values in blocks of 256, one fp32 scale each
NF4_CODEBOOK_BYTES = 16 * 4  # the 16-entry fp32 NF4 (or FP4) code book
QMAP_BYTES = 256 * 4  # a 256-entry fp32 dynamic quantization map

# 8-bit Adam moments (Dettmers et al. 2021, arXiv 2110.02861): blockwise dynamic quantization
ADAM8_BLOCK = 256  # values per block, one fp32 absmax each
ADAM8_MIN_SIZE = 4096  # smaller tensors keep fp32 moments (bitsandbytes' min_8bit_size)

# Q-GaLore group quantization (lowrank.quant): codes plus an fp16 scale and offset per group
QUANT_CONSTANT_DTYPE = "fp16"


def torch_dtype(name: str):
    """The torch dtype of a DTYPE_BYTES name ("fp32", "bf16", "fp16")."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype={name!r} is not one of {', '.join(dtypes)}")
    return dtypes[name]


def nf4_nbytes(numel: int, double_quant: bool) -> int:
    """Stored bytes of one bitsandbytes 4-bit weight of `numel` values.

    Two codes per byte and the code book; one absmax per block of 64 — fp32, or with double
    quantization one byte each plus an fp32 absmax per 256 blocks, a 256-entry fp32 map and an
    fp32 offset.
    """
    blocks = ceil(numel / NF4_BLOCK)
    stored = ceil(numel / 2) + NF4_CODEBOOK_BYTES
    if double_quant:
        return stored + blocks + ceil(blocks / NF4_DQ_BLOCK) * 4 + QMAP_BYTES + 4
    return stored + blocks * 4


def adam8bit_nbytes(numel: int) -> int:
    """One 8-bit moment of a tensor of `numel` ≥ ADAM8_MIN_SIZE values: a byte each and an fp32
    absmax per block of ADAM8_BLOCK."""
    return numel + ceil(numel / ADAM8_BLOCK) * 4


def quantized_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Exact bytes of a group-quantized tensor (Q-GaLore, arXiv 2407.08296 §3.2, as lowrank.quant
    stores it): codes (INT4 packed two to a byte, INT8 one), an fp16 scale and offset per group;
    16 bits: the values in fp16."""
    constant = DTYPE_BYTES[QUANT_CONSTANT_DTYPE]
    if bits == 16:
        return numel * constant
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not supported; use one of 4, 8, 16")
    return ceil(numel * bits / 8) + ceil(numel / group_size) * 2 * constant
