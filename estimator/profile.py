"""Activation profiles traced from a model's own forward: every family transformers ships.

The named formulas of estimator/activations.py describe the Llama, GPT-2 and GPT-NeoX blocks
op by op. Other families differ in ways a formula has to be written for — QK-norm, extra norms
around the MLP, soft-capping, sliding windows, MoE routing, parallel blocks, LayerNorm biases —
so for them the profile is measured instead, from the model's own code:

1. The model is built on the meta device and its tensors become fake tensors (shapes, no
   memory). Decoder layers that repeat an earlier layer's structure are replaced by a
   pass-through, so only one layer of each kind runs (plus the first, which differs when the
   embeddings are frozen).
2. One forward and backward at the sequence length asked for, at batch 2 and 3, are traced:
   every storage an operator creates, which module created it, which module saved it for
   backward, when it died, and which parameter's gradient it became. (Batch 1 has a profile of
   its own, traced at batch 1: a copy of a tensor that is already contiguous is skipped there.)
3. Every byte count is solved for `per_sequence·b + const` by part: the child module of a layer
   that saved it ("self_attn", "mlp", "input_layernorm", ...), tensors shared by all layers
   (RoPE tables, masks), the final norm, lm_head's input and the loss; and so is every moment
   of each layer's forward and backward (what it has saved so far or still keeps, its
   gradients made, everything else alive).

A profile is exact at its sequence length for every batch size, and each length gets its own:
sliding windows, chunked linear attention (64 tokens a chunk) and the like change a profile in
steps that no polynomial in the length follows (a fit from other lengths missed a hybrid
linear-attention family by 39%).

A profile depends on what the step saves — the trainability of the weights, which linears
carry LoRA, the dtype, the attention kernel, autocast, padding, checkpointing — so it is cached
per config, `TraceKey` and sequence length (a new one costs two traced steps, a few tenths of a
second; a cached one is a few multiplications, any batch size). LoRA's branch is traced at rank 1
(with its dropout when it has one); each further rank adds a row of lora_A's output per token, by
rule, so the rank never needs a trace of its own. Tracing runs CPU kernels (fake CUDA needs a
CUDA build of PyTorch): on CUDA the profile is that of the same kernels' CPU versions.

    profile = traced_profile(spec, key, batch=4, seq_len=256)
    profile.layers[0].saved["self_attn"](4)   # bytes the first layer's attention saves at batch 4
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import weakref
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .spec import ModelSpec, expert_grad_key

# Traced batch sizes. Batch 1 can take other code paths (a copy skipped because a tensor is
# already contiguous), so it has a profile of its own, traced at batch 1; larger batches are
# traced at 2 and 3.
BATCHES = (2, 3)
HEAD_PARTS = ("final norm", "lm_head input", "logits and loss")


@dataclass(frozen=True)
class Poly:
    """Bytes at the profile's sequence length as a function of the batch size: per_sequence·b + const
    (the batch's tokens, scores and masks grow with b; RoPE tables and other shared tensors do not)."""

    per_sequence: Fraction = Fraction(0)
    const: Fraction = Fraction(0)

    def __post_init__(self) -> None:  # evaluated in floats: exact for any realistic byte count
        object.__setattr__(self, "_f", (float(self.per_sequence), float(self.const)))

    def __call__(self, b: int, s: int | None = None) -> int:
        """At batch size b (s: the profile's own length, which the caller passes along)."""
        per, const = self._f
        return max(0, round(b * per + const))

    def __add__(self, other: Poly) -> Poly:
        return Poly(self.per_sequence + other.per_sequence, self.const + other.const)

    def dominates(self, other: Poly) -> bool:
        return self.per_sequence >= other.per_sequence and self.const >= other.const

    @staticmethod
    def fit(values: dict[tuple[int, int], int]) -> Poly:
        """Through the traced (batch, seq) points of one sequence length: two batch sizes give
        both terms, one (batch 1) the total."""
        (b1, _), *rest = sorted(values)
        if not rest:
            return Poly(Fraction(0), Fraction(values[(b1, _)]))
        b2 = rest[0][0]
        per = Fraction(values[rest[0]] - values[(b1, _)], b2 - b1)
        return Poly(per, values[(b1, _)] - b1 * per)


ZERO = Poly()


@dataclass(frozen=True)
class PolyMax:
    """The largest of several moments' byte counts (which one is largest depends on b and s)."""

    polys: tuple[Poly, ...] = ()

    def __call__(self, b: int, s: int) -> int:
        return max((p(b, s) for p in self.polys), default=0)

    @staticmethod
    def fit(series: dict[tuple[int, int], list[int]]) -> PolyMax:
        """One polynomial per moment when every shape traced the same moments; otherwise each
        shape's largest, fitted together."""
        lengths = {len(v) for v in series.values()}
        if len(lengths) == 1:
            polys = [Poly.fit({p: v[k] for p, v in series.items()}) for k in range(lengths.pop())]
        else:
            polys = [Poly.fit({p: max(v, default=0) for p, v in series.items()})]
        kept: list[Poly] = []
        for poly in polys:
            if not any(k.dominates(poly) for k in kept):
                kept = [k for k in kept if not poly.dominates(k)] + [poly]
        return PolyMax(tuple(kept))


@dataclass(frozen=True)
class TraceKey:
    """What decides the tensors a step saves (estimator/activations.py's Flow; LoRA's branches are
    traced at rank 1, and the rank's share of them added by rule)."""

    dtype: str  # "fp32" | "bf16" | "fp16": the model's dtype
    trainable: bool  # full-rank methods: every weight trains; False: frozen (LoRA, QLoRA)
    lora_targets: tuple[str, ...] = ()  # frozen: the short names of the linears that carry LoRA
    lora_dropout: bool = False  # LoRA's branch drops out its input (a copy and a mask instead of the input)
    dequantize: bool = False  # QLoRA: every block linear dequantizes its weight in its forward and its backward
    int8: bool = False  # Q-GaLore: every block linear is INT8, dequantized (through an fp32 block) per matmul
    attn: str = "sdpa"
    autocast: bool = False
    padded: bool = False
    packed: bool = False  # packed rows: position ids restarting per document (a mask built from them)
    checkpointing: bool = False  # torch's non-reentrant checkpoint around each layer (our trainer's)
    # frozen models (LoRA): modules_to_save's trainable copies, untied from each other
    embeddings_trainable: bool = False  # the input embeddings' weight needs a gradient
    lm_head_trainable: bool = False  # lm_head keeps its input (a trainable copy, or LoRA on it)


@dataclass(frozen=True)
class LinearInput:
    """A LoRA target in a traced layer (its branch was traced at rank 1): the layer part it sits
    in and the rows it sees per sequence of the batch (the sequence length, or more: CPM-Ant
    prepends prompt tokens), which size lora_A's output for the rank beyond 1."""

    part: str
    short: str
    positions: int


@dataclass(frozen=True)
class TracedStep:
    """A moment of one layer's backward: the layer's saved bytes still alive, its parameters'
    gradient bytes made so far (in the traced dtype), and the other tensors alive then."""

    alive: Poly
    made: int
    transient: Poly


@dataclass(frozen=True)
class LossStep:
    """A moment of the loss's backward, before the first head gradient: the head's saved bytes
    already freed (the log-softmax's output, once its backward ran) and the other tensors alive."""

    freed: Poly
    transient: Poly


@dataclass(frozen=True)
class LossBackward:
    """The loss's backward moments; the largest at (b, s) is the estimator's "backward: loss"."""

    steps: tuple[LossStep, ...] = ()

    def __call__(self, b: int, s: int) -> tuple[int, int]:
        """(head saved bytes freed, transient bytes) at the largest moment (the earliest of equals)."""
        best = None
        for step in self.steps:
            freed, transient = step.freed(b, s), step.transient(b, s)
            if best is None or transient - freed > best[1] - best[0]:
                best = (freed, transient)
        return best or (0, 0)

    @staticmethod
    def fit(series: dict[tuple[int, int], list[tuple[int, int]]]) -> LossBackward:
        """One pair of polynomials per moment when every shape traced the same moments; otherwise
        each shape's largest, fitted together. Moments whose total another one's dominates go."""
        lengths = {len(v) for v in series.values()}
        if len(lengths) == 1:
            rows = [{p: v[k] for p, v in series.items()} for k in range(lengths.pop())]
        else:
            rows = [{p: max(v, key=lambda m: m[1] - m[0], default=(0, 0)) for p, v in series.items()}]
        kept: list[tuple[Poly, LossStep]] = []
        for row in rows:
            total = Poly.fit({p: t - f for p, (f, t) in row.items()})
            if any(k.dominates(total) for k, _ in kept):
                continue
            step = LossStep(Poly.fit({p: f for p, (f, _) in row.items()}), Poly.fit({p: t for p, (_, t) in row.items()}))
            kept = [(k, s) for k, s in kept if not total.dominates(k)] + [(total, step)]
        return LossBackward(tuple(s for _, s in kept))


@dataclass(frozen=True)
class TracedLayer:
    """One traced decoder layer standing for `count` layers of the model."""

    index: int  # its index in the model
    count: int
    saved: dict[str, Poly]
    steps: tuple[TracedStep, ...]
    linears: tuple[LinearInput, ...]
    forward_steps: tuple[TracedStep, ...] = ()  # moments of its forward: its saved bytes so far, the rest
    # the moment each weight's gradient is made (by the weight's short name, profile._short): a layer-wise
    # optimizer's hook runs then, beside what is alive then
    grad_moments: dict[str, TracedStep] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    layers: tuple[TracedLayer, ...]  # layer 0 first
    last: int  # which entry of `layers` stands for the model's last layer
    # saved by several layers or made before them and kept (RoPE tables, masks, a checkpointed step's
    # embedding output), and labels a loss keeps as it was given them (the batch's ids)
    shared: Poly
    embedding: Poly  # an embedding module's, made after the first layer began (usually nothing)
    head: dict[str, Poly]  # HEAD_PARTS
    forward_transient: PolyMax  # at the loss, beyond every saved tensor (logits and their copies)
    loss_backward: LossBackward  # the loss's backward, before the first head gradient
    grad_bytes: dict[int, int] = field(default_factory=dict)  # per traced layer: all of its gradients
    kinds: int = 1
    order: tuple[int, ...] = ()  # for each layer of the model, the entry of `layers` that stands for it


# ---------------------------------------------------------------------------- tracing


class FloatReadsNaN(FakeTensorMode):
    """FakeTensorMode in which reading a float value gives NaN instead of raising.

    Logging reads values (the loss, grad norms); a traced or dry-run step has none. Reading an
    integer or a boolean usually decides control flow, so that still raises
    DataDependentOutputException.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_floating_point():
            return math.nan
        return super().__torch_dispatch__(func, types, args, kwargs or {})


def fake_mode() -> FloatReadsNaN:
    """The fake-tensor mode of a traced profile and of a dry run: real constants (code tables)
    become fake on use; an operator without a fake kernel raises rather than running for real on
    zero-filled tensors."""
    return FloatReadsNaN(allow_non_fake_inputs=True, allow_fallback_kernels=False)


def make_fake(model, mode, device, requires_grad: bool | None = None) -> None:
    """Turn every parameter and buffer of a meta-device `model` into a fake tensor of `mode` on
    `device`, in place; each tensor once, so tied weights stay tied. requires_grad: for every
    parameter (None: each keeps its own)."""
    from torch import nn

    faked: dict[int, object] = {}

    def fake(t, parameter: bool):
        if id(t) not in faked:
            f = mode.fake_tensor_converter.from_meta_and_device(mode, t.detach(), device)
            grad = t.requires_grad if requires_grad is None else requires_grad
            faked[id(t)] = nn.Parameter(f, requires_grad=grad) if parameter else f
        return faked[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = fake(p, True)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b, False)


@dataclass
class _Record:
    nbytes: int
    born: int
    phase: str
    creator: str
    died: int | None = None
    kind: str | None = None  # "weight" | "grad"; None: decided at the end
    savers: list = field(default_factory=list)
    grad_of: str | None = None


class _Tracer:
    """Storages through one step, with the module that made each and the modules that saved it."""

    def __init__(self) -> None:
        self.records: dict[int, _Record] = {}
        self.all: list[_Record] = []
        self.refs: dict[int, weakref.ref] = {}
        self.clock = 0
        self.phase = "forward"
        self.stack: list[str] = [""]
        self.segments: list[tuple[int, int | str]] = []  # (clock, traced layer index or "tail"): backward begins
        self.samples: list[tuple[int, str, int | None]] = []  # (clock, phase, layer running) after each birth
        self.layer_stack: list[int] = []  # the traced layers whose forward is running
        self.forward_end = 0
        self.layers_done = 0  # the clock when the last traced layer's forward returned
        self.layers_start: int | None = None  # the clock when the first layer's forward began
        self.inputs: dict[int, int] = {}

    def register(self, t, kind: str | None = None) -> _Record | None:
        import torch

        if not isinstance(t, torch.Tensor):
            return None
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        key = id(st)
        rec = self.records.get(key)
        if rec is not None:
            if kind and rec.kind is None:
                rec.kind = kind
            return rec
        self.clock += 1
        rec = _Record(st.nbytes(), self.clock, self.phase, self.stack[-1], kind=kind)
        self.records[key] = rec
        self.all.append(rec)
        self.refs[key] = weakref.ref(st, lambda _r, key=key: self.free(key))
        self.samples.append((self.clock, self.phase, self.layer_stack[-1] if self.layer_stack else None))
        return rec

    def free(self, key: int) -> None:
        rec = self.records.pop(key, None)
        self.refs.pop(key, None)
        if rec is not None:
            self.clock += 1
            rec.died = self.clock

    def pack(self, t):
        rec = self.register(t)
        if rec is not None:
            rec.savers.append(self.stack[-1])
        # detached, as lowrank/memory.py's tracker packs: a saved output kept with its grad_fn
        # would never be freed if backward never reaches its node (a reference cycle through C++)
        return t.detach() if isinstance(t, torch.Tensor) else t


def _dispatch_mode(tracer: _Tracer):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                tracer.register(t)
            return out

    return Dispatch()


def _scalars(module) -> tuple:
    """A module's plain settings (window sizes, flags, types), its layer index excluded."""
    out = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or key in ("layer_idx", "training", "layer_id", "idx"):
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            out.append((key, value))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out.append((key, tuple(value)))
    return tuple(out)


def layer_signature(layer, layer_type) -> tuple:
    """What makes two decoder layers save alike: classes, parameter shapes, settings, type."""
    return (layer_type, tuple((name, type(m).__name__, _scalars(m)) for name, m in layer.named_modules()),
            tuple((name, tuple(p.shape)) for name, p in layer.named_parameters()))


class _PassThrough:
    """Stands in for a decoder layer that repeats a traced one: returns the hidden states."""

    def __init__(self, template):
        self.template = template

    def __call__(self, hidden_states, *args, **kwargs):
        width = self.template.get("tuple")  # a real layer's output: a tuple of this length, or a tensor
        return (hidden_states, *([None] * (width - 1))) if width else hidden_states


def _build(spec: ModelSpec, key: TraceKey):
    """The fake model with only its representative layers live; returns what tracing needs."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from .constants import torch_dtype
    from .spec import _config_from_dict
    from .targets import decoder_layers, is_linear, matches

    config = _config_from_dict({k: v for k, v in spec.config.items() if k not in ("transformers_version",)},
                               f"model {spec.name!r}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=key.attn)
    model.to(torch.float32 if key.autocast else torch_dtype(key.dtype))
    prefix, layers = decoder_layers(model)
    types = getattr(config, "layer_types", None)
    types = types if isinstance(types, (list, tuple)) and len(types) == len(layers) else [None] * len(layers)
    signatures = [layer_signature(layer, types[i]) for i, layer in enumerate(layers)]
    reps: dict[tuple, int] = {}  # signature -> the traced layer (not layer 0) that stands for it
    counts: dict[int, int] = {0: 1}
    for i, sig in enumerate(signatures):
        if i == 0:
            continue
        rep = reps.setdefault(sig, i)
        counts[rep] = counts.get(rep, 0) + 1
    last = reps[signatures[-1]] if len(layers) > 1 else 0
    order = tuple(0 if i == 0 else reps[sig] for i, sig in enumerate(signatures))  # each layer's traced one
    mode = fake_mode()
    make_fake(model, mode, torch.device("cpu"), requires_grad=key.trainable)
    if not key.trainable and (key.embeddings_trainable or key.lm_head_trainable):
        embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is not None and head.weight is embeddings.weight:  # a copy is its module's own: untied
            with mode:
                head.weight = nn.Parameter(torch.empty_like(head.weight), requires_grad=False)
        embeddings.weight.requires_grad_(key.embeddings_trainable)
        if head is not None:
            head.weight.requires_grad_(key.lm_head_trainable)
    if key.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    template: dict = {}
    for i in range(len(layers)):
        if i not in counts:
            layers[i].forward = _PassThrough(template)  # an instance attribute: hooks stay the module's
    targets = set(key.lora_targets)
    lora = [(path, m) for path, m in model.named_modules()
            if not key.trainable and is_linear(m) and path.startswith(prefix + ".")
            and m.weight.ndim == 2 and path.rsplit(".", 1)[-1] in targets and matches(path, "all-linear")]
    return model, mode, prefix, layers, counts, (last, order), template, lora


def unreached_parameters(spec: ModelSpec) -> dict[str, int]:
    """Parameters that no gradient reaches in a text-only step: name -> numel. Outside the blocks,
    a multimodal causal LM's vision and audio towers; inside them, a decoder's cross-attention to
    an encoder that is never called (TrOCR) or a sparse-attention indexer whose top-k selection
    stops the gradient (DeepSeek-V4, HunYuan-V4). They are held, but AdamW keeps no state for them
    and they never get a .grad. Found by walking the autograd graph of one traced forward (batch 1,
    512 tokens, fewer where the model's positions end: a compressor that pools blocks of tokens is
    reached only by a sequence longer than its block) back from the loss; a block that repeats a
    traced one is judged by it. Expert weights are left out: which experts a few tokens reach is
    the router's choice, not the model's structure."""
    import torch

    model, mode, prefix, layers, _counts, (_last, order), _template, _lora = _build(
        spec, TraceKey(dtype="bf16", trainable=True, attn="eager"))
    reached: set[int] = set()
    with mode, fake_packing_answers():
        ids = torch.randint(0, spec.vocab_size, (1, min(512, spec.max_position or 512)))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        seen, todo = set(), [loss.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)  # an AccumulateGrad node: its parameter
            if variable is not None:
                reached.add(id(variable))
            todo += [nxt for nxt, _ in fn.next_functions]
    traced = {(i, name) for i in set(order) for name, p in layers[i].named_parameters() if id(p) in reached}
    block = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)")
    out = {}
    for name, p in model.named_parameters():
        found = block.match(name)
        if not found:
            if id(p) not in reached:
                out[name] = p.numel()
        elif "expert" not in found[2].lower() and (order[int(found[1])], found[2]) not in traced:
            out[name] = p.numel()
    return out


def _trace_once(spec: ModelSpec, key: TraceKey, batch: int, seq: int):
    """One traced step at (batch, seq): the tracer, plus the layer/part of every module path."""
    import torch

    from .config import representative_packed_positions

    positions = torch.tensor(representative_packed_positions(seq)).expand(batch, -1).contiguous() if key.packed else None

    model, mode, prefix, layers, counts, last, template, lora = _build(spec, key)
    paths = {id(m): path for path, m in model.named_modules()}
    tracer = _Tracer()
    handles = []
    traced = sorted(counts)
    linear_rows: dict[str, int] = {}  # LoRA target's path -> the rows its input has
    lm_head = model.get_output_embeddings()

    layer_ids = {id(layers[i]): i for i in counts}

    def pre(module, args):
        tracer.stack.append(paths.get(id(module), tracer.stack[-1]))
        if id(module) in layer_ids:
            tracer.layer_stack.append(layer_ids[id(module)])

    def post(module, args, out):
        tracer.stack.pop()
        if id(module) in layer_ids and tracer.layer_stack:
            tracer.layer_stack.pop()

    def layer_post(i):
        def hook(module, args, out):
            template["tuple"] = len(out) if isinstance(out, tuple) else 0
            if tracer.phase != "forward":  # checkpointing's recomputation
                return
            hidden = out[0] if isinstance(out, tuple) else out
            if i == traced[-1]:
                tracer.layers_done = tracer.clock
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda g: tracer.segments.append((tracer.clock, i)))
        return hook

    def linear_pre(path):
        def hook(module, args):
            x = args[0]
            if tracer.phase == "forward":
                linear_rows[path] = x.numel() // max(1, int(x.shape[-1]))
        return hook

    from .targets import block_linears, linear_shape

    factors: dict[str, tuple] = {}
    with mode:  # LoRA's branch at rank 1 (lowrank/lora.py: base(x) + lora_B(lora_A(dropout(x))) · scaling)
        for path, m in lora:
            in_f, out_f = linear_shape(m)
            dtype = m.weight.dtype if m.weight.is_floating_point() else torch.float32
            factors[path] = (torch.nn.Parameter(torch.zeros(1, in_f, dtype=dtype)),
                             torch.nn.Parameter(torch.zeros(out_f, 1, dtype=dtype)))

    def inject(path):
        def hook(module, args, out):
            a, b = factors[path]
            x = torch.nn.functional.dropout(args[0], 0.1, training=True) if key.lora_dropout else args[0]
            x = x if key.autocast else x.to(a.dtype)  # autocast casts by itself
            return out + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * 2.0
        return hook

    if key.dequantize or key.int8:  # a dequantized copy per matmul (4-bit: nothing saved but the codes)
        for _path, m in block_linears(model):
            m.forward = _dequantizing_forward(m, int8=key.int8)
    for path, m in lora:
        handles.append(m.register_forward_pre_hook(linear_pre(path)))
        handles.append(m.register_forward_hook(inject(path)))
    def first_input(module, args, kwargs):  # the first layer's input gradient ends its backward
        hidden = args[0] if args else kwargs.get("hidden_states")
        if tracer.phase == "forward" and tracer.layers_start is None:
            tracer.layers_start = tracer.clock
        if tracer.phase == "forward" and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda g: tracer.segments.append((tracer.clock, "tail")))

    for i in traced:
        handles.append(layers[i].register_forward_hook(layer_post(i)))
    handles.append(layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
    handles.append(torch.nn.modules.module.register_module_forward_pre_hook(pre))
    handles.append(torch.nn.modules.module.register_module_forward_hook(post))
    grad_hooks = []

    def grad_hook(name: str):
        def on_grad(param):
            rec = tracer.register(param.grad, "grad")
            if rec is not None:
                rec.kind, rec.grad_of = "grad", name
        return on_grad

    for name, p in model.named_parameters():
        if p.requires_grad:
            grad_hooks.append(p.register_post_accumulate_grad_hook(grad_hook(name)))
    for path, (a, b) in factors.items():
        grad_hooks.append(a.register_post_accumulate_grad_hook(grad_hook(f"{path}.lora_A.weight")))
        grad_hooks.append(b.register_post_accumulate_grad_hook(grad_hook(f"{path}.lora_B.weight")))
    model.train()
    try:
        for t in (*model.parameters(), *model.buffers(), *(f for pair in factors.values() for f in pair)):
            tracer.register(t, "weight")
        with mode:
            ids = torch.randint(0, spec.vocab_size, (batch, seq))
            inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
            if key.padded and not key.packed:
                inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
            if key.packed:
                inputs["position_ids"] = mode.from_tensor(positions)
            batch_record = tracer.register(ids, "weight")  # the batch: not an activation of the step …
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if key.autocast else contextlib.nullcontext()
            with fake_packing_answers(positions), _dispatch_mode(tracer), \
                    torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
                with autocast:
                    loss = model(**inputs).loss
                tracer.forward_end = tracer.clock
                tracer.phase = "backward"
                tracer.clock += 1
                loss.backward()
                del loss
    finally:
        for h in handles + grad_hooks:
            h.remove()
    lm_head_path = paths.get(id(lm_head), "lm_head")
    embedding = model.get_input_embeddings()
    tied = lm_head is not None and embedding is not None and lm_head.weight is embedding.weight
    pending = lm_head.weight.nbytes if tied and lm_head.weight.requires_grad else None
    # … unless a loss keeps the labels it was given (the batch's own ids, unshifted: TrOCR's): then
    # the step holds them as the dry run counts them, to its end. A trainable embedding keeps them
    # too, and the estimator counts those by rule (activations.token_ids).
    embedding_path = paths.get(id(embedding)) if embedding is not None else None
    kept = batch_record.nbytes if batch_record.savers and embedding_path not in batch_record.savers else 0
    return tracer, prefix, counts, last, linear_rows, lm_head_path, pending, kept


def _dequantizing_forward(module, int8: bool = False):
    """`module`'s forward as a quantized linear computes it. 4-bit (bitsandbytes' MatMul4Bit): the
    weight is dequantized into a temporary for the matmul, and again for the input's gradient.
    INT8 (Q-GaLore's Int8Linear, lowrank/quant.py): the same, each dequantization built through
    one fp32 work block; the input is kept for the weight's gradient."""
    import torch

    from .constants import QUANT_BLOCK

    conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)

    def dequantized(weight):
        work = torch.empty(min(weight.numel(), QUANT_BLOCK), dtype=torch.float32) if int8 else None
        w = weight.clone()
        del work
        return w

    class Dequantized(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.weight = weight
            if int8:
                ctx.save_for_backward(x)
            w = dequantized(weight)
            return x @ w if conv1d else x @ w.t()

        @staticmethod
        def backward(ctx, grad):
            w = dequantized(ctx.weight)
            grad_x = grad @ w.t() if conv1d else grad @ w
            del w
            if not int8:
                return grad_x, None
            (x,) = ctx.saved_tensors
            x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
            grad_w = x2.t() @ g2 if conv1d else g2.t() @ x2
            return grad_x, grad_w

    def forward(x):
        out = Dequantized.apply(x, module.weight)
        return out + module.bias if module.bias is not None else out

    return forward


def packed_indices(find_packed, position_ids, real) -> torch.Tensor | None:
    """transformers' `find_packed_sequence_indices` on fake `position_ids`: None (not packed) unless
    `real`, the real position ids they were built from, hold a document boundary; then the same
    operators run on the fake ones (their result has no values, only the memory of a real run's)."""
    if real is None or find_packed(real) is None:
        return None
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


@contextlib.contextmanager
def fake_packing_answers(packed=None):
    """transformers checks position ids for packed sequences (a value read, which fake tensors
    cannot answer): fake batches are plain, or packed from the real position ids `packed`
    (`packed_indices`); real position ids are still checked for real."""
    from unittest import mock

    from torch._subclasses.fake_tensor import is_fake
    from transformers import masking_utils

    find = masking_utils.find_packed_sequence_indices

    def answer(position_ids):
        return packed_indices(find, position_ids, packed) if is_fake(position_ids) else find(position_ids)

    with mock.patch.object(masking_utils, "find_packed_sequence_indices", answer):
        yield


def _owner(path: str, prefix: str) -> tuple[int | None, str]:
    """(layer index, part) of a module path inside the decoder layers, or (None, path)."""
    m = re.match(re.escape(prefix) + r"\.(\d+)(?:\.([^.]+))?", path)
    if m:
        return int(m.group(1)), m.group(2) or "(block)"
    return None, path


def _measure(spec: ModelSpec, key: TraceKey, batch: int, seq: int) -> dict:
    """Byte counts of one traced step, by owner, and its backward moments, all at (batch, seq)."""
    tracer, prefix, counts, last, linear_rows, lm_head_path, pending, batch_kept = _trace_once(spec, key, batch, seq)
    traced = sorted(counts)
    final = tracer.clock + 1
    saved: dict[tuple, int] = {}  # (layer or None, part) -> bytes
    owner_of: dict[int, tuple] = {}
    for rec in tracer.all:
        if rec.kind is not None:
            continue
        forward = rec.phase == "forward"
        alive_after = rec.died is None or rec.died > tracer.forward_end
        if not (rec.savers or (forward and alive_after)):
            continue
        creator_layer, creator_part = _owner(rec.creator, prefix)
        saver_layers = {_owner(p, prefix)[0] for p in rec.savers} - {None}
        if creator_layer is None and len(saver_layers) > 1:
            owner = (None, "shared")
        elif rec.savers and _owner(rec.savers[0], prefix)[0] is not None:
            owner = _owner(rec.savers[0], prefix)
        elif creator_layer is not None:
            owner = (creator_layer, creator_part)
        else:
            where = rec.savers[0] if rec.savers else rec.creator
            owner = (None, _head_part(where, lm_head_path, prefix))
            if forward and tracer.layers_start is not None and rec.born <= tracer.layers_start:
                # made before the layers and kept past the forward by none of them (the embeddings'
                # dropout mask; under checkpointing RoPE's tables, which the checkpoints hold, and a
                # frozen embedding's output, made a leaf that requires grad by transformers' input
                # hook and held by its gradient's accumulator): freed in the embeddings' backward or
                # at its end, after every block's, so it waits through the whole backward as the
                # shared inputs do — not a head part, freed with the loss
                owner = (None, "shared")
        owner_of[id(rec)] = owner
        # what checkpointing recomputes and saves again in backward is a step's, below; a tensor saved
        # by a node that backward never reaches (an indexer behind a top-k, a router's scores that
        # feed no expert) is freed with that node in forward: an activation while it lives (as the
        # dry run counts it), never a saved one
        if forward and alive_after:
            saved[owner] = saved.get(owner, 0) + rec.nbytes
    lin = {path: (*_owner(path, prefix), path.rsplit(".", 1)[-1], rows // batch) for path, rows in linear_rows.items()}

    # forward: the most alive beyond the saved tensors, at the head (after the last layer)
    events = []
    for rec in tracer.all:
        events.append((rec.born, rec.nbytes, rec))
        if rec.died is not None:
            events.append((rec.died, -rec.nbytes, rec))
    events.sort(key=lambda e: e[0])
    total_saved = sum(saved.values())
    segments = sorted(tracer.segments)
    seg_starts = [c for c, _ in segments]

    def segment_at(clock: int):
        import bisect

        i = bisect.bisect_right(seg_starts, clock) - 1
        return segments[i][1] if i >= 0 else "head"

    live_act, live_trans, live_grad = 0, 0, 0
    part_alive: dict[tuple, int] = {}
    grads_made: dict[int | None, int] = {}
    forward_extra: list[int] = []
    loss_bwd: list[tuple[int, int]] = []  # (head saved bytes freed, transient)
    steps: dict[int, list] = {i: [] for i in traced}
    forward_steps: dict[int, list] = {i: [] for i in traced}
    grad_moments: dict[int | None, dict[str, tuple[int, int, int]]] = {}
    sample_clocks = {c: (p, layer) for c, p, layer in tracer.samples}
    e = 0
    for clock in range(1, final + 1):
        while e < len(events) and events[e][0] == clock:
            _, delta, rec = events[e]
            e += 1
            if rec.kind == "weight":
                continue
            if rec.kind == "grad":
                live_grad += delta
                if delta > 0:
                    layer = _owner(_param_module(rec.grad_of), prefix)[0]
                    if layer is not None and (rec.grad_of.endswith(".weight") or _is_expert(rec.grad_of)):
                        short = _short(rec.grad_of)
                        alive = sum(v for (lay, _), v in part_alive.items() if lay == layer)
                        grad_moments.setdefault(layer, {}).setdefault(short, (alive, grads_made.get(layer, 0),
                                                                               live_trans))
                    grads_made[layer] = grads_made.get(layer, 0) + delta
                continue
            owner = owner_of.get(id(rec))
            if owner is None:
                # a tied lm_head's gradient waits in autograd's buffer for the embedding's: the
                # estimator counts it with the head's gradients
                if rec.nbytes == pending and rec.phase == "backward" and segment_at(rec.born) == "head":
                    continue
                live_trans += delta
            else:
                live_act += delta
                part_alive[owner] = part_alive.get(owner, 0) + delta
        sample = sample_clocks.get(clock)
        if sample is None:
            continue
        phase, running = sample
        if phase == "forward" and running is not None:  # inside a layer: its saved tensors so far
            alive = sum(v for (layer, _), v in part_alive.items() if layer == running)
            forward_steps[running].append((alive, live_trans))
        if phase == "forward" and clock > tracer.layers_done:
            forward_extra.append(live_act + live_trans - total_saved)
        elif phase == "backward":
            seg = segment_at(clock)
            if seg == "tail":  # the embeddings' backward: the estimator's "backward: end"
                continue
            if seg == "head":
                if not grads_made:
                    head_alive = sum(v for (layer, _), v in part_alive.items() if layer is None)
                    head_total = sum(v for (layer, _), v in saved.items() if layer is None)
                    loss_bwd.append((head_total - head_alive, live_trans))
            else:
                alive = sum(v for (layer, _), v in part_alive.items() if layer == seg)
                steps[seg].append((alive, grads_made.get(seg, 0), live_trans))
    grad_bytes: dict[int, int] = {}
    for rec in tracer.all:
        if rec.kind == "grad" and rec.grad_of:
            layer = _owner(_param_module(rec.grad_of), prefix)[0]
            if layer is not None:
                grad_bytes[layer] = grad_bytes.get(layer, 0) + rec.nbytes
    return {"saved": saved, "steps": steps, "forward_steps": forward_steps, "grad_moments": grad_moments,
            "forward_extra": forward_extra,
            "loss_bwd": loss_bwd, "counts": counts, "last": last, "linears": lin, "grad_bytes": grad_bytes,
            "batch_kept": batch_kept}


def _param_module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_expert(name: str) -> bool:
    """A fused expert weight (`mlp.experts.gate_up_proj`), a parameter of its own module."""
    return ".experts." in name and not name.endswith((".weight", ".bias"))


def _short(name: str) -> str:
    """The name the estimator gives a weight's gradient: its module's short name (`q_proj`), or an
    expert tensor's own, marked as an expert's (`experts.down_proj`, spec.expert_grad_key)."""
    parts = name.split(".")
    return expert_grad_key(parts[-1]) if _is_expert(name) else parts[-2] if len(parts) > 1 else parts[-1]


def _head_part(path: str, lm_head_path: str, prefix: str) -> str:
    """The head part of a tensor saved (or made) outside the decoder layers, by the module path.

    "final norm" is everything the base model (the decoder layers' parent, `prefix` less its last
    name) saves outside its layers: the final norm, and any module between the last layer and the
    norm (HunYuan-V4's hyper-connection head, which collapses its hidden streams before the norm).
    Those tensors outlive lm_head's backward, as the norm's do; "logits and loss" (lm_head's output
    and the loss, computed by the causal LM itself) is freed before it."""
    if path == lm_head_path:
        return "lm_head input"
    last = path.rsplit(".", 1)[-1].lower()
    if "norm" in last or last.startswith("ln"):
        return "final norm"
    if "emb" in last or last in ("wte", "wpe"):
        return "embedding"
    base = prefix.rpartition(".")[0]
    if path.startswith(base + ".") if base else path:
        return "final norm"
    return "logits and loss"


_SPECS: dict[str, ModelSpec] = {}  # a config's JSON -> its spec (the cache's key is the JSON)
# id(config dict) -> (the dict, its JSON): specs replaced field by field share their config dict,
# so its JSON is written once per config, not once per spec object
_KEYS: dict[int, tuple[dict, str]] = {}


@lru_cache(maxsize=256)
def _profile_cached(spec_key: str, key: TraceKey, seq: int, single: bool) -> Profile:
    spec = _SPECS[spec_key]
    shapes = [(1, seq)] if single else [(b, seq) for b in BATCHES]
    points = {shape: _measure(spec, key, *shape) for shape in shapes}
    first = points[shapes[0]]
    counts, last = first["counts"], first["last"]

    def fit(get) -> Poly:
        return Poly.fit({p: get(m) for p, m in points.items()})

    owners = set()
    for m in points.values():
        owners |= set(m["saved"])
    layers = []
    for i in sorted(counts):
        parts = sorted({part for layer, part in owners if layer == i})
        saved = {part: fit(lambda m, part=part, i=i: m["saved"].get((i, part), 0)) for part in parts}
        steps = _fit_moments({p: m["steps"][i] for p, m in points.items()})
        linears = tuple(LinearInput(*values) for layer, *values in first["linears"].values() if layer == i)
        forward = _fit_moments({p: [(a, 0, t) for a, t in m["forward_steps"][i]] for p, m in points.items()})
        shorts = set.intersection(*(set(m["grad_moments"].get(i, {})) for m in points.values()))
        at_grad = {short: TracedStep(fit(lambda m, short=short, i=i: m["grad_moments"][i][short][0]),
                                     first["grad_moments"][i][short][1],
                                     fit(lambda m, short=short, i=i: m["grad_moments"][i][short][2]))
                   for short in sorted(shorts)}
        layers.append(TracedLayer(i, counts[i], saved, _frontier(steps), linears, _frontier(forward), at_grad))
    head = {part: fit(lambda m, part=part: m["saved"].get((None, part), 0)) for part in HEAD_PARTS}
    last, order = last
    return Profile(
        layers=tuple(layers),
        last=sorted(counts).index(last),
        order=tuple(sorted(counts).index(i) for i in order),
        shared=fit(lambda m: m["saved"].get((None, "shared"), 0) + m["batch_kept"]),
        embedding=fit(lambda m: m["saved"].get((None, "embedding"), 0)),
        head=head,
        forward_transient=PolyMax.fit({p: m["forward_extra"] for p, m in points.items()}),
        loss_backward=LossBackward.fit({p: m["loss_bwd"] for p, m in points.items()}),
        grad_bytes=dict(first["grad_bytes"]),
        kinds=len(counts),
    )


def _fit_moments(series: dict[tuple[int, int], list[tuple[int, int, int]]]) -> list[TracedStep]:
    """(alive, made, transient) moments traced at each shape, one polynomial pair per moment when
    every shape traced the same moments; otherwise each shape's worst, fitted together as one."""
    first = next(iter(series.values()))
    lengths = {len(v) for v in series.values()}
    if len(lengths) == 1:
        return [TracedStep(Poly.fit({p: v[k][0] for p, v in series.items()}), first[k][1],
                           Poly.fit({p: v[k][2] for p, v in series.items()})) for k in range(lengths.pop())]
    worst = {p: max(v, key=lambda t: t[0] + t[2], default=(0, 0, 0)) for p, v in series.items()}
    made = max(first, key=lambda t: t[0] + t[2], default=(0, 0, 0))[1]
    return [TracedStep(Poly.fit({p: w[0] for p, w in worst.items()}), made,
                       Poly.fit({p: w[2] for p, w in worst.items()}))]


def _frontier(steps: list[TracedStep]) -> tuple[TracedStep, ...]:
    """The moments not dominated by another (at every b and s) in gradients made, saved bytes
    alive (a layer-wise update runs beside them instead of the op's temporaries) and total."""
    def covers(a: TracedStep, b: TracedStep) -> bool:
        return a.made >= b.made and a.alive.dominates(b.alive) and (a.alive + a.transient).dominates(
            b.alive + b.transient)

    kept: list[TracedStep] = []
    for step in steps:
        if any(covers(k, step) for k in kept):
            continue
        kept = [k for k in kept if not covers(step, k)] + [step]
    return tuple(kept)


def traced_profile(spec: ModelSpec, key: TraceKey, batch: int, seq_len: int) -> Profile:
    """The activation profile of `spec` for `key` at `seq_len`, traced once per config, key,
    length and batch regime (1, or more)."""
    known = _KEYS.get(id(spec.config))
    if known is None or known[0] is not spec.config:
        known = _KEYS[id(spec.config)] = (spec.config, json.dumps(spec.config, sort_keys=True, default=str))
        _SPECS.setdefault(known[1], spec)
    return _profile_cached(known[1], key, seq_len, batch == 1)
