"""Q-GaLore's building blocks: INT8 linear weights and the lazy layer-adaptive subspace refresh.

Q-GaLore (arXiv 2407.08296) is GaLore with three memory savings:
  1. the targeted linear weights live in INT8 (groups of 256, `lowrank/quant.py`): 1.016 bytes per
     weight instead of 2 (bf16) — the dequantized weight exists only for one matmul at a time;
  2. the projection matrices live in INT4 (`QuantizedMatrix`, 0.516 bytes per element);
  3. layers whose subspace stops moving refresh it less often (`AdaptiveGap`): fewer SVDs.

How a weight gradient reaches the optimizer. An INT8 tensor cannot carry a `.grad`, so there is
no parameter for autograd to fill. `Int8Linear`'s backward computes the full weight gradient
(out, in) in the compute dtype, adds it to `layer.weight_grad` (plain attribute, None when empty;
micro-batches accumulate), then calls the hooks registered with `register_weight_grad_hook`, in
order, with the layer — the twin of `Tensor.register_post_accumulate_grad_hook`. A layer-wise
optimizer projects `weight_grad`, sets it to None, steps, and calls `layer.apply_update(update)`
right there, so one layer's full gradient is alive at a time. Without hooks `weight_grad` just
waits for a global `step()`. The grad of `bias` (a normal Parameter) goes to `bias.grad`.

GPT-2's Conv1D (weight stored (in, out)) becomes an Int8Linear like an nn.Linear: its weight is
transposed to (out, in) before quantization, so the layer computes exactly what a Conv1D holding
the dequantized weight would, and Q-GaLore projects its gradient as the equivalent Linear's. The
layer remembers it (`from_conv1d`): `dequantize_model_weights` gives back a Conv1D, so the saved
model loads into the original architecture.

    model = quantize_model_weights(model, QGaLoreConfig(rank=128))
    for name, layer in int8_linears(model):
        layer.register_weight_grad_hook(my_layerwise_step)   # reads layer.weight_grad
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from estimator.config import QGaLoreConfig, TrainSetup
from estimator.targets import target_experts, target_linears

from .distributed import Parallel
from .galore import ExpertProjectors, GaLoreAdamW
from .methods import Prepared
from .projector import GaLoreProjector
from .quant import CONSTANT_DTYPE, QuantizedMatrix, dequantize, num_groups, quantize, stochastic_update_

GAP_FACTOR = 2  # the paper doubles a stable layer's gap


# ----------------------------------------------------------------------------- the INT8 linear layer
class _Int8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized on the fly; saves x only, never the dequantized W."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, anchor: Tensor | None, layer: Int8Linear) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_c = x.to(dtype)
        weight = layer.dequantize_weight(dtype)  # (out, in) transient, freed on return
        y = F.linear(x_c, weight, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_c)
        ctx.layer, ctx.input_dtype = layer, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors  # (..., in) in the compute dtype
        layer: Int8Linear = ctx.layer
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:  # before the hooks: they may update this very weight
            weight = layer.dequantize_weight(x.dtype)  # (out, in) transient, dequantized again
            grad_x = (grad_out @ weight).to(ctx.input_dtype)
            del weight
        g_out = grad_out.reshape(-1, layer.out_features)  # (tokens, out)
        if ctx.needs_input_grad[1]:
            grad_bias = g_out.sum(0).to(ctx.bias_dtype)
        if layer.weight_requires_grad:
            grad_w = g_out.T @ x.reshape(-1, layer.in_features)  # (out, in) in the compute dtype
            layer.weight_grad = grad_w if layer.weight_grad is None else layer.weight_grad.add_(grad_w)
            del grad_w  # a hook that drops layer.weight_grad frees the gradient at once
            layer._uses = max(0, layer._uses - 1)
            if layer._uses == 0:  # the layer's last use this backward (a looped model runs it twice)
                layer._run_weight_grad_hooks()
        return grad_x, grad_bias, None, None


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored in INT8 groups and updated by stochastic rounding.

    Buffers (in the state_dict): weight_codes uint8 (out, in), weight_scales and weight_offsets
    fp16 (groups,) — 1 + 4/group_size bytes per weight. bias stays a float Parameter.
    The weight gradient goes to `weight_grad` and the hooks (see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 256,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n = num_groups(in_features * out_features, group_size)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales", torch.ones(n, dtype=CONSTANT_DTYPE, device=device))
        self.register_buffer("weight_offsets", torch.zeros(n, dtype=CONSTANT_DTYPE, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.weight_grad: Tensor | None = None
        self.weight_requires_grad = True
        self.from_conv1d = False  # quantized from GPT-2's Conv1D: dequantizes back into one
        self._weight_grad_hooks: OrderedDict[int, Callable[[Int8Linear], None]] = OrderedDict()
        self._uses = 0  # forward calls whose backward has not run yet (see `forward`)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, group_size: int = 256) -> Int8Linear:
        """Quantize an nn.Linear (or GPT-2's Conv1D, whose weight is (in, out)) into an Int8Linear."""
        weight = linear.weight.detach()
        conv1d = type(linear).__name__ == "Conv1D"
        if conv1d:
            weight = weight.T
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=linear.bias is not None, group_size=group_size, device="meta")
        layer.from_conv1d = conv1d
        layer.weight_codes, layer.weight_scales, layer.weight_offsets = quantize(weight, 8, group_size)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full (out, in) weight in `dtype`: a new tensor, the caller's to free."""
        return dequantize(self.weight_codes, self.weight_scales, self.weight_offsets, self.group_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """A model that runs this layer more than once per forward (a looped, recurrent-depth family
        such as Dory) gets one weight gradient per backward, summed over the uses: the hooks run
        after the last use's backward, never on a part (a layer-wise update in between would change
        the weight the earlier use's backward still multiplies by). Checkpointing's recomputation,
        which runs inside backward, is not a use."""
        if torch.is_grad_enabled() and self.weight_requires_grad and torch._C._current_graph_task_id() == -1:
            self._uses += 1
        anchor = None
        if torch.is_grad_enabled() and self.weight_requires_grad and not x.requires_grad and (
                self.bias is None or not self.bias.requires_grad):
            # nothing else needs a grad here: an empty leaf makes autograd call our backward anyway
            anchor = torch.empty(0, device=x.device, requires_grad=True)
        return _Int8LinearFunction.apply(x, self.bias, anchor, self)

    # -- the weight gradient
    def register_weight_grad_hook(self, hook: Callable[[Int8Linear], None]) -> RemovableHandle:
        """hook(layer) runs in backward after each gradient is added to `layer.weight_grad`."""
        handle = RemovableHandle(self._weight_grad_hooks)
        self._weight_grad_hooks[handle.id] = hook
        return handle

    def _run_weight_grad_hooks(self) -> None:
        for hook in list(self._weight_grad_hooks.values()):
            hook(self)

    # -- the weight update
    @torch.no_grad()
    def apply_update(self, update: Tensor, generator: torch.Generator | None = None, beta: float = 1.0) -> None:
        """W ← beta·W + update (full size, any float dtype), re-quantized by unbiased stochastic rounding.

        beta = 1 - lr·weight_decay is AdamW's decoupled decay, applied without dequantizing W.
        """
        stochastic_update_(self.weight_codes, self.weight_scales, self.weight_offsets, update,
                           self.group_size, bits=8, generator=generator, beta=beta)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) must not round the fp16 constants: hide them as int16 meanwhile.
        self.weight_scales = self.weight_scales.view(torch.int16)
        self.weight_offsets = self.weight_offsets.view(torch.int16)
        try:
            return super()._apply(fn, recurse)
        finally:
            self.weight_scales = self.weight_scales.view(CONSTANT_DTYPE)
            self.weight_offsets = self.weight_offsets.view(CONSTANT_DTYPE)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


def int8_linears(model: nn.Module) -> list[tuple[str, Int8Linear]]:
    """(path, layer) of every Int8Linear in the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Int8Linear)]


def quantize_model_weights(model: nn.Module, cfg: QGaLoreConfig) -> nn.Module:
    """Replace the target linear layers (cfg.targets) by Int8Linear, in place; returns the model.

    Embeddings, norms and lm_head keep their dtype. Layers are converted one at a time, so the
    extra memory is one layer's fp32 work blocks; each float weight is freed when replaced.
    """
    if int8_linears(model):
        raise ValueError("this model already has Int8Linear layers; quantize_model_weights runs once per model")
    # names only: hold no layer; fused expert weights (3-D) stay in the weight dtype
    names = [name for name, _ in target_linears(model, cfg.targets, experts_allowed=True, method="Q-GaLore")]
    for name in names:
        parent, _, child = name.rpartition(".")
        layer = Int8Linear.from_linear(model.get_submodule(name), cfg.weight_group_size)
        setattr(model.get_submodule(parent), child, layer)
    return model


# ----------------------------------------------------------------------------- quantized projections
class QuantizedStore:
    """A projection matrix held in `bits` (4: packed INT4, 8, or 16: fp16) groups of `group_size`.

    The `ProjectionStore` of lowrank/projector.py: `make_store=lambda dtype: QuantizedStore(dtype,
    cfg.proj_bits, cfg.proj_group_size)`. `get` dequantizes into `dtype` on every call: a
    transient of the projection's size, freed after the matmul that uses it.
    """

    def __init__(self, dtype: torch.dtype, bits: int = 4, group_size: int = 256) -> None:
        self.dtype, self.bits, self.group_size = dtype, bits, group_size
        self.matrix: QuantizedMatrix | None = None

    def set(self, matrix: Tensor) -> None:
        self.matrix = QuantizedMatrix.from_float(matrix, self.bits, self.group_size)

    def get(self) -> Tensor:
        if self.matrix is None:
            raise RuntimeError("projection matrix used before the first refresh")
        return self.matrix.dequantize(self.dtype)

    def state_tensors(self) -> list[Tensor]:
        return [] if self.matrix is None else self.matrix.state_tensors()

    def state_dict(self) -> dict[str, Any]:
        return {"matrix": None if self.matrix is None else self.matrix.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["matrix"]
        self.matrix = None if saved is None else QuantizedMatrix.from_state_dict(saved)


# ----------------------------------------------------------------------------- lazy adaptive refresh
@dataclass
class GapRecord:
    """One subspace refresh of one layer: when, how similar to the previous one, the gap after it."""

    step: int
    similarity: float | None  # |cos| of the leading singular vectors; None for the first SVD
    gap: int


def leading_vector(projection: Tensor, side: str) -> Tensor:
    """The leading singular vector in a projection: column 0 of U (left) or row 0 of Vᴴ (right)."""
    if side == "left":
        return projection[:, 0]
    if side == "right":
        return projection[0, :]
    raise ValueError(f"side={side!r} must be 'left' (projection = U[:, :r]) or 'right' (projection = Vh[:r])")


def subspace_similarity(old: Tensor, new: Tensor) -> float:
    """|cos| between two leading singular vectors: a singular vector's sign is arbitrary."""
    if old.shape != new.shape:
        raise ValueError(f"leading vectors of shapes {tuple(old.shape)} and {tuple(new.shape)} cannot be compared")
    return F.cosine_similarity(old.float(), new.float(), dim=0).abs().item()


class AdaptiveGap:
    """How long one layer waits between GaLore subspace refreshes; doubles it once the subspace is stable.

    After each SVD, `record` compares the new leading singular vector with the previous one
    (|cos|, sign-insensitive) and pushes it in a queue of `queue_size`. When the queue is full and
    its mean is ≥ cos_threshold, the gap doubles and the queue is cleared, so the next doubling
    needs queue_size new refreshes at the new gap. adaptive=False only records (GaLore plots).

    The projector keeps the schedule (lowrank/projector.py): `projector.on_refresh = gap`, and
    each refresh calls this object, which records the event and sets `projector.gap`. The previous
    leading vector is kept here in fp32 (one column, m or n floats), so the comparison does not
    need the old projection (which may be gone, or INT4).
    """

    def __init__(self, gap: int, side: str = "left", cos_threshold: float = 0.4, queue_size: int = 5,
                 adaptive: bool = True) -> None:
        problems = []
        if not (isinstance(gap, int) and not isinstance(gap, bool) and gap >= 1):
            problems.append(f"gap={gap!r} must be a whole number ≥ 1")
        if side not in ("left", "right"):
            problems.append(f"side={side!r} must be 'left' or 'right'")
        if not isinstance(queue_size, int) or queue_size < 1:
            problems.append(f"queue_size={queue_size!r} must be a whole number ≥ 1")
        if problems:
            raise ValueError("; ".join(problems))
        self.gap, self.side = gap, side
        self.cos_threshold, self.queue_size, self.adaptive = float(cos_threshold), queue_size, adaptive
        self.queue: deque[float] = deque(maxlen=queue_size)
        self.history: list[GapRecord] = []
        self.last_vector: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: QGaLoreConfig, side: str) -> AdaptiveGap:
        return cls(cfg.update_proj_gap, side, cfg.cos_threshold, cfg.queue_size, cfg.adaptive)

    @property
    def svd_count(self) -> int:
        return len(self.history)

    @property
    def similarities(self) -> list[float | None]:
        return [r.similarity for r in self.history]

    @torch.no_grad()
    def record(self, new: Tensor, step: int, old: Tensor | None = None) -> float | None:
        """Note the SVD done at `step` with its new projection; returns the similarity (None first).

        old: the previous projection, to compare with instead of the kept leading vector.
        """
        vector = leading_vector(new, self.side).detach().float().clone()
        previous = leading_vector(old, self.side) if old is not None else self.last_vector
        similarity = None if previous is None else subspace_similarity(previous, vector)
        if similarity is not None:
            self.queue.append(similarity)
            full = len(self.queue) == self.queue_size
            if self.adaptive and full and sum(self.queue) / self.queue_size >= self.cos_threshold:
                self.gap *= GAP_FACTOR
                self.queue.clear()
        self.last_vector = vector
        self.history.append(GapRecord(step, similarity, self.gap))
        return similarity

    def __call__(self, projector: Any, event: Any) -> None:
        """GaLoreProjector.on_refresh: record event.new (dict side -> matrix), set projector.gap."""
        self.record(event.new[self.side], event.step)
        projector.gap = self.gap

    def state_tensors(self) -> list[Tensor]:
        return [] if self.last_vector is None else [self.last_vector]

    def state_dict(self) -> dict[str, Any]:
        return {"gap": self.gap, "queue": list(self.queue), "last_vector": self.last_vector,
                "history": [vars(r).copy() for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gap = int(state["gap"])
        self.queue = deque(state["queue"], maxlen=self.queue_size)
        vector = state["last_vector"]
        self.last_vector = None if vector is None else vector.float()
        self.history = [GapRecord(**r) for r in state["history"]]


class ExpertGaps:
    """The adaptive gaps of a fused expert weight's projectors (`ExpertProjectors`), one per expert."""

    def __init__(self, gaps: list[AdaptiveGap]) -> None:
        self.gaps = gaps

    def state_tensors(self) -> list[Tensor]:
        return [t for gap in self.gaps for t in gap.state_tensors()]

    def state_dict(self) -> dict[str, Any]:
        return {"experts": [gap.state_dict() for gap in self.gaps]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for gap, saved in zip(self.gaps, state["experts"], strict=True):
            gap.load_state_dict(saved)


# ----------------------------------------------------------------------------- the optimizer
class QGaLoreAdamW(GaLoreAdamW):
    """GaLore AdamW whose projected weights are Int8Linear layers (Q-GaLore, arXiv 2407.08296).

    A projected "parameter" is a layer's `weight_codes`; its gradient is `layer.weight_grad`
    (layer-wise: the layer's weight-grad hook steps at once); its update is projected back in
    the compute dtype and added by unbiased stochastic rounding (`Int8Linear.apply_update`).
    Projections are held in `proj_bits` groups (INT4 packed two to a byte by default) and each
    layer's refresh gap adapts (`AdaptiveGap`). Everything else is GaLore AdamW's.

    Fused expert weights of mixture-of-experts blocks (3-D, in the group as float parameters) are
    projected expert by expert as GaLore does (`ExpertProjectors`), each expert's projection in
    INT4 with its own adaptive gap; the weights themselves stay in the weight dtype (no INT8).
    """

    def __init__(self, params, layers: dict[Tensor, Int8Linear], cfg: QGaLoreConfig, dtype: torch.dtype,
                 seed: int = 0, **kwargs) -> None:
        self._layers = layers  # weight_codes -> its layer
        self._cfg, self._dtype, self._seed = cfg, dtype, seed
        self._layer_index = {codes: i for i, codes in enumerate(layers)}
        self._generators: dict[Tensor, torch.Generator] = {}  # one stream per layer (see _generator)
        super().__init__(params, **kwargs)

    def make_projector(self, p: Tensor, group: dict, name: str, index: int,
                       count: int) -> GaLoreProjector | ExpertProjectors:
        projector = super().make_projector(p, group, name, index, count)
        gaps = []
        for one in getattr(projector, "experts", [projector]):
            gaps.append(AdaptiveGap.from_config(self._cfg, "right" if one.side == "right" else "left"))
            one.on_refresh = gaps[-1]
        self.state[p]["adaptive"] = ExpertGaps(gaps) if isinstance(projector, ExpertProjectors) else gaps[0]
        return projector

    def _make_store(self, dtype: torch.dtype) -> QuantizedStore:
        return QuantizedStore(dtype, self._cfg.proj_bits, self._cfg.proj_group_size)

    def _weight_dtype(self, p: Tensor) -> torch.dtype:
        return self._dtype if p in self._layers else p.dtype

    def _grad(self, p: Tensor) -> Tensor | None:
        layer = self._layers.get(p)
        return p.grad if layer is None else layer.weight_grad

    def _drop_grad(self, p: Tensor) -> None:
        layer = self._layers.get(p)
        if layer is None:
            p.grad = None
        else:
            layer.weight_grad = None

    def _register_hooks(self) -> list:
        hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._group_of if p.requires_grad]
        for codes, layer in self._layers.items():
            hooks.append(layer.register_weight_grad_hook(lambda _layer, codes=codes: self._on_grad(codes)))
        return hooks

    def _add_back(self, p: Tensor, projector: GaLoreProjector, direction: Tensor, alpha: float, beta: float) -> None:
        layer = self._layers.get(p)
        if layer is None:
            return super()._add_back(p, projector, direction, alpha, beta)
        update = projector.project_back(direction).mul_(alpha)  # (out, in) in the compute dtype
        layer.apply_update(update, self._generator(p), beta=beta)

    def _generator(self, codes: Tensor) -> torch.Generator:
        """The stochastic-rounding stream of one layer, seeded by its index: the same draws whichever
        rank updates the layer (ZeRO-1), in whatever order the layers come."""
        if codes not in self._generators:
            seed = self._seed * 1_000_003 + self._layer_index[codes]
            self._generators[codes] = torch.Generator(device=codes.device).manual_seed(seed)
        return self._generators[codes]

    def _trained_tensors(self, p: Tensor) -> list[Tensor]:
        """An INT8 layer's update changes its codes and its group constants."""
        layer = self._layers.get(p)
        return super()._trained_tensors(p) if layer is None else \
            [layer.weight_codes, layer.weight_scales, layer.weight_offsets]

    def _share_projection(self, projector: GaLoreProjector) -> None:
        super()._share_projection(projector)
        if self.parallel is not None and isinstance(projector.on_refresh, AdaptiveGap):
            projector.on_refresh.gap = projector.gap  # rank 0's gap decision, as its schedule

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for layer in self._layers.values():
            layer.weight_grad = None
            layer._uses = 0  # a forward that never got its backward (dropped graph) counts no longer

    def gradient_tensors(self) -> list[Tensor]:
        grads = [layer.weight_grad for layer in self._layers.values() if layer.weight_grad is not None]
        return super().gradient_tensors() + grads

    def extra_trainable_numel(self) -> int:
        """INT8 weights are trained but are not parameters: their element count."""
        return sum(codes.numel() for codes in self._layers)

    def _local_layer_info(self) -> list[dict]:
        """GaLore's per-layer info plus each layer's similarity history (the app plots it)."""
        info = super()._local_layer_info()
        for row, projector in zip(info, self.projectors()):
            row["similarities"] = projector.on_refresh.similarities
        return info

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for st in sd["state"].values():
            if isinstance(st.get("adaptive"), (AdaptiveGap, ExpertGaps)):
                st["adaptive"] = st["adaptive"].state_dict()
        sd["rounding_rng"] = {self._layer_index[codes]: gen.get_state() for codes, gen in self._generators.items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        gaps = {p: state["adaptive"] for p, state in self.state.items() if "adaptive" in state}
        saved = {k: dict(v) for k, v in state_dict["state"].items()}
        adaptive = {k: v.pop("adaptive") for k, v in saved.items() if "adaptive" in v}
        super().load_state_dict({**state_dict, "state": saved})
        index = {i: p for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for key, state in adaptive.items():
            p = index[key]
            if not self._owns(p):
                continue
            gaps[p].load_state_dict(state)
            self.state[p]["adaptive"] = gaps[p]
            projector = self.state[p]["projector"]
            if isinstance(projector, ExpertProjectors):
                for one, gap in zip(projector.experts, gaps[p].gaps):
                    one.on_refresh = gap
            else:
                projector.on_refresh = gaps[p]
        by_layer = {i: codes for codes, i in self._layer_index.items()}
        for i, rng in state_dict.get("rounding_rng", {}).items():
            self._generator(by_layer[int(i)]).set_state(rng)


def build_qgalore_optimizer(model: nn.Module, cfg: QGaLoreConfig, lr: float, weight_decay: float = 0.0,
                            betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                            grad_clip: float | None = None, seed: int = 0, grad_accum: int = 1,
                            parallel: Parallel | None = None) -> QGaLoreAdamW:
    """Q-GaLore's optimizer for a model whose target layers `quantize_model_weights` converted
    (and the fused expert weights `cfg.targets` selects, projected expert by expert)."""
    layers = int8_linears(model)
    experts = [(name, p) for name, p in target_experts(model, cfg.targets) if p.requires_grad]
    if not layers and not experts:
        raise ValueError("the model has no Int8Linear layers: call quantize_model_weights(model, cfg) first")
    too_small = [(path, (layer.out_features, layer.in_features)) for path, layer in layers
                 if cfg.rank > min(layer.out_features, layer.in_features)]
    too_small += [(name, tuple(p.shape[1:])) for name, p in experts if cfg.rank > min(p.shape[1:])]
    if too_small:
        smallest = min(min(shape) for _, shape in too_small)
        raise ValueError(f"rank={cfg.rank} is larger than the smaller dimension of {len(too_small)} targeted "
                         f"weights (e.g. {too_small[0][0]} {too_small[0][1][0]}×{too_small[0][1][1]}); "
                         f"set rank ≤ {smallest}")
    floats = [p for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    projected = [(f"{path}.weight", layer.weight_codes) for path, layer in layers] + experts
    expert_ids = {id(p) for _, p in experts}
    others = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in expert_ids]
    groups = [{"params": projected, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale,
               "proj_type": cfg.proj_type, "svd": cfg.svd, "stagger": cfg.stagger}]
    groups += [{"params": others}] if others else []
    return QGaLoreAdamW(groups, {layer.weight_codes: layer for _, layer in layers}, cfg, dtype, seed=seed,
                        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        optim_bits=8 if cfg.optimizer == "adamw8bit" else 32, grad_clip=grad_clip,
                        layerwise=cfg.layerwise, grad_accum=grad_accum, parallel=parallel)


@torch.no_grad()
def dequantize_model_weights(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every Int8Linear by an nn.Linear holding its dequantized weight, in place (by a
    Conv1D holding it transposed, (in, out), when the layer was quantized from one).

    What a finished Q-GaLore run saves: a plain model any transformers code can load (and a
    base to fine-tune). `dtype` defaults to the dtype of the model's other parameters.
    """
    floats = [p for p in model.parameters() if p.is_floating_point()]
    dtype = dtype or (floats[0].dtype if floats else torch.float32)
    for name, layer in int8_linears(model):
        device = layer.weight_codes.device
        if layer.from_conv1d:
            from transformers.pytorch_utils import Conv1D

            with torch.device("meta"):
                linear = Conv1D(layer.out_features, layer.in_features)
            linear.weight = nn.Parameter(layer.dequantize_weight(dtype).T.contiguous())
            linear.bias = nn.Parameter(torch.zeros(layer.out_features, device=device, dtype=dtype)
                                       if layer.bias is None else layer.bias.detach().to(dtype).clone())
        else:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=device, dtype=dtype)
            linear.weight.copy_(layer.dequantize_weight(dtype))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


# ----------------------------------------------------------------------------- method hooks
def prepare(model: nn.Module, cfg: QGaLoreConfig, setup: TrainSetup, lr: float, weight_decay: float,
            grad_clip: float | None, parallel: Parallel | None = None) -> Prepared:
    """INT8 target weights, Q-GaLore's optimizer over the model; it clips per layer (not the loop)
    and reduces its own gradients across ranks."""
    model = quantize_model_weights(model, cfg)
    if parallel is not None:
        parallel.wrap(model, cfg)  # refuses the strategies Q-GaLore cannot take; wraps nothing
    optimizer = build_qgalore_optimizer(model, cfg, lr, weight_decay, grad_clip=grad_clip,
                                        grad_accum=setup.grad_accum, parallel=parallel)
    return Prepared(model, optimizer, cfg, grad_clip=None, lowrank=optimizer, parallel=parallel)


def save(model: nn.Module, cfg: QGaLoreConfig, directory: Path, base_name: str | None, final: bool,
         state: dict | None = None) -> None:
    """A model folder: INT8 codes and group constants for a snapshot; the last one dequantized, so
    any transformers code loads it (the base of a later run)."""
    if final:
        dequantize_model_weights(model)
    model.save_pretrained(directory)
