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
MIB = 1 << 20
#: The topics' message limit (localkafka.TopicSettings' default, which the benchmark's topics
#: get): a request or an answer larger than this cannot travel in a record.
TOPIC_LIMIT_BYTES = 64 * MIB
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

    @property
    def result_nbytes(self) -> int:
        """U, S and Vt of the (reduced) SVD the benchmark asks for, in bytes."""
        r = min(self.rows, self.cols)
        return (self.rows * r + r + r * self.cols) * np.dtype(DTYPE).itemsize

    def needs_store(self, limit: int = TOPIC_LIMIT_BYTES) -> bool:
        """The request or its answer cannot travel in a record of ``limit`` bytes: the service is
        measured with payloads stored, and with few requests (each takes seconds)."""
        return max(self.nbytes, self.result_nbytes) > limit


DEFAULT_SIZES = ("32", "64", "128", "256", "512", "1024", "4096x64", "2048", "4096")
QUICK_SIZES = ("32", "256")
#: Sizes measured with payloads inline and stored, side by side (the crossover, issue #17).
DEFAULT_CROSSOVER = ("256", "512", "768", "1024")
QUICK_CROSSOVER = ("256",)


def matrices(shape: Shape, distinct: int = DISTINCT) -> list[np.ndarray[Any, Any]]:
    """``distinct`` standard-normal float64 matrices of ``shape``, the same in every process."""
    rng = np.random.default_rng([SEED, shape.rows, shape.cols])
    return [rng.standard_normal((shape.rows, shape.cols)) for _ in range(distinct)]


def request_count(
    ceiling_rate: float, seconds: float, lo: int, hi: int, multiple_of: int = 1
) -> int:
    """Requests for one scenario: ``seconds`` of work at the ceiling rate, within [lo, hi],
    rounded up to a multiple of ``multiple_of`` (the workers: with requests of several seconds
    each, a last round that leaves a worker idle would count against the service)."""
    count = max(lo, min(hi, round(ceiling_rate * seconds)))
    return -(-count // max(1, multiple_of)) * max(1, multiple_of)


def all_sizes(sizes: list[Shape], crossover: list[Shape]) -> list[Shape]:
    """The sizes one run measures, in the order given: ``sizes``, then crossover sizes not in
    them, each placed before the first larger size so the table reads in order."""
    out = list(dict.fromkeys(sizes))
    for shape in crossover:
        if shape in out:
            continue
        bigger = [i for i, s in enumerate(out) if s.rows == s.cols and s.rows > shape.rows]
        out.insert(bigger[0] if bigger and shape.rows == shape.cols else len(out), shape)
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
