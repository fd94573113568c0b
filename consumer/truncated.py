"""Truncated SVD: the k largest singular triplets without a full decomposition.

Pure numerics over numpy arrays and scipy.sparse matrices; ``consumer.compute`` decides when to
use them (``plan``) and wraps what they return. The algorithms, named as in results:

- ``arpack``, ``propack``, ``lobpcg``: ``scipy.sparse.linalg.svds`` with that solver (driver
  ``svds``). They only need products with A and Aᵀ, so a sparse matrix is never densified.
  For k = min(m, n) (which ARPACK and LOBPCG cannot do, and PROPACK does badly on a
  rank-deficient A) the first k - 1 come from the solver and the last from the orthogonal
  complement of the others (exact: the singular vectors of the smaller side span its space).
- ``randomized``: randomized subspace iteration (Halko, Martinsson and Tropp, "Finding
  structure with randomness", 2011, algorithms 4.4 and 5.1) with oversampling and power
  iterations until the triplets pass the residual test below, or at most
  ``RANDOMIZED_ITERATIONS`` of them (driver: the LAPACK routine of the small dense SVD).
  Only when asked for: it is then approximate on slowly decaying spectra.

Every ARPACK, PROPACK and LOBPCG result is verified before it is returned: for each triplet,
max(‖A v - s u‖, ‖Aᵀu - s v‖) <= ``tolerance(dtype)`` * s_max. A solver that stops short
raises ``NotConverged`` (a ``LinAlgError``); the caller falls back or reports it.

Why the automatic choice never picks randomized: held to that residual test, it was never
faster than ARPACK on single-threaded workers (2000 x 2000, k = 10: spectra decaying by
0.5, 0.9 and 0.97 per value, and flat; ARPACK 0.4 to 3 s, randomized 0.45 s to no convergence
in 16 iterations). It wins only by stopping early with approximate values, which a request
must ask for. Values come
back in descending order, U's columns and Vt's rows in the same order (signs are arbitrary,
but u and v of a triplet agree). Random starts come from a ``seed`` (see ``seed_from``), so a
given request always gives the same factors.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg

ALGORITHM_ARPACK = "arpack"
ALGORITHM_PROPACK = "propack"
ALGORITHM_LOBPCG = "lobpcg"
ALGORITHM_RANDOMIZED = "randomized"
#: Only in ``plan``: LAPACK on the dense matrix (compute.py; the result says "dense-topk").
ALGORITHM_DENSE = "dense"
ALGORITHMS = frozenset(
    {ALGORITHM_DENSE, ALGORITHM_ARPACK, ALGORITHM_PROPACK, ALGORITHM_LOBPCG, ALGORITHM_RANDOMIZED}
)
AUTO = "auto"

DRIVER_SVDS = "svds"
#: The zero matrix: nothing to compute, any orthonormal vectors are singular vectors.
DRIVER_TRIVIAL = "trivial"

# --- the automatic choice for dense input (see ``plan``) ----------------------------------------
#: At most this many elements (256 x 256): LAPACK takes milliseconds, nothing beats it.
SMALL_ELEMENTS = 1 << 16
#: k above this share of min(m, n): ARPACK costs about as much as LAPACK (measured at
#: 1000 x 1000: k = 50 took 0.4 s, k = 100 0.85 s, the thin dense SVD 1 s).
DENSE_SHARE = 0.1

#: Extra columns of the randomized sketch (Halko et al. recommend 5 to 10).
OVERSAMPLING = 10
#: Power iterations after which randomized returns its last iterate, converged or not.
RANDOMIZED_ITERATIONS = 16

FloatArray = npt.NDArray[np.floating[Any]]


class NotConverged(np.linalg.LinAlgError):
    """An iterative method stopped before its triplets passed the residual test."""


class Triplets(NamedTuple):
    """The k largest singular triplets, descending, in the input's dtype."""

    u: FloatArray
    s: FloatArray
    vt: FloatArray
    driver: str


def is_sparse(a: object) -> bool:
    return bool(scipy.sparse.issparse(a))


def seed_from(text: str) -> int:
    """A 64-bit seed from a request id: the same request draws the same random start."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def tolerance(dtype: npt.DTypeLike) -> float:
    """Largest accepted triplet residual, relative to s_max: 10 sqrt(eps) (1.5e-7 for float64,
    3.5e-3 for float32). The values are then accurate to about its square over the gap."""
    return 10.0 * math.sqrt(float(np.finfo(np.dtype(dtype)).eps))


# ----------------------------------------------------------------------------- the choice


def check(shape: tuple[int, int], k: int | None, *, sparse: bool, algorithm: str | None) -> None:
    """Raise ValueError for a combination no algorithm serves."""
    if algorithm is not None and algorithm != AUTO and algorithm not in ALGORITHMS:
        raise ValueError(
            f"unknown algorithm {algorithm!r}; known: auto, {', '.join(sorted(ALGORITHMS))}"
        )
    if sparse and k is None:
        raise ValueError("a sparse matrix needs k (its full SVD would be dense)")
    if sparse and algorithm == ALGORITHM_DENSE:
        raise ValueError("algorithm 'dense' would densify the sparse matrix")
    if algorithm not in (None, AUTO, ALGORITHM_DENSE) and k is None:
        raise ValueError(f"algorithm {algorithm!r} computes the k largest triplets: it needs k")


def plan(
    shape: tuple[int, int], k: int | None, *, sparse: bool, algorithm: str | None
) -> tuple[str, ...]:
    """The algorithms to try, in order; each after the first runs only if the one before did
    not converge. A pinned algorithm is tried alone.

    Automatic: sparse input always ARPACK (never densified). Dense input: LAPACK when k is
    None, the matrix small or k a large share of min(m, n); otherwise ARPACK, then LAPACK if
    ARPACK does not converge.
    """
    check(shape, k, sparse=sparse, algorithm=algorithm)
    if algorithm is not None and algorithm != AUTO:
        return (algorithm,)
    if sparse:
        return (ALGORITHM_ARPACK,)
    m, n = shape
    elements = m * n
    if k is None or elements <= SMALL_ELEMENTS or k > DENSE_SHARE * min(m, n):
        return (ALGORITHM_DENSE,)
    return (ALGORITHM_ARPACK, ALGORITHM_DENSE)


# ------------------------------------------------------------------------------ the solvers


def top_k(a: Any, k: int, algorithm: str, *, seed: int = 0) -> Triplets:
    """The k largest triplets of ``a`` (dense array or canonical scipy.sparse) by
    ``algorithm``. Raises NotConverged (randomized returns its last iterate instead)."""
    m, n = a.shape
    dtype = np.dtype(a.dtype)
    if not _any_nonzero(a):
        return _zero(m, n, k, dtype)
    rng = np.random.default_rng(seed)
    if algorithm == ALGORITHM_RANDOMIZED:
        found = randomized(a, k, rng=rng, iterations=RANDOMIZED_ITERATIONS, strict=False)
    elif algorithm in (ALGORITHM_ARPACK, ALGORITHM_LOBPCG, ALGORITHM_PROPACK):
        found = _svds(a, k, algorithm, rng)
        _verify(a, found, algorithm)
    else:
        raise ValueError(f"{algorithm!r} is not a truncated algorithm")
    return found


def randomized(
    a: Any, k: int, *, rng: np.random.Generator, iterations: int, strict: bool = True
) -> Triplets:
    """Randomized subspace iteration: a sketch of range(A) with k + OVERSAMPLING columns,
    re-orthonormalized around each product with A and Aᵀ, until the top k Ritz triplets pass
    the residual test (checked after each power iteration, so a fast-decaying spectrum stops
    early) or ``iterations`` power iterations were done (NotConverged if ``strict``)."""
    m, n = a.shape
    dtype = np.dtype(a.dtype)
    width = min(k + OVERSAMPLING, m, n)
    tol = tolerance(dtype)
    omega = rng.standard_normal((n, width)).astype(dtype, copy=False)
    q = _orthonormal(a @ omega)
    worst = math.inf
    for done in range(iterations + 1):
        # B = Qᵀ A, computed as (Aᵀ Q)ᵀ so that a sparse A is only multiplied from the left.
        bt = np.asarray(a.T @ q)
        ub, s, vt, driver = _small_svd(bt.T)
        u = q @ ub[:, :k]
        found = Triplets(u, s[:k], vt[:k], driver)
        # Aᵀu = s v holds exactly in the sketch; only A v - s u measures convergence.
        worst = _residual(np.asarray(a @ found.vt.T) - found.u * found.s, found.s)
        if worst <= tol:
            return found
        if done == iterations:
            break
        q = _orthonormal(np.asarray(a @ _orthonormal(bt)))
    if strict:
        raise NotConverged(
            f"randomized: residual {worst:.2e} above {tol:.1e} after {iterations} power iterations"
        )
    return found


def _svds(a: Any, k: int, solver: str, rng: np.random.Generator) -> Triplets:
    m, n = a.shape
    r = min(m, n)
    dtype = np.dtype(a.dtype)
    # ARPACK and LOBPCG stop at min(m, n) - 1 triplets, and PROPACK, which may go to
    # min(m, n), returns unusable ones there when A is rank-deficient: the last one is
    # completed below, for all three.
    asked = k if k < r else k - 1
    if asked == 0:
        u, s, vt = np.zeros((m, 0), dtype), np.zeros(0, dtype), np.zeros((0, n), dtype)
    else:
        options: dict[str, Any] = {}
        if solver == ALGORITHM_PROPACK:
            # Its default Krylov dimension (10 k) often fails to converge on flat spectra;
            # the memory it costs is (m + n) * kmax.
            options["maxiter"] = 10 * asked + 100
        elif solver == ALGORITHM_LOBPCG:
            # svds hands tol**2 to LOBPCG, an absolute bound on the residuals of AᵀA (scale
            # s_max²): ask for a tenth of our own test, in those units.
            top = _norm_estimate(a, rng)
            options["tol"] = math.sqrt(tolerance(dtype) / 10) * top
            options["maxiter"] = 500
        try:
            with warnings.catch_warnings():
                # LOBPCG reports slow convergence and tiny problems as warnings; _verify
                # judges the result itself.
                warnings.simplefilter("ignore")
                u, s, vt = scipy.sparse.linalg.svds(a, k=asked, solver=solver, rng=rng, **options)
        except (scipy.sparse.linalg.ArpackError, np.linalg.LinAlgError) as exc:
            raise NotConverged(f"{solver}: {exc}") from exc
        if solver == ALGORITHM_PROPACK:
            u, s, vt = _refit(a, vt)
        order = np.argsort(s)[::-1]
        u, s, vt = u[:, order], s[order], vt[order]
    u, s, vt = (np.ascontiguousarray(x, dtype=dtype) for x in (u, s, vt))
    if asked < k:
        u, s, vt = _complete(a, u, s, vt, rng)
    return Triplets(u, s, vt, DRIVER_SVDS)


def _refit(a: Any, vt: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Rayleigh-Ritz on span(V): orthonormal Q of it, then the SVD of A Q. PROPACK keeps its
    vectors only partly orthogonal; svds does this itself for ARPACK and LOBPCG."""
    q = _orthonormal(vt.T)
    u, s, w = scipy.linalg.svd(np.asarray(a @ q), full_matrices=False)
    return u, s, (q @ w.T).T


def _complete(
    a: Any, u: FloatArray, s: FloatArray, vt: FloatArray, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Add the last triplet to min(m, n) - 1 of them. On the smaller side the singular vectors
    span the whole space, so the missing one is the orthogonal complement of the others; its
    partner is A v (or Aᵀu) with the other partners projected out (Rayleigh-Ritz on what is
    left), so that roundoff in the known triplets cannot leak into a tiny last one."""
    m, n = a.shape
    if n <= m:  # v completes V in Rⁿ; u = A v, less its part along U
        new_v = _complement(vt.T)
        new_u, sigma = _remainder(np.asarray(a @ new_v).reshape(-1), u, rng)
    else:  # u completes U in Rᵐ; v = Aᵀu, less its part along V
        new_u = _complement(u)
        new_v, sigma = _remainder(np.asarray(a.T @ new_u).reshape(-1), vt.T, rng)
    dtype = s.dtype
    u = np.column_stack([u, new_u.astype(dtype)])
    s = np.append(s, dtype.type(sigma))
    vt = np.vstack([vt, new_v.astype(dtype)[np.newaxis, :]])
    order = np.argsort(s, kind="stable")[::-1]
    return np.ascontiguousarray(u[:, order]), s[order], np.ascontiguousarray(vt[order])


def _remainder(
    x: FloatArray, basis: FloatArray, rng: np.random.Generator
) -> tuple[FloatArray, float]:
    """x without its components along ``basis``, as a unit vector, and the norm of what was
    left. When only roundoff is left (a zero singular value), its direction means nothing:
    any unit vector orthogonal to ``basis`` is returned instead."""
    before = float(np.linalg.norm(x))
    for _ in range(2):  # twice is enough (Kahan), unless x lay almost inside span(basis)
        x = x - basis @ (basis.T @ x)
    norm = float(np.linalg.norm(x))
    if not norm > 16 * float(np.finfo(x.dtype).eps) * before:
        return _unit_orthogonal_to(basis, rng), norm
    x = x / norm
    x = x - basis @ (basis.T @ x)
    return x / np.linalg.norm(x), norm


def _complement(w: FloatArray) -> FloatArray:
    """The unit vector orthogonal to the r - 1 orthonormal columns of the r x (r - 1) ``w``."""
    r = w.shape[0]
    if w.shape[1] == 0:
        out: FloatArray = np.zeros(r, dtype=w.dtype)
        out[0] = 1
        return out
    q, _ = np.linalg.qr(w, mode="complete")
    return np.asarray(q[:, -1])


def _unit_orthogonal_to(basis: FloatArray, rng: np.random.Generator) -> FloatArray:
    x: FloatArray = np.asarray(rng.standard_normal(basis.shape[0]), dtype=basis.dtype)
    for _ in range(2):  # twice is enough (Kahan): x is random, not close to span(basis)
        x = x - basis @ (basis.T @ x)
    return np.asarray(x / np.linalg.norm(x), dtype=basis.dtype)


def _verify(a: Any, found: Triplets, solver: str) -> None:
    u, s, vt = found.u, found.s, found.vt
    left = np.asarray(a @ vt.T) - u * s
    right = np.asarray(a.T @ u) - vt.T * s
    worst = max(_residual(left, s), _residual(right, s))
    tol = tolerance(s.dtype)
    if not worst <= tol:  # also catches NaN
        raise NotConverged(f"{solver}: triplet residual {worst:.2e} above {tol:.1e}")
    identity = np.eye(s.shape[0])
    drift = max(
        float(np.max(np.abs(u.T.astype(np.float64) @ u - identity), initial=0.0)),
        float(np.max(np.abs(vt.astype(np.float64) @ vt.T - identity), initial=0.0)),
    )
    if not drift <= tol:
        raise NotConverged(f"{solver}: singular vectors off orthogonal by {drift:.2e}")


def _residual(columns: FloatArray, s: FloatArray) -> float:
    """The largest column norm relative to s_max (absolute when s_max is 0)."""
    if columns.size == 0:
        return 0.0
    scale = float(s[0]) if s.size and s[0] > 0 else 1.0
    return float(np.max(np.linalg.norm(columns.astype(np.float64), axis=0))) / scale


def _orthonormal(y: FloatArray) -> FloatArray:
    q, _ = np.linalg.qr(y)
    return np.asarray(q)


def _small_svd(b: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, str]:
    """Thin SVD of the small projected matrix: gesdd, then gesvd if it fails to converge."""
    for driver in ("gesdd", "gesvd"):
        try:
            u, s, vt = scipy.linalg.svd(b, full_matrices=False, lapack_driver=driver)
        except np.linalg.LinAlgError as exc:
            last = exc
            continue
        return u, s, vt, driver
    raise NotConverged(f"randomized: the projected SVD failed with gesdd and gesvd: {last}")


def _norm_estimate(a: Any, rng: np.random.Generator, steps: int = 6) -> float:
    """A few power iterations on AᵀA: a lower estimate of s_max (never above it)."""
    x = rng.standard_normal(a.shape[1])
    estimate = 0.0
    for _ in range(steps):
        x /= np.linalg.norm(x)
        y = np.asarray(a @ x, dtype=np.float64).reshape(-1)
        estimate = float(np.linalg.norm(y))
        x = np.asarray(a.T @ y, dtype=np.float64).reshape(-1)
        if not np.any(x):
            break
    return estimate


def _any_nonzero(a: Any) -> bool:
    return bool(np.any(a.data) if is_sparse(a) else np.any(a))


def _zero(m: int, n: int, k: int, dtype: np.dtype[Any]) -> Triplets:
    return Triplets(
        np.eye(m, k, dtype=dtype), np.zeros(k, dtype), np.eye(k, n, dtype=dtype), DRIVER_TRIVIAL
    )


# ---------------------------------------------------------------------------- sparse input


def canonical(a: Any, *, check_finite: bool = True) -> Any:
    """A csr or csc matrix with sorted indices and no repeated entries (repeats summed); a
    copy only when ``a`` is not already so. Raises ValueError for what cannot be computed."""
    if not is_sparse(a) or len(a.shape) != 2:
        raise ValueError("expected a 2-D scipy.sparse matrix")
    if np.dtype(a.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"unsupported dtype {a.dtype}; expected float32 or float64")
    if a.format not in ("csr", "csc"):
        a = a.tocsr()  # new arrays, repeats summed
    elif not a.has_canonical_format:
        a = a.copy()  # never sort or sum in place: the arrays may be the parent's input
        a.sum_duplicates()
    if check_finite and not np.isfinite(a.data).all():
        raise ValueError("matrix contains NaN or infinite entries")
    return a


def sparse_quality(a: Any, u: FloatArray, s: FloatArray, vt: FloatArray) -> tuple[float, float]:
    """``compute.quality`` for a sparse A, without densifying it: with B = U diag(s) Vt,
    ‖A - B‖² = ‖A‖² - 2⟨A, B⟩ + ‖B‖², where ⟨A, B⟩ = Σ s_j u_jᵀ A v_j and ‖B‖² uses the k x k
    Gram matrices. In float64; cancellation puts a floor of about 1e-8 under the relative
    error (well below any truncation error)."""
    a64 = canonical(a).astype(np.float64)
    u64, s64, vt64 = (np.asarray(x, dtype=np.float64) for x in (u, s, vt))
    norm_a2 = float(np.sum(a64.data**2))
    av = np.asarray(a64 @ vt64.T)
    cross = float(np.sum(s64 * np.sum(u64 * av, axis=0)))
    gram_u, gram_v = u64.T @ u64, vt64 @ vt64.T
    norm_b2 = float(s64 @ (gram_u * gram_v) @ s64)
    residual = math.sqrt(max(norm_a2 - 2 * cross + norm_b2, 0.0))
    reconstruction = residual / math.sqrt(norm_a2) if norm_a2 > 0 else residual
    identity = np.eye(s64.shape[0])
    orthogonality = max(
        float(np.max(np.abs(gram_u - identity), initial=0.0)),
        float(np.max(np.abs(gram_v - identity), initial=0.0)),
    )
    return reconstruction, orthogonality


__all__ = [
    "ALGORITHMS",
    "NotConverged",
    "Triplets",
    "canonical",
    "check",
    "is_sparse",
    "plan",
    "randomized",
    "seed_from",
    "sparse_quality",
    "tolerance",
    "top_k",
]
