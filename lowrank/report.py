"""Predicted beside measured: the comparison every run, test and benchmark uses.

The targets (issue #4 and README): the peak within 5%, and every category that holds at least
10% of the measured peak within 5% of its measured value.

    check = compare_memory(estimate.to_dict(), measured.to_dict())
    check.ok, check.peak_error, check.failures
    print(memory_table(estimate.to_dict(), measured.to_dict()))
"""

from __future__ import annotations

from dataclasses import dataclass, field

CATEGORIES = ("weights", "adapters", "gradients", "optimizer", "activations", "transient")
PEAK_TOLERANCE = 0.05
CATEGORY_TOLERANCE = 0.05
CATEGORY_FLOOR = 0.10  # categories smaller than this share of the peak are not held to the tolerance
MiB = 2**20


@dataclass
class Comparison:
    peak_error: float  # (predicted - measured) / measured
    category_errors: dict[str, float]  # same, for categories that count
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def relative_error(predicted: float, measured: float) -> float:
    if measured == 0:
        return 0.0 if predicted == 0 else float("inf")
    return (predicted - measured) / measured


def compare_memory(predicted: dict, measured: dict, peak_tolerance: float = PEAK_TOLERANCE,
                   category_tolerance: float = CATEGORY_TOLERANCE,
                   category_floor: float = CATEGORY_FLOOR) -> Comparison:
    """Compare two objects shaped like DESIGN.md's (`peak_bytes`, `breakdown`)."""
    peak = relative_error(predicted["peak_bytes"], measured["peak_bytes"])
    failures = []
    if abs(peak) > peak_tolerance:
        failures.append(f"peak {100 * peak:+.1f}%")
    errors = {}
    for cat in CATEGORIES:
        real = measured["breakdown"].get(cat, 0)
        if real >= category_floor * measured["peak_bytes"]:
            errors[cat] = relative_error(predicted["breakdown"].get(cat, 0), real)
            if abs(errors[cat]) > category_tolerance:
                failures.append(f"{cat} {100 * errors[cat]:+.1f}%")
    return Comparison(peak, errors, failures)


def memory_table(predicted: dict, measured: dict) -> str:
    """A readable predicted vs measured table, category by category, in MiB."""
    rows = [f"{'':<12} {'predicted':>12} {'measured':>12} {'error':>8}"]
    for cat in CATEGORIES:
        p, m = predicted["breakdown"].get(cat, 0), measured["breakdown"].get(cat, 0)
        error = f"{100 * relative_error(p, m):+7.1f}%" if m else ""
        rows.append(f"{cat:<12} {p / MiB:>10.2f} M {m / MiB:>10.2f} M {error:>8}")
    p, m = predicted["peak_bytes"], measured["peak_bytes"]
    rows.append(f"{'peak':<12} {p / MiB:>10.2f} M {m / MiB:>10.2f} M {100 * relative_error(p, m):+7.1f}%")
    rows.append(f"{'phase':<12} {predicted.get('phase', ''):>12} {measured.get('phase', ''):>12}")
    return "\n".join(rows)
