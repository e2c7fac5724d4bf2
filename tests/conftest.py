"""Shared test setup: one torch thread (tiny matmuls run far faster than with two contending
threads on a small CI machine), quiet optional-kernel warnings, and tiny model builders."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")

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


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


def train_losses(model, optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    """Plain next-token training on one batch: the loss of every step."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
