"""ModelSpec: the exact parameter shapes of a causal LM, from whatever the user has.

A preset name (assets/presets.json), a `config.json` path, a model folder, or a hub id. The
model is built on the meta device (no memory, no weights) so every shape is the real
transformers module's; LoRA and GaLore act per linear layer and need them all.

    spec = load_spec("llama-7b")
    spec.params_total, spec.linears[0]   # 6738415616, LinearShape('q_proj', 'attention', 4096, 4096, ...)
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from .config import shown

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# The activation model of estimator/activations.py follows these module structures.
# Every other family's activations are traced from its own forward (estimator/profile.py).
FAMILIES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "gemma": "gemma",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a decoder block; `count` blocks have it."""

    short: str
    group: str | None
    in_features: int
    out_features: int
    bias: bool
    count: int

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


def expert_grad_key(short: str) -> str:
    """A fused expert weight's gradient, named apart from a linear's of the same short name: a
    shared expert's `down_proj` and the routed experts' `experts.down_proj` are made at different
    moments of a block's backward (the routed experts' buffers are alive only at theirs)."""
    return f"experts.{short}"


@dataclass(frozen=True)
class ExpertShape:
    """One fused expert weight of a mixture-of-experts block, (num_experts, out_features,
    in_features) as transformers stores it (`mlp.experts.gate_up_proj`); `count` blocks have it.
    GaLore projects each of its `num_experts` matrices separately."""

    short: str
    group: str | None
    num_experts: int
    out_features: int
    in_features: int
    count: int

    @property
    def numel(self) -> int:
        """Elements of one block's tensor (every expert)."""
        return self.num_experts * self.out_features * self.in_features

    @property
    def grad_key(self) -> str:
        """Its gradient's name among a block's (estimator/profile.py grad_moments)."""
        return expert_grad_key(self.short)

    @property
    def matrix(self) -> LinearShape:
        """One expert's matrix as a linear layer's shape; its count is every expert of every block."""
        return LinearShape(self.short, self.group, self.in_features, self.out_features, False,
                           self.count * self.num_experts)


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and structure of a model: what the memory model needs, nothing else."""

    name: str
    model_type: str
    family: str
    exact_family: bool  # False: no named activation formulas; the profile is traced (family "traced")
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int | None
    tie_word_embeddings: bool
    activation: str
    linears: tuple[LinearShape, ...]
    embedding_params: int  # token (and position) embeddings
    lm_head_params: int  # 0 when tied to the embeddings
    norm_params: int  # every norm weight and bias, final norm included
    other_params: int  # parameters in none of the groups above
    float_buffer_numel: int  # cast with the model's dtype (rotary inv_freq, ...)
    other_buffer_bytes: int
    dropout: dict[str, float] = field(default_factory=dict)
    sliding_window: int | None = None
    config: dict = field(default_factory=dict, compare=False, repr=False)
    # the dtype from_pretrained loads the source's saved weights in; None: built from its config
    # (a preset, a config.json, a folder without weights) — estimator/load.py
    weights_dtype: str | None = None
    # mixture of experts: the fused expert weights (their parameters are in other_params too) and
    # how many experts each token is routed to (0 for a dense model)
    experts: tuple[ExpertShape, ...] = ()
    experts_per_token: int = 0
    # the other parameters outside the experts, (numel, how many tensors): optimizers keep state
    # per tensor (MoE routers, one-output gates, learned scalars)
    other_tensors: tuple[tuple[int, int], ...] = ()
    # parameters no gradient reaches in a text-only step (a multimodal model's vision and audio
    # towers): held as weights, never a gradient or an optimizer state; in no group above
    unreached_params: int = 0
    unreached_modules: tuple[str, ...] = ()
    # decoder-block linears no gradient reaches (a cross-attention whose encoder never runs, a
    # sparse-attention indexer behind a top-k): held (quantized, adapted, projected like the rest
    # when targeted), never a gradient or an optimizer state; not in `linears`
    idle_linears: tuple[LinearShape, ...] = ()

    @property
    def linear_params(self) -> int:
        return sum(lin.numel * lin.count for lin in self.linears)

    @property
    def held_linears(self) -> tuple[LinearShape, ...]:
        """Every linear of the decoder blocks: those that train and the idle ones."""
        return self.linears + self.idle_linears

    @property
    def idle_params(self) -> int:
        """Parameters no gradient reaches: idle linears and the unreached others."""
        return sum(lin.numel * lin.count for lin in self.idle_linears) + self.unreached_params

    @property
    def params_total(self) -> int:
        return (self.linear_params + self.embedding_params + self.lm_head_params
                + self.norm_params + self.other_params + self.idle_params)

    @property
    def expert_params(self) -> int:
        """Parameters of the fused expert weights (a part of other_params)."""
        return sum(ex.numel * ex.count for ex in self.experts)

    @property
    def params_active(self) -> int:
        """Parameters one token computes with: `experts_per_token` of the `num_experts` matrices of
        each fused expert weight, every other parameter (shared experts and routers included)."""
        routed_out = sum(ex.count * (ex.num_experts - min(self.experts_per_token, ex.num_experts))
                         * ex.out_features * ex.in_features for ex in self.experts)
        return self.params_total - routed_out

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


@lru_cache(maxsize=1)
def preset_table() -> dict[str, dict]:
    """assets/presets.json: name -> {"description", "config"}."""
    with open(ASSETS / "presets.json") as f:
        return json.load(f)


def preset_names() -> list[str]:
    return list(preset_table())


# What load_config reads from a user: bounded, so a hostile or broken input fails in milliseconds
# with a message instead of filling memory or building a model for minutes.
MAX_SOURCE_CHARS = 1024  # a preset name, a path or a hub id
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KB; the Plan tab's upload has the same cap
MAX_JSON_DEPTH = 32  # real configs nest 3 or 4 levels (text_config, rope_scaling, ...)
# Size fields of a config (any nesting level): whole numbers from 1 to a bound beyond any released
# model (the deepest has ~130 layers, the widest a hidden size of ~25k, the largest vocabulary
# ~260k), so that building the model on the meta device stays fast and every byte count of an
# estimate stays far inside 64 bits.
SIZE_LIMITS = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers"), 1024),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model"), 1 << 17),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size"), 1 << 20),
    "vocab_size": 1 << 22,
    **dict.fromkeys(("num_attention_heads", "n_head", "num_key_value_heads"), 4096),
    "head_dim": 1 << 14,
    **dict.fromkeys(("max_position_embeddings", "n_positions"), 1 << 24),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts"), 1024),
}


def one_line(text: str, limit: int = 300) -> str:
    """A message from elsewhere (transformers, the OS) as one line of at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _json_depth(data) -> int:
    """How deeply objects and arrays nest (a scalar: 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def check_sizes(data: dict, where: str) -> None:
    """ValueError naming the first size field (at any nesting level) that no real model has."""
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in SIZE_LIMITS and value is not None:
                values = value if isinstance(value, list) else [value]
                top = SIZE_LIMITS[key]
                for v in values:
                    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                        raise ValueError(f"{where}: {key}={shown(value)} must be a whole number from 1 to {top:,} "
                                         f"(beyond any real model); fix the config")
            elif isinstance(value, (dict, list)):
                stack.append(value)


def config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises on a config it cannot use (its strict dataclasses' errors included)."""
    errors: tuple[type[BaseException], ...] = (ValueError, KeyError, TypeError, AttributeError, IndexError,
                                               ZeroDivisionError, OverflowError, RecursionError, RuntimeError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: no strict dataclasses
        return errors
    return (*errors, StrictDataclassError)


def _config_from_dict(data: dict, where: str):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{where} has no \"model_type\"; add one (for example \"llama\") to describe the architecture")
    if not isinstance(model_type, str):
        raise ValueError(f"{where}: model_type={shown(model_type)} must be a string such as \"llama\"")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: model_type={shown(model_type)} is not a transformers architecture this install "
                         f"knows; use a known model_type such as llama, mistral, qwen2, gemma, gpt2, gpt_neox")
    try:
        with _quiet_token_warnings():
            return AutoConfig.for_model(model_type, **data)
    except config_errors() as err:
        raise ValueError(f"{where}: transformers cannot read this {model_type} config ({err.__class__.__name__}: "
                         f"{one_line(err, 200)}); check its values") from None


def _read_config_file(path: Path) -> dict:
    """The JSON object in a config.json: at most MAX_CONFIG_BYTES, nested at most MAX_JSON_DEPTH deep."""
    where = f"config {str(path)!r}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ValueError(f"cannot read {where}: {err.strerror or err}; check the path and permissions") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{where} is larger than 1 MB; a config.json is a few KB — point to the model's "
                         f"config.json, not its weights")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text; point to the model's config.json") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON (line {err.lineno}: {err.msg}); fix the file") from None
    except RecursionError:
        raise ValueError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels; a config.json nests a few — "
                         f"fix the file") from None
    except ValueError as err:  # e.g. an integer longer than Python converts
        raise ValueError(f"{where} is not valid JSON ({one_line(err, 120)}); fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object, not {type(data).__name__}")
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise ValueError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels; a config.json nests a few — "
                         f"fix the file")
    check_sizes(data, where)
    return data


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", source))


def _check_source(source) -> str:
    """The stripped model argument, or ValueError: not a string, empty, or longer than MAX_SOURCE_CHARS."""
    if not isinstance(source, str):
        raise ValueError(f"model={shown(source)} must be a string: a preset name, a config.json path, "
                         f"a folder or a hub id")
    source = source.strip()
    if not source:
        raise ValueError("model is empty; give a preset name (e.g. llama-7b), a config.json path, a folder "
                         "or a hub id")
    if len(source) > MAX_SOURCE_CHARS:
        raise ValueError(f"model={shown(source)} is {len(source):,} characters long; a preset name, path or hub id "
                         f"is at most {MAX_SOURCE_CHARS:,}")
    return source


def _path_kind(path: Path, source: str) -> str | None:
    """"dir", "file" or None (nothing there); ValueError when the OS refuses the name itself."""
    try:
        if path.is_dir():
            return "dir"
        return "file" if path.is_file() else None
    except OSError as err:  # a name too long for the file system, a loop of links, ...
        raise ValueError(f"model={source!r} cannot be used as a path ({err.strerror or err}); give a preset, "
                         f"a config.json path, a model folder or a hub id") from None


def load_config(source: str, trust_remote_code: bool = False):
    """A transformers config from a preset name, a config.json path, a model folder or a hub id.

    Whatever the source, the config must describe a decoder-only causal LM whose special token
    ids lie inside its vocabulary (check_config); otherwise ValueError names the problem and the fix.
    """
    source = _check_source(source)
    config = _read_config(source, trust_remote_code)
    check_config(config, f"model={source!r}")
    return config


def _read_config(source: str, trust_remote_code: bool):
    presets = preset_table()
    if source in presets:
        return _config_from_dict(presets[source]["config"], f"preset {source}")
    path = Path(os.path.expanduser(source))
    kind = _path_kind(path, source)
    if kind == "dir":
        path = path / "config.json"
        if _path_kind(path, source) != "file":
            raise ValueError(f"model folder {source!r} has no config.json; point to a folder saved by save_pretrained")
        kind = "file"
    if kind == "file":
        return _config_from_dict(_read_config_file(path), f"config {str(path)!r}")
    if source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source:
        raise ValueError(f"model={source!r}: no such file or folder; give a config.json, a model folder, "
                         f"a preset or a hub id (org/name)")
    if source.endswith(".json") or "/" not in source and not _looks_like_hub_id(source):
        close = difflib.get_close_matches(source.lower(), presets, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"presets are {', '.join(presets)}"
        what = "no such file" if source.endswith(".json") else "unknown preset"
        raise ValueError(f"model={source!r}: {what}; {hint}")
    config = _hub_config(source, trust_remote_code)
    try:
        sizes = config.to_dict()
    except (TypeError, ValueError, AttributeError, RecursionError) as err:
        raise ValueError(f"model={source!r}: its hub config cannot be read ({one_line(err, 200)})") from None
    check_sizes(sizes, f"model={source!r}")
    return config


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine fails in seconds instead of retrying for half a minute."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{host}")
    host = re.sub(r"^\w+://", "", endpoint).split("/")[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_config(repo_id: str, trust_remote_code: bool):
    from transformers import AutoConfig

    def remote_code_error() -> ValueError:
        return ValueError(f"model={repo_id!r} needs its own code from the hub; pass --trust-remote-code if you trust it")

    try:  # the local cache first: no network at all
        with _quiet_token_warnings():
            return AutoConfig.from_pretrained(repo_id, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, *config_errors()) as err:
        if "trust_remote_code" in str(err):
            raise remote_code_error() from None
    if not hub_reachable():
        raise ValueError(f"model={repo_id!r}: the Hugging Face hub cannot be reached (offline) and it is not in the "
                         f"local cache; give a preset name, a local config.json, or connect to the internet")
    try:
        with _quiet_token_warnings():
            return AutoConfig.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
    except (OSError, *config_errors()) as err:
        if "trust_remote_code" in str(err):
            raise remote_code_error() from None
        raise ValueError(f"model={repo_id!r}: no config on the Hugging Face hub ({one_line(err, 160)}); "
                         f"check the id, or log in for gated models") from None


DECODER_EXAMPLES = "llama, mistral, qwen2, gemma, gpt2 or gpt_neox"
SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id")


@contextlib.contextmanager
def _quiet_token_warnings():
    """Without transformers' warning about special token ids outside the vocabulary while a config
    is built: check_config refuses the ids that break a model in one line, and lets the rest be."""
    logger = logging.getLogger("transformers.configuration_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "integer within the vocabulary" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def check_config(config, where: str) -> None:
    """ValueError unless `config` is a decoder-only causal LM whose special token ids fit its vocabulary."""
    problem = architecture_problem(config)
    if problem is None:
        try:
            data = config.to_dict()
        except (TypeError, ValueError, AttributeError, RecursionError):  # spec_from_config names it
            return
        problem = token_id_problem(data)
    if problem:
        raise ValueError(f"{where}: {problem}")


def architecture_problem(config) -> str | None:
    """Why transformers cannot build `config` as a decoder-only causal LM (one clause with the fix), or None.

    Decoder-only: not an encoder-decoder (`is_encoder_decoder`, e.g. t5, whisper, bart), a class in
    transformers' causal-LM mapping (or the hub code's own AutoModelForCausalLM), and not an encoder
    that only attends causally when `is_decoder` is set (bert, roberta, electra, ...: their configs
    carry `is_decoder` beside `add_cross_attention`; real decoders such as gpt_neox have no cross-attention switch).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None) or type(config).__name__
    fix = f"use a decoder-only model such as {DECODER_EXAMPLES}"
    auto_map = getattr(config, "auto_map", None)
    remote = isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map
    if getattr(config, "is_encoder_decoder", False) is True:
        return (f"{model_type} is an encoder-decoder model, so it cannot be trained or estimated as a "
                f"decoder-only causal LM; {fix}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        return (f"{model_type} has no causal language model class in transformers (it is not a text decoder), so "
                f"it cannot be trained or estimated as a decoder-only causal LM; {fix}")
    if getattr(config, "is_decoder", None) is False and hasattr(config, "add_cross_attention") and not remote:
        return (f"{model_type} is an encoder (bidirectional attention), so it cannot be trained or estimated as a "
                f"decoder-only causal LM; {fix}, or set \"is_decoder\": true in its config to make it causal")
    return None


def token_id_problem(data: dict) -> str | None:
    """Which special token ids (pad, bos, eos: a list too; nested configs such as text_config) lie
    outside their config's vocabulary, and the fix; None when all fit.

    An id fits when -vocab_size <= id < vocab_size, what torch's Embedding accepts as padding_idx
    (several hub configs store pad_token_id=-1 and train fine). A config without its own vocab_size
    (a multimodal one) is checked against its text_config's.
    """
    bad: dict[int, list[str]] = {}  # vocab_size -> "field=value" of the ids outside it
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, list):
            stack.extend((f"{prefix.rstrip('.')}[{i}].", child) for i, child in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        vocab = node.get("vocab_size")
        if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
            for key in SPECIAL_TOKENS:
                value = node.get(key)
                ids = value if isinstance(value, list) else [value]
                if any(isinstance(i, int) and not isinstance(i, bool) and not -vocab <= i < vocab for i in ids):
                    bad.setdefault(vocab, []).append(f"{prefix}{key}={shown(value)}")
        stack.extend((f"{prefix}{key}.", child) for key, child in node.items() if isinstance(child, (dict, list)))
        text = node.get("text_config")
        if prefix == "" and vocab is None and isinstance(text, dict) and text.get("vocab_size") is not None:
            stack.append(("", {**{k: node.get(k) for k in SPECIAL_TOKENS}, "vocab_size": text["vocab_size"]}))
    if not bad:
        return None
    clauses = []
    for vocab, fields in bad.items():
        names = " and ".join(f.split("=", 1)[0] for f in fields)
        verb = "is" if len(fields) == 1 else "are"
        clauses.append(f"{', '.join(fields)} {verb} outside the vocabulary (vocab_size={vocab}); "
                       f"set {names} below vocab_size={vocab}, or null")
    return "; ".join(clauses)


@lru_cache(maxsize=256)
def _causal_lm_class(model_type: str):
    """transformers' causal-LM class of `model_type`, or None (unknown, or not importable here)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    try:
        return getattr(transformers, name) if name else None
    except (ImportError, AttributeError, RuntimeError):
        return None


# what each attention implementation needs of the model class (PreTrainedModel.get_correct_attn_implementation)
ATTENTION_SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                     "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}


def attention_fallback(config, requested: str) -> tuple[str, str | None]:
    """The attention implementation a model of `config` (a transformers config, a ModelSpec or a
    config dict) runs when `requested` is asked for, and a note when that is another one.

    Read from the causal-LM class's own flags (`_supports_sdpa`, ...), which transformers checks
    when it builds the model: a family without SDPA (gemma2, bloom, gpt_neo, ...) runs eager
    attention instead (the note says so). Any other implementation the family cannot run is a
    ValueError naming those it can. Eager always runs; hub code (auto_map) decides for itself.
    """
    from .config import ATTN_IMPLEMENTATIONS

    if requested == "eager" or requested not in ATTENTION_SUPPORT:
        return requested, None
    data = config.config if isinstance(config, ModelSpec) else config if isinstance(config, dict) else None
    if data is not None:
        model_type, auto_map = data.get("model_type"), data.get("auto_map")
    else:
        model_type, auto_map = getattr(config, "model_type", None), getattr(config, "auto_map", None)
    if isinstance(config, ModelSpec):
        model_type = config.model_type
    if isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map or not isinstance(model_type, str):
        return requested, None
    cls = _causal_lm_class(model_type)
    supported = getattr(cls, ATTENTION_SUPPORT[requested], None) if cls is not None else None
    if not isinstance(supported, bool) or supported:
        return requested, None
    if requested == "sdpa":
        return "eager", f"{model_type} does not support sdpa attention; eager attention is used"
    valid = [a for a in ATTN_IMPLEMENTATIONS if a == "eager" or getattr(cls, ATTENTION_SUPPORT.get(a, ""), False)]
    raise ValueError(f"attn_implementation={requested} is not supported by {model_type}; use one of "
                     f"{', '.join(valid)}")


def checkpointing_problem(model_type: str) -> str | None:
    """Why gradient checkpointing cannot be used with this family (transformers has none for
    it), or None."""
    cls = _causal_lm_class(model_type) if isinstance(model_type, str) else None
    if cls is not None and getattr(cls, "supports_gradient_checkpointing", True) is False:
        return (f"{model_type} has no gradient checkpointing in transformers; run without "
                f"--grad-checkpointing (grad_checkpointing=false)")
    return None


def packing_problem(model_type: str) -> str | None:
    """Why sequence packing (position_ids restarting per document, no attention mask) cannot keep
    attention inside each document for this family, or None.

    transformers 5 finds packed documents from the position ids it hands its mask builders
    (masking_utils.find_packed_sequence_indices); a family whose modeling code does not pass
    them (bloom's ALiBi, OPT's learned offsets, ...) would attend across documents silently.
    """
    import importlib
    import inspect

    cls = _causal_lm_class(model_type) if isinstance(model_type, str) else None
    source = ""
    if cls is not None:
        try:
            source = inspect.getsource(importlib.import_module(cls.__module__))
        except (OSError, TypeError, ImportError):
            source = ""
    if re.search(r"(create_\w*mask\(|mask_kwargs\s*=\s*\{|mask_function\()[^)}]*position_ids", source):
        return None
    why = "its attention mask ignores position ids" if cls is not None else "transformers has no model class for it here"
    return (f"packed=True: {model_type} cannot keep packed documents apart ({why}), so tokens would attend "
            f"across documents; train without --packed")


def _attr(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def spec_from_config(config, name: str) -> ModelSpec:
    """Build the model on the meta device and read every parameter shape from it."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (*config_errors(), AssertionError) as err:  # torch and some models assert on their arguments
        raise ValueError(f"model={name!r}: transformers cannot build a causal LM from this config "
                         f"({err.__class__.__name__}: {one_line(err, 200)}); check its values") from None
    try:
        spec = _spec_from_model(model, config, name)
        unreached = _unreached(spec, model)
        return _spec_from_model(model, config, name, unreached) if unreached else spec
    except config_errors() as err:  # an architecture unlike any the activation model knows
        raise ValueError(f"model={name!r}: cannot read the shapes of this {config.model_type} model "
                         f"({err.__class__.__name__}: {one_line(err, 200)}); check its config") from None


def _unreached(spec: ModelSpec, model) -> dict[str, int]:
    """Parameters that a text-only step gives no gradient (a multimodal model's towers, a
    cross-attention to an encoder that never runs, a sparse-attention indexer): one traced forward,
    a tenth to a few tenths of a second; none for a named family."""
    from .profile import unreached_parameters

    if spec.exact_family:
        return {}
    try:
        return unreached_parameters(spec)
    except Exception:  # noqa: BLE001 - a forward the trace cannot run: count every parameter as trained
        return {}


def _is_norm(module_path: str) -> bool:
    """Is the module at this path a norm (counted in norm_params)?"""
    return "norm" in module_path.split(".")[-1].lower() or bool(re.search(r"(^|\.)ln_", module_path))


def _owners(params: dict[str, int], prefix: str, names: list[str], depth: int = 3) -> tuple[str, ...]:
    """The modules that hold these parameters, the largest first: outside the decoder blocks
    `depth` names deep; inside them, the shallowest module under the block all of whose
    parameters are among them (TrOCR's `layers.*.encoder_attn`, HunYuan-V4's
    `layers.*.self_attn.indexer`), any block's as "layers.*.". `names`: every parameter's."""
    block = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)")
    layer_params: dict[str, list[str]] = {}  # a block's index -> its parameters' names within it
    for n in names:
        if found := block.match(n):
            layer_params.setdefault(found[1], []).append(found[2])
    sizes: dict[str, int] = {}
    for pname, numel in params.items():
        found = block.match(pname)
        if found:
            parts = found[2].split(".")
            k = 1  # a parameter of the block itself: its own name
            for k in range(1, len(parts)):  # else the shallowest wholly unreached module, or its own
                head = ".".join(parts[:k]) + "."
                if all(f"{prefix}.{found[1]}.{rel}" in params for rel in layer_params[found[1]] if rel.startswith(head)):
                    break
            owner = f"{prefix.rsplit('.', 1)[-1]}.*.{'.'.join(parts[:k])}"
        else:
            owner = ".".join(pname.split(".")[:depth])
        sizes[owner] = sizes.get(owner, 0) + numel
    return tuple(sorted(sizes, key=lambda o: -sizes[o]))


def _spec_from_model(model, config, name: str, unreached: dict[str, int] | None = None) -> ModelSpec:
    """The spec of a meta-device model; `unreached`: parameters no gradient reaches (name -> numel),
    held as weights but in no trainable group."""
    import torch

    from .targets import block_linears, decoder_layers, expert_parameters, linear_group, linear_shape

    prefix, blocks = decoder_layers(model)
    unreached = unreached or {}
    linear_counts: dict[tuple, int] = {}
    idle_counts: dict[tuple, int] = {}
    linear_modules: set[str] = set()
    for path, module in block_linears(model):  # routers and one-output gates count as other_params
        in_f, out_f = linear_shape(module)
        key = (path.rsplit(".", 1)[-1], linear_group(path), in_f, out_f, module.bias is not None)
        counts = idle_counts if f"{path}.weight" in unreached else linear_counts
        counts[key] = counts.get(key, 0) + 1
        linear_modules.add(path)
    linears = tuple(LinearShape(*key, count) for key, count in linear_counts.items())
    idle = tuple(LinearShape(*key, count) for key, count in idle_counts.items())
    expert_counts: dict[tuple, int] = {}
    for pname, param in expert_parameters(model):  # fused (E, m, n) weights: in other_params below
        key = (pname.rsplit(".", 1)[-1], linear_group(pname), *(int(n) for n in param.shape))
        expert_counts[key] = expert_counts.get(key, 0) + 1
    experts = tuple(ExpertShape(*key, count) for key, count in expert_counts.items())
    expert_names = {pname for pname, _ in expert_parameters(model)}
    other_sizes: dict[int, int] = {}

    embedding_params = lm_head_params = norm_params = other_params = 0
    embedding_modules = {path for path, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    lm_head_module = None
    output_embeddings = model.get_output_embeddings()
    for path, m in model.named_modules():
        if m is output_embeddings:
            lm_head_module = path
    for pname, param in model.named_parameters():  # tied weights appear once
        module_path = pname.rsplit(".", 1)[0]
        if module_path in linear_modules or pname in unreached:
            continue
        if module_path in embedding_modules:
            embedding_params += param.numel()
        elif module_path == lm_head_module:
            lm_head_params += param.numel()
        elif _is_norm(module_path):
            norm_params += param.numel()
        else:
            other_params += param.numel()
            if pname not in expert_names:
                other_sizes[param.numel()] = other_sizes.get(param.numel(), 0) + 1

    float_buffer_numel = other_buffer_bytes = 0
    for _, buf in model.named_buffers():
        if buf.is_floating_point():
            float_buffer_numel += buf.numel()
        else:
            other_buffer_bytes += buf.numel() * buf.element_size()

    hidden = _attr(config, "hidden_size", "n_embd")
    heads = _attr(config, "num_attention_heads", "n_head")
    head_dim = _attr(config, "head_dim", default=None) or hidden // heads
    n_layers = len(blocks)
    family = FAMILIES.get(config.model_type)
    dropout = {key: float(value) for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                                               "hidden_dropout", "classifier_dropout")
               if isinstance(value := getattr(config, key, None), (int, float)) and value > 0}
    return ModelSpec(
        name=name,
        model_type=config.model_type,
        family=family or "traced",
        exact_family=family is not None,
        hidden_size=hidden,
        intermediate_size=_attr(config, "intermediate_size", "n_inner", default=None) or 4 * hidden,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=_attr(config, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_position=_attr(config, "max_position_embeddings", "n_positions", default=None),
        # the same weight object (CTRL's lm_head keeps a bias of its own beside the shared weight)
        tie_word_embeddings=_tied(model),
        activation=str(_attr(config, "hidden_activation", "hidden_act", "activation_function", default="silu")),
        linears=linears,
        embedding_params=embedding_params,
        lm_head_params=lm_head_params,
        norm_params=norm_params,
        other_params=other_params,
        float_buffer_numel=float_buffer_numel,
        other_buffer_bytes=other_buffer_bytes,
        dropout=dropout,
        sliding_window=getattr(config, "sliding_window", None),
        config=config.to_dict(),
        experts=experts,
        experts_per_token=int(_attr(config, "num_experts_per_tok", "moe_topk", default=0) or 0)
        if experts else 0,
        other_tensors=tuple(sorted(other_sizes.items(), reverse=True)),
        unreached_params=sum(n for pname, n in unreached.items() if pname.rsplit(".", 1)[0] not in linear_modules),
        unreached_modules=_owners(unreached, prefix, [n for n, _ in model.named_parameters()]),
        idle_linears=idle,
    )


def _tied(model) -> bool:
    """Does lm_head use the input embeddings' weight?"""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(outputs, "weight", None)
    return weight is None or (inputs is not None and weight is getattr(inputs, "weight", None))


def _cache_key(source: str) -> tuple:
    path = Path(os.path.expanduser(source))
    try:
        if path.exists():
            target = path / "config.json" if path.is_dir() else path
            return (str(target.resolve()), target.stat().st_mtime_ns)
    except (OSError, ValueError):  # load_config names the problem
        pass
    return (source, None)


@lru_cache(maxsize=128)
def _load_spec_cached(source: str, key: tuple, trust_remote_code: bool) -> ModelSpec:
    name = source
    if name not in preset_table() and key[1] is not None:  # a file or folder
        path = Path(os.path.expanduser(name))
        name = path.parent.name if path.name == "config.json" else (path.name if path.is_dir() else path.stem)
    from .load import weights_dtype

    spec = spec_from_config(load_config(source, trust_remote_code), name)
    saved = weights_dtype(source, spec.config)
    return replace(spec, weights_dtype=saved) if saved else spec


def load_spec(source: str, trust_remote_code: bool = False) -> ModelSpec:
    """ModelSpec for a preset, config path, folder or hub id; cached (files by modification time)."""
    source = _check_source(source)
    return _load_spec_cached(source, _cache_key(source), trust_remote_code)
