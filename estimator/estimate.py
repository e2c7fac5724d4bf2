"""The peak memory of a training step: candidate moments of the step, the largest one wins.

A steady-state step (optimizer states exist) allocates its peak at one of a few moments:

    forward: loss          all activations saved, plus the logits and their fp32 copy
    backward: loss         the log-softmax gradient beside the saved activations
    backward: top block    the lm_head gradient, every block's activations, one block's bump
    backward: end          every gradient (layer-wise: one tensor's gradient and update)
    optimizer              every gradient and the optimizer's temporaries

Each moment is a breakdown by category (estimator/constants.py CATEGORIES); the peak is the largest total. Gradient
accumulation keeps the gradients of earlier micro-batches alive through the last forward.

    est = estimate("llama-7b", GaLoreConfig(rank=1024, optimizer="adamw8bit", layerwise=True),
                   TrainSetup(batch_size=1, seq_len=256, dtype="bf16"))
    est.peak_bytes / 2**30, est.phase, est.breakdown
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from math import ceil

from . import activations as act
from . import constants
from . import loss as chunked
from . import memory as mem
from .config import GaLoreConfig, LoRAConfig, MethodConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from .constants import CATEGORIES, DTYPE_BYTES
from .load import load_moment, paged_states, step_setup
from .loss import spec_logit_head
from .spec import ModelSpec, attention_fallback, checkpointing_problem, load_spec, packing_problem
from .targets import targets_problem

CUDA_CONTEXT = 512 * 2**20  # CUDA context, cuBLAS and kernel images: not in the allocator's count
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation: reserved beyond allocated, as a share of the peak
GiB = 2**30


@dataclass
class Estimate:
    """A predicted step: the peak, its phase and breakdown, and every candidate moment."""

    model: str
    method: str
    params_total: int
    params_trainable: int
    peak_bytes: int
    phase: str
    moment: str
    breakdown: dict[str, int]
    overhead_bytes: int
    moments: dict[str, dict[str, int]] = field(default_factory=dict)
    activation_terms: dict[str, int] = field(default_factory=dict)
    distributed_terms: dict[str, int] = field(default_factory=dict)  # several GPUs: what sharding adds or divides
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load_bytes: int = 0  # the peak of building or loading the model and preparing it (estimator/load.py)
    load_moment: str = ""
    load_breakdown: dict[str, int] = field(default_factory=dict)
    params_active: int | None = None  # mixture of experts: the parameters one token computes with
    host_bytes: int | None = None  # CPU offload: the host memory one rank's shards take (None: no offload)
    host_breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def needs_peak_bytes(self) -> int:
        """The larger allocated peak: the step's or the load's."""
        return max(self.peak_bytes, self.load_bytes)

    @property
    def total_bytes(self) -> int:
        """What a GPU must hold: the larger of the step's and the load's peak, plus the overhead."""
        return self.needs_peak_bytes + self.overhead_bytes

    def describe(self) -> str:
        """One line: the model, the method and its main options, the batch, the precision."""
        o = self.options
        method = self.method
        if method in ("lora", "qlora"):
            method += f" (rank {o['rank']}, {o['targets']})"
        elif method in ("galore", "qgalore"):
            extra = ", layer-wise" if o["layerwise"] else ""
            method += f" (rank {o['rank']}, {o['optimizer']}{extra})"
        else:
            method += f" ({o['optimizer']})"
        precision = o["dtype"] + (" + bf16 autocast" if o["autocast"] else "")
        ckpt = ", checkpointing" if o["grad_checkpointing"] else ""
        ckpt += f", chunked loss ({o['loss_chunk_tokens']} tokens)" if o.get("loss") == "chunked" else ""
        accum = f" × {o['grad_accum']} accumulated" if o["grad_accum"] > 1 else ""
        gpus = o.get("gpus", 1)
        per_gpu = (f" · per GPU of {gpus} (batch {o['batch_size'] // gpus} each), "
                   f"shard {o.get('shard', 'none')}" if gpus > 1 else "")
        per_gpu += ", CPU offload" if o.get("cpu_offload") else ""
        return (f"{self.model} · {method} · batch {o['batch_size']} × {o['seq_len']} tokens{accum} · "
                f"{precision}{ckpt} · {o['attn_implementation']}{per_gpu}")

    def to_dict(self) -> dict:
        """The estimate's JSON object (`python -m estimator --json`, the app's API, summary.json's
        "predicted"): model, method, params, peak_bytes, phase, breakdown, overhead_bytes, ..."""
        return {
            "model": self.model,
            "method": self.method,
            "params": {"total": self.params_total, "trainable": self.params_trainable,
                       **({"active": self.params_active} if self.params_active is not None else {})},
            "peak_bytes": self.peak_bytes,
            "phase": self.phase,
            "moment": self.moment,
            "breakdown": dict(self.breakdown),
            "overhead_bytes": self.overhead_bytes,
            "moments": {k: dict(v) for k, v in self.moments.items()},
            "activation_terms": dict(self.activation_terms),
            **({"distributed_terms": dict(self.distributed_terms)} if self.distributed_terms else {}),
            **({"host": {"peak_bytes": self.host_bytes, "breakdown": dict(self.host_breakdown)}}
               if self.host_bytes is not None else {}),
            "options": dict(self.options),
            "notes": list(self.notes),
            "load": {"peak_bytes": self.load_bytes, "moment": self.load_moment,
                     "breakdown": dict(self.load_breakdown)},
        }


def setup_options(setup: TrainSetup) -> dict:
    """The setup as an estimate's options: the loss and its chunk only when not the default full loss."""
    options = asdict(setup)
    if setup.loss == "full":
        del options["loss"], options["loss_chunk_tokens"]
    if not setup.packed:
        del options["packed"]
    if not setup.cpu_offload:
        del options["cpu_offload"]
    return options


def make_flow(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, device: str) -> act.Flow:
    """Which tensors the step saves, from the method's trainability and the setup."""
    full_rank = not isinstance(method, LoRAConfig)
    lora = isinstance(method, LoRAConfig)
    targets = frozenset(lin.short for lin in mem.target_linears(spec, method.targets)) if lora else frozenset()
    saved = method.saved_modules if lora else ()
    cast = None
    if isinstance(method, QGaLoreConfig):  # INT8 layers dequantize per matmul: nothing to cast and keep
        cast = sum(lin.numel * lin.count for lin in spec.linears if not mem.is_target(lin, method.targets))
    return act.Flow(
        d=2 if setup.autocast else DTYPE_BYTES[setup.dtype],  # autocast: matmuls run in bf16
        base_trainable=full_rank,
        norms_trainable=full_rank,
        embeddings_trainable=full_rank or "embed_tokens" in saved,
        lm_head_trainable=full_rank or "lm_head" in saved,
        copies=lora,
        lm_head_lora=lora and method.head_lora,
        lora_targets=targets,
        lora_rank=method.rank if lora else 0,
        lora_dropout=float(method.dropout) if lora else 0.0,
        attn=setup.attn_implementation,
        device=device,
        checkpointing=setup.grad_checkpointing,
        autocast=setup.autocast,
        cast_linear_params=cast,
        padded=setup.padded or setup.packed,  # packed rows: a block-diagonal mask from the position ids
        dequantized=isinstance(method, QLoRAConfig),
        int8=isinstance(method, QGaLoreConfig),
        packed=setup.packed,
        loss_chunk=setup.loss_chunk_tokens if setup.loss == "chunked" else 0,
        softcap=setup.loss == "chunked" and spec_logit_head(spec).softcap is not None,
    )


def check_against_model(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> list[str]:
    """Problems only the model can reveal (raise), and notes worth showing (returned)."""
    problems, notes = [], []
    if isinstance(method, (LoRAConfig, GaLoreConfig)):
        experts = mem.projected_experts(spec, method)
        chosen = mem.target_linears(spec, method.targets) + [ex.matrix for ex in experts]
        problem = targets_problem(method.targets, [lin.short for lin in spec.held_linears], bool(chosen), spec.name,
                                  [ex.short for ex in spec.experts], _projects_experts(method), _METHOD_NAMES[method.method])
        if problem:
            problems.append(problem)
        else:
            dims = [min(lin.in_features, lin.out_features) for lin in chosen]
            if isinstance(method, LoRAConfig) and method.head_lora:
                dims.append(min(spec.hidden_size, spec.vocab_size))
            smallest = min(dims)
            if method.rank > smallest:
                problems.append(f"rank={method.rank} is above the smallest target dimension ({smallest}) of "
                                f"{spec.name}; use rank ≤ {smallest}")
    if setup.loss == "chunked" and isinstance(method, LoRAConfig) and method.head_lora:
        problems.append("--loss chunked computes lm_head's matmul itself and cannot run LoRA on it; drop lm_head "
                        "from targets (modules_to_save=lm_head composes) or use --loss full")
    if setup.loss == "chunked" and spec_logit_head(spec).problem:
        problems.append(spec_logit_head(spec).problem)
    if setup.grad_checkpointing and (problem := checkpointing_problem(spec.model_type)):
        problems.append(problem)
    if setup.packed and (problem := packing_problem(spec.model_type)):
        problems.append(problem)
    if problems:
        raise ValueError("; ".join(problems))
    if spec.max_position and setup.seq_len > spec.max_position:
        notes.append(f"seq_len {setup.seq_len} is above the model's maximum position ({spec.max_position})")
    if isinstance(method, QLoRAConfig) and setup.autocast:
        notes.append("QLoRA under autocast: activations are approximate (its compute dtype already casts; "
                     "measured about 5% above this estimate)")
    if setup.autocast and spec.family not in ("llama", "gemma"):
        notes.append(f"autocast is modeled for the Llama family; {spec.model_type} is approximate")
    if not spec.exact_family:
        notes.append(f"{spec.model_type}: activations traced from transformers' own forward on CPU kernels "
                     f"(no named formulas for this family)")
    notes += _expert_notes(spec, method)
    if spec.idle_params:
        notes.append(f"{spec.idle_params / 1e6:,.1f} M parameters ({', '.join(spec.unreached_modules[:3])}) get no "
                     "gradient in a text-only step: held as weights, with no gradient and no optimizer state")
    return notes


_METHOD_NAMES = {"full": "full training", "lora": "LoRA", "qlora": "QLoRA", "galore": "GaLore", "qgalore": "Q-GaLore"}


def _projects_experts(method: MethodConfig) -> bool:
    """Can fused expert weights be targets of `method` (GaLore and Q-GaLore project them; LoRA cannot)?"""
    return isinstance(method, GaLoreConfig)


def _expert_notes(spec: ModelSpec, method: MethodConfig) -> list[str]:
    """What a method does with a mixture-of-experts model's fused expert weights."""
    if not spec.experts:
        return []
    names = ", ".join(sorted({ex.short for ex in spec.experts}))
    share = f"{spec.expert_params / 1e9:.3f} B parameters, {100 * spec.expert_params / spec.params_total:.0f}% of the model"
    if isinstance(method, LoRAConfig):
        return [f"fused expert weights ({names}: {share}) are frozen under {_METHOD_NAMES[method.method]}: adapters go on "
                f"attention and dense or shared-expert linears only (no LoRA on 3-D expert parameters, peft's "
                f"target_parameters, here)"]
    if isinstance(method, GaLoreConfig):
        experts = mem.projected_experts(spec, method)
        if not experts:
            return [f"fused expert weights ({names}: {share}) are not in targets={method.targets!r}: plain AdamW states"]
        projected = ", ".join(sorted({ex.short for ex in experts}))
        note = (f"{_METHOD_NAMES[method.method]} projects each of the {experts[0].num_experts} experts' matrices of "
                f"{projected} separately (a projection and low-rank moments per expert)")
        if isinstance(method, QGaLoreConfig):
            note += "; the fused expert weights stay in the weight dtype (INT8 is for linear layers)"
        return [note]
    return []


def gradients_alive_before(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, grads: int,
                           layout: Layout | None = None) -> int:
    """Gradients that exist before this micro-batch's backward makes its own.

    Accumulating: those of the earlier micro-batches. Layer-wise GaLore accumulates projected
    gradients (ℓ elements per matrix, weight dtype) for the projected weights and full gradients
    for the rest — unless ZeRO-1 gives the projection to one rank only (full gradients then).
    In DDP's buckets (`layout.buckets`) every gradient exists from the start of the step.
    """
    layout = layout or Layout()
    if layout.buckets:
        return grads
    if setup.grad_accum == 1:
        return 0
    if not (isinstance(method, GaLoreConfig) and method.layerwise) or not layout.projected_accumulation:
        return grads
    d = DTYPE_BYTES[setup.dtype]
    total = 0
    experts = mem.projected_experts(spec, method)
    for lin in (*spec.linears, *(ex.matrix for ex in experts)):  # an expert's matrix: projected, as a linear
        if mem.is_target(lin, method.targets):
            total += lin.count * galore_low_rank_numel(lin, method) * d
        else:
            total += lin.count * lin.in_features * lin.out_features * d
        if lin.bias:
            total += lin.count * lin.out_features * d
    return total + sum(mem._non_linear_tensors(spec, experts)) * d


def largest_linear(spec: ModelSpec) -> int:
    return max(lin.in_features * lin.out_features for lin in spec.linears)


def dequant_transient(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> int:
    """QLoRA and Q-GaLore dequantize one weight at a time for its matmul (compute dtype)."""
    if isinstance(method, QLoRAConfig):
        return largest_linear(spec) * DTYPE_BYTES[method.compute_dtype]
    if isinstance(method, QGaLoreConfig):
        return int8_dequant_temps(largest_linear(spec), DTYPE_BYTES[setup.dtype])
    return 0


def int8_dequant_temps(numel: int, d: int) -> int:
    """lowrank.quant.dequantize of an INT8 weight: the output in the compute dtype, built through
    one fp32 work block of at most constants.QUANT_BLOCK elements."""
    return numel * d + 4 * min(numel, constants.QUANT_BLOCK)


def galore_low_rank_numel(lin, method: GaLoreConfig) -> int:
    r = min(method.rank, lin.in_features, lin.out_features)
    if method.proj_type == "full":
        return r * r
    return r * max(lin.in_features, lin.out_features)


def galore_adam_temps(numel: int, method: GaLoreConfig, d: int) -> int:
    """lowrank.galore's Adam on one low-rank gradient: 32-bit keeps the gradient and the
    direction (2ℓ in the weight dtype); 8-bit dequantizes both moments to fp32 beside the
    gradient and an fp32 copy of it (13ℓ with fp32 weights, 14ℓ with bf16, and the absmax)."""
    if method.optimizer == "adamw8bit" and numel >= constants.ADAM8_MIN_SIZE:
        return (13 if d == 4 else 14) * numel + 4 * ceil(numel / constants.ADAM8_BLOCK)
    return 2 * numel * (4 if method.optimizer == "adamw8bit" else d)


def galore_plain_temps(numel: int, method: GaLoreConfig, d: int) -> int:
    """AdamW on a non-projected tensor, in slices of constants.GALORE_SLICE elements: a denominator
    slice (32-bit); 8-bit: the slice's two dequantized fp32 moments and, with fp32 weights, the
    requantized codes and their absmax (9 bytes an element), with bf16 weights the gradient's
    fp32 copy (12 bytes an element) — measured in tests/test_vocabulary.py."""
    s = min(numel, constants.GALORE_SLICE)
    if method.optimizer == "adamw8bit" and numel >= constants.ADAM8_MIN_SIZE:
        if d == 4:  # the moments, then the requantized codes and their absmax beside them
            return 9 * s + 4 * ceil(s / constants.ADAM8_BLOCK)
        return 12 * s  # the moments and an fp32 copy of the gradient slice
    return s * (4 if method.optimizer == "adamw8bit" else d)


def galore_update_temps(lin, method: GaLoreConfig, d: int) -> int:
    """Temporaries of one projected weight's update: Adam on ℓ; then for Q-GaLore the update
    direction (ℓ, weight dtype) is projected back into a full-size update, which stochastic
    rounding adds to the INT8 weight. The direction is alive through both: beside the projection's
    read (lowrank.quant dequantizes it for the matmul, whose output is the full-size update) and
    beside the rounding's work blocks."""
    low = galore_low_rank_numel(lin, method)
    temps = galore_adam_temps(low, method, d)
    if isinstance(method, QGaLoreConfig):
        r = min(method.rank, lin.in_features, lin.out_features)
        proj = r * min(lin.in_features, lin.out_features) * d
        numel = lin.in_features * lin.out_features
        add_back = max(projection_read_temps(lin, method, d), numel * d + max(proj, stochastic_rounding_temps(numel)))
        temps = max(temps, low * d + add_back)
    return temps


def projection_read_temps(lin, method: GaLoreConfig, d: int) -> int:
    """Reading one projection for a matmul: nothing for GaLore's dense P; Q-GaLore dequantizes
    its P (r × min(m, n)) into the weight dtype, through an unpacked copy of INT4 codes and one
    fp32 work block (lowrank.quant)."""
    if not isinstance(method, QGaLoreConfig):
        return 0
    numel = min(method.rank, lin.in_features, lin.out_features) * min(lin.in_features, lin.out_features)
    if method.proj_bits == 16:
        return numel * d
    unpacked = 2 * ceil(numel / 2) if method.proj_bits == 4 else 0
    return unpacked + int8_dequant_temps(numel, d)


def expert_update_temps(lin, method: GaLoreConfig, d: int) -> int:
    """Temporaries of one expert's update (`lin`: its matrix): Adam on its ℓ, or the update
    direction (ℓ) beside the projection read for the in-place GEMM into the float weight —
    fused expert weights are never INT8, Q-GaLore's included."""
    low = galore_low_rank_numel(lin, method)
    return max(galore_adam_temps(low, method, d), low * d + projection_read_temps(lin, method, d))


def stochastic_rounding_temps(numel: int) -> int:
    """lowrank.quant.stochastic_update_ on one block: two fp32 copies of it and per-group work
    (measured: 8.13 bytes per element of a block, tests/estimator/test_memory.py)."""
    block = min(numel, constants.QUANT_BLOCK)
    return 8 * block + block * 33 // 256


def update_transient(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> int:
    """Temporaries of the optimizer step at its worst tensor (tensors are updated one by one).

    Fused torch AdamW, bitsandbytes AdamW8bit and SGD update in place. torch's Adafactor
    rebuilds the full second-moment estimate `row_var @ col_var` of the matrix it updates (one
    full-size tensor). GaLore: see galore_update_temps and galore_plain_temps.
    """
    d = DTYPE_BYTES[setup.dtype]
    if isinstance(method, GaLoreConfig):
        # a fused expert weight is updated one expert's matrix at a time, each projected on its own
        matrices = [lin for lin in spec.linears if mem.is_target(lin, method.targets)]
        worst = max([galore_update_temps(lin, method, d) for lin in matrices]
                    + [expert_update_temps(ex.matrix, method, d) for ex in mem.projected_experts(spec, method)]
                    + [galore_plain_temps(n, method, d) for n in _plain_tensors(spec, method)])
        return worst
    if method.optimizer == "adafactor":
        if isinstance(method, LoRAConfig):
            largest = max(method.rank * max(lin.in_features, lin.out_features)
                          for lin in mem.target_linears(spec, method.targets))
            return largest * mem.adapter_dtype_bytes(method, setup)
        # a block's fused expert weights come one after the other: the first one's update is still
        # referenced while the second one's estimate is built
        experts = [sum(ex.numel for ex in spec.experts)] if spec.experts else []
        return max([lin.in_features * lin.out_features for lin in spec.linears]
                   + experts + [spec.vocab_size * spec.hidden_size]) * d
    return 0


def _plain_tensors(spec: ModelSpec, method: GaLoreConfig) -> list[int]:
    """numel of the tensors GaLore leaves to plain AdamW."""
    out = mem._non_linear_tensors(spec, mem.projected_experts(spec, method))
    for lin in spec.linears:
        if not mem.is_target(lin, method.targets):
            out.append(lin.in_features * lin.out_features)
        if lin.bias:
            out.append(lin.out_features)
    return out


def layerwise_hooks(spec: ModelSpec, method: GaLoreConfig, setup: TrainSetup) -> list[tuple[str, int, int]]:
    """(weight's gradient key, gradients, transient) at the worst moments of a layer-wise hook in a block.

    The key is the weight's short name, a fused expert weight's `ExpertShape.grad_key`: a shared
    expert's `down_proj` linear is updated at its own moment, not at the routed experts'.

    First the full gradient of a projected weight sits beside its projection R (ℓ elements);
    the gradient is then freed and Adam's temporaries (and Q-GaLore's full-size update) follow.
    A fused expert weight (E matrices) is projected whole, E·ℓ, then updated expert by expert:
    the other experts' projections wait beside one expert's temporaries. A weight left to plain
    AdamW (not a target; a fused expert weight under Q-GaLore) is updated beside its full gradient.
    """
    d = DTYPE_BYTES[setup.dtype]
    projected = [lin for lin in spec.linears if mem.is_target(lin, method.targets)]
    hooks = [(lin.short, lin.in_features * lin.out_features * d, galore_low_rank_numel(lin, method) * d)
             for lin in projected]
    hooks += [(lin.short, 0, galore_update_temps(lin, method, d)) for lin in projected]
    experts = mem.projected_experts(spec, method)
    for ex in experts:
        low = galore_low_rank_numel(ex.matrix, method) * d
        hooks += [(ex.grad_key, ex.numel * d, ex.num_experts * low + projection_read_temps(ex.matrix, method, d)),
                  (ex.grad_key, 0, (ex.num_experts - 1) * low + expert_update_temps(ex.matrix, method, d))]
    plain = {(lin.short, lin.in_features * lin.out_features) for lin in spec.linears
             if not mem.is_target(lin, method.targets)}
    plain |= {(ex.grad_key, ex.numel) for ex in spec.experts if ex not in experts}
    hooks += [(short, n * d, galore_plain_temps(n, method, d)) for short, n in sorted(plain)]
    return hooks


def backward_moments(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, flow: act.Flow,
                     before: int, grads: int) -> dict[str, tuple[int, int, int]]:
    """(gradients, activations, transient) at the worst bump of the top and of the bottom block.

    Top block: every block's activations are alive and only the head's gradients exist.
    Bottom block: every other gradient exists and only the first block's activations remain.
    With checkpointing the block being differentiated is recomputed: its saved tensors are
    short-lived (transient) beside the checkpointed block inputs (activations).
    Layer-wise GaLore keeps no gradient but the one its hook is consuming (`layerwise_hooks`);
    a tied embedding's gradient waits for the end of backward, when both uses have added theirs:
    lm_head's side is alive through the blocks' backward in autograd's input buffer, not yet a
    .grad (so: transient, as the tracker sees it).
    """
    b, s = setup.batch_size, setup.seq_len
    d = DTYPE_BYTES[setup.dtype]
    layerwise = isinstance(method, GaLoreConfig) and method.layerwise
    block_grads = {} if layerwise else mem.block_gradient_bytes(spec, method, setup)
    head_grads = 0 if layerwise else mem.head_gradient_bytes(spec, method, setup)
    if isinstance(method, LoRAConfig):  # modules_to_save's embedding copy
        embedding_grads = spec.vocab_size * spec.hidden_size * d if flow.embeddings_trainable else 0
    else:
        embedding_grads = 0 if layerwise or spec.tie_word_embeddings else spec.embedding_params * d
    tied_pending = spec.vocab_size * spec.hidden_size * d if layerwise and spec.tie_word_embeddings else 0
    # a traced QLoRA profile dequantizes each weight where the real step does
    dequant = 0 if act.traced(spec) and isinstance(method, (QLoRAConfig, QGaLoreConfig)) else \
        dequant_transient(spec, method, setup)
    hooks = layerwise_hooks(spec, method, setup) if layerwise else []
    traced_hooks = act.traced(spec) and bool(hooks)  # each hook beside the moment its gradient is made
    if hooks and not traced_hooks:  # a hook runs inside its block's backward: the gradient flowing
        # through the block and the one into its linear's input (the widest, when the largest
        # update runs) are alive beside it
        widest = max(lin.in_features for lin in spec.linears)
        flowing = b * s * flow.d * (spec.hidden_size + widest)
        hooks = [(short, grads_, temps + flowing) for short, grads_, temps in hooks]
    tied_new = spec.vocab_size * spec.hidden_size * d if flow.tied_trainable(spec) else 0
    n = spec.num_layers
    out = {}
    all_blocks = 0 if act.checkpointed(spec, flow) else act.blocks_saved(spec, flow, b, s)
    ids = act.token_ids(flow, b, s)
    if act.checkpointed(spec, flow):  # kept through backward: each block's input, the shared inputs
        ckpt, shared = act.checkpointed_layer_saved(spec, flow, b, s), act.checkpointed_shared(spec, flow, b, s)
    else:
        shared = act.shared_saved(spec, flow, b, s)
    for where, first in (("top block", False), ("bottom block", True)):
        parts = act.block_saved(spec, flow, b, s, first=first)
        candidates = []
        had: tuple[str, ...] = ()
        made_before = 0
        for step in act.block_backward_steps(spec, flow, b, s, first=first):
            alive = act.step_alive(parts, step)
            made = act.step_made(step, block_grads)
            if step.made_share is not None:  # traced: the gradients made since the previous moment
                newest, made_before = made - made_before, made
            else:
                newest = max([block_grads.get(k, 0) for k in step.grads_of if k not in had], default=0)
            had = step.grads_of
            if act.checkpointed(spec, flow):
                activations = (n if where == "top block" else 1) * ckpt + shared + ids
                recomputed = alive
            else:  # at the top, every other block's saved tensors wait
                activations = alive + (all_blocks - sum(parts.values()) if where == "top block" else 0) + shared + ids
                recomputed = 0
            if before:  # accumulating: each new gradient is added to the old one as soon as it is made
                gradients = before  # a tied embedding's lm_head side waits in autograd's buffer
                recomputed += tied_new
                if not layerwise:  # the newest gradient of the step, just before it is added
                    candidates.append((gradients, activations, recomputed + newest + step.transient + dequant))
            elif layerwise:  # each gradient is consumed by its hook as soon as it is made
                gradients = 0
                recomputed += tied_pending  # not a .grad yet: autograd's buffer holds it
            elif where == "top block":
                gradients = head_grads - tied_new + made
                recomputed += tied_new
            else:
                own = act.traced_block_gradients(spec, flow, b, s, first=True) if block_grads else None
                own = sum(block_grads.values()) if own is None else own
                gradients = grads - embedding_grads - own + made - tied_new
                recomputed += tied_new
            paired = [] if traced_hooks else hooks
            for _, extra_grads, extra in [("", 0, step.transient + dequant), *paired]:
                candidates.append((gradients + extra_grads, activations, recomputed + extra))
        if traced_hooks:  # beside the block's saved tensors still alive and the other tensors then
            at_grad = act.traced_grad_moments(spec, flow, b, s, first)
            waiting = shared + ids + (all_blocks - sum(parts.values()) if where == "top block" else 0)
            pending = tied_pending if not before else tied_new
            elsewhere = [short for short, _, _ in hooks if short not in at_grad]  # another kind of layer's
            anywhere = act.traced_grad_moments_anywhere(spec, flow, b, s) if elsewhere else {}
            for short, extra_grads, extra in hooks:
                if short in at_grad:
                    alive, others = at_grad[short]
                    candidates.append((before + extra_grads, waiting + alive, pending + others + extra))
                elif short in anywhere:  # a weight of another kind of layer (hybrid families): where it is
                    below, alive, others = anywhere[short]  # checkpointed: the blocks below keep their inputs only
                    held = waiting if act.checkpointed(spec, flow) else shared + ids + below
                    candidates.append((before + extra_grads, held + alive, pending + others + extra))
                else:
                    alive, others = max(at_grad.values(), key=sum, default=(0, 0))
                    candidates.append((before + extra_grads, waiting + alive, pending + others + extra))
        if where == "top block":  # before the top block's backward: every block's saved tensors
            if act.checkpointed(spec, flow):
                blocks = n * act.checkpointed_layer_saved(spec, flow, b, s) + act.checkpointed_shared(spec, flow, b, s)
            else:
                blocks = all_blocks + act.shared_saved(spec, flow, b, s)
            blocks += act.token_ids(flow, b, s)
        if layerwise and where == "top block" and spec.lm_head_params:
            # lm_head's hook: its gradient and AdamW slices beside every block's activations and
            # the final norm's (its backward comes next). All of them: the top block's first
            # backward moment is later, after the head's backward has freed what the head saved
            # of the top block's output (HunYuan-V4's hyper-connection head keeps the last block's
            # streams), so it is not the moment to start from.
            alive = blocks + act.head_saved(spec, flow, b, s)["final norm"]
            lm_head_grad = 0 if before else spec.lm_head_params * d  # accumulating: already in `before`
            hidden_grad = b * s * spec.hidden_size * flow.d  # flowing on into the final norm
            candidates.append((before + lm_head_grad, alive,
                               galore_plain_temps(spec.lm_head_params, method, d) + hidden_grad))
        if where == "top block":
            if before:  # the head's new gradients wait beside every block's activations until added
                candidates.append((before, blocks, head_grads))
            if flow.head_keeps_input and not flow.loss_chunk:  # the chunked loss: its own moments
                # lm_head's backward: the logits' gradient (model dtype) is alive beside the new
                # weight gradient, its input and the final norm's saved tensors; the new gradient
                # either becomes .grad or waits to be added to the accumulated one
                head = act.head_saved(spec, flow, b, s)
                alive = blocks + head["final norm"] + head["lm_head input"]
                new = spec.vocab_size * spec.hidden_size * d if flow.lm_head_trainable else head_grads  # LoRA's
                logits_grad = b * s * spec.vocab_size * flow.d
                candidates.append((before, alive, new + logits_grad) if before else (new, alive, logits_grad))
        if candidates:  # none when no gradient flows through the blocks (only lm_head trains)
            out[f"backward: {where}"] = max(candidates, key=sum)
    return out


@dataclass(frozen=True)
class Layout:
    """How a data-parallel rank holds what one GPU alone would (estimator/distributed.py).

    buckets: gradients live in DDP's buckets for the whole step.
    optimizer: this rank's optimizer-state bytes (ZeRO-1: its share), None for all of them.
    projected_accumulation: layer-wise GaLore may sum projected gradients across micro-batches.
    """

    buckets: bool = False
    optimizer: int | None = None
    projected_accumulation: bool = True


def sliding_window_active(spec: ModelSpec, seq_len: int) -> bool:
    """Does attention slide at this length (a window shorter than the sequence, switched on)?"""
    window = spec.sliding_window
    return bool(window) and seq_len > window and spec.config.get("use_sliding_window", True) is not False


def estimate_spec(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, device: str = "cuda") -> Estimate:
    """Predict one steady-state training step of `spec` with `method` and `setup` (per GPU when
    `setup.gpus` > 1: estimator/distributed.py)."""
    from . import distributed

    attn, attn_note = attention_fallback(spec, setup.attn_implementation)  # what the model really runs
    if attn != setup.attn_implementation:
        setup = replace(setup, attn_implementation=attn)
    notes = check_against_model(spec, method, setup) + ([attn_note] if attn_note else [])
    if spec.exact_family and sliding_window_active(spec, setup.seq_len):
        # the named formulas have no sliding-window mask: this length is traced (estimator/profile.py)
        spec = replace(spec, family="traced", exact_family=False)
        notes.append(f"sequences longer than the {spec.sliding_window}-token sliding window: activations traced "
                     f"from transformers' own forward on CPU kernels")
    given, (setup, recipe_notes) = setup, step_setup(method, setup)  # the peft recipe's fp32 and checkpointing
    if setup.gpus > 1:
        moments, terms, shared = distributed.rank_moments(spec, method, setup, device)
    else:
        (moments, terms), shared = step_moments(spec, method, setup, device), {}
    moments = paged_states(method, device, moments, recipe_notes)
    name = max(moments, key=lambda k: sum(moments[k].values()))
    breakdown = {c: moments[name][c] for c in CATEGORIES}
    peak = sum(breakdown.values())
    load = load_moment(spec, method, given, device)
    host = distributed.host_memory(spec, method, setup) if setup.cpu_offload else None
    if host is not None:
        notes.append(f"CPU offload: each GPU's process also holds {sum(host.values()) / GiB:,.2f} GiB of host memory "
                     f"(its shards of parameters, gradients and optimizer states); GPU fits and counts leave it out")
    overhead = CUDA_CONTEXT + int(ALLOCATOR_SLACK * max(peak, load.peak_bytes)) if device == "cuda" else 0
    # field by field (the duplicates tool sees the shape of ModelSpec's construction in spec.py)
    return Estimate(
        model=spec.name,
        method=method.method,
        params_total=spec.params_total,
        # parameters no gradient reaches still require one (the trainer counts them): no gradient, no state
        params_trainable=mem.params_trainable(spec, method),
        peak_bytes=peak,
        phase=name.split(":")[0],
        moment=name,
        breakdown=breakdown,
        overhead_bytes=overhead,
        moments=moments,
        activation_terms=terms,
        distributed_terms=shared,
        options={**method.to_dict(), **setup_options(given)},
        notes=notes + recipe_notes,
        load_bytes=load.peak_bytes,
        load_moment=load.moment,
        load_breakdown=load.breakdown,
        params_active=spec.params_active if spec.experts else None,
        host_bytes=None if host is None else sum(host.values()),
        host_breakdown=host or {},
    )


def step_moments(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, device: str,
                 layout: Layout | None = None) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """The candidate peak moments of one GPU's step (each a breakdown by category) and the named
    activation terms; `layout`: how a data-parallel rank differs (DDP's buckets, ZeRO-1's share)."""
    layout = layout or Layout()
    flow = make_flow(spec, method, setup, device)
    b, s = setup.batch_size, setup.seq_len
    d = DTYPE_BYTES[setup.dtype]
    static = {
        "weights": mem.weights_bytes(spec, method, setup),
        "adapters": mem.adapters_bytes(spec, method, setup),
        "optimizer": mem.optimizer_bytes(spec, method, setup) if layout.optimizer is None else layout.optimizer,
    }
    grads = mem.gradient_bytes(spec, method, setup)
    layerwise = isinstance(method, GaLoreConfig) and method.layerwise
    before = gradients_alive_before(spec, method, setup, grads, layout)
    terms = act.activation_terms(spec, flow, b, s)
    saved = sum(terms.values())
    update = update_transient(spec, method, setup)

    def moment(gradients: int, activations: int, transient: int) -> dict[str, int]:
        return {**static, "gradients": gradients, "activations": activations, "transient": transient}

    moments = {
        "forward: loss": moment(before, saved, act.loss_forward_transient(spec, flow, b, s)
                                + act.forward_transient(spec, flow, b, s)),
    }
    for name, (made, freed, transient) in act.loss_backward_moments(spec, flow, b, s, bool(before)).items():
        moments[name] = moment(before + made, saved - freed, transient)
    if flow.loss_chunk:
        made, activations, transient = chunked.final_norm_moment(
            spec, flow, b, s, mem.head_gradient_bytes(spec, method, setup), bool(before), layerwise)
        moments["backward: final norm"] = moment(before + made, activations, transient)
    if act.traced(spec):  # inside a layer's forward (only traced families have such moments)
        moments["forward: a block"] = moment(before, *act.traced_forward_peak(spec, flow, b, s))
    for name, values in backward_moments(spec, method, setup, flow, before, grads).items():
        moments[name] = moment(*values)
    if layerwise:
        # the last hooks: the embeddings' gradients and their AdamW slices; every other gradient,
        # accumulated or not, has been consumed by its hook by now
        embedding = spec.vocab_size * spec.hidden_size
        positions = spec.embedding_params - embedding  # learned positions (GPT-2), updated first
        tied = embedding * d if spec.tie_word_embeddings else 0  # its lm_head side, still pending
        # accumulating, the first micro-batches' sum is not yet added either (three copies, as below)
        ends = [(embedding * d, max((3 if before else 2) * tied, galore_plain_temps(embedding, method, d)))]
        if positions:  # beside it, the token embedding's gradient accumulated so far
            ends.append((positions * d + (embedding * d if before else 0),
                         tied + galore_plain_temps(positions, method, d)))
        moments["backward: end"] = max((moment(grad, 0, temps) for grad, temps in ends), key=lambda m: sum(m.values()))
    else:
        # a tied embedding gets two gradients, lm_head's and the input side's; autograd's input
        # buffer adds them out of place, so the new one and the sum coexist with the first
        # (accumulating, the first is not yet added either: three copies beside the accumulated ones)
        tied = flow.tied_trainable(spec)
        copies = 3 if before else 2
        embedding = spec.vocab_size * spec.hidden_size * d
        ends = [moment(grads, 0, copies * embedding if tied else 0)]
        if flow.embeddings_trainable:
            # the embedding's backward makes its gradient while the gradient flowing into it (b·s·h)
            # and the token ids are alive; the new gradient is a .grad at once unless it is added to
            # another one: the accumulated gradient, or (tied) lm_head's side still in the buffer
            flowing = b * s * spec.hidden_size * d
            new = embedding if before or tied else 0
            pending = embedding if tied else 0
            ends.append(moment(grads - (embedding if tied and not before else 0), act.token_ids(flow, b, s),
                               pending + new + flowing))
        moments["backward: end"] = max(ends, key=lambda m: sum(m.values()))
        moments["optimizer"] = moment(grads, 0, update)
    return moments, terms


def estimate(model: str | ModelSpec, method: MethodConfig, setup: TrainSetup | None = None,
             device: str = "cuda", trust_remote_code: bool = False) -> Estimate:
    """Predict the memory of one training step. `model`: preset, config path, folder, hub id or ModelSpec."""
    spec = model if isinstance(model, ModelSpec) else load_spec(model, trust_remote_code)
    return estimate_spec(spec, method, setup or TrainSetup(), device)
