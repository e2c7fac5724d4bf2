"""The fine-tuning demo's data: a prompt/response task made from Python's own standard library.

Fine-tuning needs a base that already knows some language (LoRA on a random base barely moves the
loss), so the demo pre-trains a tiny base on the default corpus (Python's documentation) first;
then every method fine-tunes that base on this task — write a function's body from its signature
and docstring (lowrank.data.code_task):

    {"prompt": "def year(self):\n    \"\"\"year (1-9999)\"\"\"\n", "response": "    return self._year"}

Code is a new domain for a base that read prose, so the loss falls visibly in a few dozen steps;
held-out functions show what generalizes. `lowrank.data` masks the loss to the response.
No internet.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowrank.data import code_task


def task_records() -> list[dict]:
    """The task's records: lowrank.data.code_task (about 1,900 functions of the standard library)."""
    return code_task()


def write_task(folder: str | Path) -> Path:
    """The task as a .jsonl file in `folder` (written once)."""
    path = Path(folder) / "code-task.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in task_records()))
        tmp.replace(path)
    return path
