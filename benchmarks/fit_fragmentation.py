"""Fit the worker's allocator constants (planner/core.py, expandable segments) on its measured rows, and say
how well the fit predicts a row it has not seen (leave-one-out).

    .venv/bin/python benchmarks/fit_fragmentation.py

The constants are grid-searched to minimise the squared relative error of nvml_used over the worker rows of
calibration/*.jsonl, an underestimate weighing 1.5x an overestimate (an underestimate is an OOM). The planner's
committed values are the full-data fit; the leave-one-out column is each row predicted by the fit of the others.
No GPU needed: the planner is pure Python.
"""

from __future__ import annotations

import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import planner_accuracy  # noqa: E402  (puts the repository root on sys.path)

from planner import core  # noqa: E402

GRID = {
    "GC_BACKWARD_LAYERS": [1.2, 1.3, 1.4],
    "FRAG_LOSS_EXPANDABLE": [0.33, 0.37, 0.4, 0.45],
    "FRAG_FUSED_CHUNK_EXPANDABLE": [0.6, 0.8, 1.0],
    "FRAG_PARAM_POOL_EXPANDABLE": [0.3, 0.4, 0.5],
    "FRAG_SOFTCAP_EXPANDABLE": [0.6, 0.8, 1.0],
}


def objective(errors: list[float]) -> float:
    return sum((e if e > 0 else 1.5 * e) ** 2 for e in errors)


def errors_for(values: tuple, rows: list[dict], arch: dict) -> list[float]:
    for name, value in zip(GRID, values, strict=False):
        setattr(core, name, value)
    core._FIXED_CACHE.clear()
    return [(planner_accuracy.predict(row, arch)[0] - row["nvml_used"]) / row["nvml_used"] for row in rows]


def main() -> int:
    arch = planner_accuracy._arch_table()
    rows = [row for row in planner_accuracy.load_rows() if "spec" in row["case"]]
    committed = tuple(getattr(core, name) for name in GRID)
    fits = [(values, errors_for(values, rows, arch)) for values in itertools.product(*GRID.values())]
    best_values, best_errors = min(fits, key=lambda fit: objective(fit[1]))
    held_out = []
    for index in range(len(rows)):
        _, errors = min(fits, key=lambda fit: objective(fit[1][:index] + fit[1][index + 1 :]))
        held_out.append(errors[index])
    committed_errors = errors_for(committed, rows, arch)
    print(f"{'row':34} {'committed':>10} {'left out':>9}")
    for row, error, loo in zip(rows, committed_errors, held_out, strict=False):
        print(f"{row['case']['name']:34} {error * 100:>+9.1f}% {loo * 100:>+8.1f}%")
    for label, errors in (("committed constants", committed_errors), ("leave-one-out", held_out)):
        print(
            f"{label}: {len(errors)} rows, median |error| {statistics.median(map(abs, errors)) * 100:.1f}%, "
            f"worst {max(map(abs, errors)) * 100:.1f}%, worst underestimate {min(errors) * 100:+.1f}%"
        )
    print(
        "best fit:",
        dict(zip(GRID, best_values, strict=False)),
        "| committed:",
        dict(zip(GRID, committed, strict=False)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
