"""Which linear layers a method acts on — one rule shared by the estimator and the methods.

Only linear layers inside the decoder blocks are candidates (never embeddings or `lm_head`).
A layer belongs to "attention" or "mlp" by the name of the block it sits in:

    model.layers.3.self_attn.q_proj   -> attention      transformer.h.0.attn.c_attn -> attention
    model.layers.3.mlp.down_proj      -> mlp            gpt_neox.layers.1.mlp.dense_4h_to_h -> mlp

targets = "attention" | "mlp" | "all-linear" | "q_proj,v_proj" (names of the layers themselves).

Mixture-of-experts blocks hold two things that are not candidates:
  * routers and one-output gates — a linear named like a router, one with a single output
    (Qwen2-MoE's `shared_expert_gate`), or one named `gate` beside an `experts` module (the
    router of Mixtral-style blocks; Llama's `gate_proj` stays a target). They are tiny, and a
    rank above their output width would make no sense;
  * fused expert weights: transformers stores the experts of a block as 3-D parameters,
    `mlp.experts.gate_up_proj` (E, 2i, h) and `mlp.experts.down_proj` (E, h, i). They are not
    linear modules, so LoRA leaves them frozen; GaLore projects each of their E matrices
    (`target_experts`), selected by the same rules ("all-linear", "mlp", or their names).
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn

from .config import HEAD_TARGET, TARGET_SHORTHANDS, parse_targets

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


def is_router(path: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """A router or one-output gate (never a target): a single output, "router" in the name, or a
    layer named `gate` whose parent module also holds the `experts`."""
    short = path.rsplit(".", 1)[-1]
    _, out_features = linear_shape(module)
    if out_features == 1 or "router" in short.lower():
        return True
    return short == "gate" and parent is not None and hasattr(parent, "experts")


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
    """Does a linear named `short` in block part `group` (attention/mlp) match `targets`? A list may
    mix shorthands and names ("all-linear,lm_head", "attention,gate_proj"): any of them selects."""
    return any(w == "all-linear" or w == short or (w in ("attention", "mlp") and w == group)
               for w in parse_targets(targets))


def matches(path: str, targets: str) -> bool:
    """Does the linear layer at `path` (inside a decoder block) match `targets`?"""
    return selects(path.rsplit(".", 1)[-1], linear_group(path), targets)


def targets_problem(targets: str, names: list[str], chosen: bool, where: str, experts: list[str] = (),
                    experts_allowed: bool = False, method: str = "LoRA") -> str | None:
    """Why `targets` cannot be used with a model whose block linears have these short `names`
    (one message, naming the layers there are), or None; `chosen`: does it select any?

    experts: the short names of the model's fused expert weights (`gate_up_proj`, `down_proj`);
    experts_allowed: may they be targets (GaLore and Q-GaLore: yes; LoRA and QLoRA: no, and the
    message says that `method` leaves them frozen).
    """
    available = sorted(set(names) | (set(experts) if experts_allowed else set()))
    layers = ", ".join(available) or "none"
    frozen = [] if experts_allowed else sorted(set(experts) - set(names))
    fate = "leaves the experts frozen" if "lora" in method.lower() else "leaves the experts to plain AdamW"
    kind = "is a fused expert weight (3-D, not a linear layer)" if len(frozen) == 1 else \
        "are fused expert weights (3-D, not linear layers)"
    why = f"; {', '.join(frozen)} {kind}: {method} {fate}" if frozen else ""
    head = "lora" in method.lower() and HEAD_TARGET in parse_targets(targets)  # LoRA on lm_head: outside the blocks
    chosen = chosen or head
    missing = [w for w in parse_targets(targets) if w not in TARGET_SHORTHANDS and w not in available
               and not (head and w == HEAD_TARGET)]
    if missing:
        return (f"targets={targets!r}: no linear layer named {', '.join(missing)} in {where}; its layers are "
                f"{layers}{why if set(missing) & set(frozen) else ''}")
    if not chosen:
        return f"targets={targets!r} selects no linear layer of {where}; its layers are {layers}{why}"
    return None


def plain_forward(module: nn.Module) -> bool:
    """A linear that computes x·Wᵀ (+ b), which a method may wrap or replace: nn.Linear's own
    forward, GPT-2's Conv1D, a quantized linear of bitsandbytes or ours, or a subclass whose
    forward does not reshape its weight (Falcon's `x @ self.weight.T`; DeepSeek-V4's grouped
    linear, which views its weight per group, is not one)."""
    return _plain_class(type(module))


@functools.cache
def _plain_class(cls: type) -> bool:
    """plain_forward for a class (its source is read once)."""
    if (cls.__name__ == "Conv1D" or cls.forward is nn.Linear.forward
            or cls.__module__.split(".")[0] in ("bitsandbytes", "lowrank")):
        return True
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True
    return not re.search(r"self\.weight\s*(?:\.(?:view|reshape|unflatten)\b|\[)", source)


@functools.cache
def weights_used_directly(model_class: type) -> frozenset[str]:
    """Short names of linears whose weight the family's own code multiplies outside their forward
    (Jamba's `dt_proj.weight @ x`) or whose weight's dtype it casts the input to (HunYuan-V4's
    indexer, `x.to(self.weights_proj.weight.dtype)`): a method that replaces the layer, or stores
    its weight as 4- or 8-bit codes, would break them."""
    try:
        source = inspect.getsource(inspect.getmodule(model_class))
    except (OSError, TypeError):
        return frozenset()
    used = re.findall(r"\.(\w+)\.weight\s*@", source)  # (Bloom's slices under pretraining_tp > 1 are not)
    # an input cast to the weight's dtype; Falcon's flash-attention path (`target_dtype =
    # self.query_key_value.weight.dtype`, a float dtype for the attention kernel) is not one
    cast = re.findall(r"\.to\((?:dtype\s*=\s*)?[\w.]*?\.(\w+)\.weight\.dtype\)", source)
    return frozenset(used + cast)


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every candidate linear layer in the decoder blocks: routers and
    one-output gates left out (`is_router`), and so are linears with a forward of their own and
    linears whose weight the model's code uses directly (`plain_forward`, `weights_used_directly`):
    those train as plain parameters."""
    prefix, _ = decoder_layers(model)
    pattern = re.compile(re.escape(prefix) + r"\.\d+\.")
    modules = dict(model.named_modules())
    direct = weights_used_directly(type(model))
    found = []
    for name, m in modules.items():
        if not (is_linear(m) and pattern.match(name)) or name.rsplit(".", 1)[-1] in direct or not plain_forward(m):
            continue
        if not is_router(name, m, modules.get(name.rpartition(".")[0])):
            found.append((name, m))
    return found


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every fused expert weight in the decoder blocks: the 3-D float
    parameters (E, m, n), one matrix per expert, of a module named like experts (a convolution's
    3-D kernel, as in Qwen3-Next's linear attention, is not one)."""
    prefix, _ = decoder_layers(model)
    pattern = re.compile(re.escape(prefix) + r"\.\d+\.")
    return [(name, p) for name, p in model.named_parameters()
            if p.dim() == 3 and p.is_floating_point() and pattern.match(name)
            and "expert" in name.rpartition(".")[0].rsplit(".", 1)[-1].lower()]


def target_linears(model: nn.Module, targets: str, experts_allowed: bool = False,
                   method: str = "LoRA") -> list[tuple[str, nn.Module]]:
    """(path, module) of every linear layer in the decoder blocks that `targets` selects.

    Raises ValueError naming the available layer names when a listed name matches nothing.
    experts_allowed: the fused expert weights' names are valid targets too (GaLore, which
    takes them from `target_experts`); a list naming only experts then selects no linear.
    method: named in the message when a target is an expert weight `method` cannot take.
    """
    found = block_linears(model)
    chosen = [(name, m) for name, m in found if matches(name, targets)]
    experts = [name.rsplit(".", 1)[-1] for name, _ in expert_parameters(model)]
    any_expert = experts_allowed and bool(target_experts(model, targets))
    problem = targets_problem(targets, [name.rsplit(".", 1)[-1] for name, _ in found], bool(chosen) or any_expert,
                              "this model", experts, experts_allowed, method)
    if problem:
        raise ValueError(problem)
    return chosen


def output_path(model: nn.Module) -> str:
    """The module path of the output projection (get_output_embeddings(): lm_head, NeoX's embed_out)."""
    head = model.get_output_embeddings()
    for path, module in model.named_modules():
        if module is head:
            return path
    raise ValueError(f"{type(model).__name__} has no output projection to put LoRA on; drop lm_head from targets")


def input_path(model: nn.Module) -> str:
    """The module path of the input embeddings (get_input_embeddings(): embed_tokens, wte, embed_in)."""
    embeddings = model.get_input_embeddings()
    return next(path for path, module in model.named_modules() if module is embeddings)


def target_experts(model: nn.Module, targets: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the fused expert weights `targets` selects (GaLore projects each of
    their E matrices): "all-linear", "mlp" (the block part they sit in) or their names."""
    return [(name, p) for name, p in expert_parameters(model) if matches(name, targets)]
