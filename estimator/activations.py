"""Activation memory: the tensors autograd saves for backward, module by module.

Derived from the forward code of the transformers modules (transformers 5.x), not from a GPT
formula, and checked against `lowrank.memory.MemoryTracker` measurements (tests/estimator/
test_accuracy.py, every method and setting on six architectures). The rules every term
follows are autograd's:

- `y = x @ W.T` saves x only when W needs a gradient, and W (a weight, not an activation) when
  x does. So LoRA, which freezes W, saves the input once for `lora_A` instead (its dropout
  output when dropout > 0), plus the rank-r output of `lora_A` for `lora_B`.
- `a * b` saves b when a needs a gradient and a when b does; a product with a constant
  (cos/sin of RoPE, a frozen norm weight) saves only the constant.
- casts, views, additions and concatenations save nothing.

Sizes are in bytes for one micro-batch; `tokens = batch_size * seq_len`; `d` is the size of an
activation element (2 for bf16, 4 for fp32). Each family (Llama, GPT-2, GPT-NeoX) describes a
block as named parts and the bumps of its backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import loss as chunked
from .spec import ModelSpec


@dataclass(frozen=True)
class Flow:
    """What decides which tensors a step saves: trainability, LoRA placement, dtype, kernels."""

    d: int  # bytes per activation element (model dtype)
    base_trainable: bool  # decoder-block linear weights get gradients (full, GaLore, Q-GaLore)
    norms_trainable: bool
    embeddings_trainable: bool
    lm_head_trainable: bool
    lora_targets: frozenset[str] = frozenset()  # short names of the linears carrying LoRA
    lora_rank: int = 0
    lora_dropout: float = 0.0
    attn: str = "sdpa"
    device: str = "cuda"
    checkpointing: bool = False
    autocast: bool = False
    cast_linear_params: int | None = None  # block linear weights autocast copies (None: all of them)
    padded: bool = False  # batches carry an attention mask (or packed ones build one from position ids)
    dequantized: bool = False  # QLoRA: each 4-bit linear dequantizes its weight for its matmul, forward and back
    int8: bool = False  # Q-GaLore: each INT8 linear dequantizes its weight for its matmul, forward and back
    packed: bool = False  # packed rows: position ids per row (RoPE tables per row), mask from them
    loss_chunk: int = 0  # tokens per chunk of the chunked loss (lowrank/loss.py); 0: transformers' full loss
    softcap: bool = False  # the chunked loss soft-caps each chunk's logits (one more fp32 chunk in backward)
    copies: bool = False  # trainable embeddings / lm_head are modules_to_save copies: never tied to each other
    lm_head_lora: bool = False  # LoRA on lm_head: it keeps its input and the rank-r activation

    def tied_trainable(self, spec: ModelSpec) -> bool:
        """One trainable weight used as the embedding and as lm_head (full-rank training of a tied model)."""
        return spec.tie_word_embeddings and self.embeddings_trainable and not self.copies

    @property
    def blocks_train(self) -> bool:
        """Does a gradient flow through the decoder blocks? Not when only lm_head (LoRA on it, or a
        modules_to_save copy) trains: then the blocks run as in inference and save nothing. (Under
        checkpointing they still do: measured, the checkpointed blocks keep their inputs and the
        final norm saves as in training.)"""
        return (self.base_trainable or self.norms_trainable or self.embeddings_trainable or bool(self.lora_targets)
                or self.checkpointing)

    @property
    def head_keeps_input(self) -> bool:
        """Does lm_head save its input for backward (a trainable weight, or LoRA's A)?"""
        return self.lm_head_trainable or self.lm_head_lora

    def saves_input(self, short: str) -> bool:
        """Does this linear keep its input (rather than a LoRA dropout copy) for backward?"""
        if self.base_trainable:
            return True
        return short in self.lora_targets and self.lora_dropout == 0

    @property
    def residual_d(self) -> int:
        """Bytes of the residual stream and norm math: fp32 under autocast (weights are fp32)."""
        return 4 if self.autocast else self.d

    @property
    def mask_bytes(self) -> int:
        """A dropout mask element: bool from CUDA's fused kernel; the CPU kernel keeps a scaled copy."""
        return self.mask_bytes_of(self.d)

    def mask_bytes_of(self, input_bytes: int) -> int:
        """The mask of a dropout applied to an input with elements of `input_bytes`."""
        return 1 if self.device == "cuda" else input_bytes

    @property
    def stat_bytes(self) -> int:
        """LayerNorm's saved mean and rstd: fp32 on CUDA, the input dtype on CPU."""
        return 4 if self.device == "cuda" else self.d


@dataclass(frozen=True)
class BackwardStep:
    """A moment inside one block's backward: which saved parts are still alive, which of the
    block's parameters already have gradients, and the temporaries of the op running then.

    A traced profile (estimator/profile.py) gives bytes instead of names: `alive_bytes` of the
    block's saved tensors, and `made_share` of the block's gradients made so far."""

    alive: tuple[str, ...]
    grads_of: tuple[str, ...]
    transient: int
    alive_bytes: int | None = None
    made_share: float | None = None
    made_bytes: int | None = None  # traced full-rank: the block's gradient bytes made, as traced


def step_alive(parts: dict[str, int], step: BackwardStep) -> int:
    """The block's saved bytes still alive at `step`."""
    return step.alive_bytes if step.alive_bytes is not None else sum(parts[p] for p in step.alive)


def step_made(step: BackwardStep, block_grads: dict[str, int]) -> int:
    """The block's gradient bytes made by `step` (`block_grads`: all of them, by parameter group)."""
    if step.made_bytes is not None and block_grads:
        return step.made_bytes
    if step.made_share is not None:
        return round(step.made_share * sum(block_grads.values()))
    return sum(block_grads.get(k, 0) for k in step.grads_of)


# ---------------------------------------------------------------------------- shared pieces


def rmsnorm_saved(spec: ModelSpec, flow: Flow, tokens: int, input_grad: bool) -> int:
    """LlamaRMSNorm: `w * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(dtype)`.

    With a gradient flowing into x: the fp32 input (4h, kept by pow and mul) and rsqrt (4 bytes
    a token). With a trainable weight: the normalized value cast back to the model dtype (d·h).
    GemmaRMSNorm multiplies in fp32 (`* (1 + w.float())`), so its normalized value is 4h.
    """
    h = spec.hidden_size
    saved = tokens * (4 * h + 4) if input_grad else 0
    if flow.norms_trainable:
        saved += tokens * h * (4 if spec.family == "gemma" else flow.residual_d)
    return saved


def layernorm_saved(spec: ModelSpec, flow: Flow, tokens: int, with_input: bool = True) -> int:
    """nn.LayerNorm (native_layer_norm) saves its input and two statistics per token.

    `with_input=False` when another LayerNorm already saved the same input (GPT-NeoX's parallel
    residual normalizes one x twice).
    """
    return tokens * ((spec.hidden_size * flow.d if with_input else 0) + 2 * flow.stat_bytes)


def linear_inputs_saved(flow: Flow, tokens: int, width: int, consumers: tuple[str, ...],
                        counted: bool = False, from_norm: bool = False, input_grad: bool = True) -> int:
    """One input of `width` features read by several linears (q,k,v read the same norm output).

    The input is stored once if any consumer keeps it (a trainable weight, or LoRA without
    dropout) — unless `counted` says another op saved the same storage already. Each LoRA
    consumer with dropout keeps its own dropout output and mask, and every LoRA consumer keeps
    lora_A's rank-r output for lora_B (peft and lowrank.lora compute
    `base(x) + lora_B(lora_A(dropout(x))) * scaling`).
    Under autocast a norm's fp32 output is cast to bf16 by each linear that reads it, so every
    consumer keeps its own copy (`from_norm`). Dropout keeps its mask only when a gradient
    flows into its input (not in a LoRA model's first block).
    """
    d = flow.d
    savers = [c for c in consumers if flow.saves_input(c)]
    saved = 0
    if flow.autocast and from_norm:
        saved += len(savers) * tokens * width * d
    elif not counted and savers:
        saved += tokens * width * d
    for c in consumers:
        if c in flow.lora_targets:
            if flow.lora_dropout > 0:  # the dropout output (autocast: its bf16 cast) and the mask
                saved += tokens * width * (d + (flow.mask_bytes_of(flow.residual_d) if input_grad else 0))
            saved += tokens * flow.lora_rank * d
    return saved


def sdpa_kernel(spec: ModelSpec, flow: Flow, dropout: float = 0.0) -> str:
    """Which attention kernel runs: flash, efficient, math (SDPA) or eager.

    CUDA: flash for bf16/fp16; fp32 takes the memory-efficient kernel, or the math one with
    grouped-query attention. CPU: flash, unless attention dropout forces the math kernel.
    """
    if flow.attn == "eager":
        return "eager"
    if flow.device == "cpu":
        return "math" if dropout > 0 else "flash"
    if flow.d < 4 or flow.autocast:
        return "flash"
    return "efficient" if spec.num_kv_heads == spec.num_heads else "math"


def flash_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int, kernel: str) -> int:
    """FlashAttention / memory-efficient SDPA: the output and an fp32 log-sum-exp per head and
    token (FlashAttention-2, arXiv 2307.08691; the efficient kernel pads it to 32 tokens)."""
    lse_tokens = seq if kernel == "flash" else -(-seq // 32) * 32
    return batch * seq * spec.q_dim * flow.d + 4 * spec.num_heads * batch * lse_tokens


def scores_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int, softmax_bytes: int, dropout: float) -> int:
    """Attention probabilities kept by an unfused kernel: the softmax output (softmax_bytes per
    element), its cast back to the model dtype when they differ, and with dropout the mask and
    the dropped-out probabilities."""
    scores = batch * spec.num_heads * seq * seq
    saved = scores * softmax_bytes + (scores * flow.d if softmax_bytes != flow.d else 0)
    if dropout > 0:
        saved += scores * (flow.mask_bytes + flow.d)
    return saved


# ---------------------------------------------------------------------------- Llama family


LLAMA_PARTS = ("input norm", "q/k/v inputs", "attention", "post-attention norm", "mlp inputs", "mlp")


def llama_attention_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> int:
    """Self-attention after the q/k/v projections, RoPE applied (LlamaAttention.forward).

    RoPE's `q * cos + rotate_half(q) * sin` multiplies by constants: it saves cos/sin (shared by
    all layers), never q or k. Then:
    - flash/efficient SDPA: q, k, v after RoPE — K and V at their own number of heads
      (`enable_gqa`) — the output (also o_proj's input) and the log-sum-exp. With an attention
      mask (padded batches) transformers cannot pass `enable_gqa`: `repeat_kv` copies K and V
      to every head first, and SDPA keeps its own model-dtype copy of the mask.
    - eager (`eager_attention_forward`) and SDPA's math kernel: `repeat_kv` copies K and V to
      every head; QKᵀ saves q and the repeated k; the fp32 softmax output and its cast back are
      saved; the product with V saves the repeated v; the output is copied contiguous for o_proj.
    """
    tokens = batch * seq
    d, q, kv = flow.d, spec.q_dim, spec.kv_dim
    kernel = sdpa_kernel(spec, flow)
    if kernel in ("flash", "efficient"):
        kv_saved = q if flow.padded else kv
        mask = batch * seq * seq * d if flow.padded else 0
        saved = tokens * (q + 2 * kv_saved) * d + flash_saved(spec, flow, batch, seq, kernel) + mask
        return saved + linear_inputs_saved(flow, tokens, q, ("o_proj",), counted=True)
    repeated = kv if spec.num_kv_heads == spec.num_heads else q
    saved = tokens * (q + 2 * repeated) * d + scores_saved(spec, flow, batch, seq, 4, 0.0)
    return saved + linear_inputs_saved(flow, tokens, q, ("o_proj",))


def gated_mlp_saved(spec: ModelSpec, flow: Flow, tokens: int) -> int:
    """LlamaMLP: `down(act(gate(x)) * up(x))` with act = SiLU (Gemma: tanh-GELU).

    The activation saves its input g; the product saves act(g) and up(x); down_proj's input
    (the product) is kept like any linear input. All are `intermediate_size` wide.
    """
    i, d = spec.intermediate_size, flow.d
    return 3 * tokens * i * d + linear_inputs_saved(flow, tokens, i, ("down_proj",))


def llama_block_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int, first: bool) -> dict[str, int]:
    """One decoder block of the Llama family (Llama, Mistral, Qwen2, Gemma), by part.

    `first`: the first block of a LoRA model, whose input carries no gradient (frozen
    embeddings), so its input norm saves nothing.
    """
    tokens = batch * seq
    input_grad = not first or flow.embeddings_trainable
    h = spec.hidden_size
    return {
        "input norm": rmsnorm_saved(spec, flow, tokens, input_grad),
        "q/k/v inputs": linear_inputs_saved(flow, tokens, h, ("q_proj", "k_proj", "v_proj"), from_norm=True,
                                            input_grad=input_grad),
        "attention": llama_attention_saved(spec, flow, batch, seq),
        "post-attention norm": rmsnorm_saved(spec, flow, tokens, True),
        "mlp inputs": linear_inputs_saved(flow, tokens, h, ("gate_proj", "up_proj"), from_norm=True),
        "mlp": gated_mlp_saved(spec, flow, tokens),
    }


NORM_BUMP = 12  # an RMSNorm/LayerNorm backward holds three fp32 hidden-size temporaries (bytes per feature)


def llama_backward_steps(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> list[BackwardStep]:
    """The bumps of a Llama block's backward, in the order autograd runs it (MLP first).

    MLP: the gradients of the product's two factors (2·i·d a token) once down_proj's gradient
    exists — plus the product's own gradient when down_proj did not keep the product (frozen,
    no LoRA) so nothing was freed in exchange; each RMSNorm backward: three fp32 hidden-size
    temporaries; attention: the gradients of q, k and v (flash), or the fp32 softmax gradient
    and its cast (eager, a·s per token).
    """
    tokens = batch * seq
    h, i, d = spec.hidden_size, spec.intermediate_size, flow.d
    if sdpa_kernel(spec, flow) in ("flash", "efficient"):
        attention_bump = tokens * (spec.q_dim + 2 * spec.kv_dim) * d
    else:
        attention_bump = tokens * spec.num_heads * seq * (4 + d)
    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    qkv = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    mlp_bump = tokens * i * d * (2 if flow.saves_input("down_proj") else 3)
    return [
        BackwardStep(LLAMA_PARTS, ("mlp.down_proj",), mlp_bump),
        BackwardStep(LLAMA_PARTS[:4], mlp, tokens * NORM_BUMP * h),
        BackwardStep(LLAMA_PARTS[:3], (*mlp, "norm2", "attention.o_proj"), attention_bump),
        BackwardStep(LLAMA_PARTS[:1], (*mlp, "norm2", "attention.o_proj", *qkv), tokens * NORM_BUMP * h),
    ]


# ---------------------------------------------------------------------------- GPT-2


GPT2_PARTS = ("ln_1", "attention", "ln_2", "mlp")


def gpt2_block_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int, first: bool) -> dict[str, int]:
    """GPT2Block: LayerNorm → Conv1D c_attn → attention → c_proj → dropout, LayerNorm → MLP.

    - ln_1/ln_2: input and statistics; their outputs are c_attn's and c_fc's inputs.
    - attention: flash/efficient SDPA keeps the fused qkv output (q, k, v are views of it), its
      output and log-sum-exp; eager — and CPU SDPA with attention dropout, which runs the math
      kernel in fp32 — keeps contiguous copies of q, kᵀ, v, the probabilities (with dropout mask
      and result) and a contiguous copy of the output for c_proj; then the residual dropout mask.
    - mlp: `gelu_new` is Python arithmetic, `0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`: it keeps
      x, 0.5·x, tanh(·) and 1 + tanh(·), each 4h wide; its output is c_proj's input; then the
      residual dropout mask.
    A Conv1D's input is kept only for a weight that trains (or LoRA on it): with LoRA on c_attn
    alone, ln_2's output and both c_proj inputs are not. In a LoRA model's first block (frozen
    embeddings) nothing before the first adapted linear needs a gradient, so saves nothing.
    """
    tokens, h, d = batch * seq, spec.hidden_size, flow.d
    p_attn = spec.dropout.get("attn_pdrop", 0.0)
    p_resid = spec.dropout.get("resid_pdrop", 0.0)
    trains = {short: flow.base_trainable or short in flow.lora_targets for short in ("c_attn", "c_proj", "c_fc")}
    # does a gradient flow into each point? Always, but in the first block of a LoRA model (frozen
    # embeddings): there only from the first linear that carries LoRA on
    into = not first or flow.embeddings_trainable or flow.norms_trainable
    qkv = into or trains["c_attn"]
    attn_out = qkv or trains["c_proj"]
    resid_mask = tokens * h * flow.mask_bytes if p_resid > 0 else 0
    kernel = sdpa_kernel(spec, flow, p_attn)
    if not qkv:
        attention = 0
    elif kernel in ("flash", "efficient"):
        attention = tokens * 3 * h * d + flash_saved(spec, flow, batch, seq, kernel)
    elif kernel == "math":  # CPU: q, k, v upcast to fp32, scores kept in fp32 too
        scores = batch * spec.num_heads * seq * seq
        attention = tokens * 3 * h * 4 + scores * 4 * 3
    else:
        attention = tokens * 3 * h * d + scores_saved(spec, flow, batch, seq, d, p_attn)
    # flash/efficient: the kernel's saved output is c_proj's input (merging the heads is a view)
    attention += linear_inputs_saved(flow, tokens, h, ("c_proj",), counted=qkv and kernel in ("flash", "efficient"),
                                     input_grad=qkv)
    width = spec.intermediate_size
    gelu = 4 if spec.activation == "gelu_new" else 1
    fc_out = attn_out or trains["c_fc"]
    norm = layernorm_saved(spec, flow, tokens)
    return {
        "ln_1": (norm if into or flow.norms_trainable else 0)
        + linear_inputs_saved(flow, tokens, h, ("c_attn",), input_grad=into),
        "attention": attention + (resid_mask if attn_out else 0),
        "ln_2": (norm if attn_out or flow.norms_trainable else 0)
        + linear_inputs_saved(flow, tokens, h, ("c_fc",), input_grad=attn_out),
        "mlp": (tokens * width * d * gelu if fc_out else 0)
        + linear_inputs_saved(flow, tokens, width, ("c_proj",), input_grad=fc_out) + resid_mask,
    }


def gpt2_backward_steps(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> list[BackwardStep]:
    """GPT-2 block backward: the MLP's 4h-wide gradients, then attention's q, k, v gradients."""
    tokens, h, d = batch * seq, spec.hidden_size, flow.d
    mlp = ("mlp.c_fc", "mlp.c_proj")
    return [
        BackwardStep(GPT2_PARTS, ("mlp.c_proj",), tokens * 2 * spec.intermediate_size * d),
        BackwardStep(GPT2_PARTS[:2], (*mlp, "norm2", "attention.c_proj"), tokens * 3 * h * d),
        BackwardStep(GPT2_PARTS[:1], (*mlp, "norm2", "attention.c_proj", "attention.c_attn"),
                     tokens * NORM_BUMP * h),
    ]


# ---------------------------------------------------------------------------- GPT-NeoX


NEOX_PARTS = ("norms", "attention", "mlp")


def neox_block_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int, first: bool) -> dict[str, int]:
    """GPTNeoXLayer with the parallel residual `x + attn(ln1(x)) + mlp(ln2(x))`.

    - norms: x once (both LayerNorms read it), each norm's statistics and output.
    - attention: q and k after partial RoPE (concatenations), then flash SDPA keeps the fused
      qkv output (v is a view of it), the output and log-sum-exp; eager keeps a contiguous v
      and the fp32 probabilities with their cast; both copy the output contiguous for `dense`.
    - mlp: GELU keeps its input; `dense_4h_to_h` keeps GELU's output.
    """
    tokens, h, d = batch * seq, spec.hidden_size, flow.d
    kernel = sdpa_kernel(spec, flow)
    qk = tokens * 2 * h * d
    if kernel in ("flash", "efficient"):
        attention = qk + tokens * 3 * h * d + flash_saved(spec, flow, batch, seq, kernel)
    else:
        attention = qk + tokens * h * d + scores_saved(spec, flow, batch, seq, 4, 0.0)
    norms = layernorm_saved(spec, flow, tokens) + layernorm_saved(spec, flow, tokens, with_input=False)
    return {
        "norms": norms + 2 * tokens * h * d,
        "attention": attention + tokens * h * d,
        "mlp": 2 * tokens * spec.intermediate_size * d,
    }


def neox_backward_steps(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> list[BackwardStep]:
    """GPT-NeoX block backward: MLP gradients, then attention's, then both LayerNorms'."""
    tokens, h, d = batch * seq, spec.hidden_size, flow.d
    mlp = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    return [
        BackwardStep(NEOX_PARTS, ("mlp.dense_4h_to_h",), tokens * 2 * spec.intermediate_size * d),
        BackwardStep(NEOX_PARTS[:2], (*mlp, "attention.dense"), tokens * 3 * h * d),
        BackwardStep(NEOX_PARTS[:1], (*mlp, "attention.dense", "attention.query_key_value"), tokens * NORM_BUMP * h),
    ]


# ---------------------------------------------------------------------------- traced families


def traced(spec: ModelSpec) -> bool:
    """A family without named formulas: its activations come from a traced profile."""
    return spec.family == "traced"


def checkpointed(spec: ModelSpec, flow: Flow) -> bool:
    """Checkpointing modelled by rule (block inputs kept, each block recomputed in its backward);
    a traced family's profile is traced with checkpointing on, recomputation included."""
    return flow.checkpointing and not traced(spec)


def profile(spec: ModelSpec, flow: Flow, batch: int, seq: int):
    """The traced activation profile (estimator/profile.py) of what `flow` saves."""
    from .profile import TraceKey, traced_profile

    key = TraceKey(dtype="fp32" if flow.autocast or flow.d == 4 else "bf16", trainable=flow.base_trainable,
                   lora_targets=tuple(sorted(flow.lora_targets)), lora_dropout=flow.lora_dropout > 0,
                   dequantize=flow.dequantized, int8=flow.int8,
                   attn=flow.attn, autocast=flow.autocast,
                   padded=flow.padded, packed=flow.packed, checkpointing=flow.checkpointing,
                   embeddings_trainable=flow.embeddings_trainable and not flow.base_trainable,
                   lm_head_trainable=flow.head_keeps_input and not flow.base_trainable)
    return traced_profile(spec, key, batch, seq)


def lora_saved(flow: Flow, layer, tokens: int, seq: int) -> dict[str, int]:
    """What LoRA's rank adds to a traced layer, by part. The profile traced each target's branch
    at rank 1 (its input or dropout copy, lora_A's output); each further rank adds a row of
    lora_A's output per token."""
    out: dict[str, int] = {}
    batch = tokens // max(1, seq)
    for lin in layer.linears:
        rows = batch * (lin.positions or seq)  # rows the linear sees (a family may prepend prompt tokens)
        out[lin.part] = out.get(lin.part, 0) + rows * (flow.lora_rank - 1) * flow.d
    return out


def traced_layer_saved(flow: Flow, layer, batch: int, seq: int) -> dict[str, int]:
    parts = {part: poly(batch, seq) for part, poly in layer.saved.items()}
    if flow.lora_targets and not flow.checkpointing:  # checkpointed: LoRA saves in the recomputation
        for part, extra in lora_saved(flow, layer, batch * seq, seq).items():
            parts[part] = parts.get(part, 0) + extra
    return parts


def traced_block_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int, first: bool) -> dict[str, int]:
    """The first layer's saved bytes by part, or the last layer's (the top of backward)."""
    p = profile(spec, flow, batch, seq)
    return traced_layer_saved(flow, p.layers[0] if first else p.layers[p.last], batch, seq)


def traced_backward_steps(spec: ModelSpec, flow: Flow, batch: int, seq: int, first: bool) -> list[BackwardStep]:
    """The traced moments of a layer's backward (LoRA's rank beyond the traced 1 counted alive
    throughout: saved in the forward, or under checkpointing made again by the recomputation —
    transient, as the rest of the recomputed layer is)."""
    p = profile(spec, flow, batch, seq)
    layer = p.layers[0] if first else p.layers[p.last]
    lora = sum(lora_saved(flow, layer, batch * seq, seq).values()) if flow.lora_targets else 0
    saved_lora, recomputed_lora = (0, lora) if flow.checkpointing else (lora, 0)
    total = p.grad_bytes.get(layer.index, 0)
    traced_made = flow.base_trainable  # full-rank: the trace made the same gradients (layers of any kind)
    if not layer.steps:  # no tensor was born in the layer's backward: its saved tensors, all its gradients
        alive = sum(traced_layer_saved(flow, layer, batch, seq).values())
        return [BackwardStep((), (), 0, alive_bytes=alive, made_share=1.0, made_bytes=total if traced_made else None)]
    return [BackwardStep((), (), step.transient(batch, seq) + recomputed_lora, alive_bytes=step.alive(batch, seq) + saved_lora,
                         made_share=step.made / total if total else 1.0,
                         made_bytes=step.made if traced_made else None) for step in layer.steps]


def traced_block_gradients(spec: ModelSpec, flow: Flow, batch: int, seq: int, first: bool) -> int | None:
    """All of one block's gradient bytes as traced (full-rank flows; None otherwise): the first
    block's, or the last one's."""
    if not (traced(spec) and flow.base_trainable):
        return None
    p = profile(spec, flow, batch, seq)
    layer = p.layers[0] if first else p.layers[p.last]
    return p.grad_bytes.get(layer.index, 0)


# ---------------------------------------------------------------------------- a whole step

BLOCKS = {
    "llama": (llama_block_saved, llama_backward_steps),
    "gemma": (llama_block_saved, llama_backward_steps),
    "gpt2": (gpt2_block_saved, gpt2_backward_steps),
    "gpt_neox": (neox_block_saved, neox_backward_steps),
}


def block_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int, first: bool = False) -> dict[str, int]:
    """Saved bytes of one decoder block by part (the first block differs under LoRA; a traced
    family's other blocks are its last block's kind)."""
    if traced(spec):  # (a trace of frozen blocks saves nothing by itself)
        return traced_block_saved(spec, flow, batch, seq, first)
    saved = BLOCKS[spec.family][0](spec, flow, batch, seq, first)
    return saved if flow.blocks_train else dict.fromkeys(saved, 0)


def block_backward_steps(spec: ModelSpec, flow: Flow, batch: int, seq: int, first: bool = False) -> list[BackwardStep]:
    if traced(spec):
        return traced_backward_steps(spec, flow, batch, seq, first)
    return BLOCKS[spec.family][1](spec, flow, batch, seq) if flow.blocks_train else []


def traced_grad_moments(spec: ModelSpec, flow: Flow, batch: int, seq: int, first: bool) -> dict[str, tuple[int, int]]:
    """(saved bytes of the block still alive, other tensors alive) when each weight's gradient is
    made, by the weight's short name, in the first block or the last (traced families only)."""
    p = profile(spec, flow, batch, seq)
    layer = p.layers[0] if first else p.layers[p.last]
    return {short: (m.alive(batch, seq), m.transient(batch, seq)) for short, m in layer.grad_moments.items()}


def traced_grad_moments_anywhere(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> dict[str, tuple[int, int, int]]:
    """For each weight's short name, the worst moment its gradient is made in any layer of the
    model (a hybrid family's linear-attention projections are in other layers than its last):
    (saved bytes of the layers below, of the layer still alive, other tensors alive). Traced
    families only (under checkpointing the layers below hold their inputs: the first is unused)."""
    p = profile(spec, flow, batch, seq)
    saved = [sum(traced_layer_saved(flow, layer, batch, seq).values()) for layer in p.layers]
    worst: dict[str, tuple[int, int, int]] = {}
    below = 0
    for kind in p.order:
        for short, m in p.layers[kind].grad_moments.items():
            moment = (below, m.alive(batch, seq), m.transient(batch, seq))
            if sum(moment) > sum(worst.get(short, (0, 0, 0))):
                worst[short] = moment
        below += saved[kind]
    return worst


def traced_forward_peak(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> tuple[int, int]:
    """(activations, transient) at the worst moment inside a layer's forward: every earlier
    layer's saved tensors, what is shared, and the traced moment of this layer (a chunked linear
    attention's per-chunk state, an MoE layer's expert buffers, ...). Traced families only."""
    p = profile(spec, flow, batch, seq)
    saved = [sum(traced_layer_saved(flow, layer, batch, seq).values()) for layer in p.layers]
    worst = []
    for layer in p.layers:
        moments = [(m.alive(batch, seq), m.transient(batch, seq)) for m in layer.forward_steps]
        worst.append(max(moments, key=sum, default=(0, 0)))
    base = shared_saved(spec, flow, batch, seq) + token_ids(flow, batch, seq)
    best, before = (0, 0), 0
    for kind in p.order:
        alive, transient = worst[kind]
        if before + alive + transient > sum(best):
            best = (base + before + alive, transient)
        before += saved[kind]
    return best


def blocks_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> int:
    """Every decoder block's saved bytes (no checkpointing)."""
    if traced(spec):
        p = profile(spec, flow, batch, seq)
        return sum(layer.count * sum(traced_layer_saved(flow, layer, batch, seq).values()) for layer in p.layers)
    first = sum(block_saved(spec, flow, batch, seq, first=True).values())
    return first + (spec.num_layers - 1) * sum(block_saved(spec, flow, batch, seq).values())


def shared_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> int:
    """Saved once for all blocks: RoPE's tables (a traced family: whatever its layers share)."""
    if traced(spec):
        return profile(spec, flow, batch, seq).shared(batch, seq)
    return rotary_tables(spec, flow, seq, batch)


def checkpointed_layer_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> int:
    """Gradient checkpointing (non-reentrant) keeps only each block's input hidden states."""
    return batch * seq * spec.hidden_size * flow.residual_d


def autocast_weight_copies(spec: ModelSpec, flow: Flow) -> int:
    """Under autocast every linear (lm_head included) casts its fp32 weight to bf16 once per
    forward and keeps the copy for backward (PyTorch AMP's weight cache); 2 bytes a weight.
    Q-GaLore's INT8 layers dequantize on the fly and keep no copy."""
    if not flow.autocast:
        return 0
    cast = spec.linear_params if flow.cast_linear_params is None else flow.cast_linear_params
    blocks = 0 if flow.checkpointing else cast
    return 2 * (blocks + spec.vocab_size * spec.hidden_size)


def rotary_tables(spec: ModelSpec, flow: Flow, seq: int, batch: int = 1) -> int:
    """RoPE's cos and sin for the positions of a batch, (1, s, head_dim) each — (b, s, head_dim)
    when packed rows bring their own position ids — shared by all blocks (computed in the residual
    dtype); Llama-family and GPT-NeoX blocks keep them."""
    if spec.family == "gpt2" or not flow.blocks_train:
        return 0
    return 2 * (batch if flow.packed else 1) * seq * spec.head_dim * flow.residual_d


def token_ids(flow: Flow, batch: int, seq: int) -> int:
    """The int64 input ids, kept by a trainable embedding for its backward."""
    return batch * seq * 8 if flow.embeddings_trainable else 0


def checkpointed_shared(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> int:
    """Inputs every checkpointed block shares: RoPE's tables and the attention mask — eager's
    (b, 1, s, s) in the model dtype, SDPA's boolean one when batches are padded."""
    if traced(spec):
        return profile(spec, flow, batch, seq).shared(batch, seq)
    mask = batch * seq * seq * flow.d if flow.attn == "eager" else (batch * seq * seq if flow.padded else 0)
    kept = 0
    if spec.family == "gpt2" and not flow.embeddings_trainable:
        # frozen GPT-2 embeddings under checkpointing: the token embeddings (and, with embedding
        # dropout, its input too) and the int64 position ids stay referenced until backward ends
        # (measured on the dry run; a trainable model frees them)
        copies = 2 if spec.dropout.get("embd_pdrop", 0.0) > 0 else 1
        kept = copies * batch * seq * spec.hidden_size * flow.d + 8 * seq
    return mask + rotary_tables(spec, flow, seq, batch) + kept


def head_saved(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> dict[str, int]:
    """Final norm, lm_head and the loss, as the *ForCausalLM classes compute them.

    transformers' ForCausalLMLoss upcasts the logits to fp32 (`logits.float()`) and runs
    cross-entropy, whose log-softmax saves its fp32 output (b·s·V·4). The model-dtype logits
    and their fp32 copy are not saved; they are freed once the loss is computed.
    GPT-2 drops out its embeddings (a mask per token and feature, kept only when the embeddings train).
    """
    tokens = batch * seq
    h, V = spec.hidden_size, spec.vocab_size
    if traced(spec):  # the traced loss covers the log-softmax, the labels and any soft-capping
        head = {part: poly(batch, seq) for part, poly in profile(spec, flow, batch, seq).head.items()}
        if flow.lm_head_lora:  # A x, kept for B's weight gradient (added by rule, as the blocks' LoRA)
            head["lm_head LoRA"] = tokens * flow.lora_rank * flow.d
        if flow.loss_chunk:  # the chunked loss is ours, not the family's: its own terms replace the traced loss
            return {"final norm": head["final norm"], **chunked.head_saved(spec, flow, tokens)}
        return head
    if not flow.blocks_train:  # a frozen final norm over hidden states that need no gradient
        final_norm = 0
    elif spec.family in ("gpt2", "gpt_neox"):
        final_norm = layernorm_saved(spec, flow, tokens)
    else:
        final_norm = rmsnorm_saved(spec, flow, tokens, True)
    if flow.loss_chunk:
        saved = {"final norm": final_norm, **chunked.head_saved(spec, flow, tokens)}
    else:
        saved = {
            "final norm": final_norm,
            "lm_head input": tokens * h * flow.d if flow.head_keeps_input else 0,
            "log-softmax": tokens * V * 4,
            "labels": tokens * 8,  # the shifted int64 targets the loss keeps
        }
    if flow.lm_head_lora:  # A x, kept for B's weight gradient
        saved["lm_head LoRA"] = tokens * flow.lora_rank * flow.d
    if flow.autocast:
        saved["autocast weight copies"] = autocast_weight_copies(spec, flow)
    if spec.dropout.get("embd_pdrop", 0.0) > 0 and flow.embeddings_trainable:  # frozen: no gradient, no mask
        saved["embedding dropout"] = tokens * h * flow.mask_bytes
    return saved


def loss_forward_transient(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> int:
    """At the log-softmax: the logits in the model dtype and, in bf16/fp16, their fp32 copy
    (a traced family: everything alive there beyond the saved tensors, masks included).
    The chunked loss: one chunk's (estimator/loss.py `forward_transient`)."""
    if flow.loss_chunk:
        return chunked.forward_transient(spec, flow, batch * seq)
    if traced(spec):
        return profile(spec, flow, batch, seq).forward_transient(batch, seq)
    tokens, V = batch * seq, spec.vocab_size
    return tokens * V * flow.d + (tokens * V * 4 if flow.d < 4 else 0)


def loss_backward(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> tuple[int, int]:
    """At the loss's largest backward moment, before any head gradient: (saved bytes of the head
    already freed, transient bytes). The log-softmax's backward: the nll gradient and the
    log-softmax gradient (fp32, b·s·V each), nothing freed yet. A traced family: its own largest
    moment, which may come later, after the log-softmax's output is freed (a learned logit scale's
    backward, with the fp32 logits it saved still alive)."""
    if traced(spec):
        return profile(spec, flow, batch, seq).loss_backward(batch, seq)
    return 0, 2 * batch * seq * spec.vocab_size * 4


def loss_backward_moments(spec: ModelSpec, flow: Flow, batch: int, seq: int,
                          accumulating: bool) -> dict[str, tuple[int, int, int]]:
    """The loss's backward: (gradient bytes made, saved bytes already freed, transient bytes) at
    each moment, by name. Full loss: the log-softmax's backward, before any gradient (lm_head's comes
    after, in estimate.backward_moments); the chunked loss: estimator/loss.py `backward_moments`."""
    if flow.loss_chunk:
        return chunked.backward_moments(spec, flow, batch, seq, accumulating)
    freed, transient = loss_backward(spec, flow, batch, seq)
    return {"backward: loss": (0, freed, transient)}


def forward_transient(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> int:
    """Alive through the forward only: eager attention's (b, 1, s, s) causal mask in the model
    dtype, and under autocast with checkpointing the autocast cache's bf16 weight copies (the
    checkpointed blocks do not save them, the cache holds them until autocast exits)."""
    if traced(spec):  # in loss_forward_transient
        return 0
    mask = batch * seq * seq * flow.d if flow.attn == "eager" else 0
    mask += batch * seq * seq if flow.padded and flow.attn != "eager" else 0  # SDPA's boolean mask
    cast = spec.linear_params if flow.cast_linear_params is None else flow.cast_linear_params
    cache = 2 * cast if flow.autocast and flow.checkpointing else 0
    return mask + cache


def activation_terms(spec: ModelSpec, flow: Flow, batch: int, seq: int) -> dict[str, int]:
    """Every saved tensor of one micro-batch, by part of the model, summed over layers."""
    if checkpointed(spec, flow):
        layers = {"checkpointed block inputs": spec.num_layers * checkpointed_layer_saved(spec, flow, batch, seq),
                  "checkpointed shared inputs": checkpointed_shared(spec, flow, batch, seq)}
    elif traced(spec):
        layers = {}
        for layer in profile(spec, flow, batch, seq).layers:
            for k, v in traced_layer_saved(flow, layer, batch, seq).items():
                layers[f"blocks: {k}"] = layers.get(f"blocks: {k}", 0) + layer.count * v
        layers["blocks: shared (RoPE tables, masks)"] = shared_saved(spec, flow, batch, seq)
    else:
        first = block_saved(spec, flow, batch, seq, first=True)
        other = block_saved(spec, flow, batch, seq, first=False)
        layers = {f"blocks: {k}": first[k] + (spec.num_layers - 1) * other[k] for k in other}
        layers["blocks: rotary tables"] = rotary_tables(spec, flow, seq, batch)
    layers["embedding: token ids"] = token_ids(flow, batch, seq)
    return {**layers, **{f"head: {k}": v for k, v in head_saved(spec, flow, batch, seq).items()}}
