"""Predicted beside measured: the one comparison every run, test, benchmark and tab uses.

The targets (README): the peak within 5%, and every category that holds at least 10% of the
measured peak within 5% of its measured value.

    check = compare_memory(estimate.to_dict(), measured.to_dict())
    check.ok, check.peak_error, check.failures, check.to_dict()      # the JSON form (summary.json)
    comparison_rows(predicted, measured)                             # the rows the app's tables show
    print(comparison_table(predicted, measured))                     # the terminal's table
"""

from __future__ import annotations

from dataclasses import dataclass, field

from estimator.constants import CATEGORIES

PEAK_TOLERANCE = 0.05
CATEGORY_TOLERANCE = 0.05
CATEGORY_FLOOR = 0.10  # categories smaller than this share of the peak are not held to the tolerance
MiB = 2**20


@dataclass
class Comparison:
    peak_error: float  # (predicted - measured) / measured
    category_errors: dict[str, float]  # same, for categories that count
    failures: list[str] = field(default_factory=list)
    load_error: float | None = None  # the load's peak (predicted["load"] vs measured["load_peak_bytes"])
    host_error: float | None = None  # CPU offload: the host memory's peak (both objects' "host")

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """As summary.json holds it."""
        out = {"peak_error": self.peak_error, "category_errors": self.category_errors,
               "within_targets": self.ok, "failures": self.failures, "load_error": self.load_error}
        if self.host_error is not None:
            out["host_error"] = self.host_error
        return out


def relative_error(predicted: float, measured: float) -> float:
    if measured == 0:
        return 0.0 if predicted == 0 else float("inf")
    return (predicted - measured) / measured


def compare_memory(predicted: dict, measured: dict, peak_tolerance: float = PEAK_TOLERANCE,
                   category_tolerance: float = CATEGORY_TOLERANCE,
                   category_floor: float = CATEGORY_FLOOR) -> Comparison:
    """Compare two objects shaped like the estimate's JSON (`peak_bytes`, `breakdown`)."""
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
    load = None
    if load_bytes(predicted) is not None and load_bytes(measured, measured=True) is not None:
        load = relative_error(load_bytes(predicted), load_bytes(measured, measured=True))
    host = None
    if host_bytes(predicted) is not None and host_bytes(measured) is not None:
        host = relative_error(host_bytes(predicted), host_bytes(measured))
        if abs(host) > peak_tolerance:
            failures.append(f"host memory {100 * host:+.1f}%")
    return Comparison(peak, errors, failures, load, host)


def host_bytes(memory: dict | None) -> int | None:
    """The host memory's peak under CPU offload (`"host": {"peak_bytes"}`, the same in a predicted and
    a measured object); None without offload."""
    host = memory.get("host") if isinstance(memory, dict) else None
    return host.get("peak_bytes") if isinstance(host, dict) else None


def load_bytes(memory: dict | None, measured: bool = False) -> int | None:
    """The load's peak in a predicted (`"load": {"peak_bytes"}`) or measured (`"load_peak_bytes"`)
    memory object; None when it has none."""
    if not isinstance(memory, dict):
        return None
    if measured:
        value = memory.get("load_peak_bytes")
    else:
        load = memory.get("load")
        value = load.get("peak_bytes") if isinstance(load, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Row:
    """One line of a predicted-vs-measured table; `measured` None while the measurement is pending."""

    name: str  # a category, or "peak"
    predicted: int
    measured: int | None

    @property
    def error(self) -> float | None:
        return None if not self.measured else relative_error(self.predicted, self.measured)


def comparison_rows(predicted: dict, measured: dict | None) -> list[Row]:
    """Every category, then the step's peak, then the load's peak when predicted (its measured
    value None until measured), then the host memory under CPU offload."""
    def value(source: dict | None, name: str) -> int | None:
        if source is None:
            return None
        return source["peak_bytes"] if name == "peak" else source["breakdown"].get(name, 0)

    rows = [Row(name, value(predicted, name), value(measured, name)) for name in (*CATEGORIES, "peak")]
    if load_bytes(predicted) is not None:
        rows.append(Row("load", load_bytes(predicted), load_bytes(measured, measured=True)))
    if host_bytes(predicted) is not None:
        rows.append(Row("host memory", host_bytes(predicted), host_bytes(measured)))
    return rows


def comparison_table(predicted: dict, measured: dict) -> str:
    """A readable predicted vs measured table in MiB, with the phase of each peak."""
    lines = [f"{'':<12} {'predicted':>14} {'measured':>14} {'error':>8}"]
    for row in comparison_rows(predicted, measured):
        error = "" if row.error is None else f"{100 * row.error:+7.2f}%"
        real = "—" if row.measured is None else f"{row.measured / MiB:,.2f} MiB"
        lines.append(f"{row.name:<12} {row.predicted / MiB:>10,.2f} MiB {real:>14} {error:>8}")
    lines.append(f"{'phase':<12} {predicted.get('phase', ''):>14} {measured.get('phase', ''):>14}")
    return "\n".join(lines)
