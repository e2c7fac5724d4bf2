"""How fast the estimator answers: one estimate once the model spec is cached, a full GPU fit
table (with the largest batch for every GPU), a cold spec build, and for families without named
formulas (MoE presets here) the cost of tracing a new activation profile (estimator/profile.py).

    python bench/estimator_speed.py

Targets: one estimate ≤ 1 ms, a full fit table ≤ 100 ms, a new traced profile ≤ 2 s.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.estimate import estimate_spec
from estimator.gpus import fit_table, gpu_catalog, max_batch_size
from estimator.profile import _profile_cached
from estimator.spec import _load_spec_cached, load_spec, preset_names

METHODS = [FullConfig(), LoRAConfig(rank=64), QLoRAConfig(rank=64), GaLoreConfig(rank=512, layerwise=True),
           QGaLoreConfig(rank=512)]
MODELS = ["llama-7b", "llama2-70b", "llama3.1-8b", "gpt2"]
TRACED = [name for name in ("mixtral-8x7b", "qwen1.5-moe-a2.7b") if name in preset_names()]


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def fit_row(spec, method, setup) -> list[dict]:
    return fit_table(estimate_spec(spec, method, setup))


def all_max_batches(spec, method, setup) -> list[int | None]:
    return [max_batch_size(spec, method, setup, gpu) for gpu in gpu_catalog()]


def main() -> None:
    setup = TrainSetup(batch_size=4, seq_len=1024)
    print(f"{'model':<12} {'method':<8} {'estimate':>10} {'fit table':>10} {'max batch, 20 GPUs':>20}")
    for model in MODELS + TRACED:
        spec = load_spec(model)
        for method in METHODS:
            one = timed(partial(estimate_spec, spec, method, setup), 200)
            table = timed(partial(fit_row, spec, method, setup), 50)
            batches = timed(partial(all_max_batches, spec, method, setup), 5)
            print(f"{model:<12} {method.method:<8} {one * 1e3:>8.3f}ms {table * 1e3:>8.3f}ms {batches * 1e3:>20.1f}ms")
    print("\nA new traced profile (cleared cache; full training, then LoRA: two trace keys):")
    for model in TRACED:
        spec = load_spec(model)
        for method in (FullConfig(), LoRAConfig(rank=64)):
            for batch in (4, 1):  # batch 1 has a profile of its own
                _profile_cached.cache_clear()
                start = time.perf_counter()
                estimate_spec(spec, method, TrainSetup(batch_size=batch, seq_len=1024))
                print(f"  {model:<18} {method.method:<5} batch {batch}: {1e3 * (time.perf_counter() - start):,.0f} ms")
    _load_spec_cached.cache_clear()
    start = time.perf_counter()
    load_spec("llama2-70b")
    print(f"\ncold spec of llama2-70b (meta-device build): {1e3 * (time.perf_counter() - start):.0f} ms; cached after")


if __name__ == "__main__":
    main()
