"""MemoryTracker counts the bytes CUDA's allocator would, by category, at the peak."""

from __future__ import annotations

import weakref

import torch

from lowrank.memory import MemoryTracker


def test_counts_live_storages_and_frees():
    tracker = MemoryTracker()
    with tracker:
        a = torch.zeros(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = torch.ones(500, dtype=torch.float64)  # 4000 bytes
        assert tracker.current_bytes == 8000
        del a, b
        assert tracker.current_bytes == 4000
        del c
    assert tracker.result().peak_bytes == 8000


def test_saved_tensors_are_activations_and_grads_are_gradients():
    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(16, 64)
    tracker = MemoryTracker()
    tracker.watch([w], "weights")
    hook = w.register_post_accumulate_grad_hook(lambda p: tracker.watch([p.grad], "gradients"))
    with tracker:
        tracker.phase("forward")
        y = (x @ w).exp()  # the matmul saves x (w needs a gradient), exp saves its output
        tracker.phase("backward")
        y.sum().backward()
    hook.remove()
    result = tracker.result()
    assert result.breakdown["weights"] == 64 * 32 * 4
    assert result.breakdown["activations"] == 16 * 64 * 4 + 16 * 32 * 4
    assert result.phase == "backward"
    assert w.grad is not None


def test_gradient_hooks_run_before_a_layerwise_optimizer_frees_the_grad():
    model = torch.nn.Linear(8, 4)
    freed = []

    def optimizer_hook(p):
        freed.append(p.grad.numel())
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(optimizer_hook)
    tracker = MemoryTracker()
    tracker.watch_model(model)
    with tracker:
        tracker.phase("forward")
        loss = model(torch.randn(2, 8)).sum()
        tracker.phase("backward")
        loss.backward()
    grads = [r for r in tracker._records if r.category == "gradients"]
    assert sorted(r.nbytes for r in grads) == [16, 128] and freed


def test_cuda_blocks_round_up(monkeypatch):
    from lowrank import memory

    class FakeCuda:
        type = "cuda"

    st = torch.zeros(3).untyped_storage()
    assert memory._storage_bytes(st, FakeCuda()) == 512
    assert memory._storage_bytes(st, torch.device("cpu")) == 12


def test_a_saved_output_that_backward_never_reaches_dies_with_its_graph():
    """A node that saves its own output (sigmoid) and whose result only feeds a top-k's indices (no
    gradient flows back through it: DeepSeek-V4's indexer) is freed when forward drops it, as in a
    step without the tracker. Packed with its grad_fn, the saved output would own the node that owns
    it — a cycle through C++ that no gc breaks — and stay alive through the step (and every later one)."""
    x = torch.randn(64, 256, requires_grad=True)
    tracker = MemoryTracker()
    with tracker:
        tracker.phase("forward")
        scores = torch.sigmoid(x * 2)  # sigmoid saves its output
        picked = scores.topk(4, dim=-1).indices  # integers: backward stops here
        storage = weakref.ref(scores.untyped_storage())
        loss = x.pow(2).sum()
        del scores
        assert storage() is None
        tracker.phase("backward")
        loss.backward()
    assert picked.shape == (64, 4)
    assert torch.allclose(x.grad, 2 * x)  # unpacking a detached saved tensor still differentiates
