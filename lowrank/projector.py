"""The GaLore projector: a rank-r subspace of one weight's gradient, refreshed every `gap` steps.

GaLore (https://arxiv.org/abs/2403.03507) keeps Adam's moments in the subspace spanned by the top
singular vectors of the gradient G (m×n). Which side is projected follows galore-torch:

    side    matrix P               project(G)        project_back(R)   moments
    left    U[:, :r]     (m×r)     Pᵀ G     (r×n)    P R               r×n
    right   Vh[:r, :]    (r×n)     G Pᵀ     (m×r)    R P               m×r
    full    both                   Pₗᵀ G Pᵣᵀ (r×r)   Pₗ R Pᵣ           r×r

"std" projects the smaller dimension (left when m < n, else right), "reverse_std" the other one.
The SVD is always computed in fp32 — exact (`torch.linalg.svd`, as galore-torch) or randomized
(Halko et al. 2011, https://arxiv.org/abs/0909.4061: q = r + 8 columns, 2 power iterations; what
GaLore 2, https://arxiv.org/abs/2504.20437, uses) — and P is stored in the weight dtype.

Memory: P costs m·r (left) or r·n (right) elements per weight, instead of a second and third m·n
for Adam's moments. Unlike galore-torch we keep only the r needed vectors, not a view of the whole
U or Vh (min(m, n)² elements in fp32).

Hooks for Q-GaLore: `make_store` decides how P is held (a quantized store dequantizes in `get`);
`gap` can be changed per layer, `n_svd` counts refreshes, and `on_refresh(projector, event)` sees
the old and new matrices right after each SVD, before the next refresh is scheduled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

PROJ_SIDES = {  # proj_type -> side when m >= n, side when m < n
    "std": ("right", "left"),
    "reverse_std": ("left", "right"),
    "left": ("left", "left"),
    "right": ("right", "right"),
    "full": ("full", "full"),
}


def projection_side(shape: tuple[int, int], proj_type: str) -> str:
    """"left", "right" or "full" for a weight of `shape` (m, n), as galore-torch decides."""
    if proj_type not in PROJ_SIDES:
        raise ValueError(f"proj_type={proj_type!r} is not one of {', '.join(PROJ_SIDES)}; pick one of those")
    m, n = shape
    return PROJ_SIDES[proj_type][0 if m >= n else 1]


def exact_svd(a: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(U[:, :r], Vh[:r]) from the full thin SVD of `a` (fp32); `seed` is unused."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], vh[:rank]


def randomized_svd(a: Tensor, rank: int, seed: int = 0, oversample: int = 8, n_iter: int = 2) -> tuple[Tensor, Tensor]:
    """(U[:, :r], Vh[:r]) of `a` (m×n, fp32) from a randomized range finder with power iterations.

    Costs about (2·n_iter + 2)·m·n·q flops with q = r + oversample, against O(m·n·min(m, n)) for
    the exact SVD. The sketch is seeded, so a refresh is reproducible (and resumable).
    """
    m, n = a.shape
    if m < n:  # sketch the smaller side
        u, vh = randomized_svd(a.T, rank, seed, oversample, n_iter)
        return vh.T, u.T
    q = min(rank + oversample, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=a.device, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q  # (m, q): orthonormal basis of the sketched range
    for _ in range(n_iter):  # power iterations sharpen the spectrum: (A Aᵀ)^k A Ω
        basis = torch.linalg.qr(a.T @ basis).Q  # (n, q)
        basis = torch.linalg.qr(a @ basis).Q  # (m, q)
    u_small, _, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)  # (q, q), (q, n)
    return basis @ u_small[:, :rank], vh[:rank]


SVD_FUNCTIONS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"exact": exact_svd, "randomized": randomized_svd}


@runtime_checkable
class HoldsTensors(Protocol):
    """An object in an optimizer's state that owns tensors (a projector, a store, a gap schedule)."""

    def state_tensors(self) -> list[Tensor]: ...


class ProjectionStore(Protocol):
    """How one projection matrix is held. Q-GaLore plugs in an INT4/INT8 store with group scales."""

    def set(self, matrix: Tensor) -> None: ...  # matrix: the fresh fp32 singular vectors
    def get(self) -> Tensor: ...  # the matrix to multiply with, in the weight dtype
    def state_tensors(self) -> list[Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class DenseStore:
    """The matrix as-is, in the weight dtype (what galore-torch stores)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.matrix: Tensor | None = None

    def set(self, matrix: Tensor) -> None:
        # copy=True: never keep a view of the SVD's larger U or Vh alive
        self.matrix = matrix.to(self.dtype, memory_format=torch.contiguous_format, copy=True)

    def get(self) -> Tensor:
        if self.matrix is None:
            raise RuntimeError("projection matrix used before the first refresh")
        return self.matrix

    def state_tensors(self) -> list[Tensor]:
        return [] if self.matrix is None else [self.matrix]

    def state_dict(self) -> dict:
        return {"matrix": self.matrix}

    def load_state_dict(self, state: dict) -> None:
        self.matrix = state["matrix"]


@dataclass
class Refresh:
    """One subspace refresh: `old` is None on the first SVD (or when no one listens).

    Matrices are keyed by side: "left" (m×r, singular vectors in columns) and/or "right" (r×n,
    singular vectors in rows), as the store returns them.
    """

    step: int
    old: dict[str, Tensor] | None
    new: dict[str, Tensor]


class GaLoreProjector:
    """Projects one weight's gradient into a rank-`rank` subspace refreshed every `gap` steps.

    The first SVD happens at step 0; with `offset` > 0 (staggering) the second one comes at
    `offset`, then every `gap` steps. `project_back` does not multiply by `scale`: the optimizer
    folds scale into its step size, or calls `add_back_`, which applies it without a full-size
    temporary.
    """

    def __init__(self, shape: tuple[int, int], rank: int, update_proj_gap: int, scale: float = 1.0,
                 proj_type: str = "std", svd: str = "randomized", dtype: torch.dtype = torch.float32,
                 offset: int = 0, seed: int = 0, name: str = "",
                 make_store: Callable[[torch.dtype], ProjectionStore] = DenseStore) -> None:
        m, n = shape
        if not 1 <= rank <= min(m, n):
            raise ValueError(f"rank={rank} does not fit {name or 'a weight'} of shape {m}×{n}: "
                             f"set rank between 1 and {min(m, n)} (the smaller dimension)")
        if svd not in SVD_FUNCTIONS:
            raise ValueError(f"svd={svd!r} is not one of {', '.join(SVD_FUNCTIONS)}; pick one of those")
        self.shape, self.rank, self.scale, self.name = (m, n), rank, scale, name
        self.side = projection_side((m, n), proj_type)
        self.svd, self.seed, self.offset = svd, seed, offset
        self.gap = update_proj_gap  # may be changed per layer (Q-GaLore's lazy refreshes)
        self.n_svd = 0
        self.next_refresh = 0
        self.on_refresh: Callable[[GaLoreProjector, Refresh], None] | None = None
        sides = ("left", "right") if self.side == "full" else (self.side,)
        self.stores: dict[str, ProjectionStore] = {s: make_store(dtype) for s in sides}

    # ------------------------------------------------------------------ schedule and SVD
    def due(self, step: int) -> bool:
        """Does the update at `step` (0-based count of this weight's updates) refresh the subspace?"""
        return self.n_svd == 0 or step >= self.next_refresh

    @torch.no_grad()
    def refresh(self, grad: Tensor, step: int) -> Refresh:
        """New subspace from the SVD of `grad` (the full, accumulated gradient) in fp32."""
        old = self.matrices() if self.on_refresh is not None and self.n_svd > 0 else None
        seed = self.seed * 1_000_003 + self.n_svd
        u, vh = SVD_FUNCTIONS[self.svd](grad.float(), self.rank, seed=seed)
        for side, store in self.stores.items():
            store.set(u if side == "left" else vh)
        del u, vh
        self.n_svd += 1
        event = Refresh(step, old, self.matrices())
        if self.on_refresh is not None:
            self.on_refresh(self, event)  # may change self.gap before we schedule the next one
        first_gap = self.offset if self.n_svd == 1 and self.offset > 0 else self.gap
        self.next_refresh = step + first_gap
        return event

    def matrices(self) -> dict[str, Tensor]:
        return {side: store.get() for side, store in self.stores.items()}

    # ------------------------------------------------------------------ projections
    def low_rank_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return {"left": (self.rank, n), "right": (m, self.rank), "full": (self.rank, self.rank)}[self.side]

    def project(self, grad: Tensor) -> Tensor:
        """G (m×n) -> R, the low-rank gradient (shape `low_rank_shape()`, dtype of G).

        P is cast to G's dtype when they differ (an INT8 layer under autocast hands a bf16
        gradient to an fp32 projector): a copy of P, never of G.
        """
        def matrix(side: str) -> Tensor:
            p = self.stores[side].get()
            return p if p.dtype == grad.dtype else p.to(grad.dtype)

        if self.side == "left":
            return matrix("left").T @ grad
        if self.side == "right":
            return grad @ matrix("right").T
        return matrix("left").T @ grad @ matrix("right").T

    def project_back(self, low: Tensor) -> Tensor:
        """R -> P R (or R P, Pₗ R Pᵣ): a full m×n tensor, not multiplied by scale."""
        if self.side == "left":
            return self.stores["left"].get() @ low
        if self.side == "right":
            return low @ self.stores["right"].get()
        return self.stores["left"].get() @ (low @ self.stores["right"].get())

    def add_back_(self, weight: Tensor, low: Tensor, alpha: float, beta: float = 1.0) -> None:
        """weight ← beta·weight + alpha·project_back(low), in place, with no m×n temporary (one GEMM)."""
        if self.side == "left":
            weight.addmm_(self.stores["left"].get(), low, beta=beta, alpha=alpha)
        elif self.side == "right":
            weight.addmm_(low, self.stores["right"].get(), beta=beta, alpha=alpha)
        else:
            weight.addmm_(self.stores["left"].get(), low @ self.stores["right"].get(), beta=beta, alpha=alpha)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> list[Tensor]:
        return [t for store in self.stores.values() for t in store.state_tensors()]

    def state_dict(self) -> dict:
        return {"gap": self.gap, "n_svd": self.n_svd, "next_refresh": self.next_refresh,
                "stores": {side: store.state_dict() for side, store in self.stores.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.gap, self.n_svd, self.next_refresh = state["gap"], state["n_svd"], state["next_refresh"]
        for side, store in self.stores.items():
            store.load_state_dict(state["stores"][side])

    def info(self) -> dict:
        """What the app shows per layer."""
        return {"name": self.name, "shape": self.shape, "rank": self.rank, "side": self.side, "gap": self.gap,
                "svd_count": self.n_svd, "next_refresh": self.next_refresh}
