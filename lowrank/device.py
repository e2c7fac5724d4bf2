"""Where a run happens, and how much memory that place has: one answer for the trainer, the dry
run, the worker and the app.

    resolve_device("auto")             # cuda when there is a GPU, else cpu
    resolve_device("cuda", fake=True)  # a dry run's fake tensors: cpu without a CUDA build (FAKE_CUDA_FALLBACK)
    device_capacity(torch.device("cpu"))
"""

from __future__ import annotations

import os

import torch

DEVICES = ("auto", "cpu", "cuda")
FAKE_CUDA_FALLBACK = ("fake CUDA tensors need a PyTorch built with CUDA and a GPU (autograd aborts on them "
                      "otherwise); this dry run uses fake CPU tensors: no 512-byte blocks, CPU attention kernels")


def resolve_device(name: str = "auto", *, fake: bool = False) -> torch.device:
    """The device `name` (auto, cpu, cuda or cuda:N) means on this machine.

    auto is CUDA when a GPU is there, else the CPU. Asking for CUDA without one is a ValueError
    for a real run; for a dry run (`fake=True`) the fake tensors go to the CPU instead, as fake
    CUDA tensors cannot run backward without CUDA (see FAKE_CUDA_FALLBACK).
    """
    if not isinstance(name, str) or not (name in DEVICES or name.startswith("cuda:")):
        raise ValueError(f"device={name!r} must be auto, cpu or cuda")
    cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if name.startswith("cuda") and not cuda:
        if fake:
            return torch.device("cpu")
        raise ValueError(f"device={name!r} but this machine has no CUDA GPU; use --device cpu (or auto)")
    return torch.device(name)


def device_capacity(device: torch.device) -> int | None:
    """Bytes the device holds: the GPU's memory, or the machine's RAM for the CPU (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
