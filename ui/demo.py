"""The fine-tuning demo's data: a prompt/response task made from Python's own documentation.

Fine-tuning needs a base that already knows some language (LoRA on a random base barely moves the
loss), so the demo pre-trains a tiny base on the default corpus first; then every method
fine-tunes that base on this task — repeat a sentence of the docs:

    {"prompt": "Repeat: Assignments to \"__debug__\" are illegal.\\nAnswer:",
     "response": " Assignments to \"__debug__\" are illegal."}

Held-out sentences measure whether a method learned to copy, not whether it memorized the
training records. `lowrank.data` masks the loss to the response. No internet, same records on
every machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowrank.data import repeat_task


def task_records() -> list[dict]:
    """The task's records: lowrank.data.repeat_task (about 900 sentences of Python's docs)."""
    return repeat_task()


def write_task(folder: str | Path) -> Path:
    """The task as a .jsonl file in `folder` (written once)."""
    path = Path(folder) / "repeat-task.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in task_records()))
        tmp.replace(path)
    return path
