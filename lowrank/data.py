"""The data a training run consumes: a corpus, a tokenizer, shuffled micro-batches and an eval split.

    data = load_data(source=None, tokenizer_source=None, vocab_size=4096, seq_len=256,
                     batch_size=8, seed=0, cache_dir=Path("runs/.cache"), max_position=1024)
    batch = next(data.train)                  # {"input_ids": (B, T), "labels": (B, T)} int64, CPU
    state = data.train.state_dict()           # save with a checkpoint; load_state_dict on --resume
    for batch in data.eval_batches(max_batches=20): ...
    data.tokenizer.save_pretrained(run_dir)   # AutoTokenizer.from_pretrained(run_dir) reloads it

Sources (`source`):
    None          the default corpus: `pydoc_data.topics`, the English documentation text that ships
                  with every Python (~465k characters, 79 topics), one document per topic, sorted.
    path.txt      UTF-8 plain text, one document.
    path.jsonl    one JSON object per line, a prompt and a response each. Field pairs, first match
                  wins: prompt/response, prompt/completion, instruction/output (an optional "input"
                  is appended to the instruction after a blank line, as in Alpaca), input/output.
                  The prompt and response are tokenized separately and joined as they are: put any
                  template (such as a trailing "\\n") into the prompt.

Tokenizer (`tokenizer_source`): a model folder (or reachable hub id) loaded with
`AutoTokenizer.from_pretrained`; or None: a byte-level BPE trained here with `tokenizers` on the
whole corpus (eval part included), at most `vocab_size` ids, "<|endoftext|>" as its only special
token, cached in `cache_dir` by a hash of (recipe, vocab size, text). Training is deterministic and
takes ~0.2 s on the default corpus, which fills 4096 ids but only 6668 of 8192 (merges need a pair
seen twice). `find_tokenizer(model_folder)` tells whether a model folder brings its own tokenizer.

Rows. Every document or record starts with the tokenizer's BOS when it has one distinct from EOS,
and ends with EOS.
    text    documents are concatenated and cut into blocks of exactly `seq_len` tokens (the tail
            shorter than a block is dropped); labels = input_ids (the model shifts them) and no
            attention_mask, so SDPA can take its causal fast path.
    jsonl   one row per record, cut at `seq_len` and right-padded with the pad token (EOS when the
            tokenizer has none); labels are -100 on prompt and padding tokens, and an
            attention_mask marks the padding. Records whose prompt leaves no response token inside
            `seq_len` are skipped and counted in `Data.skipped`.
    packed  (`packed=True`, either kind) documents or records are concatenated into full rows of
            `seq_len` tokens with no padding (`packed_rows`): a document that does not fit the rest
            of a row is split, its tail starting the next row; position_ids restart at 0 for each
            document (piece), and its first token's label is -100, so no token predicts across a
            boundary. No attention_mask: transformers reads the boundaries from position_ids
            (masking_utils.find_packed_sequence_indices) and keeps attention inside each document.

Split: a seeded permutation of the rows (blocks or records) puts round(eval_fraction · rows), at
least one, in the eval split, as long as one row is left for training; runs with the same seed
share an eval split. The training loader walks a
fresh seeded permutation of the training rows each epoch, in full micro-batches (the last partial
one of an epoch is dropped); its state is (epoch, position). Every problem is a ValueError that
names the file (and line), the field or value, and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from estimator.config import packed_positions  # noqa: F401  (the rows packed_rows makes, for a dry run)

EOT = "<|endoftext|>"
IGNORE_INDEX = -100  # labels the loss skips (torch cross_entropy's default ignore_index)
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte
# Bump when the BPE recipe changes, so cached tokenizers trained by an older recipe are not reused.
BPE_RECIPE = "byte-level-bpe-v1:min_frequency=2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# (prompt field, response field), first match wins; "input" joins "instruction" when both exist.
# Independent random streams from one seed: which rows are held out, and each epoch's shuffle.
SPLIT_STREAM, SHUFFLE_STREAM = 0, 1
FIELD_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("instruction", "output"), ("input", "output"))


# ---- corpora -------------------------------------------------------------------------------------


def default_documents() -> list[str]:
    """The default corpus: Python's own documentation topics, one document each, in key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # a few trimmed Python builds leave it out
        raise ValueError("the default corpus (pydoc_data.topics) is missing from this Python: give a .txt "
                         "or .jsonl data file instead") from e
    return [topics[key] for key in sorted(topics)]


def code_task(limit: int | None = None, max_lines: int = 6) -> list[dict[str, str]]:
    """A fine-tuning task in a new domain, made from Python's own standard library: write the body
    of a function from its signature and docstring.

    {"prompt": "def year(self):\n    \"\"\"year (1-9999)\"\"\"\n", "response": "    return self._year"}
    for every documented function of the top-level stdlib modules whose body (after the
    docstring) is 1 to `max_lines` ASCII lines. Code is a different domain from the prose the
    base was pre-trained on, so every method has something to learn, and held-out functions
    measure what generalizes. The same records for the same Python version; no internet.
    """
    import ast
    import sysconfig

    records = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or len(node.body) < 2 or not ast.get_docstring(node):
                continue
            body = lines[node.body[1].lineno - 1:node.end_lineno]
            if not 1 <= len(body) <= max_lines or not all(line.isascii() for line in body):
                continue
            indent = min(len(line) - len(line.lstrip()) for line in body if line.strip())
            summary = ast.get_docstring(node).strip().splitlines()[0]
            record = {"prompt": f'def {node.name}({ast.unparse(node.args)}):\n    """{summary}"""\n',
                      "response": "\n".join("    " + line[indent:] for line in body)}
            try:  # a summary ending in a quote or a backslash would not parse
                ast.parse(record["prompt"] + record["response"])
            except SyntaxError:
                continue
            records.append(record)
    if len(records) < 100:
        raise ValueError(f"the Python standard library's sources are missing under "
                         f"{sysconfig.get_paths()['stdlib']} (found {len(records)} functions); the code task "
                         "is built from them: use a Python install with its .py files, or upload a .jsonl task")
    return records[:limit]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"data file {str(path)!r} does not exist: give an existing .txt or .jsonl file, "
                         "or no data source for the default corpus")
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} is a directory, not a file: give a .txt or .jsonl file inside it")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file as one string; empty or undecodable files are errors."""
    path = Path(path)
    _check_file(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}): "
                         "save it as UTF-8") from e
    if not text.strip():
        raise ValueError(f"data file {str(path)!r} is empty: give a file with some text in it")
    return text


def _record(obj: object, where: str) -> tuple[str, str]:
    """(prompt, response) from one parsed JSONL line."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object like {{\"prompt\": ..., \"response\": ...}}, "
                         f"got {type(obj).__name__}")
    for prompt_key, response_key in FIELD_PAIRS:
        if prompt_key in obj and response_key in obj:
            break
    else:
        pairs = ", ".join(f"{p}/{r}" for p, r in FIELD_PAIRS)
        raise ValueError(f"{where}: no prompt/response fields (found {sorted(obj)}); use one of the pairs {pairs}")
    for key in (prompt_key, response_key) + (("input",) if prompt_key == "instruction" and "input" in obj else ()):
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    prompt = obj[prompt_key]
    if prompt_key == "instruction" and obj.get("input"):
        prompt = f"{prompt}\n\n{obj['input']}"
    return prompt, obj[response_key]


def read_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs, one per non-blank line; errors name the file and the line."""
    path = Path(path)
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); "
                             "write one JSON object per line") from e
        records.append(_record(obj, where))
    if not records:
        raise ValueError(f"data file {str(path)!r} has no records: write one JSON object per line")
    return records


# ---- tokenizers ----------------------------------------------------------------------------------


def find_tokenizer(folder: str | Path) -> str | None:
    """`folder` when it holds tokenizer files (a model folder with its tokenizer), else None."""
    folder = Path(folder)
    return str(folder) if folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES) else None


def load_tokenizer(source: str, vocab_size: int, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A model's own tokenizer (a folder or reachable hub id); its ids must fit `vocab_size`."""
    path = Path(source)
    if not path.exists() and (source.startswith((".", "~")) or path.is_absolute() or source.count("/") > 1):
        raise ValueError(f"tokenizer folder {source!r} does not exist: give a folder with tokenizer files, "
                         "or no tokenizer to train a BPE one")
    if path.exists() and find_tokenizer(path) is None:
        raise ValueError(f"tokenizer folder {source!r} has none of {', '.join(TOKENIZER_FILES)}: "
                         "give a folder with a tokenizer, or no tokenizer to train a BPE one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {source!r} could not be loaded ({e}): give a local folder with "
                         "tokenizer files, or no tokenizer to train a BPE one") from e
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {source!r} has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size {vocab_size}: ids ≥ {vocab_size} would index past the embedding; "
                         "use the model's own tokenizer or a model with a larger vocab_size")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {source!r} has no eos_token, needed to end documents: set "
                         "\"eos_token\" in its tokenizer_config.json, or give no tokenizer to train a BPE one")
    return tokenizer


def _bpe_key(documents: list[str], vocab_size: int) -> str:
    digest = hashlib.sha256(f"{BPE_RECIPE}|{vocab_size}".encode())
    for doc in documents:  # length-prefixed, so ["ab", "c"] and ["a", "bc"] differ
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


def _train_bpe(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = (line for doc in documents for line in doc.splitlines(keepends=True))
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT, pad_token=EOT,
                                   clean_up_tokenization_spaces=False)


def bpe_tokenizer(documents: list[str], vocab_size: int, cache_dir: str | Path) -> PreTrainedTokenizerBase:
    """A byte-level BPE of at most `vocab_size` ids trained on `documents`, cached in `cache_dir`.

    Deterministic: the same documents and vocab size give the same tokenizer, in any process.
    """
    if vocab_size <= BYTE_ALPHABET:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE tokenizer: it needs "
                         f"{BYTE_ALPHABET} byte tokens plus {EOT}; use vocab_size ≥ {BYTE_ALPHABET + 1}")
    folder = Path(cache_dir) / f"bpe-{vocab_size}-{_bpe_key(documents, vocab_size)}"
    if not (folder / "tokenizer.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        _train_bpe(documents, vocab_size).save_pretrained(scratch)
        try:
            os.replace(scratch, folder)  # atomic: a concurrent run sees all of it or nothing
        except OSError:  # another run cached the same tokenizer first
            shutil.rmtree(scratch, ignore_errors=True)
    return AutoTokenizer.from_pretrained(folder)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # verbose=False: whole documents are longer than model_max_length on purpose; no warning
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and bos != tokenizer.eos_token_id else []


# ---- rows ----------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Equal-length token rows: (N, T) int32 tensors; labels None means labels = input_ids."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None  # packed rows: positions restart for each document

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        """Tokens the model reads, padding excluded."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at `index` as a model batch of int64 tensors (attention_mask only with padding)."""
        input_ids = self.input_ids[index].long()
        batch = {"input_ids": input_ids, "labels": input_ids.clone() if self.labels is None else self.labels[index].long()}
        if self.attention_mask is not None:
            batch["attention_mask"] = self.attention_mask[index].long()
        if self.position_ids is not None:
            batch["position_ids"] = self.position_ids[index].long()
        return batch

    def subset(self, index: torch.Tensor) -> Rows:
        """The rows at `index`, as Rows."""
        labels, mask, positions = (None if t is None else t[index]
                                   for t in (self.labels, self.attention_mask, self.position_ids))
        return Rows(self.input_ids[index], labels, mask, positions)

    def batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Fixed-order batches, the last one possibly smaller, at most `max_batches` of them."""
        count = -(-len(self) // batch_size)
        for i in range(count if max_batches is None else min(count, max_batches)):
            yield self.select(torch.arange(i * batch_size, min((i + 1) * batch_size, len(self))))


def text_rows(documents: list[list[int]], eos_id: int, seq_len: int) -> Rows:
    """Documents joined by EOS (each ends with one) and cut into blocks of `seq_len` tokens."""
    stream = [token for doc in documents for token in (*doc, eos_id)]
    count = len(stream) // seq_len
    if count == 0:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than seq_len={seq_len}: use seq_len ≤ "
                         f"{len(stream)}, or a longer text")
    return Rows(torch.tensor(stream[:count * seq_len], dtype=torch.int32).view(count, seq_len))


def record_rows(prompts: list[list[int]], responses: list[list[int]], eos_id: int, pad_id: int,
                seq_len: int) -> tuple[Rows, int]:
    """One padded row per record, loss on the response (and its EOS) only; also the skipped count.

    A record is skipped when its prompt leaves no response token that the model predicts: the
    first position has no prediction, so at least one label at position ≥ 1 must remain.
    """
    input_ids, labels, mask, skipped = [], [], [], 0
    for prompt, response in zip(prompts, responses):
        ids = (prompt + response + [eos_id])[:seq_len]
        target = ([IGNORE_INDEX] * len(prompt) + response + [eos_id])[:seq_len]
        if all(t == IGNORE_INDEX for t in target[1:]):
            skipped += 1
            continue
        padding = seq_len - len(ids)
        input_ids.append(ids + [pad_id] * padding)
        labels.append(target + [IGNORE_INDEX] * padding)
        mask.append([1] * len(ids) + [0] * padding)
    if not input_ids:
        longest = max(len(p) for p in prompts)
        raise ValueError(f"no record fits seq_len={seq_len}: each prompt leaves no room for its response "
                         f"(longest prompt {longest} tokens); raise seq_len, or shorten the prompts")
    rows = Rows(*(torch.tensor(t, dtype=torch.int32) for t in (input_ids, labels, mask)))
    return rows, skipped


def packed_rows(documents: list[list[int]], seq_len: int, labels: list[list[int]] | None = None) -> Rows:
    """Documents concatenated into full rows of `seq_len` tokens, no padding, attention kept inside each.

    Greedy, in order: each row takes documents until it is full; a document that does not fit the
    rest of a row is split there and its tail starts the next row (a document longer than a row
    is split into several). position_ids restart at 0 for every document and every piece of one;
    the label of each piece's first token is -100, so the token before it (another document's
    last) predicts nothing across the boundary. `labels`: per-document targets (-100 on prompts),
    default the tokens themselves. The tail shorter than a row is dropped.
    """
    ids_stream: list[int] = []
    label_stream: list[int] = []
    position_stream: list[int] = []
    for i, doc in enumerate(documents):
        target = doc if labels is None else labels[i]
        start = 0
        while start < len(doc):
            room = seq_len - len(ids_stream) % seq_len
            piece = doc[start:start + room]
            ids_stream += piece
            label_stream += [IGNORE_INDEX] + list(target[start + 1:start + len(piece)])
            position_stream += range(len(piece))
            start += len(piece)
    count = len(ids_stream) // seq_len
    if count == 0:
        raise ValueError(f"the data has {len(ids_stream)} tokens, fewer than seq_len={seq_len}: use seq_len ≤ "
                         f"{len(ids_stream)}, or more data")
    rows = [torch.tensor(s[:count * seq_len], dtype=torch.int32).view(count, seq_len)
            for s in (ids_stream, label_stream, position_stream)]
    return Rows(rows[0], rows[1], None, rows[2])


def split_rows(rows: Rows, eval_fraction: float, seed: int) -> tuple[Rows, Rows]:
    """(train, eval): a seeded permutation sends round(eval_fraction · N), at least 1, rows to eval.

    No eval rows when eval_fraction is 0 or there is a single row (training needs it).
    """
    count = len(rows)
    n_eval = 0 if eval_fraction == 0 or count < 2 else min(count - 1, max(1, round(eval_fraction * count)))
    order = torch.from_numpy(np.random.default_rng([seed, SPLIT_STREAM]).permutation(count))
    return rows.subset(order[n_eval:].sort().values), rows.subset(order[:n_eval].sort().values)


# ---- loaders -------------------------------------------------------------------------------------


class TrainBatches:
    """Endless micro-batches of the training rows: a fresh seeded shuffle every epoch, resumable.

    An iterator: `next(batches)` returns the batch at (epoch, position) and moves on. Each epoch
    has len(rows) // batch_size full batches (the partial last one is dropped; its rows come up in
    other epochs). `state_dict()` after a batch and `load_state_dict()` in a new process continue
    with exactly the batches the first process would have produced next.
    """

    def __init__(self, rows: Rows, batch_size: int, seed: int):
        if batch_size > len(rows):
            raise ValueError(f"batch_size={batch_size} is more than the {len(rows)} training rows of "
                             f"{rows.input_ids.shape[1]} tokens: lower batch_size to ≤ {len(rows)}, lower "
                             "seq_len, or give more data")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.batches_per_epoch = len(rows) // batch_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) cache

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of the training rows that `epoch` walks through."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, SHUFFLE_STREAM, epoch])
            self._order = (epoch, torch.from_numpy(rng.permutation(len(self.rows))))
        return self._order[1]

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.position * self.batch_size
        batch = self.rows.select(self.epoch_order(self.epoch)[start:start + self.batch_size])
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from, plus what must match on resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved `state_dict()`; the seed, batch size and data must be the same."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "rows"):
            if state.get(key) != mine[key]:
                raise ValueError(f"data state {key}={state.get(key)!r} differs from this run's {key}={mine[key]}: "
                                 "resume with the same data, seq_len, batch_size and seed as the saved run")
        if not 0 <= state["position"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"data state position={state['position']} epoch={state['epoch']} is out of range "
                             f"(0 ≤ position < {self.batches_per_epoch}): the checkpoint does not match this data")
        self.epoch, self.position = state["epoch"], state["position"]


@dataclass
class Data:
    """Everything a run reads: the tokenizer, the training loader, the eval rows, counts to log."""

    tokenizer: PreTrainedTokenizerBase
    train: TrainBatches
    eval_rows: Rows
    kind: str  # "text" or "jsonl"
    source: str  # the file, or "pydoc_data.topics"
    tokenizer_source: str  # the tokenizer folder or id, or the cached BPE folder
    records: int  # documents (text) or records kept (jsonl)
    skipped: int = 0  # jsonl records whose prompt leaves no room for the response
    packed: bool = False  # rows are packed documents (position_ids, no padding)

    def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The held-out rows in a fixed order, in batches of the training batch size."""
        return self.eval_rows.batches(self.train.batch_size, max_batches)

    def summary(self) -> dict[str, object]:
        """Counts for the run's config.json and the log."""
        return {"kind": self.kind, "source": self.source, "tokenizer": self.tokenizer_source,
                "vocab": len(self.tokenizer), "records": self.records, "skipped": self.skipped,
                "train_rows": len(self.train.rows), "eval_rows": len(self.eval_rows),
                "train_tokens": self.train.rows.tokens, "eval_tokens": self.eval_rows.tokens,
                "batches_per_epoch": self.train.batches_per_epoch, "packed": self.packed}


def _check_args(seq_len: int, batch_size: int, seed: int, eval_fraction: float, max_position: int | None) -> None:
    problems = []
    if not isinstance(seq_len, int) or seq_len < 2:
        problems.append(f"seq_len={seq_len!r} must be a whole number ≥ 2")
    elif max_position is not None and seq_len > max_position:
        problems.append(f"seq_len={seq_len} is above the model's maximum position {max_position}: "
                        f"use seq_len ≤ {max_position}")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r} must be a whole number ≥ 1")
    if not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r} must be a whole number ≥ 0")
    if not 0 <= eval_fraction < 1:
        problems.append(f"eval_fraction={eval_fraction!r} must be in [0, 1): the share of data held out, e.g. 0.05")
    if problems:
        raise ValueError("; ".join(problems))


def load_data(source: str | None, tokenizer_source: str | None, vocab_size: int, seq_len: int,
              batch_size: int, seed: int, cache_dir: str | Path, eval_fraction: float = 0.05,
              max_position: int | None = None, trust_remote_code: bool = False, packed: bool = False) -> Data:
    """Read `source`, get a tokenizer, build rows, split them; see the module docstring."""
    _check_args(seq_len, batch_size, seed, eval_fraction, max_position)
    kind = "jsonl" if source is not None and Path(source).suffix.lower() == ".jsonl" else "text"
    if source is not None and kind == "text" and Path(source).suffix.lower() != ".txt":
        raise ValueError(f"data file {source!r} is neither .txt (plain text) nor .jsonl (prompt/response "
                         "records): rename it to .txt if it is UTF-8 text")
    if kind == "jsonl":
        records = read_jsonl(source)
        documents = [text for record in records for text in record]
    else:
        documents = default_documents() if source is None else [read_text(source)]

    if tokenizer_source is None:
        tokenizer = bpe_tokenizer(documents, vocab_size, cache_dir)
        tokenizer_source = tokenizer.name_or_path
    else:
        tokenizer = load_tokenizer(tokenizer_source, vocab_size, trust_remote_code)
    eos, bos = tokenizer.eos_token_id, _bos(tokenizer)

    skipped = 0
    if kind == "jsonl":
        prompts = [bos + ids for ids in _encode(tokenizer, [p for p, _ in records])]
        responses = _encode(tokenizer, [r for _, r in records])
        if packed:  # no padding: records joined; loss on responses (and their EOS) only
            rows = packed_rows([p + r + [eos] for p, r in zip(prompts, responses)], seq_len,
                               [[IGNORE_INDEX] * len(p) + r + [eos] for p, r in zip(prompts, responses)])
            count = len(records)
        else:
            pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
            rows, skipped = record_rows(prompts, responses, eos, pad, seq_len)
            count = len(records) - skipped
    elif packed:
        rows = packed_rows([bos + ids + [eos] for ids in _encode(tokenizer, documents)], seq_len)
        count = len(documents)
    else:
        rows = text_rows([bos + ids for ids in _encode(tokenizer, documents)], eos, seq_len)
        count = len(documents)
    train_rows, eval_rows = split_rows(rows, eval_fraction, seed)
    return Data(tokenizer, TrainBatches(train_rows, batch_size, seed), eval_rows, kind,
                source or "pydoc_data.topics", str(tokenizer_source), count, skipped, packed)
