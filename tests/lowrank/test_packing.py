"""Sequence packing (--packed): rows built from documents with position ids restarting per document,
no padding, no token predicting across a boundary; a packed row's loss is the token-weighted mean of
its documents' own losses (attention stays inside each); the dry run sees packed batches as a real
run does; families that ignore position-id packing are refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from estimator.config import LoRAConfig, TrainSetup
from estimator.profile import packed_indices
from lowrank.data import IGNORE_INDEX, load_data, packed_rows
from lowrank.dryrun import dry_run
from tests.helpers import tiny_config

SEQ = 32


def test_packed_rows_fill_rows_and_restart_positions():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], list(range(11, 30))]
    rows = packed_rows(docs, 8)
    assert rows.attention_mask is None and rows.input_ids.shape == (3, 8)  # 29 tokens: 3 full rows, tail dropped
    assert rows.input_ids.flatten().tolist() == list(range(1, 25))
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]
    # the first token of every document (and of every piece of a split one) predicts nothing
    assert rows.labels.tolist()[0] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, 6, 7, 8]
    assert rows.labels.tolist()[1][:4] == [IGNORE_INDEX, 10, IGNORE_INDEX, 12]
    assert rows.labels.tolist()[2][0] == IGNORE_INDEX  # a split document's tail starts the next row
    batch = rows.select(torch.tensor([0, 1]))
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["position_ids"].dtype == torch.int64
    assert rows.tokens == rows.input_ids.numel()  # no padding


def test_packed_rows_keep_prompt_labels_masked():
    rows = packed_rows([[1, 2, 3, 4], [5, 6, 7, 8]], 8, [[IGNORE_INDEX, IGNORE_INDEX, 3, 4], [IGNORE_INDEX, 6, 7, 8]])
    assert rows.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, 6, 7, 8]]
    with pytest.raises(ValueError, match="fewer than seq_len"):
        packed_rows([[1, 2]], 8)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_is_the_documents_loss(family, attn):
    """No attention across documents: the packed row's loss (mean over its predicted tokens) equals
    the token-weighted mean of each document's loss run on its own."""
    torch.manual_seed(0)
    config = tiny_config(family, attn=attn)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    generator = torch.Generator().manual_seed(1)
    lengths = [(11, 9, 12), (20, 12)]  # two rows of 32 tokens
    docs = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for row in lengths for n in row]
    rows = packed_rows(docs, SEQ)
    assert rows.input_ids.shape == (2, SEQ)
    with torch.no_grad():
        packed = model(**rows.select(torch.arange(2)), use_cache=False).loss
        total = count = 0
        for doc in docs:
            ids = torch.tensor([doc])
            total += model(input_ids=ids, labels=ids, use_cache=False).loss * (len(doc) - 1)
            count += len(doc) - 1
        unpacked = model(input_ids=rows.input_ids.long(), labels=rows.labels.long(), use_cache=False).loss
    torch.testing.assert_close(packed, total / count, rtol=1e-5, atol=1e-5)
    assert abs(float(unpacked) - float(total / count)) > 1e-4  # attention across documents would differ


def test_load_data_packs_text_and_records(tmp_path):
    text = load_data(None, None, 400, SEQ, 4, 0, tmp_path, packed=True)
    batch = next(text.train)
    assert "attention_mask" not in batch and batch["position_ids"].shape == (4, SEQ)
    assert text.packed and text.summary()["packed"]
    assert (batch["labels"] == IGNORE_INDEX).sum() == (batch["position_ids"] == 0).sum()
    records = tmp_path / "r.jsonl"
    records.write_text("\n".join(json.dumps({"prompt": f"Q{i}: what?\n", "response": f"answer {i} " * (i % 5 + 1)})
                                 for i in range(60)))
    data = load_data(str(records), None, 400, SEQ, 2, 0, tmp_path, packed=True)
    padded = load_data(str(records), None, 400, SEQ, 2, 0, tmp_path)
    assert data.train.rows.attention_mask is None and data.train.rows.position_ids is not None
    assert data.train.rows.tokens == data.train.rows.input_ids.numel()
    assert len(data.train.rows) < len(padded.train.rows)  # the padding is gone


def test_packed_indices_follow_the_real_position_ids():
    find = __import__("transformers").masking_utils.find_packed_sequence_indices
    plain = torch.arange(8).expand(2, -1)
    assert packed_indices(find, plain, plain) is None
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]] * 2)
    assert packed_indices(find, packed, packed).tolist() == find(packed).tolist()
    assert packed_indices(find, packed, None) is None


def test_dry_run_measures_the_packed_mask():
    setup = TrainSetup(batch_size=2, seq_len=256)
    plain = dry_run("tiny-llama-20m", LoRAConfig(rank=8), setup, device="cpu")
    packed = dry_run("tiny-llama-20m", LoRAConfig(rank=8), TrainSetup(batch_size=2, seq_len=256, packed=True),
                     device="cpu")
    # the boolean (b, 1, s, s) mask and per-row RoPE tables: more than b·s·s bytes over the causal path
    assert packed.peak_bytes - plain.peak_bytes >= 2 * 256 * 256


def test_cli_refuses_families_that_ignore_position_ids(tmp_path, capsys):
    from transformers import BloomConfig

    from lowrank.train import main

    BloomConfig(vocab_size=256, hidden_size=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "bloom")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "bloom" / "config.json"), "--method", "full", "--packed", "--dry-run",
              "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bloom cannot keep packed documents apart" in err
    with pytest.raises(ValueError, match="replaces padding"):
        TrainSetup(packed=True, padded=True)
