"""The SVD itself: pure functions over numpy arrays.

Nothing here knows about asyncio, Kafka, processes or shared memory, so it runs the same in a
pool worker, in a test, or in a notebook, and every value it takes or returns pickles.

Errors:
- ``ValueError`` for a request that cannot be computed (shape, dtype, non-finite entries, bad
  ``k``). The caller maps it to a request error; retrying cannot help.
- ``ComputeError`` (a ``LinAlgError``) when LAPACK fails with both drivers, or a truncated
  algorithm with no fallback left does not converge (consumer/truncated.py). It subclasses
  ``numpy.linalg.LinAlgError`` so code that already catches ``LinAlgError`` keeps working, and its
  ``__cause__`` is the last driver's error. Not retryable: the same input fails the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import scipy.linalg

from consumer import truncated

FloatArray = npt.NDArray[np.floating[Any]]

DRIVER_GESDD = "gesdd"
DRIVER_GESVD = "gesvd"

#: Dense LAPACK decomposition, nothing discarded.
ALGORITHM_DENSE = "dense"
#: Dense LAPACK decomposition, then only the top-k triplets kept.
ALGORITHM_DENSE_TOPK = "dense-topk"
#: The truncated ones (arpack, propack, lobpcg, randomized) are in consumer/truncated.py.

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class ComputeError(np.linalg.LinAlgError):
    """Both LAPACK drivers failed on this matrix (the cause is the last driver's error)."""


@dataclass(frozen=True, slots=True)
class SvdFactors:
    """``a ≈ u @ diag(s) @ vt``; ``u`` and ``vt`` are None for a values-only request.

    ``s`` is in descending order and has the input's dtype, as do ``u`` and ``vt``.
    ``driver`` is the routine that produced the result (a LAPACK driver, ``svds`` or
    ``trivial``); ``algorithm`` says how (``ALGORITHM_DENSE``, ``ALGORITHM_DENSE_TOPK`` or one
    of ``truncated.ALGORITHMS``).
    """

    u: FloatArray | None
    s: FloatArray
    vt: FloatArray | None
    driver: str
    algorithm: str


@dataclass(frozen=True, slots=True)
class OutputShapes:
    """Shapes of the factors ``svd`` returns for given options (None: not returned)."""

    u: tuple[int, int] | None
    s: tuple[int]
    vt: tuple[int, int] | None


class Quality(NamedTuple):
    """See ``quality``."""

    reconstruction: float
    orthogonality: float


def output_shapes(
    m: int, n: int, *, full_matrices: bool, compute_uv: bool, k: int | None
) -> OutputShapes:
    """Shapes of the factors of an m x n matrix, known before computing anything.

    The parent uses this to size the shared-memory result regions before dispatch. It also
    validates the options, so a bad request fails here, in the parent, without touching a
    worker. Raises ``ValueError`` for m or n < 1, k outside 1..min(m, n), or ``full_matrices``
    together with ``k`` (a top-k result has exactly k columns; silently dropping one of the
    two options would hide a client mistake).
    """
    if m < 1 or n < 1:
        raise ValueError(f"matrix must have at least one row and one column, got {m}x{n}")
    r = min(m, n)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise ValueError(f"k must be an integer, got {k!r}")
        if not 1 <= k <= r:
            raise ValueError(f"k={k} is outside 1..min(m, n)={r} for a {m}x{n} matrix")
        if full_matrices:
            raise ValueError("full_matrices and k cannot be combined")
        r = int(k)
    if not compute_uv:
        return OutputShapes(u=None, s=(r,), vt=None)
    if full_matrices:
        return OutputShapes(u=(m, m), s=(r,), vt=(n, n))
    return OutputShapes(u=(m, r), s=(r,), vt=(r, n))


def svd(
    a: npt.NDArray[Any] | Any,
    *,
    full_matrices: bool = False,
    compute_uv: bool = True,
    k: int | None = None,
    algorithm: str | None = None,
    seed: int = 0,
    check_finite: bool = True,
) -> SvdFactors:
    """Singular value decomposition of a real 2-D float32 or float64 matrix.

    Computes in the input's dtype. ``a`` is never modified. With ``k`` only the top-k triplets
    are returned, by the algorithm ``truncated.plan`` picks (``algorithm`` None or "auto") or
    the one named (see ``_top_k``); ``seed`` fixes the random starts of the iterative ones.
    ``a`` may also be a scipy.sparse matrix: then ``k`` is required, and it is never
    densified. Raises ``ValueError`` for an invalid request and ``ComputeError`` when the
    computation fails (both LAPACK drivers, or the named iterative algorithm, did not converge).
    ``check_finite=False`` skips the scan for NaN and infinities, for a caller that made it
    (the service's decoder does).
    """
    sparse = truncated.is_sparse(a)
    if sparse:
        a = truncated.canonical(a, check_finite=check_finite)
    else:
        _validate(a, check_finite=check_finite)
    m, n = a.shape
    output_shapes(m, n, full_matrices=full_matrices, compute_uv=compute_uv, k=k)
    truncated.check((m, n), k, sparse=sparse, algorithm=algorithm)
    # Entries whose squares overflow (or underflow) the dtype: LAPACK scales dense input itself
    # (and prints DLASCL complaints doing so), ARPACK does not and fails. A power of two scales
    # exactly; the singular values are scaled back, and overflow there is the caller's to see.
    exponent = extreme_exponent(a)
    if exponent:
        a = _ldexp(a, -exponent)
    if k is not None:
        factors = _top_k(a, int(k), compute_uv=compute_uv, algorithm=algorithm, seed=seed)
    else:
        factors = _dense(a, full_matrices=full_matrices, compute_uv=compute_uv)
    if not exponent:
        return factors
    with np.errstate(over="ignore"):
        return dataclasses.replace(factors, s=np.ldexp(factors.s, exponent))


def svd_stack(
    stack: npt.NDArray[Any], *, full_matrices: bool = False, compute_uv: bool = True
) -> list[SvdFactors]:
    """``svd`` of each matrix of a (B, m, n) stack in one call (numpy's batched gesdd), for
    many small matrices: one LAPACK call each from C, not one Python call each.

    For finite matrices whose scale is not extreme (``extreme_exponent`` 0), as ``svd`` takes
    them. Raises ``LinAlgError`` when gesdd fails on any of them; ``svd`` then retries each
    with its fallback driver.
    """
    if stack.ndim != 3 or stack.dtype not in SUPPORTED_DTYPES:
        raise ValueError("expected a (B, m, n) float32 or float64 stack")
    if not compute_uv:
        values = np.linalg.svd(stack, compute_uv=False)
        return [SvdFactors(None, s, None, DRIVER_GESDD, ALGORITHM_DENSE) for s in values]
    u, s, vt = np.linalg.svd(stack, full_matrices=full_matrices)
    return [SvdFactors(u[i], s[i], vt[i], DRIVER_GESDD, ALGORITHM_DENSE) for i in range(len(stack))]


def extreme_exponent(a: Any) -> int:
    """The power of two to divide ``a`` by so its largest entry is near 1, when the squares of
    its entries would overflow or underflow its dtype; 0 when they would not."""
    values = a.data if truncated.is_sparse(a) else a
    if values.size == 0:
        return 0
    largest = max(float(values.max()), -float(values.min()))
    if ordinary_scale(np.asarray(largest), values.dtype):
        return 0
    return math.frexp(largest)[1]


def ordinary_scale(largest: npt.NDArray[Any], dtype: npt.DTypeLike) -> npt.NDArray[np.bool_]:
    """Where the largest absolute entries given leave a matrix's squares within ``dtype``'s
    range (or the matrix is zero): ``extreme_exponent`` 0, for many matrices at once."""
    info = np.finfo(dtype)
    low, high = 2.0 ** (info.minexp // 2), 2.0 ** (info.maxexp // 2)
    return np.asarray((largest == 0.0) | ((low <= largest) & (largest <= high)))


def _ldexp(a: Any, exponent: int) -> Any:
    """``a * 2**exponent``, exactly, as a new matrix of the same kind and dtype."""
    if truncated.is_sparse(a):
        scaled = a.copy()
        scaled.data = np.ldexp(a.data, exponent).astype(a.dtype, copy=False)
        return scaled
    return np.ldexp(a, exponent).astype(a.dtype, copy=False)


def quality(
    a: npt.NDArray[Any], u: npt.NDArray[Any], s: npt.NDArray[Any], vt: npt.NDArray[Any]
) -> Quality:
    """How good a factorization is, computed in float64 whatever the factors' dtype.

    With r = len(s), U_r = u[:, :r] and Vt_r = vt[:r, :]:

    - ``reconstruction`` = ||A - U_r diag(s) Vt_r||_F / ||A||_F (the absolute ||.||_F when A = 0).
      For a top-k result this is the truncation error, not a rounding error.
    - ``orthogonality`` = max(max|U_r^T U_r - I|, max|Vt_r Vt_r^T - I|): the largest entry, in
      absolute value, of either Gram matrix's departure from the identity.

    The extra columns of a full ``u`` (rows of a full ``vt``) are not checked: that would cost
    O(m³) for a tall matrix, more than the SVD itself. A sparse ``a`` is not densified (see
    ``truncated.sparse_quality``).
    """
    exponent = extreme_exponent(a)  # relative figures: scale so that norms do not overflow
    if exponent:
        a, s = _ldexp(a, -exponent), np.ldexp(np.asarray(s, dtype=np.float64), -exponent)
    if truncated.is_sparse(a):
        return Quality(*truncated.sparse_quality(a, u, s, vt))
    r = s.shape[0]
    a64 = np.asarray(a, dtype=np.float64)
    u_r = np.asarray(u[:, :r], dtype=np.float64)
    vt_r = np.asarray(vt[:r, :], dtype=np.float64)
    residual = a64 - (u_r * np.asarray(s, dtype=np.float64)) @ vt_r
    norm_a = float(np.linalg.norm(a64))
    norm_residual = float(np.linalg.norm(residual))
    reconstruction = norm_residual / norm_a if norm_a > 0 else norm_residual
    identity = np.eye(r)
    orthogonality = max(
        float(np.max(np.abs(u_r.T @ u_r - identity), initial=0.0)),
        float(np.max(np.abs(vt_r @ vt_r.T - identity), initial=0.0)),
    )
    return Quality(reconstruction, orthogonality)


def _validate(a: npt.NDArray[Any], *, check_finite: bool = True) -> None:
    if not isinstance(a, np.ndarray) or a.ndim != 2:
        raise ValueError("expected a 2-D numpy array")
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {a.dtype}; expected float32 or float64")
    # LAPACK given NaN or Inf returns garbage or fails to converge; say what is wrong instead.
    if check_finite and not np.isfinite(a).all():
        raise ValueError("matrix contains NaN or infinite entries")


def _top_k(
    a: Any, k: int, *, compute_uv: bool, algorithm: str | None = None, seed: int = 0
) -> SvdFactors:
    """The k largest singular triplets, by the algorithms ``truncated.plan`` lists, in turn:
    one that does not converge hands over to the next. The last one's failure is a
    ``ComputeError`` (a pinned algorithm is tried alone; automatic plans for dense input end
    with LAPACK). Iterative algorithms compute the vectors even for values only: their
    convergence test needs them.
    """
    failure: truncated.NotConverged | None = None
    for name in truncated.plan(a.shape, k, sparse=truncated.is_sparse(a), algorithm=algorithm):
        if name == truncated.ALGORITHM_DENSE:
            return _dense_top_k(a, k, compute_uv=compute_uv)
        try:
            found = truncated.top_k(a, k, name, seed=seed)
        except truncated.NotConverged as exc:
            failure = exc
            continue
        return SvdFactors(
            u=found.u if compute_uv else None,
            s=found.s,
            vt=found.vt if compute_uv else None,
            driver=found.driver,
            algorithm=name,
        )
    raise ComputeError(f"the truncated SVD did not converge ({failure})") from failure


def _dense_top_k(a: npt.NDArray[Any], k: int, *, compute_uv: bool) -> SvdFactors:
    """The thin dense SVD, sliced. Slices are copied so the discarded columns are not kept
    alive."""
    full = _dense(a, full_matrices=False, compute_uv=compute_uv)
    return SvdFactors(
        u=None if full.u is None else full.u[:, :k].copy(),
        s=full.s[:k].copy(),
        vt=None if full.vt is None else full.vt[:k, :].copy(),
        driver=full.driver,
        algorithm=ALGORITHM_DENSE_TOPK,
    )


def _dense(a: npt.NDArray[Any], *, full_matrices: bool, compute_uv: bool) -> SvdFactors:
    """gesdd (divide and conquer, fast), falling back to gesvd (slower, more robust)."""
    try:
        result = _lapack_svd(
            a, driver=DRIVER_GESDD, full_matrices=full_matrices, compute_uv=compute_uv
        )
        driver = DRIVER_GESDD
    except np.linalg.LinAlgError:
        try:
            result = _lapack_svd(
                a, driver=DRIVER_GESVD, full_matrices=full_matrices, compute_uv=compute_uv
            )
        except np.linalg.LinAlgError as exc:
            raise ComputeError("SVD did not converge with gesdd nor with gesvd") from exc
        driver = DRIVER_GESVD
    if compute_uv:
        u, s, vt = result
        return SvdFactors(u=u, s=s, vt=vt, driver=driver, algorithm=ALGORITHM_DENSE)
    return SvdFactors(u=None, s=result, vt=None, driver=driver, algorithm=ALGORITHM_DENSE)


def _lapack_svd(a: npt.NDArray[Any], *, driver: str, full_matrices: bool, compute_uv: bool) -> Any:
    """One LAPACK call. ``a`` itself is left intact: the fallback driver and ``quality`` need it.

    LAPACK works in column-major order, so a C-ordered input is copied once whatever we do.
    Making that copy here lets LAPACK overwrite it (``overwrite_a``) instead of having scipy
    copy it a second time. An input that is already Fortran-ordered is the caller's, so scipy
    copies it (once) rather than LAPACK destroying it.
    """
    work = np.asfortranarray(a)
    owned = not np.shares_memory(work, a)
    return scipy.linalg.svd(
        work,
        full_matrices=full_matrices,
        compute_uv=compute_uv,
        overwrite_a=owned,
        check_finite=False,
        lapack_driver=driver,
    )


def relative_tolerance(dtype: npt.DTypeLike, size: int) -> float:
    """A loose bound for backward-stable SVD errors: ~ eps * sqrt(size), with headroom.

    Used by tests and health checks to judge ``quality`` figures per dtype.
    """
    eps = float(np.finfo(np.dtype(dtype)).eps)
    return 50.0 * eps * math.sqrt(max(size, 1))
