"""What `--resume` needs, in one file written atomically: a kill during a save leaves the previous
checkpoint whole.

    save_checkpoint(out, step, prepared, data, peak_lr)      # checkpoints/checkpoint.pt
    step = load_checkpoint(out, prepared, data, device)      # --resume
    save_base(build, out / "base", tokenizer, dtype)         # the random base a preset's adapter belongs to

Several ranks write one whole checkpoint: the model and the optimizer as one process would
hold them (FSDP's shards gathered, ZeRO-1's states consolidated), written by rank 0. So it
resumes on any number of ranks — or in a single process. Every rank must call both functions
(the gathering is collective).

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
    model = whole_model_state(prepared)
    optimizer, layout = whole_optimizer_state(prepared)
    if prepared.parallel is not None and not prepared.parallel.is_main:
        return
    directory = out / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model, "optimizer": optimizer, "optimizer_layout": layout,
             "data": data.train.state_dict(), "peak_lr": peak_lr, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    write_atomically(directory / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def _fsdp(prepared: Prepared) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(prepared.model, FSDPModule)


def _trainable_names(model) -> list[str]:
    """Trainable parameters in the order the methods hand them to their optimizers."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def whole_model_state(prepared: Prepared) -> dict:
    """The trainable state (and Q-GaLore's INT8 weights) as one process holds it (collective under FSDP)."""
    if not _fsdp(prepared):
        return trainable_state(prepared.model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(prepared.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    keep = set(_trainable_names(prepared.model))
    return {k: v for k, v in full.items() if k in keep}


def whole_optimizer_state(prepared: Prepared) -> tuple[dict, str]:
    """The optimizer's state as one process holds it, and its layout: "indexed" (torch's own, by
    parameter position) or "named" (by parameter name, what FSDP's gathering gives)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    optimizer = prepared.optimizer
    if prepared.lowrank is not None and prepared.parallel is not None:
        return prepared.lowrank.whole_state_dict(), "indexed"
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        return (optimizer.state_dict() if prepared.parallel.is_main else {}), "indexed"
    if _fsdp(prepared):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(prepared.model, optimizer, options=options), "named"
    return optimizer.state_dict(), "indexed"


def _renamed(state: dict, names: list[str], to_names: bool) -> dict:
    """An optimizer state dict keyed by position <-> by parameter name."""
    key = (lambda i: names[i]) if to_names else {name: i for i, name in enumerate(names)}.__getitem__
    return {"state": {key(k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key(p) for p in g["params"]]} for g in state["param_groups"]]}


def load_whole_state(prepared: Prepared, model: dict, optimizer: dict, layout: str) -> None:
    """Load a whole checkpoint into however this process holds the model (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if _fsdp(prepared):
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(prepared.model, model, options=options)
        named = optimizer if layout == "named" else _renamed(optimizer, _trainable_names(prepared.model), True)
        set_optimizer_state_dict(prepared.model, prepared.optimizer, named, options=options)
        return
    missing = prepared.model.load_state_dict(model, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"the checkpoint does not fit this model ({missing.unexpected_keys[:3]})")
    if layout == "named" and not isinstance(prepared.optimizer, ZeroRedundancyOptimizer):
        set_optimizer_state_dict(prepared.model, prepared.optimizer, optimizer,
                                 options=StateDictOptions(full_state_dict=True))
        return
    indexed = optimizer if layout == "indexed" else _renamed(optimizer, _trainable_names(prepared.model), False)
    prepared.optimizer.load_state_dict(indexed)


def load_checkpoint(out: Path, prepared: Prepared, data, device: torch.device) -> int:
    """Restore what `save_checkpoint` wrote; returns the number of steps done."""
    path = out / "checkpoints" / CHECKPOINT
    if not path.exists():
        raise ValueError(f"--resume {out}: no checkpoint at {path}; the run saved none before it ended")
    state = torch.load(path, map_location=device, weights_only=False)
    try:
        load_whole_state(prepared, state["model"], state["optimizer"], state.get("optimizer_layout", "indexed"))
    except ValueError as err:
        raise ValueError(f"--resume {out}: {err}") from None
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
