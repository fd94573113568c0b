"""The benchmark's matrices: shapes, deterministic contents, and how many requests per size.

Every scenario (ceiling, Kafka, quick fix, Celery) regenerates the same matrices from the same
seed in its own process, so no scenario pays for shipping them to another, and all of them
decompose exactly the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DTYPE = np.float64
#: Distinct matrices per shape, cycled through: enough that no cache holds one hot matrix,
#: few enough that the 1024x1024 set (8 MB each) stays small.
DISTINCT = 8
SEED = 20241124


@dataclass(frozen=True, order=True)
class Shape:
    rows: int
    cols: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"256"`` (square) or ``"4096x64"``."""
        rows, _, cols = text.strip().lower().partition("x")
        shape = cls(int(rows), int(cols or rows))
        if shape.rows < 1 or shape.cols < 1:
            raise ValueError(f"bad shape {text!r}")
        return shape

    @property
    def label(self) -> str:
        return str(self.rows) if self.rows == self.cols else f"{self.rows}x{self.cols}"

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * np.dtype(DTYPE).itemsize


DEFAULT_SIZES = ("32", "64", "128", "256", "512", "1024", "4096x64")
QUICK_SIZES = ("32", "256")


def matrices(shape: Shape, distinct: int = DISTINCT) -> list[np.ndarray[Any, Any]]:
    """``distinct`` standard-normal float64 matrices of ``shape``, the same in every process."""
    rng = np.random.default_rng([SEED, shape.rows, shape.cols])
    return [rng.standard_normal((shape.rows, shape.cols)) for _ in range(distinct)]


def request_count(ceiling_rate: float, seconds: float, lo: int, hi: int) -> int:
    """Requests for one scenario: ``seconds`` of work at the ceiling rate, within [lo, hi]."""
    return max(lo, min(hi, round(ceiling_rate * seconds)))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
