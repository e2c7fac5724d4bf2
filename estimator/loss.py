"""The loss a step computes (`--loss {full,chunked}`) and what a model's head does to its logits.

    full      transformers' own: `logits = lm_head(h)` for every token, `logits.float()`, then
              cross-entropy, whose log-softmax keeps b·s·V fp32 values for backward
    chunked   lowrank/loss.py: the loss over chunks of `loss_chunk_tokens` tokens, each chunk's
              logits recomputed in backward, so only the final hidden states (b·s·h), the
              targets and one fp32 log-sum-exp per token stay alive between forward and backward

The chunked loss calls the model's decoder and then the head itself, so it must reproduce what
the causal-LM class does between the two. `logit_head` reads that from the class's own forward
(the families transformers ships differ only in a few known ways: a scale, a division, a final
tanh soft-cap) and names anything else, which `--loss chunked` then refuses in one line.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

LOSSES = ("full", "chunked")
# Tokens per chunk. The chunk's temporaries are chunk · V · (d + 4) bytes (its logits and their
# fp32 copy): at a 128k vocabulary and bf16, 1024 tokens take 0.73 GiB, 256 tokens 188 MiB —
# about as much as the final hidden states of a 4096-wide model at 2 × 2048 tokens hold (bench/chunked_loss.py).
# Below 256 tokens the head's matmuls (chunk × h by h × V) start to lose throughput on a GPU, so
# 256 trades no speed for a chunk that is rarely the step's largest term.
DEFAULT_CHUNK_TOKENS = 256
MAX_CHUNK_TOKENS = 1 << 24


@dataclass(frozen=True)
class LogitHead:
    """What a causal LM does between its decoder and the loss, as the chunked loss redoes it per
    chunk, in fp32: `logits · scale`, then `softcap · tanh(logits / softcap)` (None: no cap).

    problem: why the chunked loss cannot reproduce this head (None when it can)."""

    scale: float = 1.0
    softcap: float | None = None
    problem: str | None = None
    norm: str = "rms"  # the final norm: "rms" (RMSNorm-like) or "layer" (LayerNorm)


_OUTPUTS = re.compile(r"^(\w+) = (\w+)(\.last_hidden_state|\[0\])$")
_SLICE = re.compile(r"^hidden_states = slice_logits_to_keep\((\w+(?:\.last_hidden_state|\[0\])?), logits_to_keep\)$")
_HEAD = re.compile(r"^(\w*logits) = self\.(\w+)\(hidden_states(?:\.to\([\w.]+\))?\)(\.float\(\)|\.contiguous\(\))?"
                   r"(?: ([*/]) ([\w.]+))?$")
_SCALE = re.compile(r"^(\w*logits) = \1 ([*/]) ([\w.]+)$")
_SOFTCAP = ("if self.config.final_logit_softcapping is not None:",
            "logits = logits / self.config.final_logit_softcapping", "logits = torch.tanh(logits)",
            "logits = logits * self.config.final_logit_softcapping")
_SOFTCAP_TEXT = ("if (final_logit_softcapping := self.config.get_text_config().final_logit_softcapping) is not None:",
                 "logits = logits / final_logit_softcapping", "logits = torch.tanh(logits)",
                 "logits = logits * final_logit_softcapping")


def _lines(source: str) -> list[str]:
    out = []
    for line in source.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _value(model, expression: str) -> float | None:
    """`self.config.logits_scaling`, `self.logit_scale`, `self.model.lm_head_multiplier` on `model`."""
    obj = model
    for name in expression.split(".")[1:]:
        obj = getattr(obj, name, None)
    if hasattr(obj, "item"):  # a 0-d tensor or parameter: a learned scale is not reproduced
        return None
    return float(obj) if isinstance(obj, (int, float)) and not isinstance(obj, bool) else None


def logit_head(model) -> LogitHead:
    """How `model` (a transformers causal LM, meta tensors are enough) turns its decoder's output
    into the logits its loss reads, from its class's forward; `problem` when the chunked loss
    cannot redo it."""
    cls = type(model)
    name = getattr(model.config, "model_type", cls.__name__)
    try:
        lines = _lines(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return LogitHead(problem=f"--loss chunked cannot read {name}'s forward; use --loss full")

    def refuse(what: str) -> LogitHead:
        return LogitHead(problem=f"--loss chunked cannot reproduce {name}'s head ({what}); use --loss full")

    prefix = getattr(cls, "base_model_prefix", "")
    calls = [k for k, line in enumerate(lines) if prefix and f"self.{prefix}(" in line]
    heads = [k for k, line in enumerate(lines) if _HEAD.match(line)]
    if not calls or not heads or heads[0] < calls[0]:
        return refuse(f"its forward does not compute `logits = self.lm_head(hidden_states)` from self.{prefix or '?'}")
    end, depth = calls[-1 if calls[-1] < heads[0] else 0], 0
    for k in range(end, heads[0]):  # the decoder call's closing parenthesis
        depth += lines[k].count("(") - lines[k].count(")")
        end = k
        if depth <= 0:
            break
    for line in lines[end + 1:heads[0]]:
        if not (_OUTPUTS.match(line) or _SLICE.match(line)):
            return refuse(f"`{line}` between its decoder and its head")
    head = _HEAD.match(lines[heads[0]])
    if head.group(2) != _output_name(model):
        return refuse(f"its logits come from self.{head.group(2)}, not its output embeddings")
    scale, softcap = 1.0, None

    def scaled(op: str, expression: str) -> bool:
        nonlocal scale
        value = _value(model, expression)
        if value is None or value == 0:
            return False
        scale = scale * value if op == "*" else scale / value
        return True

    if head.group(4) and not scaled(head.group(4), head.group(5)):
        return refuse(f"`{lines[heads[0]]}`")
    k = heads[0] + 1
    while k < len(lines) and not lines[k].startswith(("loss = None", "loss = self.loss_function(")):
        block = tuple(lines[k:k + 4])
        if block in (_SOFTCAP, _SOFTCAP_TEXT):
            config = model.config.get_text_config() if block == _SOFTCAP_TEXT else model.config
            softcap = getattr(config, "final_logit_softcapping", None)
            k += 4
            continue
        match = _SCALE.match(lines[k])
        if match and softcap is None and scaled(match.group(2), match.group(3)):
            k += 1
            continue
        return refuse(f"`{lines[k]}`")
    rest = lines[k:k + 4]
    loss = getattr(model, "loss_function", None)
    if not any(line.startswith("loss = self.loss_function(") for line in rest) or \
            getattr(loss, "__name__", "") != "ForCausalLMLoss":
        return refuse("its loss is not transformers' ForCausalLMLoss")
    if getattr(model.config, "output_router_logits", False):
        return LogitHead(problem=f"--loss chunked computes the cross-entropy only, and {name} adds its router's "
                                 "auxiliary loss (output_router_logits=True); use --loss full")
    return LogitHead(scale=scale, softcap=float(softcap) if softcap else None, norm=_final_norm(model))


def _final_norm(model) -> str:
    """"layer" when the decoder's last norm is a LayerNorm, else "rms"."""
    norms = [m for name, m in model.base_model.named_children() if "norm" in type(m).__name__.lower()
             or name in ("ln_f", "final_layer_norm", "norm_f")]
    norm = norms[-1] if norms else None
    return "layer" if norm is not None and "layernorm" in type(norm).__name__.lower() else "rms"


def _output_name(model) -> str | None:
    head = model.get_output_embeddings()
    for name, module in model.named_children():
        if module is head:
            return name
    return None


_HEADS: dict[str, LogitHead] = {}


def spec_logit_head(spec) -> LogitHead:
    """`logit_head` of a ModelSpec's model (built on the meta device once per config)."""
    import json

    key = json.dumps(spec.config, sort_keys=True, default=str)
    if key not in _HEADS:
        import torch
        from transformers import AutoModelForCausalLM

        from .spec import _config_from_dict

        config = _config_from_dict({k: v for k, v in spec.config.items() if k != "transformers_version"},
                                   f"model {spec.name!r}")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _HEADS[key] = logit_head(model)
    return _HEADS[key]


# ---------------------------------------------------------------------------- its memory
#
# What lowrank/loss.py allocates, op by op, checked against the MemoryTracker on the dry run
# (tests/estimator/test_chunked_loss.py): `flow.d` is the matmul dtype's size (2 under autocast),
# a chunk is min(loss_chunk_tokens, b·s) rows.


def chunk_rows(flow, tokens: int) -> int:
    """Rows of the largest chunk: `loss_chunk`, or every token when there are fewer."""
    return min(flow.loss_chunk, tokens)


def head_saved(spec, flow, tokens: int) -> dict[str, int]:
    """What the chunked loss keeps for backward, by part: the final hidden states (its input, in
    the matmul dtype — kept even when lm_head is frozen, since each chunk's logits are recomputed
    from them), the shifted int64 targets, one fp32 log-sum-exp per token, and the loss's scalars
    (the fp32 sum and the mean)."""
    return {
        "lm_head input": tokens * spec.hidden_size * flow.d,
        "labels": tokens * 8,
        "log-sum-exp": tokens * 4,
        "loss scalars": 8,
    }


def forward_transient(spec, flow, tokens: int) -> int:
    """One chunk of the forward: its logits in the matmul dtype and their fp32 copy (fp32: the
    logits themselves, then beside them the gathered target logit, the row maximum and the row
    sum, fp32 each, and the int64 clamped targets before them: 12 bytes a row)."""
    c, V = chunk_rows(flow, tokens), spec.vocab_size
    if flow.d < 4:
        return c * V * (flow.d + 4)
    return c * V * 4 + 12 * c


def backward_transient(spec, flow, tokens: int) -> int:
    """One chunk of the backward, beside the gradients it fills: the recomputed logits and their
    fp32 copy, then the fp32 softmax − one-hot and its cast to the matmul dtype beside the row
    weights (4 bytes a row); fp32: the softmax and per-row work (16 bytes a row). A soft-cap adds its
    fp32 derivative beside the softmax."""
    c, V = chunk_rows(flow, tokens), spec.vocab_size
    temps = c * V * (flow.d + 4) + 4 * c if flow.d < 4 else c * V * 4 + 16 * c
    if flow.softcap:
        temps = max(temps, c * V * 8 + 16 * c)
    return temps


def backward_moments(spec, flow, batch: int, seq: int, accumulating: bool) -> dict[str, tuple[int, int, int]]:
    """(gradient bytes made, saved bytes freed, transient bytes) at the chunked loss's backward.

    Its one node makes the hidden states' gradient and lm_head's weight gradient (in the matmul
    dtype, zeroed first, summed chunk by chunk in place) beside one chunk's temporaries. The
    weight gradient becomes `.grad` unless it is added to another — accumulating, DDP's buckets, a
    tied embedding's (autograd's buffer adds them out of place) — when it is transient. Under
    autocast it is the gradient of the bf16 weight copy: its cast to fp32 comes next, once the node
    has released what it kept (that copy included).
    """
    tokens = batch * seq
    hidden_grad = tokens * spec.hidden_size * flow.d
    chunk = backward_transient(spec, flow, tokens)
    if not flow.lm_head_trainable:
        return {"backward: loss": (0, 0, hidden_grad + chunk)}
    new = spec.vocab_size * spec.hidden_size * flow.d
    added = accumulating or flow.tied_trainable(spec)
    if flow.autocast:
        master = spec.vocab_size * spec.hidden_size * 4
        freed = sum(v for k, v in head_saved(spec, flow, tokens).items() if k != "loss scalars") + new
        cast = (0, freed, new + master + hidden_grad) if added else (master, freed, new + hidden_grad)
        return {"backward: loss": (0, 0, new + hidden_grad + chunk), "backward: loss (lm_head gradient cast)": cast}
    return {"backward: loss": (0, 0, new + hidden_grad + chunk) if added else (new, 0, hidden_grad + chunk)}


def final_norm_backward(spec, flow, tokens: int) -> tuple[int, int]:
    """The final norm's backward, which the chunked loss leaves exposed (the full loss's moments
    dwarf it): (its saved bytes still alive, its temporaries) at its largest moment.

    RMSNorm (`w * (x.float() * rsqrt(mean(x²) + eps)).to(dtype)`): the backward of pow and mean and
    the two paths into the fp32 input hold five fp32 hidden-size tensors (20 bytes a feature) while
    that input is still kept. LayerNorm (native_layer_norm_backward): the input gradient in the
    model dtype beside the incoming one, what the norm saved still kept (a traced family counts
    its input with the last block's)."""
    from . import activations as act

    h = spec.hidden_size
    layer = spec.family in ("gpt2", "gpt_neox") if spec.exact_family else spec_logit_head(spec).norm == "layer"
    if layer:
        return act.head_saved(spec, flow, 1, tokens)["final norm"], tokens * h * 2 * flow.d
    return tokens * h * 4, tokens * h * 20


def final_norm_moment(spec, flow, batch: int, seq: int, head_grads: int, accumulating: bool,
                      layerwise: bool) -> tuple[int, int, int]:
    """(gradients made, activations, transient) at the final norm's backward.

    Every block's saved tensors wait (or their checkpointed inputs), with the loss's scalars and
    the token ids; the head's gradients exist — lm_head's and the final norm's (`head_grads`) —
    unless a layer-wise hook consumed them, they are added to accumulated ones (transient), or
    lm_head's is tied and waits in autograd's buffer for the embedding's (transient)."""
    from . import activations as act

    tokens = batch * seq
    if flow.checkpointing:
        blocks = spec.num_layers * act.checkpointed_layer_saved(spec, flow, batch, seq) + \
            act.checkpointed_shared(spec, flow, batch, seq)
    else:
        blocks = act.blocks_saved(spec, flow, batch, seq) + act.shared_saved(spec, flow, batch, seq)
    alive, bump = final_norm_backward(spec, flow, tokens)
    activations = blocks + act.token_ids(flow, batch, seq) + head_saved(spec, flow, tokens)["loss scalars"] + alive
    made, transient = 0, bump
    if flow.lm_head_trainable and not layerwise:
        tied = spec.vocab_size * spec.hidden_size * (4 if flow.autocast else flow.d) if flow.tied_trainable(spec) else 0
        if accumulating:
            transient += head_grads
        else:
            made, transient = head_grads - tied, transient + tied
    return made, activations, transient
