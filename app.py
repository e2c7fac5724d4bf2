"""The browser app: plan memory, train live, and see predicted beside measured.

    python app.py                      # http://127.0.0.1:7860
    python app.py --port 8080 --runs /data/runs --share

Wiring only: the tabs live in ui/ (plain handlers first, then one create_*_tab each), the work in
estimator/ and lowrank/. Training runs in worker processes, one at a time per device; estimates
never wait for them.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import inspect
import logging
import os
import sys
from pathlib import Path

import gradio as gr

from ui.dryrun import create_dryrun_tab
from ui.plan import create_plan_tab, warm_up
from ui.runner import Runner, cuda_available
from ui.train import create_train_tab

RUNS = Path(__file__).resolve().parent / "runs"
MAX_UPLOAD = "64mb"  # data files; a config.json is held to 1 MB by the Plan tab
LOG = logging.getLogger("lowrank-memory")
# Gradio recomputes its monitoring summary (a pandas table of up to 10,000 past events) after every
# event, holding the interpreter for milliseconds per call under load; every 1000 events is plenty.
ANALYTICS_EVERY = "1000"


def device_line() -> str:
    if cuda_available():
        import torch

        props = torch.cuda.get_device_properties(0)
        return f"Training device: **{props.name}** ({props.total_memory / 2**30:.0f} GiB)."
    return "Training device: **CPU** (no CUDA GPU found): the tiny presets train in seconds to minutes."


def build_ui(runs_root: str | Path = RUNS, runner: Runner | None = None) -> gr.Blocks:
    """The whole app; `runs_root` holds one folder per training run (`runner`: its workers)."""
    runner = runner or Runner(runs_root)
    atexit.register(runner.stop_all)  # no worker outlives the app
    with gr.Blocks(title="lowrank-memory") as demo:
        gr.Markdown("# lowrank-memory\nPredict, run and measure the memory of one training step with full "
                    "training, LoRA, QLoRA, GaLore and Q-GaLore. " + device_line())
        with gr.Tabs():
            with gr.Tab("Plan", id="plan"):
                create_plan_tab(demo)
            with gr.Tab("Train", id="train"):
                create_train_tab(demo, runner)
            with gr.Tab("Dry run", id="dryrun"):
                create_dryrun_tab(Path(runs_root))
    log_handled_errors(demo)
    return demo


def one_line_errors(fn, name: str):
    """`fn` (plain, generator, async or async generator) whose handled `gr.Error` — bad input, its
    message already shown to the user — is logged as one line instead of Gradio's traceback."""
    def report(err: gr.Error) -> None:
        if err.print_exception:
            LOG.warning("%s: %s: %s", name, err.title, " ".join(str(err.message).split()))
            err.print_exception = False

    if inspect.isasyncgenfunction(fn):
        async def wrapper(*args, **kwargs):
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            except gr.Error as err:
                report(err)
                raise
    elif inspect.iscoroutinefunction(fn):
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except gr.Error as err:
                report(err)
                raise
    elif inspect.isgeneratorfunction(fn):
        def wrapper(*args, **kwargs):
            try:
                return (yield from fn(*args, **kwargs))
            except gr.Error as err:
                report(err)
                raise
    else:
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error as err:
                report(err)
                raise
    wrapper = functools.wraps(fn)(wrapper)  # Gradio reads the signature (gr.Request, **kwargs) through it
    wrapper.one_line_errors = True
    return wrapper


def log_handled_errors(demo: gr.Blocks) -> None:
    """Every event of `demo`: a handled gr.Error is one log line; any other exception keeps its traceback."""
    for block_fn in demo.fns.values():
        if block_fn.fn is not None and not getattr(block_fn.fn, "one_line_errors", False):
            block_fn.fn = one_line_errors(block_fn.fn, block_fn.api_name or block_fn.name)


def warm_estimator() -> None:
    """Import and build what the first estimates need (transformers' model classes, the default
    preset on the meta device, matplotlib's backend: seconds of CPU) before the server answers, so
    that no caller waits for them."""
    try:
        warm_up()
        with contextlib.suppress(ImportError):  # Gradio looks up matplotlib's backend around every event
            import matplotlib

            matplotlib.get_backend()
    except Exception as err:  # a failed warm-up only means a slower first call
        LOG.warning("warm-up failed (%s: %s); the first estimate will be slower", type(err).__name__, err)


def launch(demo: gr.Blocks, runs_root: str | Path = RUNS, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, **kwargs):
    """Serve `demo`: the queue keeps each event's own concurrency limit (training: one per device);
    files under `runs_root` (downloads) may be served. The estimator is warmed up first."""
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", ANALYTICS_EVERY)  # read by demo.queue()
    warm_estimator()
    return demo.queue(default_concurrency_limit=None).launch(
        server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD,
        allowed_paths=[str(Path(runs_root))], **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--runs", default=str(RUNS), help="folder of the training runs (default: runs/)")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    if args.share or args.host not in ("127.0.0.1", "localhost"):
        print("warning: the app is reachable beyond this machine: anyone who can open it may load local model "
              f"folders by path, start training runs, and download files under {args.runs}", file=sys.stderr)
    launch(build_ui(args.runs), args.runs, args.host, args.port, args.share)


if __name__ == "__main__":
    main()
