"""Data: the default corpus, a deterministic cached BPE, text blocks, masked JSONL rows, the split,
shuffled resumable batches, and errors that name the file, the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lowrank import data as data_module
from lowrank.data import (
    EOT,
    IGNORE_INDEX,
    Rows,
    bpe_tokenizer,
    default_documents,
    load_data,
    read_jsonl,
    split_rows,
)
from tests.helpers import tiny_model

VOCAB = 400
SEQ = 32
SAMPLE = (
    "The quick brown fox jumps over the lazy dog, again and again.\n\n"
    "  Indented code:\tx = f(a , b) .  Ünïcödé — 日本語 🙂 and \"quotes\" and 'apostrophes'.\r\n"
    "Numbers 3.14159 and 1,000,000; trailing spaces   \n"
)
RECORDS = [
    {"prompt": "Question: what is two plus two?\nAnswer:", "response": " Four."},
    {"prompt": "Name a colour.\n", "response": "Blue, like the sky on a clear summer day."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"input": "Say hi.", "output": "Hi!"},
] * 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(default_documents()[:4]), encoding="utf-8")  # ~20k characters
    return path


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jsonl") / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n", encoding="utf-8")
    return path


def text_data(text_file: Path, cache: Path, **overrides):
    kwargs = dict(source=str(text_file), tokenizer_source=None, vocab_size=VOCAB, seq_len=SEQ, batch_size=4,
                  seed=0, cache_dir=cache)
    return load_data(**{**kwargs, **overrides})


def test_default_corpus_is_large_english_text():
    documents = default_documents()
    text = "".join(documents)
    assert len(documents) > 50 and len(text) > 400_000
    assert documents == default_documents()  # same order every time
    words = text.split()
    assert sum(w in ("the", "is", "a", "of") for w in words) > len(words) // 20


def test_real_corpus_bpe_fits_the_vocab_and_round_trips(cache):
    data = load_data(None, None, vocab_size=4096, seq_len=256, batch_size=8, seed=0, cache_dir=cache,
                     max_position=1024)
    assert len(data.tokenizer) == 4096
    rows = torch.cat([data.train.rows.input_ids, data.eval_rows.input_ids])
    assert int(rows.max()) < 4096 and int(rows.min()) >= 0
    assert data.summary()["train_tokens"] > 100_000
    document = default_documents()[7]
    assert data.tokenizer.decode(data.tokenizer(document)["input_ids"]) == document


def test_bpe_round_trips_and_ids_fit(text_file, cache):
    data = text_data(text_file, cache)
    tokenizer = data.tokenizer
    assert len(tokenizer) <= VOCAB and tokenizer.eos_token == EOT
    for text in (SAMPLE, text_file.read_text(encoding="utf-8")[:3000], " leading space", "a\n\n\nb"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < VOCAB
        assert tokenizer.decode(ids) == text
    assert int(data.train.rows.input_ids.max()) < VOCAB


def test_bpe_is_deterministic_and_cached(tmp_path, monkeypatch):
    documents = [SAMPLE * 20, "another document about foxes and dogs " * 50]
    first = bpe_tokenizer(documents, VOCAB, tmp_path / "a")
    second = bpe_tokenizer(documents, VOCAB, tmp_path / "b")
    folder = Path(first.name_or_path)
    assert (folder / "tokenizer.json").read_text() == (Path(second.name_or_path) / "tokenizer.json").read_text()

    def no_training(*args):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(data_module, "_train_bpe", no_training)
    assert bpe_tokenizer(documents, VOCAB, tmp_path / "a").name_or_path == str(folder)
    assert list((tmp_path / "a").iterdir()) == [folder]  # no scratch folders left behind
    with pytest.raises(AssertionError):  # other text, other tokenizer
        bpe_tokenizer(documents[:1], VOCAB, tmp_path / "a")


def test_saved_tokenizer_reloads_and_serves_as_a_model_tokenizer(text_file, cache, tmp_path):
    data = text_data(text_file, cache)
    data.tokenizer.save_pretrained(tmp_path / "run")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert reloaded(SAMPLE)["input_ids"] == data.tokenizer(SAMPLE)["input_ids"]
    again = text_data(text_file, cache, tokenizer_source=str(tmp_path / "run"))
    assert again.tokenizer_source == str(tmp_path / "run")
    assert torch.equal(again.train.rows.input_ids, data.train.rows.input_ids)


def test_text_blocks_have_labels_and_no_attention_mask(text_file, cache):
    data = text_data(text_file, cache)
    batch = next(data.train)
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (4, SEQ) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"])
    eos = data.tokenizer.eos_token_id
    blocks = torch.cat([data.train.rows.input_ids, data.eval_rows.input_ids])
    assert int((blocks == eos).sum()) in (0, 1)  # one document; its EOS may fall in the dropped tail
    assert data.records == 1


def test_eval_split_is_disjoint_and_covers_every_block(text_file, cache):
    data = text_data(text_file, cache, eval_fraction=0.1)
    train, held_out = data.train.rows.input_ids, data.eval_rows.input_ids
    total = len(train) + len(held_out)
    assert len(held_out) == round(0.1 * total)
    every = text_data(text_file, cache, eval_fraction=0.0)
    assert len(every.eval_rows) == 0 and len(every.train.rows) == total
    train_set = {tuple(row.tolist()) for row in train}
    eval_set = {tuple(row.tolist()) for row in held_out}
    assert not train_set & eval_set
    assert train_set | eval_set == {tuple(row.tolist()) for row in every.train.rows.input_ids}
    rows = Rows(torch.arange(10).view(10, 1))
    assert [len(part) for part in split_rows(rows, 0.01, seed=0)] == [9, 1]  # at least one eval row
    assert [len(part) for part in split_rows(Rows(rows.input_ids[:1]), 0.5, seed=0)] == [1, 0]


def test_eval_batches_fixed_order_and_limit(text_file, cache):
    data = text_data(text_file, cache, eval_fraction=0.3, batch_size=3)
    first = [b["input_ids"] for b in data.eval_batches()]
    assert torch.equal(torch.cat(first), data.eval_rows.input_ids.long())
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(first, data.eval_batches()))
    assert len(list(data.eval_batches(max_batches=2))) == 2


def test_batches_are_deterministic_per_seed_and_reshuffled_per_epoch(text_file, cache):
    def first_ids(seed: int, count: int) -> list[torch.Tensor]:
        loader = text_data(text_file, cache, seed=seed).train
        return [next(loader)["input_ids"] for _ in range(count)]

    a, b, c = first_ids(0, 3), first_ids(0, 3), first_ids(1, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))

    loader = text_data(text_file, cache).train
    epochs = [loader.epoch_order(0), loader.epoch_order(1)]
    assert not torch.equal(epochs[0], epochs[1])
    for order in epochs:
        assert sorted(order.tolist()) == list(range(len(loader.rows)))
    seen = [next(loader)["input_ids"] for _ in range(loader.batches_per_epoch)]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    assert len({tuple(row.tolist()) for batch in seen for row in batch}) == loader.batches_per_epoch * 4


def test_resume_continues_with_the_same_batches(text_file, cache):
    loader = text_data(text_file, cache, seed=3).train
    for _ in range(2 * loader.batches_per_epoch - 2):  # into the second epoch
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    expected = [next(loader)["input_ids"] for _ in range(5)]  # crosses into the third epoch
    resumed = text_data(text_file, cache, seed=3).train
    resumed.load_state_dict(state)
    assert all(torch.equal(x, next(resumed)["input_ids"]) for x in expected)
    with pytest.raises(ValueError, match="seed=3 differs.*same data, seq_len, batch_size and seed"):
        text_data(text_file, cache, seed=4).train.load_state_dict(state)


def test_jsonl_masks_prompt_and_padding(jsonl_file, cache):
    data = load_data(str(jsonl_file), None, VOCAB, seq_len=SEQ, batch_size=4, seed=0, cache_dir=cache)
    assert data.kind == "jsonl" and data.records == len(RECORDS) and data.skipped == 0
    assert len(data.train.rows) + len(data.eval_rows) == len(RECORDS) and len(data.eval_rows) == 1
    tokenizer, eos = data.tokenizer, data.tokenizer.eos_token_id
    records = read_jsonl(jsonl_file)
    rows = Rows(*(torch.cat([a, b]) for a, b in zip(
        (data.train.rows.input_ids, data.train.rows.labels, data.train.rows.attention_mask),
        (data.eval_rows.input_ids, data.eval_rows.labels, data.eval_rows.attention_mask))))
    found = 0
    for prompt, response in records[:4]:  # the first copy of each record, wherever the split put it
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        length = min(len(p) + len(r) + 1, SEQ)
        match = [i for i in range(len(rows)) if rows.input_ids[i, :len(p)].tolist() == p
                 and rows.input_ids[i, len(p):length].tolist() == (r + [eos])[:length - len(p)]]
        assert match
        i = match[0]
        labels, mask = rows.labels[i].tolist(), rows.attention_mask[i].tolist()
        assert labels[:len(p)] == [IGNORE_INDEX] * len(p)
        assert labels[len(p):length] == rows.input_ids[i, len(p):length].tolist()
        assert labels[length:] == [IGNORE_INDEX] * (SEQ - length)
        assert mask == [1] * length + [0] * (SEQ - length)
        found += 1
    assert found == 4
    assert records[2][0] == "Translate to French.\n\nGood morning" and records[3] == ("Say hi.", "Hi!")
    batch = next(data.train)
    assert set(batch) == {"input_ids", "labels", "attention_mask"} and batch["attention_mask"].dtype == torch.int64


def test_batches_train_a_tiny_model(jsonl_file, text_file, cache):
    model = tiny_model("llama", vocab_size=VOCAB)
    for source in (jsonl_file, text_file):
        data = load_data(str(source), None, VOCAB, seq_len=SEQ, batch_size=2, seed=0, cache_dir=cache,
                         max_position=model.config.max_position_embeddings)
        with torch.no_grad():
            loss = model(**next(data.train), use_cache=False).loss
        assert torch.isfinite(loss) and abs(float(loss) - torch.log(torch.tensor(VOCAB)).item()) < 1.0


def test_jsonl_truncation_and_skipped_records(tmp_path, cache):
    path = tmp_path / "long.jsonl"
    records = [{"prompt": "word " * 100, "response": "never seen"}] + [{"prompt": "Hi", "response": " there " * 50}] * 3
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    data = load_data(str(path), None, VOCAB, seq_len=16, batch_size=1, seed=0, cache_dir=cache, eval_fraction=0)
    assert data.skipped == 1 and data.records == 3
    rows = data.train.rows
    assert rows.input_ids.shape == (3, 16) and bool(rows.attention_mask.all())  # cut, not padded
    assert int((rows.labels != IGNORE_INDEX).sum(dim=1).min()) > 0
    only_long = tmp_path / "only_long.jsonl"
    only_long.write_text(json.dumps(records[0]), encoding="utf-8")
    with pytest.raises(ValueError, match="no record fits seq_len=16.*raise seq_len"):
        load_data(str(only_long), None, VOCAB, seq_len=16, batch_size=1, seed=0, cache_dir=cache)


def test_bos_starts_each_record_when_the_tokenizer_has_one(jsonl_file, cache, tmp_path):
    tokenizer = load_data(str(jsonl_file), None, VOCAB, SEQ, 4, 0, cache).tokenizer
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.save_pretrained(tmp_path / "with_bos")
    data = load_data(str(jsonl_file), str(tmp_path / "with_bos"), VOCAB + 1, SEQ, 4, 0, cache)
    bos = data.tokenizer.bos_token_id
    assert bos is not None and bos != data.tokenizer.eos_token_id
    assert bool((data.train.rows.input_ids[:, 0] == bos).all())
    assert bool((data.train.rows.labels[:, 0] == IGNORE_INDEX).all())


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.txt", None, r"missing\.txt' does not exist: give an existing \.txt or \.jsonl file"),
    ("folder.txt", "a directory", r"folder\.txt' is a directory, not a file"),
    ("empty.txt", "", r"empty\.txt' is empty: give a file with some text"),
    ("bad.txt", b"caf\xe9 au lait", r"bad\.txt' is not UTF-8 text \(byte 3.*save it as UTF-8"),
    ("table.csv", "a,b\n1,2\n", r"table\.csv' is neither \.txt.*rename it to \.txt"),
    ("broken.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a",\n', r"broken\.jsonl, line 2: malformed JSON"),
    ("fields.jsonl", '{"prompt": "a", "response": "b"}\n\n{"question": "a", "answer": "b"}',
     r"fields\.jsonl, line 3: no prompt/response fields \(found \['answer', 'question'\]\); use one of"),
    ("typed.jsonl", '{"prompt": "a", "response": 3}', r"typed\.jsonl, line 1: field 'response' must be a string"),
    ("list.jsonl", '["prompt", "response"]', r"list\.jsonl, line 1: expected a JSON object"),
    ("blank.jsonl", "\n  \n", r"blank\.jsonl' is empty"),
])
def test_file_errors_name_the_file_and_the_fix(tmp_path, cache, name, content, message):
    path = tmp_path / name
    if content == "a directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_data(str(path), None, VOCAB, SEQ, 1, 0, cache)


def test_argument_errors(text_file, cache, tmp_path):
    with pytest.raises(ValueError, match=r"seq_len=2048 is above the model's maximum position 1024: use seq_len ≤ 1024"):
        text_data(text_file, cache, seq_len=2048, max_position=1024)
    with pytest.raises(ValueError, match=r"batch_size=0 must be a whole number ≥ 1"):
        text_data(text_file, cache, batch_size=0)
    with pytest.raises(ValueError, match=r"eval_fraction=1.0 must be in \[0, 1\)"):
        text_data(text_file, cache, eval_fraction=1.0)
    with pytest.raises(ValueError, match=r"vocab_size=256 is too small.*use vocab_size ≥ 257"):
        text_data(text_file, cache, vocab_size=256)
    with pytest.raises(ValueError, match=r"batch_size=100000 is more than the \d+ training rows.*lower batch_size"):
        text_data(text_file, cache, batch_size=100_000)
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.", encoding="utf-8")
    with pytest.raises(ValueError, match=r"the text has \d+ tokens, fewer than seq_len=32: use seq_len ≤ \d+"):
        text_data(short, cache)


def test_tokenizer_errors(text_file, cache, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer folder '/no/such/folder' does not exist"):
        text_data(text_file, cache, tokenizer_source="/no/such/folder")
    with pytest.raises(ValueError, match=r"has none of tokenizer\.json.*or no tokenizer to train a BPE one"):
        text_data(text_file, cache, tokenizer_source=str(tmp_path))
    text_data(text_file, cache).tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"has \d+ tokens, more than the model's vocab_size 300"):
        text_data(text_file, cache, tokenizer_source=str(tmp_path / "tok"), vocab_size=300)


def test_code_task_asks_for_a_function_body_from_its_docstring():
    import ast

    from lowrank.data import code_task

    records = code_task()
    assert len(records) > 1000 and code_task(limit=200) == records[:200]
    for r in records:
        assert r["prompt"].startswith("def ") and r["prompt"].endswith('"""\n')
        body = r["response"].splitlines()
        assert 1 <= len(body) <= 6 and all(line.startswith("    ") or not line.strip() for line in body)
        ast.parse(r["prompt"] + r["response"])  # signature, docstring and body: a valid function
