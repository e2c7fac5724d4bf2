"""estimator/profile.py: activation profiles traced from the model's own forward.

The named formulas (Llama, GPT-2) are checked against the traced profile of the same model,
a profile is exact at its length for any batch size (the batch is linear beyond batch 1, which
has its own), and a profile is traced once per config, key and length.
"""

from __future__ import annotations

import dataclasses

import pytest
from transformers import AutoConfig

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, TrainSetup
from estimator.estimate import estimate_spec
from estimator.profile import Poly, TraceKey, _head_part, _measure, _profile_cached, traced_profile
from estimator.spec import load_spec


def traced_twin(spec):
    """The same model, estimated from its traced profile instead of its named formulas."""
    return dataclasses.replace(spec, family="traced", exact_family=False)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    AutoConfig.for_model("qwen3", hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=1000, bos_token_id=1,
                         eos_token_id=2).save_pretrained(folder)
    return load_spec(str(folder))


@pytest.mark.parametrize("method", [FullConfig(), LoRAConfig(rank=8), GaLoreConfig(rank=16, layerwise=True)],
                         ids=["full", "lora", "galore-layerwise"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "ckpt"])
def test_llama_formulas_agree_with_the_traced_profile(method, checkpointing):
    spec = load_spec("tiny-llama-5m")
    setup = TrainSetup(batch_size=2, seq_len=96, dtype="bf16", grad_checkpointing=checkpointing)
    named = estimate_spec(spec, method, setup, device="cpu")
    traced = estimate_spec(traced_twin(spec), method, setup, device="cpu")
    assert traced.peak_bytes == pytest.approx(named.peak_bytes, rel=0.002)
    if not checkpointing:  # the same tensors, named by formula or by the module that saved them
        assert sum(traced.activation_terms.values()) == pytest.approx(sum(named.activation_terms.values()),
                                                                      rel=1e-5)
        assert {k for k in traced.activation_terms if k.startswith("blocks:")} >= {
            "blocks: self_attn", "blocks: mlp", "blocks: input_layernorm"}


@pytest.mark.parametrize("method", [FullConfig(), LoRAConfig(rank=8)], ids=["full", "lora"])
def test_gpt2_formulas_agree_with_the_traced_profile_at_the_peak(method):
    spec = load_spec("gpt2")
    setup = TrainSetup(batch_size=2, seq_len=64, dtype="bf16")
    named = estimate_spec(spec, method, setup, device="cpu")
    traced = estimate_spec(traced_twin(spec), method, setup, device="cpu")
    assert traced.peak_bytes == pytest.approx(named.peak_bytes, rel=0.01)


def test_a_profile_is_exact_at_its_length_for_any_batch(qwen3):
    key = TraceKey("bf16", trainable=True)
    profile = traced_profile(qwen3, key, batch=4, seq_len=40)
    measured = _measure(qwen3, key, 5, 40)  # a batch the profile was not traced at
    for layer in profile.layers:
        for part, poly in layer.saved.items():
            assert poly(5) == measured["saved"].get((layer.index, part), 0), part
    assert profile.shared(5) == measured["saved"].get((None, "shared"), 0)


def test_batch_one_has_a_profile_of_its_own(qwen3):
    key = TraceKey("bf16", trainable=False, lora_targets=("q_proj", "v_proj"))
    one = traced_profile(qwen3, key, batch=1, seq_len=40)
    measured = _measure(qwen3, key, 1, 40)
    for layer in one.layers:
        for part, poly in layer.saved.items():
            assert poly(1) == measured["saved"].get((layer.index, part), 0), part


def test_repeated_layers_are_traced_once(qwen3):
    profile = traced_profile(qwen3, TraceKey("bf16", trainable=True), batch=2, seq_len=40)
    assert [layer.index for layer in profile.layers] == [0, 1]  # layer 2 repeats layer 1
    assert [layer.count for layer in profile.layers] == [1, 2]
    assert profile.order == (0, 1, 1)


def test_a_profile_is_traced_once_per_config_key_and_length(qwen3):
    method, setup = LoRAConfig(rank=8), TrainSetup(batch_size=3, seq_len=72, dtype="bf16")
    estimate_spec(qwen3, method, setup, device="cpu")
    before = _profile_cached.cache_info()
    for rank in (4, 16, 32):  # LoRA's rank and the batch are rules, not traces
        estimate_spec(qwen3, LoRAConfig(rank=rank), dataclasses.replace(setup, batch_size=rank), device="cpu")
    after = _profile_cached.cache_info()
    assert after.misses == before.misses
    estimate_spec(qwen3, method, dataclasses.replace(setup, seq_len=80), device="cpu")
    assert _profile_cached.cache_info().misses > after.misses


def test_poly_fits_two_batches_or_one():
    assert Poly.fit({(2, 40): 1000, (3, 40): 1400})(5) == 2200
    assert Poly.fit({(1, 40): 777})(1) == 777


def test_towers_a_text_step_never_reaches_get_no_gradient_or_state(tmp_path):
    """Phi-4-multimodal's vision and audio towers (99% of a small config) get no gradient in a
    text-only step: held as weights, with no gradient and no AdamW state (was +283%)."""
    from bench.families import quiet, small_config
    from lowrank.dryrun import dry_run

    with quiet():
        small_config("phi4_multimodal").save_pretrained(tmp_path)
        spec = load_spec(str(tmp_path))
        setup = TrainSetup(batch_size=2, seq_len=48, dtype="bf16")
        predicted = estimate_spec(spec, FullConfig(), setup, device="cpu")
        measured = dry_run(str(tmp_path), FullConfig(), setup, device="cpu").to_dict()
    assert spec.unreached_params > 0.9 * spec.params_total
    assert spec.unreached_modules[0].startswith("model.embed_tokens_extend.")
    assert predicted.peak_bytes == pytest.approx(measured["peak_bytes"], rel=0.01)
    assert predicted.breakdown["gradients"] == measured["breakdown"]["gradients"]
    assert predicted.breakdown["optimizer"] == pytest.approx(measured["breakdown"]["optimizer"], rel=1e-3)
    assert any("no gradient in a text-only step" in note for note in predicted.notes)
    assert predicted.params_trainable == spec.params_total  # they require a gradient, as the trainer counts
    assert load_spec("tiny-llama-5m").unreached_params == 0


def test_the_embeddings_dropout_mask_waits_through_the_blocks_backward(tmp_path):
    """A mask made before the layers (GPT-BigCode drops out its embeddings) is freed by the embeddings'
    backward, after every block's: the traced profile counts it with the shared inputs, alive beside
    each block's backward, not with the loss's tensors (freed before the blocks)."""
    from lowrank.dryrun import dry_run

    AutoConfig.for_model("gpt_bigcode", n_embd=256, n_layer=2, n_head=4, vocab_size=1000, n_positions=256, bos_token_id=1,
                         eos_token_id=1, embd_pdrop=0.1).save_pretrained(tmp_path)
    spec = load_spec(str(tmp_path))
    setup = TrainSetup(batch_size=2, seq_len=48, dtype="bf16")
    method = QGaLoreConfig(rank=8)
    predicted = estimate_spec(spec, method, setup, device="cpu")
    # CPU: a bf16 mask; and the int64 position ids the trainable wpe keeps for its backward, at the end
    assert predicted.activation_terms["blocks: shared (RoPE tables, masks)"] == 2 * 48 * 256 * 2 + 48 * 8
    measured = dry_run(str(tmp_path), method, setup, device="cpu")
    assert predicted.moment == "backward: top block"  # a layer-wise update beside every block's activations
    assert predicted.breakdown["activations"] == pytest.approx(measured.breakdown["activations"], rel=1e-3)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=1e-3)


def test_what_the_base_model_saves_after_its_layers_is_the_final_norms():
    """Freed after lm_head's backward, like the final norm's saved tensors; the loss's before it."""
    assert _head_part("model.hc_head", "lm_head", "model.layers") == "final norm"  # HunYuan-V4, before the norm
    assert _head_part("model.norm", "lm_head", "model.layers") == "final norm"
    assert _head_part("transformer.ln_f", "lm_head", "transformer.h") == "final norm"
    assert _head_part("lm_head", "lm_head", "model.layers") == "lm_head input"
    assert _head_part("", "lm_head", "model.layers") == "logits and loss"  # the causal LM's own loss


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "ckpt"])
def test_layerwise_lm_head_update_beside_a_head_that_collapses_streams(tmp_path, checkpointing):
    """HunYuan-V4's hyper-connection head collapses the last layer's four hidden streams before the
    final norm, saving them (fp32) and the last layer's output: all alive when Q-GaLore's layer-wise
    hook updates lm_head, the step's peak. They were counted as the loss's (freed by then) and the
    moment started from the top block's first backward op (after the head had freed the streams):
    activations -9.6% (checkpointing: -53%). Without checkpointing they agree to the byte but for a
    few scalars, which needs the router's saved tensors that die in forward (its graph feeds no
    expert on fake tensors) left out of the block's saved bytes (they were +2,680 B)."""
    from bench.families import quiet, small_config
    from lowrank.dryrun import dry_run

    method = QGaLoreConfig(rank=16)
    setup = TrainSetup(batch_size=2, seq_len=48, dtype="bf16", grad_checkpointing=checkpointing)
    with quiet():
        small_config("hy_v4").save_pretrained(tmp_path)
        predicted = estimate_spec(load_spec(str(tmp_path)), method, setup, device="cpu")
        measured = dry_run(str(tmp_path), method, setup, device="cpu")
    assert measured.phase == "backward" and predicted.moment == "backward: top block"
    # its indexer (behind a top-k) gets no gradient: held with no state, named in a note
    assert any("(layers.*.self_attn.indexer) get no gradient" in note for note in predicted.notes)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
    assert predicted.breakdown["activations"] == pytest.approx(measured.breakdown["activations"], rel=0.01)
    if not checkpointing:
        assert abs(predicted.breakdown["activations"] - measured.breakdown["activations"]) < 1024


def test_the_loss_backward_moment_splits_what_it_freed_from_its_temporaries(tmp_path):
    """Dory's head multiplies its fp32 logits by a learned per-token scale, which saves them: the
    loss's largest backward moment is that product's backward, after the log-softmax's output is
    freed. The traced moment keeps what it freed apart from its temporaries (it used to subtract one
    from the other: the same total, but the fp32 logits-sized gradient counted as saved, activations
    +15% and transient -33%)."""
    from bench.families import quiet, small_config
    from lowrank.dryrun import dry_run

    with quiet():
        small_config("dory").save_pretrained(tmp_path)
        spec = load_spec(str(tmp_path))
        setup = TrainSetup(batch_size=1, seq_len=160, dtype="bf16")
        predicted = estimate_spec(spec, FullConfig(), setup, device="cpu")
        measured = dry_run(str(tmp_path), FullConfig(), setup, device="cpu")
    assert predicted.moment == "backward: loss"
    for category in ("activations", "transient"):
        assert predicted.breakdown[category] == pytest.approx(measured.breakdown[category], abs=8)


def test_checkpointed_lora_keeps_what_is_made_before_the_layers(tmp_path):
    """Under checkpointing transformers makes a frozen embedding's output a leaf that requires grad;
    its gradient's accumulator holds it to the end of backward, as the checkpoints hold RoPE's
    tables: both wait through the blocks' backward with the shared inputs (TrOCR's embedding output
    does not enter a layer as it is: its learned positions and layernorm_embedding come first). TrOCR's
    loss keeps the labels it was given, the batch's own ids. LoRA's rank beyond the traced 1 is
    recomputed with its layer: transient."""
    from bench.families import quiet, small_config
    from lowrank.dryrun import dry_run

    with quiet():
        small_config("trocr").save_pretrained(tmp_path)
        spec = load_spec(str(tmp_path))
        setup = TrainSetup(batch_size=1, seq_len=48, dtype="bf16", grad_checkpointing=True, attn_implementation="eager")
        method = LoRAConfig(rank=8)
        predicted = estimate_spec(spec, method, setup, device="cpu")
        measured = dry_run(str(tmp_path), method, setup, device="cpu")
    assert predicted.breakdown["activations"] == pytest.approx(measured.breakdown["activations"], abs=8)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, abs=8)


def test_what_an_unreached_indexer_saves_is_freed_in_forward(tmp_path):
    """DeepSeek-V4's indexer feeds only a top-k's indices: backward never runs its nodes, so what
    they save is freed with them when forward ends, not kept through the step. Packed with their
    grad_fn (both tracers returned the tensor itself), saved outputs formed an uncollectable cycle
    that kept the second layer's indexer alive under the first layer's backward: the dry run peaked
    there with 7.5 MB the estimate did not count (-1.75%, gradients -43.7% at 1×160)."""
    from bench.families import METHODS, quiet, small_config
    from estimator.estimate import step_moments
    from lowrank.dryrun import dry_run

    with quiet():
        small_config("deepseek_v4").save_pretrained(tmp_path)
        spec = load_spec(str(tmp_path))
        setup = TrainSetup(batch_size=1, seq_len=160, dtype="bf16")
        predicted = estimate_spec(spec, METHODS["full"], setup, device="cpu")
        moments, _ = step_moments(spec, METHODS["full"], dataclasses.replace(setup, attn_implementation="eager"), "cpu")
        measured = dry_run(str(tmp_path), METHODS["full"], setup, device="cpu")
    assert predicted.moment == "backward: bottom block"
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=1e-3)
    assert predicted.breakdown["gradients"] == measured.breakdown["gradients"]
    assert predicted.breakdown["activations"] == pytest.approx(measured.breakdown["activations"], rel=1e-3)
    # the forward's peak, at the loss: the indexer's saved tensors are gone by then
    assert sum(moments["forward: loss"].values()) == pytest.approx(measured.phase_peaks["forward"], rel=1e-3)
