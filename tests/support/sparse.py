"""Sparse test matrices in the wire's three formats, deliberately not canonical: indices out of
order within a row (column) and some entries repeated, which must add up."""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas.sparse import SparseMatrix


def random_sparse(
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    density: float = 0.3,
    fmt: str = "csr",
    dtype: Any = np.float64,
    index_dtype: Any = np.int32,
    repeats: int = 3,
) -> SparseMatrix:
    """A random matrix with about density * m * n entries, ``repeats`` of them stored twice
    (the two parts sum to the entry), in ``fmt`` with unsorted indices."""
    m, n = shape
    count = max(1, round(density * m * n))
    flat = rng.choice(m * n, size=min(count, m * n), replace=False)
    rows, cols = np.divmod(flat, n)
    data = rng.standard_normal(rows.shape[0])
    extra = min(repeats, rows.shape[0])
    if extra:  # split some entries in two stored parts
        part = rng.standard_normal(extra)
        data[:extra] -= part
        rows = np.concatenate([rows, rows[:extra]])
        cols = np.concatenate([cols, cols[:extra]])
        data = np.concatenate([data, part])
    order = rng.permutation(rows.shape[0])
    rows, cols, data = rows[order], cols[order], data[order].astype(dtype)
    if fmt == "coo":
        return SparseMatrix(
            "coo", shape, data, (rows.astype(index_dtype), cols.astype(index_dtype))
        )
    major, minor, size = (rows, cols, m) if fmt == "csr" else (cols, rows, n)
    by_major = np.argsort(major, kind="stable")  # grouped by row (column), still unsorted within
    indptr = np.concatenate([[0], np.cumsum(np.bincount(major, minlength=size))])
    return SparseMatrix(
        fmt,  # type: ignore[arg-type]
        shape,
        data[by_major],
        (minor[by_major].astype(index_dtype), indptr.astype(index_dtype)),
    )
