"""Helpers the tests share: tiny configs and models of every architecture the estimator models, a
prepared model's steady-state step measured beside its estimate, and plain training."""

from __future__ import annotations

import torch

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=256, max_position_embeddings=512),
    "mistral": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, vocab_size=256, max_position_embeddings=512, sliding_window=4096),
    "qwen2": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True),
    "gemma": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=32, num_hidden_layers=2, vocab_size=256, max_position_embeddings=512),
    "gpt2": dict(n_embd=64, n_head=4, n_layer=2, vocab_size=256, n_positions=512, bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                     vocab_size=256, max_position_embeddings=512),
}


def tiny_config(model_type: str = "llama", attn: str = "sdpa", **overrides):
    from transformers import AutoConfig

    kwargs = {**TINY[model_type], **overrides}
    return AutoConfig.for_model(model_type, attn_implementation=attn, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))


def token_batches(vocab_size: int, setup, seed: int = 0, device: str = "cpu") -> list[dict]:
    """`setup.grad_accum` micro-batches of random ids (labels = inputs)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(setup.grad_accum):
        ids = torch.randint(0, vocab_size, (setup.batch_size, setup.seq_len), generator=generator).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def measured_beside_predicted(model, method, setup, batches=None, device: str = "cpu") -> tuple[dict, dict]:
    """(predicted, measured) of one steady-state step of `model` (built from its config) with `method`:
    the estimate of the model's config and lowrank.step.measure_steady_step on a real step."""
    from estimator.estimate import estimate_spec
    from estimator.spec import spec_from_config
    from lowrank.methods import prepare
    from lowrank.step import measure_steady_step

    config = model.config
    spec = spec_from_config(config, config.model_type)
    prepared = prepare(model.to(device), method, setup, lr=1e-4)
    batches = batches or token_batches(config.vocab_size, setup, device=device)
    measured = measure_steady_step(prepared, batches, setup).to_dict()
    return estimate_spec(spec, method, setup, device=device).to_dict(), measured


def train_losses(model, optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    """Plain next-token training on one batch with a given optimizer: the loss of every step."""
    from estimator.config import FullConfig, TrainSetup
    from lowrank.methods import Prepared
    from lowrank.step import train_on

    return train_on(Prepared(model, optimizer, FullConfig()), [{"input_ids": ids, "labels": ids}] * steps,
                    TrainSetup())
