"""GaLore: full-rank weights trained by Adam on low-rank projected gradients.

Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
https://arxiv.org/abs/2403.03507. For each targeted weight W (m×n) with gradient G:

    R = project(G)                   # r×n (or m×r): G in the rank-r subspace of its own SVD
    M, V = Adam moments of R         # kept in the subspace: r×n each, not m×n
    N = M̂ / (√V̂ + eps)              # Adam's normalized step, still r×n
    W ← (1 − lr·wd)·W − lr·scale·project_back(N)      # one in-place GEMM, no m×n temporary

The subspace comes from the SVD of G and is refreshed every `update_proj_gap` updates
(lowrank/projector.py). Every other trainable parameter (embeddings, norms, lm_head) gets plain
AdamW in the same optimizer. Memory per targeted weight (m ≤ n): optimizer m·r + 2·n·r elements
instead of AdamW's 2·m·n; `optim_bits=8` stores the moments in 8 bits (bitsandbytes' blockwise
dynamic quantization, blocks of 256), on CPU as well as CUDA.

Layer-wise mode (`layerwise=True`) updates each parameter inside its post-accumulate-grad hook
and frees its gradient at once, so full gradients never coexist. Under gradient accumulation a
targeted weight's hook projects each micro-batch's gradient into the current subspace and sums
the low-rank pieces — exact, as projection is linear — except on a refresh step, when the full
gradient is accumulated for the SVD; other parameters accumulate in `.grad` and update on the
last micro-batch. Give the optimizer the number of micro-batches when building it.

    optimizer = build_galore_optimizer(model, GaLoreConfig(rank=128, layerwise=True), lr=1e-2, grad_accum=4)
    for batches in loader:                       # 4 micro-batches per step
        for batch in batches:
            (model(**batch, use_cache=False).loss / 4).backward()   # layer-wise: updates happen here
        optimizer.step(); optimizer.zero_grad()  # finishes the step; same calls without layerwise
        print(optimizer.grad_norm)

Gradient norm and clipping (`grad_clip`) are per parameter — the only kind layer-wise updates
allow — and of the gradient Adam sees: the low-rank gradient R for targeted weights (available
under accumulation too), the full gradient otherwise. `grad_norm` is the global norm, √Σ‖g‖², of
those pre-clip gradients.

Data parallelism (`parallel`, lowrank/distributed.py): the optimizer reduces each gradient
itself when it has arrived on every rank. Under `none` every rank holds the same projections,
so between refreshes it all-reduces the low-rank gradient R (r×n, exact: projection is
linear) and on a refresh the full one; rank 0's fresh projection is then broadcast so all ranks
stay identical. Under `optimizer` (ZeRO-1) each rank owns whole matrices — the same greedy
partition by size as torch's ZeroRedundancyOptimizer — keeps only their projections and moments,
receives their summed gradient (`reduce`), updates them and broadcasts them after the step.
Layer-wise updates keep working: the reduction happens in the hook, on the last micro-batch.

GPT-2's Conv1D stores its weight transposed, (in, out). Its gradient is projected as the (out, in)
weight of the equivalent nn.Linear (`TransposedProjector`): same side, same subspace, same update,
the moments shaped as that Linear's — a Conv1D model trains as its nn.Linear twin would, square
layers and explicit proj_type="left"/"right" included. The projected group lists which weights
are stored so (`fan_in_fan_out`, one flag per parameter, as peft names the same thing).

Mixture-of-experts models store a block's experts as one 3-D parameter (E, m, n) — transformers'
fused `mlp.experts.gate_up_proj` and `down_proj`. GaLore treats it as the E matrices it holds
(`ExpertProjectors`): each expert has its own projector, SVD, refresh schedule and low-rank
moments (kept stacked, (E, r, n), with 8-bit blocks per expert), is clipped by its own norm and
updated on its own — exactly what E separate (m, n) weights would get. The update runs expert by
expert, so its temporaries are one expert's (under `none` data parallelism each expert's
projection is reduced in turn); a layer-wise hook projects the whole gradient first (E low-rank
pieces) and frees it. Selected by targets like the linears ("all-linear", "mlp", or their names
`gate_up_proj`, `down_proj`).

Against galore-torch 1.0 (same trajectory otherwise, tests/lowrank/test_galore.py): eps and
weight decay follow torch.optim.AdamW (eps added after the bias correction, decay before the
step; galore-torch adds eps before and decays after); no m×n temporaries (it makes two per
weight per step); 8-bit moments work on CPU and never clone the weight; layer-wise updates are
exact under gradient accumulation. As in the paper, moments carry over when the subspace changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from estimator import constants
from estimator.config import GaLoreConfig, TrainSetup
from estimator.constants import ADAM8_BLOCK, ADAM8_MIN_SIZE
from estimator.distributed import greedy_partition
from estimator.targets import target_experts, target_linears

from .distributed import Parallel
from .full import save as save  # a model folder, as full training saves
from .methods import LowRankOptimizer, Prepared
from .projector import DenseStore, GaLoreProjector, HoldsTensors, Refresh


def _slices(numel: int) -> Iterator[slice]:
    """Flat slices of constants.GALORE_SLICE elements: an elementwise update's temporaries stay small."""
    size = constants.GALORE_SLICE
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


def _dynamic_maps(device: torch.device) -> tuple[Tensor, Tensor]:
    """The 256-entry signed (first moment) and unsigned (second moment) dynamic maps of bnb."""
    from bitsandbytes.functional import create_dynamic_map  # optional backend: imported on use

    with unset_fake_temporarily():  # constants: computed for real even in a dry run on fake tensors
        signed, unsigned = create_dynamic_map(signed=True).tolist(), create_dynamic_map(signed=False).tolist()
    return torch.tensor(signed, device=device), torch.tensor(unsigned, device=device)


def _dequantize(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    return torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, qmap, ADAM8_BLOCK, torch.float32)


def _quantize_into(values: Tensor, codes: Tensor, absmax: Tensor, qmap: Tensor) -> None:
    new_codes, new_absmax = torch.ops.bitsandbytes.quantize_blockwise(values, qmap, ADAM8_BLOCK)
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)


class TransposedProjector(GaLoreProjector):
    """The projector of a weight stored transposed — GPT-2's Conv1D, (in, out) — built with the
    (out, in) shape of the equivalent nn.Linear: it projects Gᵀ and adds the update into Wᵀ (a view,
    so still one in-place GEMM), so the weight moves exactly as that Linear's would."""

    def refresh(self, grad: Tensor, step: int) -> Refresh:
        return super().refresh(grad.T, step)

    def project(self, grad: Tensor) -> Tensor:
        return super().project(grad.T)

    def project_back(self, low: Tensor) -> Tensor:
        return super().project_back(low).T

    def add_back_(self, weight: Tensor, low: Tensor, alpha: float, beta: float = 1.0) -> None:
        super().add_back_(weight.T, low, alpha=alpha, beta=beta)


class ExpertProjectors:
    """The projectors of a fused expert weight (E, m, n): one `GaLoreProjector` per expert matrix.

    Offers what the optimizer asks of a projector for the whole tensor — `due` (any expert's
    refresh is due), `project` ((E, m, n) -> (E, ...), each expert by its own projector, written
    into one tensor) and the state — while updates go expert by expert (`experts`).
    """

    def __init__(self, experts: list[GaLoreProjector]) -> None:
        self.experts = experts
        self.scale, self.side = experts[0].scale, experts[0].side

    def due(self, step: int) -> bool:
        return any(proj.due(step) for proj in self.experts)

    def low_rank_shape(self) -> tuple[int, ...]:
        return (len(self.experts), *self.experts[0].low_rank_shape())

    def project(self, grad: Tensor) -> Tensor:
        """G (E, m, n) -> R (E, r, n) or (E, m, r): each expert's projection, no per-expert copy."""
        out = grad.new_empty(self.low_rank_shape())
        for e, proj in enumerate(self.experts):
            mats = {side: (m if m.dtype == grad.dtype else m.to(grad.dtype)) for side, m in proj.matrices().items()}
            if proj.side == "left":
                torch.matmul(mats["left"].T, grad[e], out=out[e])
            elif proj.side == "right":
                torch.matmul(grad[e], mats["right"].T, out=out[e])
            else:
                torch.matmul(mats["left"].T @ grad[e], mats["right"].T, out=out[e])
            del mats
        return out

    def state_tensors(self) -> list[Tensor]:
        return [t for proj in self.experts for t in proj.state_tensors()]

    def state_dict(self) -> dict:
        return {"experts": [proj.state_dict() for proj in self.experts]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["experts"]
        if len(saved) != len(self.experts):
            raise ValueError(f"a saved fused expert weight has {len(saved)} experts, this one {len(self.experts)}: "
                             "load a state of the same model")
        for proj, one in zip(self.experts, saved):
            proj.load_state_dict(one)


class GaLoreAdamW(torch.optim.Optimizer, LowRankOptimizer):
    """AdamW whose groups with a "rank" key project 2-D gradients into a GaLore subspace.

    A projected group carries rank, update_proj_gap, scale (as galore-torch's groups) and optionally
    proj_type ("std"), svd ("randomized" or "exact"), stagger (False) and fan_in_fan_out (one bool
    per parameter: True for a weight stored (in, out), as GPT-2's Conv1D; projected as its
    transpose, see `TransposedProjector`); other groups are plain AdamW. States are in the weight
    dtype, or 8-bit (`optim_bits=8`) for tensors of at least `min_8bit_size` elements. Subclasses
    (Q-GaLore) may override `make_projector` to hold P quantized or to adapt each layer's refresh gap.
    It is a `LowRankOptimizer` (lowrank/methods.py): it clips per parameter and reports the norm.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, optim_bits: int = 32,
                 grad_clip: float | None = None, layerwise: bool = False, grad_accum: int = 1,
                 min_8bit_size: int = ADAM8_MIN_SIZE, parallel: Parallel | None = None) -> None:
        problems = []
        if not lr >= 0:
            problems.append(f"lr={lr!r} must be ≥ 0")
        if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            problems.append(f"betas={betas!r} must be two numbers in [0, 1)")
        if not eps >= 0:
            problems.append(f"eps={eps!r} must be ≥ 0")
        if not weight_decay >= 0:
            problems.append(f"weight_decay={weight_decay!r} must be ≥ 0")
        if optim_bits not in (8, 32):
            problems.append(f"optim_bits={optim_bits!r} must be 8 or 32")
        if grad_clip is not None and not grad_clip > 0:
            problems.append(f"grad_clip={grad_clip!r} must be > 0, or None for no clipping")
        if not (isinstance(grad_accum, int) and grad_accum >= 1):
            problems.append(f"grad_accum={grad_accum!r} must be a whole number ≥ 1 (micro-batches per step)")
        if problems:
            raise ValueError("invalid GaLore AdamW options: " + "; ".join(problems))
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.optim_bits, self.grad_clip, self.min_8bit_size = optim_bits, grad_clip, min_8bit_size
        self.layerwise = layerwise
        self.grad_accum = grad_accum
        self._qmaps: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._norm_sq: Tensor | None = None  # Σ‖g‖² of the step in progress
        self._grad_norm: Tensor | None = None
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        self._low_grads: dict[Tensor, Tensor] = {}  # layer-wise: low-rank gradients summed over micro-batches
        self._micro: dict[Tensor, int] = {}  # layer-wise: backward passes seen per parameter this step
        self.parallel = parallel
        self._owner = self._partition() if parallel is not None and parallel.strategy == "optimizer" else None
        self._hooks = []
        projected = []
        self._fan_in_fan_out: set[Tensor] = set()  # projected weights stored (in, out)
        for group in (g for g in self.param_groups if "rank" in g):
            for key, default in (("proj_type", "std"), ("svd", "randomized"), ("stagger", False)):
                group.setdefault(key, default)
            names = group.get("param_names") or [f"param {i}" for i in range(len(group["params"]))]
            projected += [(p, group, name) for p, name in zip(group["params"], names)]
            flags = group.get("fan_in_fan_out") or [False] * len(group["params"])
            if len(flags) != len(group["params"]):
                raise ValueError(f"fan_in_fan_out has {len(flags)} flags for a group of {len(group['params'])} "
                                 "parameters: give one per parameter")
            self._fan_in_fan_out.update(p for p, flag in zip(group["params"], flags) if flag)
        for index, (p, group, name) in enumerate(projected):
            self.state[p]["projector"] = self.make_projector(p, group, name, index, len(projected))
        if layerwise:
            self._hooks = self._register_hooks()

    def make_projector(self, p: Tensor, group: dict, name: str, index: int,
                       count: int) -> GaLoreProjector | ExpertProjectors:
        """The projector of the `index`-th of `count` projected weights (staggered if asked); of a
        fused expert weight (E, m, n), one per expert (`ExpertProjectors`)."""
        if p.dim() == 3:
            gap = group["update_proj_gap"]
            return ExpertProjectors([
                GaLoreProjector(tuple(p.shape[1:]), group["rank"], gap, group["scale"], group["proj_type"], group["svd"],
                                self._weight_dtype(p), offset=index * gap // count if group["stagger"] else 0,
                                seed=index + e * count, name=f"{name}[{e}]", make_store=self._make_store)
                for e in range(p.shape[0])])
        if p.dim() != 2:
            raise ValueError(f"GaLore projects 2-D weights and fused expert weights (3-D); got a parameter of shape "
                             f"{tuple(p.shape)}: put it in a group without 'rank'")
        gap = group["update_proj_gap"]
        transposed = p in self._fan_in_fan_out
        projector = TransposedProjector if transposed else GaLoreProjector
        shape = (p.shape[1], p.shape[0]) if transposed else tuple(p.shape)  # the equivalent Linear's (out, in)
        return projector(shape, group["rank"], gap, group["scale"], group["proj_type"], group["svd"],
                         self._weight_dtype(p), offset=index * gap // count if group["stagger"] else 0,
                         seed=index, name=name, make_store=self._make_store)

    # ------------------------------------------------------------------ the public API
    @property
    def grad_norm(self) -> float | None:
        """Global norm of the pre-clip gradients of the last step (see the module docstring)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every parameter that has a gradient; in layer-wise mode, finish the step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, group in self._group_of.items():
            if self.layerwise:
                self._finish(p, group)
            elif (grad := self._grad(p)) is not None:
                low = self._reduce_gradient(p, grad)
                if self._owns(p):
                    self._update(p, group, grad, low)
                del grad, low
        self._micro.clear()
        if self._owner is not None:
            self._broadcast_owned()
        self._grad_norm = self._global_norm()
        self._norm_sq = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drops low-rank gradients accumulated by layer-wise hooks."""
        super().zero_grad(set_to_none)
        self._low_grads.clear()
        self._micro.clear()

    def projectors(self) -> list[GaLoreProjector]:
        """Every projector, a fused expert weight's one per expert."""
        out = []
        for state in self.state.values():
            projector = state.get("projector")
            if projector is not None:
                out += projector.experts if isinstance(projector, ExpertProjectors) else [projector]
        return out

    def layer_info(self) -> list[dict]:
        """Per projected weight: name, shape, rank, side, current gap, SVDs done, next refresh
        (under ZeRO-1, each row from the rank that owns the weight, gathered on rank 0 — which
        writes the metrics — in a collective; other ranks get their own rows)."""
        rows = self._local_layer_info()
        if self._owner is None:
            return rows
        everyone = self.parallel.gather_to_main(rows)
        if everyone is None:
            return rows
        owners = [self._owner[p] for p, state in self.state.items() if "projector" in state
                  for _ in getattr(state["projector"], "experts", [None])]
        return [everyone[owner][i] for i, owner in enumerate(owners)]

    def _local_layer_info(self) -> list[dict]:
        return [proj.info() for proj in self.projectors()]

    def state_tensors(self) -> list[Tensor]:
        """Every tensor the optimizer holds: moments, 8-bit constants and maps, projections."""
        seen: dict[int, Tensor] = {}
        for state in self.state.values():
            for value in state.values():
                tensors = value.state_tensors() if isinstance(value, HoldsTensors) else [value]
                seen.update({id(t): t for t in tensors if isinstance(t, Tensor)})
        return list(seen.values())

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {key: {k: (v.state_dict() if isinstance(v, (GaLoreProjector, ExpertProjectors)) else v)
                             for k, v in st.items()} for key, st in sd["state"].items()}
        return sd

    def whole_state_dict(self) -> dict:
        """The state dict one process would hold: under ZeRO-1 every owner's states, gathered on
        rank 0 (a collective; {} on the other ranks)."""
        sd = self.state_dict()
        if self._owner is None:
            return sd
        everyone = self.parallel.gather_to_main(sd)
        if everyone is None:
            return {}
        params = [p for group in self.param_groups for p in group["params"]]
        sd["state"] = {i: everyone[self._owner[p]]["state"][i] for i, p in enumerate(params)
                       if i in everyone[self._owner[p]]["state"]}
        for other in everyone:  # per-layer rounding streams (Q-GaLore), each kept by its owner
            sd.get("rounding_rng", {}).update(other.get("rounding_rng", {}))
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore moments, projections and schedules; tensors keep their saved dtypes."""
        saved_groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        if [len(g["params"]) for g in saved_groups] != sizes:
            raise ValueError(f"state_dict has groups of {[len(g['params']) for g in saved_groups]} parameters, "
                             f"this optimizer {sizes}: build it from the same model and config")
        by_id = {}
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
            by_id.update(zip(saved["params"], group["params"]))
        for key, saved_state in state_dict["state"].items():
            p = by_id[key]
            if not self._owns(p):  # ZeRO-1: another rank keeps this tensor's state
                continue
            state = {k: (v.to(p.device) if isinstance(v, Tensor) else v) for k, v in saved_state.items()}
            if "projector" in state:
                self.state[p]["projector"].load_state_dict(state["projector"])
                state["projector"] = self.state[p]["projector"]
            if "qmap_signed" in state:  # share one pair of maps again
                state["qmap_signed"], state["qmap_unsigned"] = self._maps(p.device)
            self.state[p] = state

    def gradient_tensors(self) -> list[Tensor]:
        """Layer-wise low-rank gradients summed over the micro-batches of the step in progress."""
        return list(self._low_grads.values())

    def extra_trainable_numel(self) -> int:
        """Every trained value is a parameter here (Q-GaLore's INT8 weights are not)."""
        return 0

    # ------------------------------------------------------------------ where gradients live
    # Q-GaLore's INT8 weights are not parameters: it overrides these four to read the gradient
    # its layers compute, register its own hooks and apply updates with stochastic rounding.
    def _grad(self, p: Tensor) -> Tensor | None:
        return p.grad

    def _make_store(self, dtype: torch.dtype):
        """How projection matrices are held: dense in the weight dtype (Q-GaLore: INT4)."""
        return DenseStore(dtype)

    def _weight_dtype(self, p: Tensor) -> torch.dtype:
        """The float dtype the weight computes in (moments and updates use it)."""
        return p.dtype

    def _drop_grad(self, p: Tensor) -> None:
        p.grad = None

    def _register_hooks(self) -> list:
        return [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._group_of if p.requires_grad]

    def _add_back(self, p: Tensor, projector: GaLoreProjector, direction: Tensor, alpha: float, beta: float) -> None:
        """p ← beta·p + alpha·project_back(direction), in place, without an m×n temporary."""
        projector.add_back_(p, direction, alpha=alpha, beta=beta)

    def _trained_tensors(self, p: Tensor) -> list[Tensor]:
        """What an update of `p` changes (the owner broadcasts them): the parameter itself."""
        return [p.data]

    # ------------------------------------------------------------------ data parallelism
    def _partition(self) -> dict[Tensor, int]:
        """Which rank owns each trainable tensor: torch's ZeroRedundancyOptimizer rule — each group's
        tensors, largest first, go to the rank holding the fewest elements so far (the estimator
        deals its ZeRO-1 states with the same function)."""
        groups = [group["params"] for group in self.param_groups]
        owned = greedy_partition([[p.numel() for p in params] for params in groups], self.parallel.world)
        return {groups[g][i]: rank for rank, tensors in enumerate(owned) for g, i in tensors}

    def _owns(self, p: Tensor) -> bool:
        return self._owner is None or self._owner[p] == self.parallel.rank

    def _reduce_in_place(self, p: Tensor, t: Tensor | None) -> None:
        """The mean of `t` over the ranks: on `p`'s owner (ZeRO-1) or on every rank."""
        if self.parallel is None or t is None:
            return
        if self._owner is None:
            dist.all_reduce(t, group=self.parallel.group)
        else:
            dist.reduce(t, dst=self._owner[p], group=self.parallel.group)
        t.div_(self.parallel.world)

    def _reduce_gradient(self, p: Tensor, grad: Tensor) -> Tensor | None:
        """Reduce `p`'s gradient for a global step; returns its low-rank projection when every rank
        could project it first (the projection was reduced instead of the gradient), else None."""
        if self.parallel is None:
            return None
        state = self.state[p]
        projector = state.get("projector")
        if projector is not None and self._owner is None and not projector.due(state.get("step", 0)):
            if isinstance(projector, ExpertProjectors):  # reduced expert by expert as it is updated
                return None
            low = projector.project(grad)
            self._reduce_in_place(p, low)
            return low
        self._reduce_in_place(p, grad)
        return None

    def _share_projection(self, projector: GaLoreProjector) -> None:
        """After a refresh under `none`: rank 0's projection and schedule on every rank, so the ranks
        never disagree on what to reduce (two SVDs of the same gradient may differ in the last bit)."""
        if self.parallel is None or self._owner is not None or self.parallel.fake:  # a dry run has one rank
            return
        for t in projector.state_tensors():
            dist.broadcast(t, src=0, group=self.parallel.group)
        schedule = torch.tensor([projector.gap, projector.next_refresh], dtype=torch.int64, device=self.parallel.device)
        dist.broadcast(schedule, src=0, group=self.parallel.group)
        projector.gap, projector.next_refresh = (int(v) for v in schedule.tolist())

    def _broadcast_owned(self) -> None:
        """ZeRO-1: each owner sends what it updated; every rank ends the step with the same weights."""
        work = [dist.broadcast(t, src=self._owner[p], group=self.parallel.group, async_op=True)
                for p in self._group_of for t in self._trained_tensors(p)]
        for handle in work:
            handle.wait()

    def _global_norm(self) -> Tensor | None:
        """√Σ‖g‖² over every tensor: under ZeRO-1 each rank summed its own tensors'."""
        if self._owner is None:
            return None if self._norm_sq is None else self._norm_sq.sqrt()
        total = torch.zeros((), dtype=torch.float32, device=self.parallel.device) if self._norm_sq is None \
            else self._norm_sq.float().to(self.parallel.device)
        dist.all_reduce(total, group=self.parallel.group)
        return total.sqrt()

    # ------------------------------------------------------------------ layer-wise hooks
    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: fold this micro-batch in, update on the last one."""
        micro = self._micro[p] = self._micro.get(p, 0) + 1
        if micro > self.grad_accum:
            raise RuntimeError(f"a parameter got {micro} backward passes in one step but "
                               f"grad_accum={self.grad_accum}: build the optimizer with grad_accum = the number "
                               "of micro-batches per step, and call optimizer.step() after each step")
        state = self.state[p]
        projector = state.get("projector")
        # an owner-only projection (ZeRO-1) cannot project other ranks' gradients: they accumulate in full
        if projector is not None and self._owner is None and not projector.due(state.get("step", 0)):
            low = projector.project(self._grad(p))  # exact: P(G1 + G2) = P G1 + P G2
            self._drop_grad(p)
            if p in self._low_grads:
                self._low_grads[p].add_(low)
            else:
                self._low_grads[p] = low
            del low
        if micro == self.grad_accum:
            if self.parallel is not None:
                self._reduce_in_place(p, self._low_grads.get(p, self._grad(p)))
            if self._owns(p):
                self._finish(p, self._group_of[p])
            else:  # another rank owns it: it received the sum; free ours
                self._low_grads.pop(p, None)
                self._drop_grad(p)

    def _finish(self, p: Tensor, group: dict) -> None:
        """Update `p` from what it accumulated this step (if anything) and free its gradient."""
        if p in self._low_grads or self._grad(p) is not None:  # pop: _update holds the only reference
            self._update(p, group, self._grad(p), self._low_grads.pop(p, None))
        self._drop_grad(p)

    # ------------------------------------------------------------------ one AdamW update
    def _update(self, p: Tensor, group: dict, grad: Tensor | None, low: Tensor | None = None) -> None:
        """AdamW on `p` from its full gradient `grad`, or from its accumulated low-rank gradient `low`."""
        state = self.state[p]
        step = state.get("step", 0)
        projector = state.get("projector")
        if isinstance(projector, ExpertProjectors):
            return self._update_experts(p, group, grad, low)
        if projector is not None and low is None:
            if projector.due(step):
                projector.refresh(grad, step)
                self._share_projection(projector)
            low = projector.project(grad)  # (r, n) or (m, r)
        g = grad if projector is None else low
        norm = torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32))
        self._norm_sq = norm.square() if self._norm_sq is None else self._norm_sq + norm.square().to(self._norm_sq)
        if self.grad_clip is not None:  # in place, as torch.nn.utils.clip_grad_norm_
            g.mul_((self.grad_clip / (norm + 1e-6)).clamp_(max=1.0))
        if "exp_avg" not in state:
            self._init_moments(state, g, self._weight_dtype(p))
        state["step"] = t = step + 1
        lr, wd, (beta1, _) = group["lr"], group["weight_decay"], group["betas"]
        step_size = lr / (1 - beta1**t)
        if projector is None:
            flat_p, flat_g = p.view(-1), g.reshape(-1)
            for sl in _slices(flat_p.numel()):
                m, denom = self._moments(state, flat_g[sl], sl, group, t)
                if wd != 0:
                    flat_p[sl].mul_(1 - lr * wd)
                flat_p[sl].addcdiv_(m, denom, value=-step_size)
                del m, denom  # before the next slice allocates its own
        else:
            m, denom = self._moments(state, g.reshape(-1), slice(0, g.numel()), group, t)
            direction = torch.div(m, denom, out=denom).view(g.shape).to(self._weight_dtype(p))  # (r, n) or (m, r)
            # denom too: in fp32 beside a bf16 direction it would wait through the add-back (Q-GaLore's
            # full-size update and stochastic rounding) for nothing
            del m, denom, g, low
            self._add_back(p, projector, direction, alpha=-step_size * projector.scale, beta=1 - lr * wd)

    def _update_experts(self, p: Tensor, group: dict, grad: Tensor | None, low: Tensor | None) -> None:
        """AdamW on a fused expert weight (E, m, n), expert by expert, each as a weight of its own:
        its projection (refreshed when due), its norm and clipping, its slice of the moments."""
        state = self.state[p]
        step = state.get("step", 0)
        projectors: ExpertProjectors = state["projector"]
        # data parallel without sharding, between refreshes: `_reduce_gradient` left the gradient to
        # us; each expert's projection is reduced in turn, so one expert's R is alive at a time
        reduce_each = self.parallel is not None and self._owner is None and low is None and not projectors.due(step)
        if "exp_avg" not in state:
            self._init_moments(state, p, self._weight_dtype(p), shape=projectors.low_rank_shape())
        state["step"] = t = step + 1
        lr, wd, (beta1, _) = group["lr"], group["weight_decay"], group["betas"]
        step_size = lr / (1 - beta1**t)
        for e, projector in enumerate(projectors.experts):
            if low is None:
                if projector.due(step):
                    projector.refresh(grad[e], step)
                    self._share_projection(projector)
                g = projector.project(grad[e])  # (r, n) or (m, r): one expert's
                if reduce_each:
                    self._reduce_in_place(p, g)
            else:
                g = low[e]  # projected in a hook (or reduced across ranks) already
            norm = torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32))
            self._norm_sq = norm.square() if self._norm_sq is None else self._norm_sq + norm.square().to(self._norm_sq)
            if self.grad_clip is not None:
                g.mul_((self.grad_clip / (norm + 1e-6)).clamp_(max=1.0))
            expert = {k: (v[e] if k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax") else v)
                      for k, v in state.items() if isinstance(v, Tensor)}
            m, denom = self._moments(expert, g.reshape(-1), slice(0, g.numel()), group, t)
            direction = torch.div(m, denom, out=denom).view(g.shape).to(self._weight_dtype(p))
            del m, denom, g, expert  # nothing of this expert's may wait for the next one
            self._add_back(p[e], projector, direction, alpha=-step_size * projector.scale, beta=1 - lr * wd)
            del direction

    def _init_moments(self, state: dict, g: Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> None:
        """Moments shaped as `g`; or as `shape` (E, r, n) for a fused expert weight, stacked per expert
        (8-bit or not by one expert's size, its absmax blocks its own: (E, blocks))."""
        lead = () if shape is None else shape[:1]  # (E,): one expert's blocks per row
        shape = tuple(g.shape) if shape is None else shape
        per = math.prod(shape[len(lead):])
        if self.optim_bits == 8 and per >= self.min_8bit_size:
            blocks = (*lead, math.ceil(per / ADAM8_BLOCK))
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros(shape, dtype=torch.uint8, device=g.device)
                state[key + "_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=g.device)
            state["qmap_signed"], state["qmap_unsigned"] = self._maps(g.device)
        else:
            moment_dtype = torch.float32 if self.optim_bits == 8 else dtype  # bnb keeps small states fp32
            state["exp_avg"] = torch.zeros(shape, dtype=moment_dtype, device=g.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=moment_dtype, device=g.device)

    def _maps(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._qmaps:
            self._qmaps[device] = _dynamic_maps(device)
        return self._qmaps[device]

    def _moments(self, state: dict, g: Tensor, sl: slice, group: dict, t: int) -> tuple[Tensor, Tensor]:
        """Update the moments over the flat slice `sl` with gradient slice `g`; return (m, √v̂ + eps)."""
        beta1, beta2 = group["betas"]
        bias_correction2_sqrt = math.sqrt(1 - beta2**t)
        if "exp_avg_absmax" not in state:  # dense, as torch.optim.AdamW (single-tensor path)
            m, v = state["exp_avg"].view(-1)[sl], state["exp_avg_sq"].view(-1)[sl]
            g = g.to(m.dtype)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            return m, v.sqrt().div_(bias_correction2_sqrt).add_(group["eps"])
        # 8-bit: dequantize the slice, update in fp32, quantize back (blocks never straddle slices)
        blocks = slice(sl.start // ADAM8_BLOCK, -(-sl.stop // ADAM8_BLOCK))
        codes_m, codes_v = state["exp_avg"].view(-1)[sl], state["exp_avg_sq"].view(-1)[sl]
        absmax_m, absmax_v = state["exp_avg_absmax"][blocks], state["exp_avg_sq_absmax"][blocks]
        m = _dequantize(codes_m, absmax_m, state["qmap_signed"])
        v = _dequantize(codes_v, absmax_v, state["qmap_unsigned"])
        g = g.float()
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        del g
        _quantize_into(m, codes_m, absmax_m, state["qmap_signed"])
        _quantize_into(v, codes_v, absmax_v, state["qmap_unsigned"])
        return m, v.sqrt_().div_(bias_correction2_sqrt).add_(group["eps"])


def galore_param_groups(model: nn.Module, cfg: GaLoreConfig) -> list[dict]:
    """Two named groups: the targeted weights (projected: linear weights, and fused expert weights
    of mixture-of-experts blocks, each expert's matrix on its own) and every other trainable parameter.

    GPT-2's Conv1D weights, stored (in, out), are flagged in the projected group's `fan_in_fan_out`
    (present only when there are any). Raises ValueError when `cfg.rank` exceeds the smaller
    dimension of a targeted weight (of an expert's matrix).
    """
    chosen = [(path, m) for path, m in target_linears(model, cfg.targets, experts_allowed=True, method="GaLore")
              if m.weight.requires_grad]
    targets = {id(m.weight): f"{path}.weight" for path, m in chosen}
    targets.update({id(p): name for name, p in target_experts(model, cfg.targets) if p.requires_grad})
    transposed = {id(m.weight) for _, m in chosen if type(m).__name__ == "Conv1D"}  # stored (in, out)
    too_small = [(name, tuple(p.shape[-2:])) for name, p in model.named_parameters()
                 if id(p) in targets and cfg.rank > min(p.shape[-2:])]
    if too_small:
        smallest = min(min(shape) for _, shape in too_small)
        listed = ", ".join(f"{name} ({shape[0]}×{shape[1]})" for name, shape in too_small[:3])
        more = f" and {len(too_small) - 3} more" if len(too_small) > 3 else ""
        raise ValueError(f"rank={cfg.rank} is larger than the smaller dimension of {len(too_small)} targeted "
                         f"weights: {listed}{more}; set rank ≤ {smallest}, or pick targets without those layers")
    projected, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projected if id(p) in targets else others).append((name, p))
    group = {"params": projected, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale,
             "proj_type": cfg.proj_type, "svd": cfg.svd, "stagger": cfg.stagger}
    if transposed:
        group["fan_in_fan_out"] = [id(p) in transposed for _, p in projected]
    return [group] + ([{"params": others}] if others else [])


def build_galore_optimizer(model: nn.Module, cfg: GaLoreConfig, lr: float, weight_decay: float = 0.0,
                           betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                           grad_clip: float | None = None, grad_accum: int = 1,
                           parallel: Parallel | None = None) -> GaLoreAdamW:
    """The GaLore optimizer for `model` as `cfg` describes it (layer-wise hooks included);
    `grad_accum` micro-batches make one step; `parallel`: this rank's data-parallel job."""
    return GaLoreAdamW(galore_param_groups(model, cfg), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                       optim_bits=8 if cfg.optimizer == "adamw8bit" else 32, grad_clip=grad_clip,
                       layerwise=cfg.layerwise, grad_accum=grad_accum, parallel=parallel)


# ---------------------------------------------------------------------------------- method hooks
def prepare(model: nn.Module, cfg: GaLoreConfig, setup: TrainSetup, lr: float, weight_decay: float,
            grad_clip: float | None, parallel: Parallel | None = None) -> Prepared:
    """Full-rank weights, GaLore's optimizer over all of them; it clips per layer (not the loop) and
    reduces its own gradients across ranks."""
    if parallel is not None:
        parallel.wrap(model, cfg)  # refuses the strategies GaLore cannot take; wraps nothing
    optimizer = build_galore_optimizer(model, cfg, lr, weight_decay, grad_clip=grad_clip,
                                       grad_accum=setup.grad_accum, parallel=parallel)
    return Prepared(model, optimizer, cfg, grad_clip=None, lowrank=optimizer, parallel=parallel)
