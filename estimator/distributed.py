"""Per-GPU memory of a data-parallel step: the terms `--gpus N --shard S` add or divide.

Every rank computes `batch_size / N` rows of each micro-batch, so activations are a one-GPU
estimate's at the per-rank batch. The rest depends on the strategy (lowrank/distributed.py):

    none        DDP: weights and states whole; gradients live in DDP's buckets for the whole
                step (`gradient_as_bucket_view`: the buckets are the gradients), so each new
                gradient is added to its bucket, as under gradient accumulation
    optimizer   ZeRO-1: as DDP, but a rank keeps the optimizer states of its share of the
                tensors — torch's ZeroRedundancyOptimizer rule, largest first to the emptiest
                rank — and the peak is the rank with the most
    gradients   FSDP2 without resharding after forward (ZeRO-2): each rank stores a padded 1/N
                shard of every parameter, gradient and state; a block's parameters are gathered
                whole in forward and stay gathered until its backward has reduce-scattered
                its gradients
    full        FSDP2 (ZeRO-3): a block's parameters are gathered for its forward, freed, and
                gathered again for its backward, where the next block's gather is already
                in flight (prefetch)

FSDP's named terms: sharded parameters, gradients and states (each tensor's first dimension
padded to a multiple of N: a mixture of experts' fused (E, m, n) weight splits its experts, or,
with fewer experts than ranks, its rows, gathered through a temporary); the root module's
gathered parameters (embeddings, final norm, lm_head); the gathered block being
computed; the flat all-gather buffer of the block prefetched; the flat reduce-scatter input of
the previous block (kept until the next reduce-scatter starts); the root's gradients,
reduce-scattered only at the end of backward. A block's gather is a moment of its own, forward
and (under `full`) backward: its flat all-gather output is copied into the gathered parameters
while the previous buffer is still held — the peak of MoE blocks, whose weights outweigh their
activations. GaLore and Q-GaLore reduce their own gradients in place (no buckets) and under
ZeRO-1 own whole matrices (a fused expert weight whole, with its E matrices' projections and
moments).
CPU offload (`--cpu-offload`, FSDP2's CPUOffloadPolicy) moves the sharded parameters, gradients
and optimizer states to host memory (`host_memory`, reported apart from the GPU's peak) and the
optimizer step with them; the GPU keeps the buffers, the gathered blocks and the prefetch
buffer, a block's gradients until their reduce-scatter and its input, the root's gradients until
the end of backward, and the activations. On CUDA each prefetch in backward first copies the
block's shards to the GPU (1/N of a block beside the gather buffers); a CPU mesh copies nothing.
Checked against `--dry-run --gpus N --shard S` (rank 0 on fake tensors, fake process group):
tests/estimator/test_distributed.py and bench/distributed_accuracy.py.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, replace
from math import ceil

from . import activations as act
from . import loss as chunked
from . import memory as mem
from .config import GaLoreConfig, LoRAConfig, MethodConfig, TrainSetup
from .constants import ADAM8_MIN_SIZE, DTYPE_BYTES, QMAP_BYTES
from .spec import ModelSpec

FSDP_STRATEGIES = ("gradients", "full")


def refusal(method: MethodConfig, shard: str) -> str | None:
    """Why `method` cannot train under `shard` (and which strategy can), or None when it can."""
    if shard in FSDP_STRATEGIES and method.method in ("galore", "qgalore"):
        return (f"--shard {shard} hands each rank a shard of every gradient matrix, and {method.method} projects "
                "whole matrices; use --shard optimizer (each rank owns whole matrices and their states) or none")
    optimizer = getattr(method, "optimizer", None)
    if shard in FSDP_STRATEGIES and optimizer in ("adamw8bit", "adafactor"):
        return (f"--shard {shard} gives the optimizer FSDP's sharded DTensor parameters, which {optimizer} cannot "
                f"update (bitsandbytes' 8-bit kernels and torch's Adafactor take plain tensors); use --optimizer "
                f"adamw or sgd, or --shard optimizer ({optimizer} states, sharded)")
    if shard in FSDP_STRATEGIES and method.method == "qlora":
        return (f"--shard {shard} would shard QLoRA's 4-bit weights, which bitsandbytes stores in a layout FSDP "
                "cannot split here; use --shard optimizer (states sharded) or none")
    return None


def rank_setup(setup: TrainSetup) -> TrainSetup:
    """What one rank computes, as a one-GPU setup: batch_size / gpus rows of each micro-batch."""
    return replace(setup, batch_size=setup.batch_size // setup.gpus, gpus=1, shard="none", cpu_offload=False)


def rank_moments(spec: ModelSpec, method: MethodConfig, setup: TrainSetup,
                 device: str) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, int]]:
    """One rank's candidate peak moments, its activation terms and the named distributed terms
    (estimate.step_moments, per GPU)."""
    from .estimate import Layout, step_moments

    problem = refusal(method, setup.shard)
    if problem:
        raise ValueError(problem)
    if setup.shard in FSDP_STRATEGIES:
        return fsdp_moments(spec, method, setup, device)
    galore = isinstance(method, GaLoreConfig)
    states = zero_states(spec, method, setup) if setup.shard == "optimizer" else None
    layout = Layout(buckets=not galore, optimizer=None if states is None else max(states),
                    projected_accumulation=states is None)
    per_rank = rank_setup(setup)
    moments, terms = step_moments(spec, method, per_rank, device, layout)
    shared = {}
    if layout.buckets:
        shared["DDP gradient buckets (the gradients, as bucket views)"] = mem.gradient_bytes(spec, method, per_rank)
    if states is not None:
        shared["optimizer states of this rank's share (ZeRO-1)"] = max(states)
        shared["ZeRO-1 parameter broadcast (in place: no buffer)"] = 0
    return moments, terms, shared


# ---------------------------------------------------------------------------- ZeRO-1
def greedy_partition(groups: list[list[int]], world: int) -> list[list[tuple[int, int]]]:
    """(group, index) of the tensors each rank owns: within each group, largest first, each to the
    rank holding the fewest elements so far (torch's ZeroRedundancyOptimizer, and lowrank.galore)."""
    fewest = [(0, rank) for rank in range(world)]  # (elements so far, rank): ties go to the lower rank
    owned: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for g, numels in enumerate(groups):
        for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
            size, rank = heapq.heappop(fewest)
            owned[rank].append((g, i))
            heapq.heappush(fewest, (size + numels[i], rank))
    return owned


@dataclass(frozen=True)
class Tensor:
    """One trainable tensor as the optimizer sees it: its elements, its 2-D shape if a matrix,
    and the state it carries (bytes) — the unit ZeRO-1 deals out."""

    numel: int
    state: int
    quantized: bool  # has 8-bit moments: the rank holding it keeps the two 256-entry maps


def optimizer_tensors(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> list[list[Tensor]]:
    """The optimizer's parameter groups, tensor by tensor (lowrank/full.py, lora.py, galore.py)."""
    if isinstance(method, GaLoreConfig):
        return galore_tensors(spec, method, setup)
    d = mem.adapter_dtype_bytes(method, setup) if isinstance(method, LoRAConfig) else DTYPE_BYTES[setup.dtype]
    numels = mem.trainable_tensors(spec, method)
    alike: dict[tuple, Tensor] = {}  # a model repeats a few shapes hundreds of times

    def tensor(n: int, shape: tuple[int, int] | None) -> Tensor:
        if (n, shape) not in alike:
            state = mem.optimizer_state_bytes([n], [shape], d, method.optimizer) - mem.qmap_bytes([n], method.optimizer)
            alike[n, shape] = Tensor(n, state, method.optimizer == "adamw8bit" and n >= ADAM8_MIN_SIZE)
        return alike[n, shape]

    return [[tensor(n, shape) for n, shape in zip(numels, _shapes(spec, method, numels))]]


def _shapes(spec: ModelSpec, method: MethodConfig, numels: list[int]) -> list[tuple[int, int] | None]:
    """The 2-D shape of each tensor of `trainable_tensors` (Adafactor factors matrices)."""
    if isinstance(method, LoRAConfig):
        shapes = []
        for lin in mem.target_linears(spec, method.targets):
            shapes += [(method.rank, lin.in_features), (lin.out_features, method.rank)] * lin.count
        return shapes
    shapes = []
    for lin in spec.linears:
        shapes += [(lin.out_features, lin.in_features)] * lin.count + ([None] * lin.count if lin.bias else [])
    rest = numels[len(shapes):]
    return shapes + [(spec.vocab_size, spec.hidden_size) if n == spec.vocab_size * spec.hidden_size else None
                     for n in rest]


def galore_tensors(spec: ModelSpec, method: GaLoreConfig, setup: TrainSetup) -> list[list[Tensor]]:
    """GaLore's two groups: projected weights (projection + low-rank moments; a fused expert weight
    (E, m, n) is one tensor holding E matrices' states, dealt out whole), every other tensor (plain
    AdamW, 8-bit when asked)."""
    d = DTYPE_BYTES[setup.dtype]
    eight = method.optimizer == "adamw8bit"

    def quantized(lin) -> bool:  # 8-bit moments: by one matrix's size (an expert's, for fused weights)
        r = min(method.rank, lin.in_features, lin.out_features)
        moments = r * r if method.proj_type == "full" else r * max(lin.in_features, lin.out_features)
        return eight and moments >= ADAM8_MIN_SIZE

    projected, plain = [], []
    for lin in spec.linears:
        numel = lin.in_features * lin.out_features
        if mem.is_target(lin, method.targets):
            projected += [Tensor(numel, mem.galore_matrix_state_bytes(lin, method, d), quantized(lin))] * lin.count
        else:
            plain += [numel] * lin.count
        if lin.bias:
            plain += [lin.out_features] * lin.count
    experts = mem.projected_experts(spec, method)
    for ex in experts:
        one = ex.matrix
        projected += [Tensor(ex.numel, ex.num_experts * mem.galore_matrix_state_bytes(one, method, d),
                             quantized(one))] * ex.count
    plain += mem._non_linear_tensors(spec, experts)
    return [projected, [Tensor(n, mem.adam_state_bytes(n, d, method.optimizer, step_tensor=False),
                               eight and n >= ADAM8_MIN_SIZE) for n in plain]]


def zero_states(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> list[int]:
    """Optimizer-state bytes on each rank under ZeRO-1."""
    groups = optimizer_tensors(spec, method, setup)
    owned = greedy_partition([[t.numel for t in group] for group in groups], setup.gpus)
    out = []
    for tensors in owned:
        chosen = [groups[g][i] for g, i in tensors]
        maps = 2 * QMAP_BYTES if any(t.quantized for t in chosen) else 0
        out.append(sum(t.state for t in chosen) + maps)
    return out


# ---------------------------------------------------------------------------- FSDP2
def expert_shard_dim(num_experts: int, rows: int, world: int) -> int:
    """The dimension FSDP2 shards a fused expert weight (E, m, n) on (lowrank/distributed.py): its
    experts (0, the default) unless there are fewer experts than ranks, where ranks would hold
    padding alone (Mixtral's 8 on 16 GPUs: 1/8 of the experts per rank, gathered to 16); then its
    rows (1), when they split evenly, as FSDP2 requires of any other dimension."""
    return 1 if num_experts < world and rows % world == 0 else 0


def _local(dim0: int, rest: int, world: int) -> int:
    """A rank's padded shard of a tensor: its first dimension split in N equal chunks."""
    return ceil(dim0 / world) * rest


@dataclass(frozen=True)
class Shards:
    """FSDP2's sizes on one rank, in elements: the shard every rank stores, and what a gathered
    block or root occupies (padded to N chunks)."""

    frozen_local: int  # frozen parameters' shards (the weights of a LoRA model)
    trainable_local: int  # trainable parameters' shards: also the sharded gradients' and states' size
    block_gathered: int  # one decoder block, gathered (all its parameters)
    block_trainable_gathered: int  # its trainable part (the reduce-scatter input)
    root_gathered: int  # embeddings, final norm and lm_head, gathered
    root_trainable_gathered: int
    trainable_tensors_local: tuple[int, ...]  # each trainable tensor's shard (Adam states, one by one)
    block_copy_out: int = 0  # a block's expert weights sharded on their rows: gathered through a temporary


def _block_tensors(spec: ModelSpec, method: MethodConfig, world: int) -> list[tuple[int, int, bool, int]]:
    """(sharded dimension, elements per index of it, trainable, how many in the model) of every kind
    of tensor the decoder blocks hold: linears (LoRA: the base frozen, its two factors trainable),
    fused expert weights (E, m, n) — FSDP2 splits their experts (dim 0) like a linear's rows, or
    their m rows (`expert_shard_dim`) —, routers and the other small tensors, norms."""
    lora = isinstance(method, LoRAConfig)
    h, layers = spec.hidden_size, spec.num_layers
    kinds = []
    for lin, trains in [(lin, True) for lin in spec.linears] + [(lin, False) for lin in spec.idle_linears]:
        # an idle linear (no gradient reaches it) holds no gradient or state
        kinds.append((lin.out_features, lin.in_features, trains and not lora, lin.count))
        if lin.bias:
            kinds.append((lin.out_features, 1, trains and not lora, lin.count))
        if lora and mem.is_target(lin, method.targets):
            kinds += [(method.rank, lin.in_features, trains, lin.count), (lin.out_features, method.rank, trains, lin.count)]
    for ex in spec.experts:  # frozen under LoRA (no adapters on fused expert weights)
        if expert_shard_dim(ex.num_experts, ex.out_features, world):
            kinds.append((ex.out_features, ex.num_experts * ex.in_features, not lora, ex.count))
        else:
            kinds.append((ex.num_experts, ex.out_features * ex.in_features, not lora, ex.count))
    for numel, count in _other_tensors(spec):
        # only sizes are known: a multiple of h is a router or gate, (outputs, h) as nn.Linear stores it
        kinds.append((numel // h, h, not lora, count) if numel % h == 0 else (numel, 1, not lora, count))
    kinds += [(h, 1, not lora, layers)] * (mem.block_norm_params(spec) // h)
    return kinds


def _other_tensors(spec: ModelSpec) -> list[tuple[int, int]]:
    """(numel, how many) of the parameters that are no linear, expert, embedding or norm (MoE
    routers, one-output gates): counted in the blocks, a lump of a spec without the list as one."""
    rest = spec.other_params - spec.expert_params
    if spec.other_tensors and sum(n * count for n, count in spec.other_tensors) == rest:
        return list(spec.other_tensors)
    return [(rest, 1)] if rest else []


def shards(spec: ModelSpec, method: MethodConfig, world: int) -> Shards:
    """The per-rank sizes FSDP2 gives `spec` trained with `method` (LoRA: base frozen, adapters trainable).

    A tensor that `count` blocks of `num_layers` have is in round(count / num_layers) of a block's
    (every block alike, the largest kind where they differ: a MoE model's first dense blocks);
    the sharded totals count each tensor as often as the model has it."""
    lora = isinstance(method, LoRAConfig)
    h, layers = spec.hidden_size, spec.num_layers
    block, block_trainable, local_tensors = 0, 0, []
    frozen_local = trainable_local = 0
    for dim0, rest, trainable, count in _block_tensors(spec, method, world):
        local = _local(dim0, rest, world)
        per_block = round(count / layers)
        block += local * world * per_block
        if trainable:
            block_trainable += local * world * per_block
            trainable_local += local * count
            local_tensors += [local] * count
        else:
            frozen_local += local * count
    root = [(spec.vocab_size, h)]
    if spec.embedding_params > spec.vocab_size * h:
        root.append((spec.embedding_params // h - spec.vocab_size, h))  # learned positions
    if spec.lm_head_params:
        root.append((spec.vocab_size, h))
    final_norm = spec.norm_params - mem.block_norm_params(spec) * layers
    root += [(h, 1)] * (final_norm // h)
    root_gathered = root_trainable = 0
    for dim0, rest in root:
        local = _local(dim0, rest, world)
        root_gathered += local * world
        if lora:
            frozen_local += local
        else:
            root_trainable += local * world
            trainable_local += local
            local_tensors.append(local)
    # FSDP2 gathers a tensor sharded on another dimension than 0 into a temporary first, then
    # concatenates its ranks' chunks along that dimension into the gathered parameter
    copy_out = sum(ex.numel * round(ex.count / layers) for ex in spec.experts
                   if expert_shard_dim(ex.num_experts, ex.out_features, world))
    return Shards(frozen_local, trainable_local, block, block_trainable, root_gathered, root_trainable,
                  tuple(local_tensors), copy_out)


def fsdp_moments(spec: ModelSpec, method: MethodConfig, setup: TrainSetup,
                 device: str) -> tuple[dict, dict, dict]:
    """The candidate peak moments of one rank's step under FSDP2 (gradients or full), each a
    breakdown by category, its activation terms and the named distributed terms (bytes)."""
    world, reshard, offload = setup.gpus, setup.shard == "full", setup.cpu_offload
    per_rank = rank_setup(setup)
    flow = _flow(spec, method, per_rank, device)
    b, s, n = per_rank.batch_size, per_rank.seq_len, spec.num_layers
    d = DTYPE_BYTES[setup.dtype]
    lora = isinstance(method, LoRAConfig)
    sh = shards(spec, method, world)
    a = mem.adapter_dtype_bytes(method, setup) if lora else d
    host = host_memory(spec, method, setup)  # the shards: in host memory under CPU offload
    buffers = spec.float_buffer_numel * d + spec.other_buffer_bytes  # not FSDP's: on the GPU either way
    sharded = {"weights": buffers + (0 if offload else host["weights"]), "adapters": 0 if offload else host["adapters"]}
    states = 0 if offload else host["optimizer"]
    block_w = sh.block_gathered * d  # a gathered block (LoRA factors beside the base: both in d here)
    copy_out = sh.block_copy_out * d  # its experts sharded on their rows, gathered into a temporary first
    root_w = sh.root_gathered * d
    block_rs = sh.block_trainable_gathered * a  # a block's reduce-scatter input (its trainable gradients)
    block_grad_shard = block_rs // world
    head_grads = 0 if lora else (spec.lm_head_params or spec.vocab_size * spec.hidden_size) * d + \
        (spec.norm_params - mem.block_norm_params(spec) * n) * d
    where = " (host memory: CPU offload)" if offload else ""
    terms = {"sharded parameters" + where: host["weights"] + host["adapters"],
             "sharded gradients" + where: host["gradients"], "sharded optimizer states" + where: host["optimizer"],
             "gathered root (embeddings, final norm, lm_head)": root_w, "gathered block": block_w,
             "prefetched block (all-gather buffer)": block_w if reshard else 0,
             "reduce-scatter input (previous block)": block_rs}
    saved = act.activation_terms(spec, flow, b, s)

    # accumulating, each micro-batch's reduce-scatter adds into the gradient shards, which exist
    # from the first micro-batch on (skipping the reduce-scatter would keep whole gradients instead)
    accumulating = setup.grad_accum > 1
    accumulated = host["gradients"] if accumulating and not offload else 0
    # the gradient shards reduce-scattered so far (offloaded: copied to the host, each as it is made)
    shard_grads = 0 if offload else block_grad_shard

    def moment(weights: int, gradients: int, activations: int, transient: int) -> dict[str, int]:
        return {"weights": sharded["weights"] + weights, "adapters": sharded["adapters"],
                "gradients": accumulated + gradients, "optimizer": states, "activations": activations,
                "transient": transient}

    blocks_kept = n if not reshard else 0  # gathered blocks alive after forward
    moments = {}
    # a block's forward begins with its gather: its flat all-gather output is copied out into the
    # gathered parameters while the previous gather's output (the root's, for the first block) is
    # still held, until this gather has started
    other = act.block_saved(spec, flow, b, s, first=False)
    bottom = act.block_saved(spec, flow, b, s, first=True)  # its input needs no gradient (frozen embeddings)
    hidden = b * s * spec.hidden_size * flow.residual_d  # a block's input, or the gradient of its output
    for k in range(n):
        previous = root_w if k == 0 else block_w
        gathered = root_w + (block_w if reshard else (k + 1) * block_w) + block_w  # + the copy-out's source
        below = sum(bottom.values()) + (k - 1) * sum(other.values()) if k else 0  # the blocks done
        activations = below + act.token_ids(flow, b, s) + (act.shared_saved(spec, flow, b, s) if k else 0)
        if act.checkpointed(spec, flow):
            activations = k * act.checkpointed_layer_saved(spec, flow, b, s) + act.token_ids(flow, b, s) + \
                act.checkpointed_shared(spec, flow, b, s)
        # the block's input hidden states; above the first block, the model's forward also still
        # holds the embeddings' output (the first block's input: saved when checkpointing)
        inputs = hidden * (1 if k == 0 or act.checkpointed(spec, flow) else 2)
        candidate = {"weights": sharded["weights"] + gathered - block_w, "adapters": sharded["adapters"],
                     "gradients": accumulated, "optimizer": states, "activations": activations,
                     "transient": previous + block_w + copy_out + inputs}
        if "forward: a block's gather" not in moments or sum(candidate.values()) > \
                sum(moments["forward: a block's gather"].values()):
            moments["forward: a block's gather"] = candidate
    if act.traced(spec):
        # inside the top block's forward (an MoE layer's routed copies and expert outputs): every
        # block gathered, or this one alone when resharding; its all-gather output kept beside it
        # until the next gather (FSDP2 frees it then, to overlap the copy-out with that gather)
        alive, transient = act.traced_forward_peak(spec, flow, b, s)
        moments["forward: a block"] = moment(root_w + (block_w if reshard else n * block_w), 0, alive,
                                             transient + block_w)
    # the last block's all-gather output stays until the root's forward returns, which computes
    # the head and the loss (FSDP2 frees a gather's output at the next gather, or at the root's end)
    moments.update({
        "forward: loss": moment(root_w + blocks_kept * block_w, 0, sum(saved.values()),
                                act.loss_forward_transient(spec, flow, b, s) + act.forward_transient(spec, flow, b, s)
                                + block_w),
    })
    # the loss's backward (the chunked loss: its node makes lm_head's gathered gradient, reduce-scattered
    # at the end of backward, so accumulating adds nothing to it)
    gathered = root_w + blocks_kept * block_w
    prefetched = block_w if reshard else 0
    for name, (made, freed, transient) in act.loss_backward_moments(spec, flow, b, s, False).items():
        moments[name] = moment(gathered, made, sum(saved.values()) - freed, transient + prefetched)
    if flow.loss_chunk:
        made, activations, transient = chunked.final_norm_moment(spec, flow, b, s, head_grads, False, False)
        moments["backward: final norm"] = moment(gathered, made, activations, transient + prefetched)
    block_grads = mem.block_gradient_bytes(spec, method, per_rank)
    for above in range(n):  # the block whose backward runs, counted from the top
        below = n - 1 - above  # blocks still waiting for their backward
        where = "top block" if above == 0 else "bottom block" if below == 0 else "a middle block"
        parts = bottom if below == 0 else other
        gathered = root_w + (block_w if reshard else (below + 1) * block_w)
        prefetch = block_w if reshard and below > 0 else 0
        pending = block_rs if above > 0 else 0
        done = head_grads + (0 if accumulating else above * shard_grads)
        if reshard:
            # its backward begins with its gather's copy-out: the block's gathered parameters fill
            # from the flat all-gather output (prefetched during the block above's backward) while
            # that block's reduce-scatter input waits, every activation of this block still saved,
            # the gradient of its output arrived and no step of its backward begun (a mixture of
            # experts' blocks, large beside their activations: a peak)
            if act.checkpointed(spec, flow):
                activations = (below + 1) * act.checkpointed_layer_saved(spec, flow, b, s) + \
                    act.checkpointed_shared(spec, flow, b, s) + act.token_ids(flow, b, s)
            else:
                activations = sum(parts.values()) + (sum(bottom.values()) + (below - 1) * sum(other.values())
                                                     if below else 0) + \
                    act.shared_saved(spec, flow, b, s) + act.token_ids(flow, b, s)
            candidate = moment(gathered, done, activations, block_w + copy_out + pending + hidden)
            if "backward: a block's gather" not in moments or sum(candidate.values()) > \
                    sum(moments["backward: a block's gather"].values()):
                moments["backward: a block's gather"] = candidate
            if offload and device == "cuda" and below > 0:
                # then the prefetch of the block below: its gather's output filled from host-to-device
                # copies of its shards (FSDPParam.all_gather_inputs: `.to(device)` of each; on a CPU
                # mesh the copy is the shard itself), this block's gather output freed by now
                candidate = moment(gathered, done, activations, block_w + block_w // world + pending + hidden)
                key = "backward: a block's prefetch (host-to-device copies)"
                if key not in moments or sum(candidate.values()) > sum(moments[key].values()):
                    moments[key] = candidate
        for step in act.block_backward_steps(spec, flow, b, s, first=below == 0):
            made = act.step_made(step, block_grads)
            if act.checkpointed(spec, flow):
                activations = (below + 1) * act.checkpointed_layer_saved(spec, flow, b, s) + \
                    act.checkpointed_shared(spec, flow, b, s) + act.token_ids(flow, b, s)
                recomputed = act.step_alive(parts, step)
            else:
                waiting = sum(bottom.values()) + (below - 1) * sum(other.values()) if below else 0
                activations = act.step_alive(parts, step) + waiting + \
                    act.shared_saved(spec, flow, b, s) + act.token_ids(flow, b, s)
                recomputed = 0
            candidate = moment(gathered, done + made, activations, recomputed + step.transient + prefetch + pending)
            key = f"backward: {where}"
            if key not in moments or sum(candidate.values()) > sum(moments[key].values()):
                moments[key] = candidate
    root_grads = 0 if lora else sh.root_trainable_gathered * d
    moments["backward: end"] = moment(root_w, (0 if accumulating else n * shard_grads) + root_grads, 0, block_rs)
    # the step: fused AdamW (or SGD) updates each shard in place (offloaded: on the CPU, the GPU idle)
    moments["optimizer"] = moment(0, 0 if accumulating or offload else host["gradients"], 0, 0)
    return moments, saved, terms


def host_memory(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> dict[str, int]:
    """One rank's FSDP2 shards by category (bytes): its padded 1/N of every parameter (LoRA: the
    frozen base as weights, the factors as adapters), of every trainable parameter's gradient, and
    the optimizer states of those shards. On the GPU without CPU offload; with it
    (CPUOffloadPolicy) in host memory, where they all exist at once from the last reduce-scatter
    through the optimizer step (torch/distributed/fsdp/_fully_shard/_fsdp_param.py keeps
    `_sharded_param_data` on the CPU, _fsdp_collectives.py `foreach_reduce` copies each gradient
    shard there, and the optimizer steps where its parameters are)."""
    d = DTYPE_BYTES[setup.dtype]
    lora = isinstance(method, LoRAConfig)
    a = mem.adapter_dtype_bytes(method, setup) if lora else d
    sh = shards(spec, method, setup.gpus)
    sizes = Counter(sh.trainable_tensors_local)  # each shard's states, alike for alike sizes
    states = sum(count * mem.optimizer_state_bytes([t], None, a, method.optimizer) for t, count in sizes.items())
    return {"weights": sh.frozen_local * d + (0 if lora else sh.trainable_local * d),
            "adapters": sh.trainable_local * a if lora else 0, "gradients": sh.trainable_local * a,
            "optimizer": states, "activations": 0, "transient": 0}


def _flow(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, device: str) -> act.Flow:
    from .estimate import make_flow

    return make_flow(spec, method, setup, device)
