"""The Train tab: run methods one after another through the worker, live, and compare them at the end.

Training events share one queue slot per device (concurrency_limit=1, concurrency_id "device"),
so runs never overlap while estimates and dry runs go on. The handlers turn widget values into
configs and follow ui/runner.py's generators, rendering the board at most twice a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import gradio as gr

from lowrank.device import DEVICES
from lowrank.worker import list_runs

from .runner import DATA_SOURCES, Runner, cuda_available, data_path, finetune_demo, local_ranks, train_methods
from .runs import Board, delete_runs, past_runs, render, view_from_folder
from .widgets import METHOD_LABELS, configs_and_setup, method_options_block, setup_widgets, show_selected

TINY = ("tiny-llama-5m", "tiny-llama-20m")
MAX_STEPS = 1_000_000  # the step fields' bound (number inputs: a slider this long cannot be aimed)
RENDER_EVERY = 0.5  # seconds between live updates of the page
# Defaults of the Train tab's method options: small enough to show something in 100 CPU steps.
TRAIN_DEFAULTS = {"galore": {"update_proj_gap": 25}, "qgalore": {"update_proj_gap": 25}}


def session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def stream(events: Iterator[dict], board: Board) -> Iterator[tuple]:
    """The page's outputs while `events` run: at most every RENDER_EVERY s, and at each run's start and end."""
    last = 0.0
    warned = set()
    try:
        for event in events:
            for view in board.runs:
                if view.status == "failed" and view.label not in warned:
                    warned.add(view.label)
                    gr.Warning(f"{view.label}: {view.message}", title="Run failed")
            if event["type"] != "step" or time.monotonic() - last > RENDER_EVERY:
                last = time.monotonic()
                yield (*render(board)[:-1], gr.skip())
    except ValueError as err:  # a later run's checks (the demo's fine-tuning runs)
        raise gr.Error(str(err), title="Run not started") from None
    yield render(board, with_downloads=True)


class TrainHandlers:
    """The Train tab's handlers over one Runner: widget values in, the page's outputs out."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def start(self, model: str, methods: list[str], data: str, upload: str | None, steps: float, lr: float,
              eval_every: float, seed: float, device: str, request: gr.Request | None = None, **values):
        """Start: the chosen methods one after another (a generator of page outputs)."""
        def events(session: str, board: Board) -> Iterator[dict]:
            configs, setup = configs_and_setup(methods, values)
            return train_methods(self.runner, session, board, model, configs, setup, steps, lr,
                                 data_path(data, upload, self.runner.root), eval_every, seed, device)

        yield from self._launch(request, events, "Cannot start")

    def start_demo(self, base: str, pretrain_steps: float, finetune_steps: float, methods: list[str], lr: float,
                   eval_every: float, seed: float, device: str, request: gr.Request | None = None, **values):
        """The fine-tuning demo: pre-train `base`, then fine-tune it with each method."""
        def events(session: str, board: Board) -> Iterator[dict]:
            configs, setup = configs_and_setup(methods, values)
            return finetune_demo(self.runner, session, board, base, pretrain_steps, finetune_steps, configs, setup,
                                 lr, eval_every, seed, device)

        yield from self._launch(request, events, "Cannot start the demo")

    def _launch(self, request: gr.Request | None, events, title: str) -> Iterator[tuple]:
        """Check everything (the first step of `events` raises on bad input, before any worker starts),
        leave the queue, then stream the page's outputs."""
        session, board = session_of(request), Board()
        try:
            running = events(session, board)
            first = next(running, None)  # None: every run was skipped (a Stop while queued)
        except ValueError as err:
            raise gr.Error(str(err), title=title) from None
        finally:
            self.runner.done_waiting(session)
        yield from stream(chain([first] if first else [], running), board)

    def queue(self, request: gr.Request | None = None) -> None:
        """Before Start waits for the device: mark this page as waiting, so its Stop can cancel it."""
        self.runner.waiting(session_of(request))

    def stop(self, request: gr.Request | None = None) -> None:
        session = session_of(request)
        queued = self.runner.is_queued(session)
        if self.runner.stop(session):
            gr.Info("Cancelled: the queued runs will not start." if queued else "Stopping after the current step…")
        else:
            gr.Info("No run of this page is in progress.")

    def refresh(self, selected: list[str] | None = None):
        """The past runs (the selection kept where its runs still exist), and model folders that
        later runs can start from."""
        rows = list_runs(self.runner.root)
        choices = past_runs(self.runner.root, rows)
        folders = {out for _, out in choices}
        finals = [str(Path(row["out"]) / "final") for row in rows
                  if row["status"] == "completed" and _is_model_folder(Path(row["out"]) / "final")]
        return (gr.Dropdown(choices=choices, value=[f for f in selected or [] if f in folders], multiselect=True),
                gr.Dropdown(choices=[*TINY, *finals]))

    def show(self, folders: list[str]):
        if not folders:
            raise gr.Error("pick one or more past runs first", title="Nothing to show")
        board = Board([view_from_folder(f) for f in folders], status=f"{len(folders)} past run(s)")
        return render(board, with_downloads=True)

    def delete(self, folders: list[str], confirmed: bool):
        """Delete the chosen run folders (never one a run of this app is using), once confirmed.

        Returns the past runs, the model choices, the confirmation (unticked) and what was done; a
        refusal is a message (the other outputs stay as they are)."""
        why = ("pick one or more past runs first" if not folders else
               "tick “yes, delete the selected runs” first: deleting cannot be undone" if not confirmed else None)
        if why:
            gr.Warning(why, title="Nothing deleted")
            return gr.skip(), gr.skip(), gr.skip(), f"Nothing deleted: {why}."
        deleted, refused = delete_runs(self.runner.root, folders, self.runner.in_use())
        lines = ([f"Deleted {len(deleted)} run(s): " + ", ".join(f"`{n}`" for n in deleted) + "."] if deleted
                 else ["Nothing was deleted."])
        lines += [f"- not deleted: {why}" for why in refused]
        past, model = self.refresh()
        return past, model, gr.Checkbox(value=False), "\n".join(lines)


def _is_model_folder(path: Path) -> bool:
    try:
        return (path / "config.json").is_file() and not path.is_symlink()
    except OSError:
        return False


def output_panel() -> list:
    """Status, progress, loss, memory, layer gaps, comparison, table, downloads: render()'s order."""
    idle = render(Board(status="Choose a model and methods, then press **Start**."))
    status = gr.Markdown(idle[0], elem_id="train-status")
    progress = gr.HTML(idle[1], elem_id="train-progress")
    with gr.Row():
        loss = gr.Plot(idle[2], show_label=False, label="loss", elem_id="train-loss")
        memory = gr.Plot(idle[3], show_label=False, label="memory", elem_id="train-memory")
    compare = gr.Plot(idle[5], show_label=False, label="predicted vs measured", elem_id="train-compare")
    table = gr.DataFrame(idle[6], label="runs", elem_id="train-table", wrap=True)
    layers = gr.Plot(idle[4], show_label=False, label="GaLore layer gaps", elem_id="train-layers")
    files = gr.File(label="downloads: metrics CSV, summary JSON, adapters", file_count="multiple",
                    interactive=False, height=200, elem_id="train-files")
    return [status, progress, loss, memory, layers, compare, table, files]


def method_choices() -> list[tuple[str, str]]:
    return [(METHOD_LABELS[m], m) for m in METHOD_LABELS]


def create_train_tab(demo: gr.Blocks, runner: Runner) -> None:
    """Layout and events of the Train tab (call inside a gr.Tab of `demo`)."""
    handlers = TrainHandlers(runner)
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            model = gr.Dropdown(list(TINY), value=TINY[0], allow_custom_value=True, label="model",
                                info="a tiny preset (CPU), a model folder such as runs/…/final, or a hub id")
            methods = gr.CheckboxGroup(method_choices(), value=["full", "lora", "galore"], elem_id="train-methods",
                                       label="methods (run one after another, same data and seed)")
            data = gr.Radio(list(DATA_SOURCES), value=DATA_SOURCES[0], label="data")
            upload = gr.File(label="data file (.txt or prompt/response .jsonl)", file_types=[".txt", ".jsonl"],
                             visible=False)
            with gr.Row():
                steps = gr.Number(100, minimum=1, maximum=MAX_STEPS, step=1, precision=0, label="steps",
                                  elem_id="train-steps")
                eval_every = gr.Number(25, minimum=0, maximum=MAX_STEPS, step=1, precision=0,
                                       label="eval every (steps; 0: only at the end)", elem_id="train-eval-every")
            with gr.Row():
                lr = gr.Number(0, minimum=0, maximum=1, label="peak learning rate (0: the method's default)")
                seed = gr.Number(0, minimum=0, maximum=2**31 - 1, precision=0, label="seed")
                device = gr.Dropdown(list(DEVICES), value="auto", label="device")
            with gr.Accordion("batch and precision", open=False):
                setup = setup_widgets(batch_size=4, seq_len=128, dtype="bf16" if cuda_available() else "fp32",
                                      dtypes=("fp32", "bf16"), max_batch=256, max_seq=8192, prefix="train",
                                      max_gpus=local_ranks(), gpus_label="processes (ranks: torchrun here; "
                                      "NCCL on GPUs, Gloo on CPU)")
            accordions, options = method_options_block(selected=("full", "lora", "galore"), defaults=TRAIN_DEFAULTS,
                                                      prefix="train")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
            with gr.Accordion("Fine-tuning demo: pre-train a tiny base, then fine-tune it with each method",
                              open=False):
                demo_base = gr.Dropdown(list(TINY), value=TINY[0], label="base model (pre-trained here first)")
                with gr.Row():
                    demo_pre = gr.Number(300, minimum=1, maximum=MAX_STEPS, step=10, precision=0,
                                         label="pre-training steps (full training)", elem_id="demo-pretrain-steps")
                    demo_ft = gr.Number(100, minimum=1, maximum=MAX_STEPS, step=5, precision=0,
                                        label="fine-tuning steps", elem_id="demo-finetune-steps")
                demo_methods = gr.CheckboxGroup(method_choices(), value=["lora", "qlora", "galore", "qgalore"],
                                                label="fine-tune with (the options above apply)")
                demo_start = gr.Button("Run the fine-tuning demo", elem_id="demo-start")
            with gr.Accordion("Past runs", open=False):
                past = gr.Dropdown([], multiselect=True, label="runs to show or delete", elem_id="past-runs",
                                   info="unreadable runs are listed with the reason; delete them here")
                with gr.Row():
                    refresh = gr.Button("Refresh", size="sm", elem_id="past-refresh")
                    load = gr.Button("Show", size="sm", elem_id="past-load")
                with gr.Row():
                    confirm = gr.Checkbox(False, label="yes, delete the selected runs", elem_id="past-delete-confirm")
                    delete = gr.Button("Delete", size="sm", variant="stop", elem_id="past-delete")
                deleted = gr.Markdown("", elem_id="past-deleted")
        with gr.Column(scale=5):
            outputs = output_panel()

    widgets = {**setup, **options}
    private = dict(api_visibility="private")
    data.change(lambda c: gr.File(visible=c == DATA_SOURCES[2]), data, upload, queue=False, **private)
    methods.change(show_selected(accordions), methods, list(accordions.values()), queue=False, **private)
    device_queue = dict(concurrency_limit=1, concurrency_id="device", show_progress="hidden", **private)
    start.click(handlers.queue, None, None, queue=False, **private).then(
        handlers.start, [model, methods, data, upload, steps, lr, eval_every, seed, device], outputs,
        inputs_kwargs=widgets, **device_queue).then(handlers.refresh, past, [past, model], **private)
    demo_start.click(handlers.queue, None, None, queue=False, **private).then(
        handlers.start_demo, [demo_base, demo_pre, demo_ft, demo_methods, lr, eval_every, seed, device],
        outputs, inputs_kwargs=widgets, **device_queue).then(handlers.refresh, past, [past, model], **private)
    stop.click(handlers.stop, None, None, concurrency_limit=None, **private)
    gr.on([refresh.click, demo.load], handlers.refresh, past, [past, model], concurrency_limit=None, **private)
    load.click(handlers.show, past, outputs, concurrency_limit=None, **private)
    delete.click(handlers.delete, [past, confirm], [past, model, confirm, deleted], concurrency_limit=None,
                 **private)
