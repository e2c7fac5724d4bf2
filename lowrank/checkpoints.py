"""Saving a run: usable snapshots (PEFT adapters, model folders) and what --resume needs.

    save_checkpoint(out, step, model, optimizer, data, peak_lr)   # checkpoints/checkpoint.pt
    save_weights(out / "checkpoints/step-100", model, method, base)  # a usable snapshot
    save_final(out, model, method, tokenizer, base)                 # final/
    step = load_checkpoint(out, model, optimizer, data, device)      # --resume
"""

from __future__ import annotations

from pathlib import Path

import torch

from estimator.config import LoRAConfig, MethodConfig, QGaLoreConfig

CHECKPOINT = "checkpoint.pt"



def trainable_state(model) -> dict:
    """What a checkpoint must hold: every trainable tensor, and INT8 weights (Q-GaLore)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if len(trainable) == sum(1 for _ in model.parameters()):
        return {k: v for k, v in model.state_dict().items()}
    state = model.state_dict()
    return {k: v for k, v in state.items() if k in trainable or "weight_codes" in k or "weight_scales" in k
            or "weight_offsets" in k}


def save_weights(directory: Path, model, method: MethodConfig, base_name: str) -> None:
    """A usable snapshot: a PEFT adapter for LoRA/QLoRA, the model's weights otherwise (Q-GaLore's
    as INT8 codes with their group constants)."""
    if isinstance(method, LoRAConfig):
        from .lora import save_adapter

        save_adapter(model, method, directory, base_model_name_or_path=base_name)
    else:
        model.save_pretrained(directory)


def save_checkpoint(out: Path, step: int, model, optimizer, data, peak_lr: float) -> None:
    """What --resume needs (model, optimizer, data position, RNG), in one file rewritten each time."""
    directory = out / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CHECKPOINT + ".tmp")
    torch.save({"step": step, "model": trainable_state(model), "optimizer": optimizer.state_dict(),
                "data": data.train.state_dict(), "peak_lr": peak_lr, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp)
    tmp.replace(directory / CHECKPOINT)


def save_final(out: Path, model, method: MethodConfig, tokenizer, base_name: str) -> Path:
    """LoRA/QLoRA: a PEFT adapter; Q-GaLore: the dequantized model; others: the model folder."""
    final = out / "final"
    if isinstance(method, LoRAConfig):
        from .lora import save_adapter

        save_adapter(model, method, final, base_model_name_or_path=base_name)
    else:
        if isinstance(method, QGaLoreConfig):
            from .qgalore import dequantize_model_weights

            dequantize_model_weights(model)
        model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    return final


def save_base(build, base: Path, tokenizer, dtype: torch.dtype) -> None:
    """Save the seeded random base model a preset's LoRA run starts from: `build()` makes it anew
    (the model being trained is already wrapped with LoRA)."""
    model = build()
    model.to(dtype).save_pretrained(base)
    tokenizer.save_pretrained(base)
    del model


def load_checkpoint(out: Path, model, optimizer, data, device: torch.device) -> int:
    path = out / "checkpoints" / CHECKPOINT
    if not path.exists():
        raise ValueError(f"--resume {out}: no checkpoint at {path}; the run saved none (use --save-every)")
    state = torch.load(path, map_location=device, weights_only=False)
    missing = model.load_state_dict(state["model"], strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"--resume {out}: the checkpoint does not fit this model ({missing.unexpected_keys[:3]})")
    optimizer.load_state_dict(state["optimizer"])
    data.train.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])
