"""The fine-tuning demo's data: a small prompt/response task made from Python's own documentation.

Fine-tuning needs a base that already knows some language (LoRA on a random base barely moves the
loss), so the demo pre-trains a tiny base on the default corpus first; then every method
fine-tunes that base on this task. Each section of `pydoc_data.topics` becomes one record:

    {"prompt": "Python help: The \"assert\" statement\\n",
     "response": "Assert statements are a convenient way to insert debugging assertions into a program:"}

`lowrank.data` masks the loss to the response. No internet, same records on every machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

HEADING_RULE = re.compile(r"([*=\-^~])\1+")
NOTES = ("Note", "New in", "Changed in", "Deprecated", "See also")


def sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """(title, body lines) of each reStructuredText-style section: a line underlined by *, =, -, ^ or ~."""
    lines = text.splitlines()
    title, body = None, []
    for i, line in enumerate(lines):
        below = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.strip() and HEADING_RULE.fullmatch(below) and len(below) >= len(line.strip()) - 1:
            if title:
                yield title, body
            title, body = line.strip(), []
        elif not HEADING_RULE.fullmatch(line.strip()):
            body.append(line)
    if title:
        yield title, body


def first_sentences(body: list[str], limit: int = 220) -> str | None:
    """The first prose paragraph's opening sentences, up to about `limit` characters (grammar and notes skipped)."""
    for paragraph in "\n".join(body).split("\n\n"):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip() or paragraph.startswith((" ", "\t")) or paragraph.strip().startswith(NOTES):
            continue
        out = ""
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
            if out and len(out) + len(sentence) > limit:
                break
            out = f"{out} {sentence}".strip()
        if len(out) > 20:
            return out
    return None


def help_task() -> list[dict]:
    """One prompt/response record per documented section (about 170)."""
    from pydoc_data.topics import topics

    records = {}
    for text in topics.values():
        for title, body in sections(text):
            response = first_sentences(body)
            if response and title not in records:
                records[title] = response
    return [{"prompt": f"Python help: {title}\n", "response": response} for title, response in records.items()]


def write_help_task(folder: str | Path) -> Path:
    """The task as a .jsonl file in `folder` (written once)."""
    path = Path(folder) / "python-help-task.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in help_task()))
        tmp.replace(path)
    return path
