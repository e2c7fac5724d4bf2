"""What `--resume` needs, in one file written atomically: a kill during a save leaves the previous
checkpoint whole.

    save_checkpoint(out, step, prepared, data, peak_lr)      # checkpoints/checkpoint.pt
    step = load_checkpoint(out, prepared, data, device)      # --resume
    save_base(build, out / "base", tokenizer, dtype)         # the random base a preset's adapter belongs to

Usable snapshots (PEFT adapters, model folders) are the methods' own `save` hooks
(lowrank/methods.py `save_model`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .methods import Prepared

CHECKPOINT = "checkpoint.pt"


def trainable_state(model) -> dict:
    """What a checkpoint must hold: every trainable tensor, and INT8 weights (Q-GaLore)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    if len(trainable) == sum(1 for _ in model.parameters()):
        return dict(state)
    return {k: v for k, v in state.items() if k in trainable or k.endswith(("weight_codes", "weight_scales",
                                                                           "weight_offsets"))}


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` into a temporary file beside `path`, flushed to disk, then renamed over `path`:
    readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def save_checkpoint(out: Path, step: int, prepared: Prepared, data, peak_lr: float) -> None:
    """Model, optimizer, data position and RNG after `step` steps, in checkpoints/checkpoint.pt."""
    directory = out / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": trainable_state(prepared.model), "optimizer": prepared.optimizer.state_dict(),
             "data": data.train.state_dict(), "peak_lr": peak_lr, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    write_atomically(directory / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load_checkpoint(out: Path, prepared: Prepared, data, device: torch.device) -> int:
    """Restore what `save_checkpoint` wrote; returns the number of steps done."""
    path = out / "checkpoints" / CHECKPOINT
    if not path.exists():
        raise ValueError(f"--resume {out}: no checkpoint at {path}; the run saved none before it ended")
    state = torch.load(path, map_location=device, weights_only=False)
    missing = prepared.model.load_state_dict(state["model"], strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"--resume {out}: the checkpoint does not fit this model ({missing.unexpected_keys[:3]})")
    prepared.optimizer.load_state_dict(state["optimizer"])
    data.train.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def save_base(build, base: Path, tokenizer, dtype: torch.dtype) -> None:
    """Save the seeded random base model a preset's LoRA run starts from: `build()` makes it anew
    (the model being trained is already wrapped with LoRA)."""
    model = build()
    model.to(dtype).save_pretrained(base)
    tokenizer.save_pretrained(base)
    del model
