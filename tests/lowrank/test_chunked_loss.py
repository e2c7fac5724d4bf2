"""The chunked loss (`--loss chunked`, lowrank/loss.py) is transformers' loss without its logits:
the same loss and gradients, every method trains to the same weights, and a head it cannot redo
is refused in one line."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from lowrank.loss import chunked_cross_entropy, install
from lowrank.methods import prepare
from lowrank.step import training_step
from tests.helpers import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")


def labelled(vocab: int, seed: int, rows: int = 3, seq: int = 11) -> dict:
    """A batch whose labels hide a prompt (-100) in one row and padding at the end of another."""
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[-1, 7:] = -100
    return {"input_ids": ids, "labels": labels}


def grads_after(model, batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """The summed loss of `batches` (accumulated as the training step does) and every gradient."""
    total = 0.0
    for batch in batches:
        loss = model(**batch, use_cache=False).loss / len(batches)
        loss.backward()
        total += float(loss)
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("gpt2", {})],
                         ids=["llama", "llama-tied", "gpt2-tied"])
def test_loss_and_gradients_equal_the_full_loss(family, overrides):
    model = tiny_model(family, **overrides).eval()  # no dropout: the two models draw no masks
    chunked = copy.deepcopy(model)
    install(chunked, chunk=7)  # 33 tokens a micro-batch: four chunks, the last one short
    batches = [labelled(model.config.vocab_size, seed) for seed in (1, 2)]  # two accumulated micro-batches
    loss, grads = grads_after(model, batches)
    chunked_loss, chunked_grads = grads_after(chunked, batches)
    assert chunked_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == chunked_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("config", [{"model_type": "gemma2", "final_logit_softcapping": 2.0},
                                    {"model_type": "cohere", "logit_scale": 0.3},
                                    {"model_type": "granite", "logits_scaling": 4.0}],
                         ids=["gemma2-softcap", "cohere-scale", "granite-scaling"])
def test_a_familys_logit_scale_and_soft_cap_are_redone_per_chunk(config):
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = config.pop("model_type")
    cfg = AutoConfig.for_model(kind, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, vocab_size=97, bos_token_id=None, eos_token_id=None,
                               pad_token_id=None, **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    chunked = copy.deepcopy(model)
    head = install(chunked, chunk=5)
    assert head.problem is None and (head.softcap or head.scale != 1.0)
    batch = [labelled(97, 3)]
    loss, grads = grads_after(model, batch)
    chunked_loss, chunked_grads = grads_after(chunked, batch)
    assert chunked_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():  # transformers caps in the model dtype, the chunks in fp32: here both fp32
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_function_alone_matches_cross_entropy_with_a_bias_and_an_empty_row():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    labels[1] = -100  # a row with nothing to predict
    logits = head(hidden)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1))
    ref.backward()
    expected = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    chunked_cross_entropy(hidden, head, labels, chunk=4).backward()
    for got, want in zip((hidden.grad, head.weight.grad, head.bias.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


METHODS = {
    "full": FullConfig(),
    "lora": LoRAConfig(rank=4),
    "qlora": QLoRAConfig(rank=4, compute_dtype="fp32"),
    "galore-layerwise": GaLoreConfig(rank=8, update_proj_gap=2, layerwise=True),
    "qgalore": QGaLoreConfig(rank=8, update_proj_gap=2),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_to_the_same_weights_with_accumulation(name):
    """Two steps of two accumulated micro-batches (layer-wise hooks and INT8 updates included). The
    chunks sum in another order: Adam turns that float noise into up to a step for an element whose
    gradient is near zero, so weights agree within 5% of lr · steps, INT8 codes within a step a step
    (as tests/distributed/equivalence.py allows)."""
    method = METHODS[name]
    setup = TrainSetup(batch_size=3, seq_len=11, dtype="fp32", grad_accum=2)
    states, losses = [], []
    for loss in ("full", "chunked"):
        torch.manual_seed(0)  # Q-GaLore rounds stochastically: the same draws for both
        prepared = prepare(tiny_model("llama", tie_word_embeddings=True), method,
                           dataclasses.replace(setup, loss=loss, loss_chunk_tokens=5), lr=1e-2)
        losses.append([training_step(prepared, [labelled(256, 2 * step + i) for i in range(2)], setup).loss
                       for step in range(2)])
        states.append({k: v.detach().clone() for k, v in prepared.model.state_dict().items()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for key, value in states[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(states[1][key], value, rtol=0, atol=0.05 * 1e-2 * 2, msg=key)
        else:  # Q-GaLore's INT8 codes: stochastic rounding of a noisy update, at most a step a training step
            assert (states[1][key].int() - value.int()).abs().max() <= 2, key


def test_without_labels_the_model_runs_its_own_forward():
    model = tiny_model("llama")
    install(model, chunk=4)
    out = model(input_ids=torch.zeros(1, 5, dtype=torch.long))
    assert out.logits.shape == (1, 5, model.config.vocab_size) and out.loss is None


def test_a_head_it_cannot_redo_is_refused_in_one_line():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("minicpm3", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=64, bos_token_id=None,
                               eos_token_id=None, pad_token_id=None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError) as err:
        install(model, chunk=4)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "--loss full" in message and "minicpm3" in message


def test_a_run_started_by_the_app_carries_the_loss_to_the_trainer():
    """The Train tab's worker starts `python -m lowrank.train` with RunSpec.flags()."""
    from lowrank.recipe import RunSpec
    from lowrank.train import build_parser, spec_from_args

    spec = RunSpec("tiny-llama-5m", LoRAConfig(rank=4), TrainSetup(loss="chunked", loss_chunk_tokens=64), out="x")
    flags = spec.flags()
    assert flags[flags.index("--loss") + 1] == "chunked" and flags[flags.index("--loss-chunk-tokens") + 1] == "64"
    assert spec_from_args(build_parser().parse_args(flags)) == spec
