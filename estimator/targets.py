"""Which linear layers a method acts on — one rule shared by the estimator and the methods.

Only linear layers inside the decoder blocks are candidates (never embeddings or `lm_head`).
A layer belongs to "attention" or "mlp" by the name of the block it sits in:

    model.layers.3.self_attn.q_proj   -> attention      transformer.h.0.attn.c_attn -> attention
    model.layers.3.mlp.down_proj      -> mlp            gpt_neox.layers.1.mlp.dense_4h_to_h -> mlp

targets = "attention" | "mlp" | "all-linear" | "q_proj,v_proj" (names of the layers themselves).
"""

from __future__ import annotations

import re

from torch import nn

from .config import TARGET_SHORTHANDS, parse_targets

_ATTENTION_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "feed_forward", "ffn")


def linear_group(path: str) -> str | None:
    """"attention" or "mlp" from the module path; None when neither block is named."""
    parts = path.split(".")[:-1]
    for part in reversed(parts):
        low = part.lower()
        if any(p in low for p in _ATTENTION_PARTS):
            return "attention"
        if any(p in low for p in _MLP_PARTS):
            return "mlp"
    return None


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D (a transposed linear), and the quantized linears built on them."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = module.weight  # Conv1D stores (in, out)
    return int(weight.shape[0]), int(weight.shape[1])


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks and its path (model.layers, transformer.h, gpt_neox.layers)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        right_size = isinstance(module, nn.ModuleList) and len(module) > 0 and n_layers in (None, len(module))
        if right_size and (best is None or len(name) < len(best[0])):
            best = (name, module)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of "
                         f"{n_layers} layers; only transformers causal-LM architectures are supported")
    return best


def selects(short: str, group: str | None, targets: str) -> bool:
    """Does a linear named `short` in block part `group` (attention/mlp) match `targets`?"""
    wanted = parse_targets(targets)
    if wanted == ("all-linear",):
        return True
    if wanted in (("attention",), ("mlp",)):
        return group == wanted[0]
    return short in wanted


def matches(path: str, targets: str) -> bool:
    """Does the linear layer at `path` (inside a decoder block) match `targets`?"""
    return selects(path.rsplit(".", 1)[-1], linear_group(path), targets)


def targets_problem(targets: str, names: list[str], chosen: bool, where: str) -> str | None:
    """Why `targets` cannot be used with a model whose block linears have these short `names`
    (one message, naming the layers there are), or None; `chosen`: does it select any?"""
    available = sorted(set(names))
    missing = [w for w in parse_targets(targets) if w not in TARGET_SHORTHANDS and w not in available]
    if missing:
        return (f"targets={targets!r}: no linear layer named {', '.join(missing)} in {where}; its layers are "
                f"{', '.join(available)}")
    if not chosen:
        return f"targets={targets!r} selects no linear layer of {where}; its layers are {', '.join(available)}"
    return None


def target_linears(model: nn.Module, targets: str) -> list[tuple[str, nn.Module]]:
    """(path, module) of every linear layer in the decoder blocks that `targets` selects.

    Raises ValueError naming the available layer names when a listed name matches nothing.
    """
    prefix, _ = decoder_layers(model)
    pattern = re.compile(re.escape(prefix) + r"\.\d+\.")
    found = [(name, m) for name, m in model.named_modules() if is_linear(m) and pattern.match(name)]
    chosen = [(name, m) for name, m in found if matches(name, targets)]
    problem = targets_problem(targets, [name.rsplit(".", 1)[-1] for name, _ in found], bool(chosen), "this model")
    if problem:
        raise ValueError(problem)
    return chosen
