"""LoRA: freeze W, train a low-rank update B A beside it (Hu et al., arXiv 2106.09685).

        h = W x + (B A x) · scaling          scaling = alpha / rank  (rsLoRA: alpha / √rank)
            ▲                 ▲
      ┌─────┴─────┐     ┌─────┴─────┐
      │ W  out×in │     │ B  out×r  │  zeros: the model starts unchanged
      │ (frozen)  │     └─────▲─────┘
      └─────▲─────┘     ┌─────┴─────┐
            │           │ A   r×in  │  Kaiming-uniform (a=√5)
            │           └─────▲─────┘
            └───────── x ─────┘ (dropout on this branch only)

Memory saved: no gradients and no optimizer states for W — only for A and B, r·(in + out)
values per layer instead of in·out (rank 8 on a 4096×4096 layer: 0.4% of it). What LoRA adds:
the adapters themselves and, per adapted layer, the rank-r activation A x saved for backward
(plus the dropped-out copy of x and its mask when dropout > 0).

Adapters are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, keys
like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so `peft` loads ours and
we load theirs; peft itself is never imported here.

GPT-2's `Conv1D` (transformers.pytorch_utils; c_attn, c_proj, c_fc) is a linear layer whose weight
is stored transposed, (in, out). It is adapted exactly like an nn.Linear: A is r×in, B is out×r,
and only the merge differs (W += (B A)ᵀ · scaling). peft does the same and marks it with
`fan_in_fan_out: true` in adapter_config.json, which we write when the adapted layers come from
Conv1D (a QLoRA base quantized from one included); lora_A/lora_B keep their (r, in)/(out, r)
shapes either way, and peft, like `load_adapter`, decides per layer from its type.

    model = apply_lora(model, LoRAConfig(rank=8, alpha=16, targets="all-linear"))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    ...
    save_adapter(model, cfg, "runs/x/adapter")

modules_to_save (LoRAConfig.modules_to_save: "embed_tokens", "lm_head", both): peft's way, a
`ModulesToSave` in place of the module holding the frozen `original_module` and a trainable copy
`modules_to_save.default` that the forward uses. The copy rather than training in place, because
that is what peft does (users compare with it): those weights are held twice, and with tied
embeddings the copy is untied from the other use (peft warns, trains the copy alone; so do we).
The adapter file holds the copies under the module's own path (`base_model.model.model.embed_tokens.weight`),
`modules_to_save` in adapter_config.json lists their short names, as peft 0.21 writes and reads them.
"lm_head" among the targets puts LoRA on the output projection (peft allows it; peft's file then also
carries `lm_head.base_layer.weight`, which load_adapter accepts and ignores: the base is the model's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from estimator.config import LoRAConfig, TrainSetup
from estimator.targets import input_path, is_linear, linear_shape, output_path, target_linears

from .distributed import Parallel
from .methods import Prepared

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out) — peft's `fan_in_fan_out`."""
    return type(module).__name__ == "Conv1D"


def from_conv1d(module: nn.Module) -> bool:
    """A Conv1D, or a layer built from one (QLoRA's Linear4bit sets `from_conv1d`): the model it
    belongs to stores this weight (in, out), so its PEFT adapter says `fan_in_fan_out: true`."""
    return is_conv1d(module) or bool(getattr(module, "from_conv1d", False))


def lora_dtype(base_layer: nn.Module) -> torch.dtype:
    """The dtype LoRA factors get by default: the base weight's, or a 4-bit layer's compute dtype."""
    if base_layer.weight.is_floating_point():
        return base_layer.weight.dtype
    return getattr(base_layer, "compute_dtype", None) or torch.float32


class LoRALinear(nn.Module):
    """`base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`, with an exact merge into W.

    base_layer is any nn.Linear, bitsandbytes' Linear4bit included (merge then is refused: it
    would re-quantize W), or GPT-2's Conv1D, whose weight is stored (in, out) (`fan_in_fan_out`:
    the merge adds the transposed update; the factors are the same). The factors live on the
    base weight's device, in `dtype` (default: `lora_dtype(base_layer)`); the input is cast to
    that dtype and the update back to the output's.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise ValueError(f"LoRA wraps nn.Linear layers (or GPT-2's Conv1D), got {type(base_layer).__name__}; "
                             "pick targets that are linear layers")
        in_features, out_features = linear_shape(base_layer)
        smallest = min(in_features, out_features)
        if not 1 <= rank <= smallest:
            raise ValueError(f"rank={rank} does not fit a {out_features}×{in_features} "
                             f"layer; pick a rank between 1 and {smallest}")
        dtype = dtype or lora_dtype(base_layer)
        device = base_layer.weight.device
        self.base_layer = base_layer.requires_grad_(False)  # W is frozen: no gradient is computed for it
        self.fan_in_fan_out = is_conv1d(base_layer)  # W stored (in, out): merges add (B A)ᵀ
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        # Identity makes no copy of x; Dropout saves a mask and the dropped copy for backward.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for model code that reads `proj.weight` (HunYuan's attention
        does; PEFT's LoRA layers allow it too)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        update = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)))
        # one fused kernel for result + update * scaling (its backward scales the gradient once)
        return torch.add(result, update.to(result.dtype), alpha=self.scaling)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling · B A in fp32, shape (out, in) — an nn.Linear weight's (a Conv1D's is its transpose)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _stored_delta(self) -> torch.Tensor:
        """delta_weight laid out as the base weight is stored: (in, out) for a Conv1D."""
        delta = self.delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    def _check_mergeable(self) -> None:
        if not self.base_layer.weight.is_floating_point():
            raise ValueError(f"cannot merge LoRA into a quantized {type(self.base_layer).__name__} (it would "
                             "re-quantize W); save the adapter and merge it into the full-precision model")

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + scaling · B A, computed in fp32 and rounded once to W's dtype."""
        if self.merged:
            return
        self._check_mergeable()
        weight = self.base_layer.weight
        weight.copy_(weight.float() + self._stored_delta())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − scaling · B A: the original W up to rounding in W's dtype."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_(weight.float() - self._stored_delta())
        self.merged = False

    def extra_repr(self) -> str:
        fan = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}{fan}"


class ModulesToSave(nn.Module):
    """peft's ModulesToSaveWrapper: the original module frozen, a trainable full copy used instead
    (same parameter names: `<path>.original_module.weight`, `<path>.modules_to_save.default.weight`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module.requires_grad_(False)
        trained = _copy_module(module)
        self.modules_to_save = nn.ModuleDict({"default": trained.requires_grad_(True)})

    @property
    def trained(self) -> nn.Module:
        return self.modules_to_save["default"]

    @property
    def weight(self) -> nn.Parameter:  # what transformers (and our code) read of an embedding or a head
        return self.trained.weight

    @property
    def bias(self):
        return getattr(self.trained, "bias", None)

    def forward(self, *args, **kwargs):
        return self.trained(*args, **kwargs)


def _copy_module(module: nn.Module) -> nn.Module:
    """A copy of `module` with its own parameters (clones; fake tensors in a dry run too)."""
    import copy

    memo = {id(p): nn.Parameter(p.detach().clone(), requires_grad=True) for p in module.parameters(recurse=True)}
    return copy.deepcopy(module, memo)


def saved_modules(model: nn.Module) -> dict[str, ModulesToSave]:
    """Every ModulesToSave of the model by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSave)}


def _save_modules(model: nn.Module, roles: tuple[str, ...]) -> None:
    """Wrap the input embeddings and/or the output projection (roles: config.SAVE_ROLES) in ModulesToSave."""
    paths = {"embed_tokens": input_path, "lm_head": output_path}
    for role in roles:
        if role == "lm_head" and model.get_output_embeddings() is None:
            raise ValueError(f"{type(model).__name__} has no output projection; drop lm_head from modules_to_save")
        path = paths[role](model)
        module = model.get_submodule(path)
        if isinstance(module, (ModulesToSave, LoRALinear)):
            raise ValueError(f"{path} already carries {type(module).__name__}; save it or adapt it, not both")
        _replace(model, path, _wrapper(module))


def _wrapper(module: nn.Module) -> ModulesToSave:
    """ModulesToSave around `module`, keeping its forward hooks (peft's recipe makes the input
    embeddings' output require grad with one: it must still run)."""
    wrapper = ModulesToSave(module)
    wrapper._forward_hooks.update(module._forward_hooks)
    return wrapper


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors — what the optimizer gets: the factors (lora_A, lora_B weights), then
    the trained copies of modules_to_save."""
    factors = [p for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    return factors + [p for m in saved_modules(model).values() for p in m.trained.parameters()]


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _check_layers(layers: list[tuple[str, nn.Module]], rank: int) -> None:
    """Every chosen layer must be linear (nn.Linear, GPT-2's Conv1D) and wide enough for `rank`;
    one error lists them all."""
    problems = []
    for path, module in layers:
        if not is_linear(module):
            problems.append(f"{path} is a {type(module).__name__}, not a linear layer "
                            "(LoRA supports nn.Linear and GPT-2's Conv1D)")
            continue
        in_features, out_features = linear_shape(module)
        if rank > min(in_features, out_features):
            problems.append(f"rank={rank} exceeds the smallest dimension of {path} "
                            f"({out_features}×{in_features}); pick rank ≤ {min(in_features, out_features)}")
    if problems:
        raise ValueError("; ".join(problems))


def _wrap(model: nn.Module, layers: list[tuple[str, nn.Module]], rank: int, alpha: float, dropout: float,
          use_rslora: bool, dtype: torch.dtype | None) -> nn.Module:
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; apply LoRA to a model without adapters")
    _check_layers(layers, rank)
    for path, base in layers:
        _replace(model, path, LoRALinear(base, rank, alpha, dropout, use_rslora, dtype))
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def lora_targets(model: nn.Module, cfg: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """(path, module) of the layers LoRA wraps: the block linears `cfg.targets` selects, and the
    output projection when it lists "lm_head"."""
    layers = target_linears(model, cfg.targets) if cfg.block_targets else []
    if cfg.head_lora:
        path = output_path(model)
        layers.append((path, model.get_submodule(path)))
    return layers


def apply_lora(model: nn.Module, cfg: LoRAConfig, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the linear layers `cfg.targets` selects in LoRALinear (lm_head too when listed), put
    `cfg.modules_to_save` in ModulesToSave (trainable copies), and freeze everything else.

    dtype: of the LoRA factors; default the base weight's dtype (a 4-bit base: its compute dtype).
    The model is changed in place and returned.
    """
    layers = lora_targets(model, cfg)
    model = _wrap(model, layers, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora, dtype)
    _save_modules(model, cfg.saved_modules)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward then costs what the base model costs).
    An adapter on an lm_head tied to the embeddings is refused: it would change them too."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for path, layer in lora_layers(model).items():
        if embeddings is not None and layer.base_layer.weight is getattr(embeddings, "weight", None):
            raise ValueError(f"{path} shares its weight with the input embeddings (tied): merging would change "
                             "them too; keep the adapter unmerged, or untie the model first")
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`: subtract every adapter from its base weight."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


# ---------------------------------------------------------------------------------- PEFT format
def peft_target_modules(model: nn.Module) -> list[str]:
    """Module names peft matches to exactly the adapted layers of `model`.

    peft selects a module when its path equals a target or ends with "." + target. Layer names
    (q_proj, ...) are used when they pick out exactly the adapted layers; full paths otherwise.
    """
    layers = lora_layers(model)
    adapted = set(layers)
    names = sorted({path.rsplit(".", 1)[-1] for path in adapted})
    inside = {f"{p}.{child}" for p, layer in layers.items() for child, _ in layer.named_modules() if child}
    selected = {path for path, _ in model.named_modules()
                if path and path not in inside and path.rsplit(".", 1)[-1] in names}
    return names if selected == adapted else sorted(adapted)


def save_adapter(model: nn.Module, cfg: LoRAConfig, directory: str | Path,
                 base_model_name_or_path: str | None = None, state: dict | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` as peft 0.21 does
    (`fan_in_fan_out: true` when the adapted layers are, or were quantized from, GPT-2's Conv1D)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save; call apply_lora(model, cfg) first")
    wrong = [path for path, layer in layers.items()
             if layer.rank != cfg.rank or not math.isclose(layer.scaling, cfg.scaling)]
    if wrong:
        raise ValueError(f"cfg (rank={cfg.rank}, scaling={cfg.scaling:g}) does not describe the layers "
                         f"{', '.join(wrong[:3])}; pass the LoRAConfig the model was built with")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model),
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": any(from_conv1d(layer.base_layer) for layer in layers.values()),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted({p.rsplit(".", 1)[-1] for p in saved_modules(model)}) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
    }
    tensors = {}
    for path, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = state[f"{path}.{part}.weight"] if state is not None else getattr(layer, part).weight
            tensors[f"{PEFT_PREFIX}{path}.{part}.weight"] = weight.detach().contiguous()
    for path, wrapper in saved_modules(model).items():  # peft keeps the copy's keys under the module's own path
        for name, param in wrapper.trained.named_parameters():
            key = f"{path}.modules_to_save.default.{name}"
            tensors[f"{PEFT_PREFIX}{path}.{name}"] = (state[key] if state is not None else param).detach().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def _read_peft_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a folder written by save_adapter or peft's save_pretrained")
    config = json.loads(path.read_text())
    # options that change what the weights mean; absent, null, false or empty are all fine.
    # fan_in_fan_out is not one of them: the factors are (r, in)/(out, r) either way, and whether
    # W is stored transposed follows from each layer's type (a Conv1D's is), as in peft.
    supported = {"peft_type": "LORA", "bias": "none"}
    problems = [f"{key}={config.get(key)!r} (only {want!r} is supported)" for key, want in supported.items()
                if config.get(key) != want]
    problems += [f"{key}={config[key]!r} (not supported)" for key in
                 ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern")
                 if config.get(key)]
    if problems:
        raise ValueError(f"{path}: unsupported adapter options {', '.join(problems)}")
    return config


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a PEFT-format LoRA adapter (ours or peft's) into `model`; returns the model.

    A model without LoRA layers gets them on exactly the modules the file holds weights for
    (in the base weight's dtype, a 4-bit base's compute dtype); a model with LoRA layers must
    have them on the same modules with the same ranks. Scaling comes from the adapter's config.
    """
    directory = Path(directory)
    config = _read_peft_config(directory)
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    saved = _load_saved_modules(model, config, state, directory)
    # peft saves the base weight of an adapted lm_head / embedding too: the model has its own
    state = {k: v for k, v in state.items() if k not in saved and not k.endswith(".base_layer.weight")}
    bad = [k for k in state if not (k.startswith(PEFT_PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight")))]
    if bad:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: unexpected keys {', '.join(bad[:3])}; "
                         f"only {PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight are supported")
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    paths = sorted({k.rsplit(".", 2)[0] for k in state})
    halves = [p for p in paths if f"{p}.lora_A.weight" not in state or f"{p}.lora_B.weight" not in state]
    if halves:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: {', '.join(halves[:3])} lack lora_A or lora_B; "
                         "the file is incomplete, save the adapter again")
    rank, alpha, use_rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    if not lora_layers(model):
        modules = dict(model.named_modules())
        missing = [p for p in paths if p not in modules]
        if missing:
            raise ValueError(f"the adapter adapts {', '.join(missing[:3])}, which this model does not have; "
                             "load it into the model it was trained on")
        _wrap(model, [(p, modules[p]) for p in paths], rank, alpha, float(config.get("lora_dropout", 0.0)),
              use_rslora, None)
    layers = lora_layers(model)
    if sorted(layers) != paths:
        raise ValueError(f"the adapter adapts {len(paths)} modules, the model has LoRA on {len(layers)} "
                         f"others ({sorted(set(layers) ^ set(paths))[:3]}); apply LoRA with the adapter's targets")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's LoRA layers are merged; call unmerge_lora(model) before loading")
    params = dict(model.named_parameters())
    wrong = [name for name, tensor in state.items() if params[name].shape != tensor.shape]
    if wrong:
        raise ValueError(f"{wrong[0]}: the adapter has shape {tuple(state[wrong[0]].shape)}, the model "
                         f"{tuple(params[wrong[0]].shape)}; build the model with rank={rank}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    for layer in layers.values():
        layer.scaling = alpha / math.sqrt(layer.rank) if use_rslora else alpha / layer.rank
    return model


def _load_saved_modules(model: nn.Module, config: dict, state: dict, directory: Path) -> set[str]:
    """Wrap and fill the adapter's modules_to_save (peft's names: the module's short name, or a
    path ending); returns the keys of `state` they used."""
    names = config.get("modules_to_save") or []
    used: set[str] = set()
    if not names:
        return used
    existing = saved_modules(model)
    for name in names:
        paths = [p for p, _ in model.named_modules() if p and (p == name or p.endswith("." + name))
                 and ".original_module" not in p and ".modules_to_save" not in p]
        paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
        if not paths:
            raise ValueError(f"{directory / ADAPTER_CONFIG}: modules_to_save {name!r} is not a module of "
                             f"{type(model).__name__}; load it into the model it was trained on")
        for path in paths:
            if path not in existing:
                _replace(model, path, _wrapper(model.get_submodule(path)))
            wrapper = model.get_submodule(path)
            with torch.no_grad():
                for pname, param in wrapper.trained.named_parameters():
                    key = f"{PEFT_PREFIX}{path}.{pname}"
                    if key not in state:
                        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: {key} is missing; save the adapter again")
                    param.copy_(state[key])
                    used.add(key)
    return used


# ---------------------------------------------------------------------------------- method hooks
def prepare(model: nn.Module, cfg: LoRAConfig, setup: TrainSetup, lr: float, weight_decay: float,
            grad_clip: float | None, parallel: Parallel | None = None) -> Prepared:
    """Adapters on `cfg.targets`, everything else frozen; the optimizer sees the adapters only."""
    return adapters_prepared(apply_lora(model, cfg), cfg, lr, weight_decay, grad_clip, parallel)


def adapters_prepared(model: nn.Module, cfg: LoRAConfig, lr: float, weight_decay: float, grad_clip: float | None,
                      parallel: Parallel | None) -> Prepared:
    """A model with adapters, wrapped for `parallel`, and an optimizer over its adapters (LoRA, QLoRA)."""
    from .full import build_optimizer

    engine = parallel.wrap(model, cfg) if parallel is not None else None
    optimizer = build_optimizer(lora_parameters(model), cfg.optimizer, lr, weight_decay, parallel=parallel)
    return Prepared(model, optimizer, cfg, grad_clip, engine=engine, parallel=parallel)


def save(model: nn.Module, cfg: LoRAConfig, directory: Path, base_name: str | None, final: bool,
         state: dict | None = None) -> None:
    """A PEFT adapter (`peft.PeftModel.from_pretrained(base, directory)` loads it); `state`: the
    whole weights, when the model holds only its shards (FSDP)."""
    save_adapter(model, cfg, directory, base_model_name_or_path=base_name, state=state)
