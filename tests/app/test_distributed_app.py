"""The app's side of data parallelism: GPUs and sharding in every tab's setup, the worker's torchrun
command, one memory line per rank, and the Plan tab's GPUs needed per method."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from estimator.config import FullConfig, LoRAConfig, TrainSetup
from lowrank.recipe import RunSpec
from lowrank.worker import clean_metrics_line, command
from ui.charts import memory_figure
from ui.plan import gpu_table, sweep
from ui.runs import metrics_frame
from ui.widgets import split_setup, train_setup


def test_gpus_and_sharding_come_from_the_setup_widgets():
    setup = train_setup(8.0, 256.0, 1.0, "bf16", False, False, "sdpa", gpus=4.0, shard="full")
    assert setup == TrainSetup(batch_size=8, seq_len=256, gpus=4, shard="full")
    values = {"batch_size": 6, "seq_len": 64, "grad_accum": 1, "dtype": "fp32", "autocast": False,
              "grad_checkpointing": False, "attn_implementation": "sdpa", "gpus": 4, "shard": "none", "rank": 8}
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by gpus=4"):
        split_setup(values)
    setup, options = split_setup({**values, "batch_size": 8})
    assert setup.gpus == 4 and options == {"rank": 8}


def test_cpu_offload_is_a_setup_widget_a_flag_of_the_run_and_fewer_gpus_in_the_plan():
    setup = train_setup(8.0, 256.0, 1.0, "bf16", False, False, "sdpa", gpus=4.0, shard="full", cpu_offload=True)
    assert setup == TrainSetup(batch_size=8, seq_len=256, gpus=4, shard="full", cpu_offload=True)
    values = {"batch_size": 8, "seq_len": 64, "grad_accum": 1, "dtype": "bf16", "autocast": False,
              "grad_checkpointing": False, "attn_implementation": "sdpa", "gpus": 4, "shard": "optimizer",
              "cpu_offload": True}
    with pytest.raises(ValueError, match="shard='optimizer' has none"):
        split_setup(values)
    spec = RunSpec("tiny-llama-5m", LoRAConfig(rank=4), setup, out="runs/x", steps=3)
    assert "--cpu-offload" in command(spec) and "--cpu-offload" in command(spec, dry_run=True)
    from estimator.spec import load_spec

    plan = TrainSetup(batch_size=8, seq_len=512, gpus=8, shard="full")
    rows = [gpu_table(load_spec("llama2-70b"), [FullConfig()], s).set_index("GPU").loc["A100 40GB", "Full training"]
            for s in (plan, replace(plan, cpu_offload=True))]
    assert int(rows[1].split("needs ")[1]) < int(rows[0].split("needs ")[1])  # the states leave the GPUs


def test_the_worker_starts_several_gpus_under_torchrun_and_a_dry_run_alone():
    spec = RunSpec("tiny-llama-5m", LoRAConfig(rank=4), TrainSetup(batch_size=4, seq_len=32, gpus=2, shard="full"),
                   out="runs/x", steps=3)
    argv = command(spec)
    assert argv[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert argv[6:8] == ["-m", "lowrank.train"] and "--shard" in argv and argv[argv.index("--gpus") + 1] == "2"
    assert command(spec, dry_run=True)[:3] == [sys.executable, "-m", "lowrank.train"]


def test_each_rank_gets_its_memory_line_and_its_column():
    MiB = 2**20
    lines = [clean_metrics_line({"step": s, "loss": 1.0, "memory_peak_bytes": (300 + s) * MiB,
                                 "memory_peak_ranks": [(300 + s) * MiB, (200 + s) * MiB]}) for s in (1, 2)]
    assert lines[0]["memory_peak_ranks"] == [301 * MiB, 201 * MiB]
    assert clean_metrics_line({"step": 1, "memory_peak_ranks": ["x"]}).get("memory_peak_ranks") is None
    fig = memory_figure({"LoRA": lines}, {"LoRA": 320 * MiB})
    names = [t.name for t in fig.data]
    assert names[:2] == ["LoRA · rank 0", "LoRA · rank 1"]
    assert list(fig.data[1].y) == [201, 202]  # MiB
    frame = metrics_frame(lines)
    assert list(frame["memory_peak_bytes_rank_1"]) == [201 * MiB, 202 * MiB]


def test_the_plan_tab_counts_the_gpus_each_method_needs():
    from estimator.spec import load_spec

    spec = load_spec("llama2-70b")
    setup = TrainSetup(batch_size=8, seq_len=512, gpus=8, shard="full")
    table = gpu_table(spec, [FullConfig(), LoRAConfig(rank=16)], setup)
    h100 = table[table["GPU"] == "H100 80GB"].iloc[0]
    assert "needs" in h100["Full training"] and "needs" in h100["LoRA"]
    needed = int(h100["Full training"].split("needs ")[1])
    assert needed >= int(h100["LoRA"].split("needs ")[1])  # LoRA needs no more GPUs than full training
    unsharded = gpu_table(spec, [LoRAConfig(rank=16)], TrainSetup(batch_size=1, seq_len=512))
    assert not unsharded["LoRA"].str.contains("needs").any()
    xs, series = sweep(spec, [FullConfig()], setup, "GPUs")
    ys = series["full"]
    assert xs[0] == 1 and all(a >= b for a, b in zip(ys[1:], ys[2:]))  # sharded over more GPUs: less each
