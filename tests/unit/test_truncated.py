"""The SVD options: every algorithm against numpy.linalg.svd, sparse input never densified,
the automatic choice, the fallbacks and what the result records.

Singular vectors are compared without their signs: each triplet must satisfy A v = s u and
Aᵀu = s v, U and V must be orthonormal, and the values must match numpy's; together these say
the factors are the top-k SVD, whatever signs (or, for repeated values, bases) were chosen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer import truncated
from consumer.compute import ComputeError, SvdFactors, quality, svd
from schemas.sparse import SparseMatrix
from tests.support.sparse import random_sparse

DTYPES = [np.float32, np.float64]
ITERATIVE = ["arpack", "propack", "lobpcg"]
ALL = ["dense", *ITERATIVE, "randomized"]

# |error in a singular value| <= VALUE_TOL * sqrt(m n) * s_max (Weyl's bound, with headroom):
# LAPACK's backward stability, which ARPACK and PROPACK (converged to machine precision) meet.
VALUE_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
# LOBPCG and randomized stop once every triplet's residual is below truncated.tolerance (10
# sqrt(eps) s_max), which bounds how far each value can be from a true one.
LOOSER = {"lobpcg", "randomized"}


def value_tol(algorithm: str, dtype: Any) -> float | None:
    """Per algorithm and dtype: None means LAPACK's (VALUE_TOL, scaled by sqrt(m n))."""
    return truncated.tolerance(dtype) if algorithm in LOOSER else None


# Pinned solvers that may refuse a small or rank-deficient matrix rather than answer wrongly.
_MAY_REFUSE = frozenset({"propack", "lobpcg"})


def svd_unless_propack_refuses(a: Any, k: int, algorithm: str, **kwargs: Any) -> Any:
    """``svd``; None when pinned PROPACK or LOBPCG refused (ComputeError). PROPACK in scipy
    breaks down on small matrices (its Krylov space is capped at min(m, n) + 1) and when k
    exceeds the numerical rank; LOBPCG can stall short of the verified tolerance on a small
    rank-deficient float32 matrix (hypothesis found a 15 x 15 one with k = 3); the verification
    then turns what they return into SVD_FAILED, never into a wrong answer. Automatic choices
    never use them."""
    given = a.to_scipy() if isinstance(a, SparseMatrix) else a
    try:
        return svd(given, k=k, algorithm=algorithm, **kwargs)
    except ComputeError:
        if algorithm not in _MAY_REFUSE:
            raise
        return None


def _geometric(
    rng: np.random.Generator, shape: tuple[int, int], ratio: float, dtype: Any = np.float64
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """U diag(ratio**i) Vᵀ with random orthonormal U, V: condition number ratio**(1 - r)."""
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    sigma = ratio ** np.arange(r)
    return ((u * sigma) @ v.T).astype(dtype), sigma


def _dense_of(a: Any) -> npt.NDArray[Any]:
    return a.toarray() if isinstance(a, SparseMatrix) else np.asarray(a)


def assert_top_k(a: Any, f: SvdFactors, k: int, *, value_tol: float | None = None) -> None:
    """``f`` holds the k largest singular triplets of ``a`` (dense array or SparseMatrix)."""
    dense = _dense_of(a).astype(np.float64)
    dtype = np.dtype(f.s.dtype)
    reference = np.linalg.svd(dense, compute_uv=False)[:k]
    scale = max(float(reference[0]), float(np.finfo(dtype).tiny))
    bound = (value_tol or VALUE_TOL[dtype] * np.sqrt(dense.size)) * scale
    assert f.s.shape == (k,)
    assert np.all(np.diff(f.s.astype(np.float64)) <= bound)  # descending
    assert np.abs(f.s.astype(np.float64) - reference).max() <= bound, (f.algorithm, f.s, reference)
    if f.u is None or f.vt is None:
        return
    m, n = dense.shape
    assert f.u.shape == (m, k) and f.vt.shape == (k, n)
    assert f.u.dtype == f.vt.dtype == dtype
    u, s, vt = (x.astype(np.float64) for x in (f.u, f.s, f.vt))
    res_tol = 2 * truncated.tolerance(dtype) * scale + bound
    assert np.linalg.norm(dense @ vt.T - u * s, axis=0).max() <= res_tol
    assert np.linalg.norm(dense.T @ u - vt.T * s, axis=0).max() <= res_tol
    orth_tol = 100 * float(np.finfo(dtype).eps) * max(m, n) + 2 * truncated.tolerance(dtype)
    assert np.abs(u.T @ u - np.eye(k)).max() <= orth_tol
    assert np.abs(vt @ vt.T - np.eye(k)).max() <= orth_tol


@st.composite
def dense_cases(draw: st.DrawFn) -> tuple[npt.NDArray[Any], int]:
    """Random (flat spectrum) or geometric (condition numbers up to 1e23) matrices."""
    dtype = draw(st.sampled_from(DTYPES))
    m, n = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        a = rng.standard_normal((m, n)).astype(dtype)
    else:
        a, _ = _geometric(rng, (m, n), draw(st.floats(0.1, 0.9)), dtype)
    return a, draw(st.integers(1, min(m, n)))


@st.composite
def sparse_cases(draw: st.DrawFn) -> tuple[SparseMatrix, int]:
    m, n = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    matrix = random_sparse(
        rng,
        (m, n),
        density=draw(st.floats(0.05, 0.6)),
        fmt=draw(st.sampled_from(["csr", "csc", "coo"])),
        dtype=draw(st.sampled_from(DTYPES)),
        index_dtype=draw(st.sampled_from([np.int32, np.int64])),
    )
    return matrix, draw(st.integers(1, min(m, n)))


# --- each path against numpy ------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALL)
@settings(max_examples=40, deadline=None)
@given(dense_cases())
def test_dense_input_matches_numpy(algorithm: str, case: tuple[npt.NDArray[Any], int]) -> None:
    a, k = case
    f = svd_unless_propack_refuses(a, k, algorithm, seed=7)
    if f is None:  # refused, never wrong
        return
    assert f.algorithm == ("dense-topk" if algorithm == "dense" else algorithm)
    # Randomized is exact here: its sketch (k + 10 columns) covers min(m, n) <= 24 when k > 13,
    # and below that the power iterations converge on matrices this small.
    assert_top_k(a, f, k, value_tol=value_tol(algorithm, a.dtype))
    values = svd(a, k=k, algorithm=algorithm, seed=7, compute_uv=False)
    assert values.u is None and values.vt is None
    if algorithm == "dense":  # LAPACK without vectors: another computation, the same values
        assert_top_k(a, values, k)
    else:  # iterative: the same computation (its test needs the vectors), vectors dropped
        np.testing.assert_array_equal(values.s, f.s)


@pytest.mark.parametrize("algorithm", ["auto", *ITERATIVE, "randomized"])
@settings(max_examples=40, deadline=None)
@given(sparse_cases())
def test_sparse_input_matches_numpy(algorithm: str, case: tuple[SparseMatrix, int]) -> None:
    matrix, k = case
    f = svd_unless_propack_refuses(matrix, k, algorithm, seed=7)
    if f is None:  # refused, never wrong
        return
    assert f.algorithm == ("arpack" if algorithm == "auto" else algorithm)
    assert_top_k(matrix, f, k, value_tol=value_tol(algorithm, matrix.dtype))
    if f.u is not None and f.vt is not None:  # quality without densifying = the dense formula
        dense = matrix.toarray()
        expected = quality(dense, f.u, f.s, f.vt)
        got = quality(matrix.to_scipy(), f.u, f.s, f.vt)
        assert got.orthogonality == pytest.approx(expected.orthogonality, abs=1e-12)
        assert got.reconstruction == pytest.approx(expected.reconstruction, abs=3e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["auto", *ALL])
def test_ill_conditioned_top_k_and_subspaces(algorithm: str, dtype: type) -> None:
    # 120 x 90 with values 0.7**i (condition number 1e14): the top triplets are well separated,
    # so the singular subspaces themselves are unique and can be compared with numpy's.
    rng = np.random.default_rng(11)
    a, _ = _geometric(rng, (120, 90), 0.7, dtype)
    k = 6
    f = svd(a, k=k, algorithm=algorithm, seed=3)
    assert_top_k(a, f, k, value_tol=value_tol(algorithm, dtype))
    u_ref, _, vt_ref = np.linalg.svd(a.astype(np.float64))
    assert f.u is not None and f.vt is not None
    tol = 1e-3 if dtype is np.float32 else 1e-9
    if algorithm in LOOSER:  # subspace angle <= residual / gap, and the gap here is 0.7**5 * 0.3
        tol = max(tol, 20 * truncated.tolerance(dtype))
    projector = f.u.astype(np.float64) @ f.u.T.astype(np.float64)
    assert np.abs(projector - u_ref[:, :k] @ u_ref[:, :k].T).max() < tol
    projector = f.vt.T.astype(np.float64) @ f.vt.astype(np.float64)
    assert np.abs(projector - vt_ref[:k].T @ vt_ref[:k]).max() < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_propack_on_ordinary_matrices(dtype: type) -> None:
    rng = np.random.default_rng(12)
    for a in (
        rng.standard_normal((300, 200)).astype(dtype),
        random_sparse(rng, (400, 300), density=0.05, dtype=dtype).to_scipy(),
    ):
        for k in (1, 10):
            f = svd(a, k=k, algorithm="propack")
            assert_top_k(a.toarray() if scipy.sparse.issparse(a) else a, f, k)


def test_randomized_on_a_slowly_decaying_spectrum_is_approximate_but_bounded() -> None:
    # 300 x 200 Gaussian: a flat spectrum, where subspace iteration converges slowly. Pinned
    # randomized then returns its last iterate: Ritz values never exceed the true ones
    # (interlacing), are close to them, and the vectors stay orthonormal triplets of Q ᵀA.
    rng = np.random.default_rng(5)
    a = rng.standard_normal((300, 200))
    reference = np.linalg.svd(a, compute_uv=False)
    f = svd(a, k=5, algorithm="randomized", seed=1)
    assert f.algorithm == "randomized" and f.driver == "gesdd"
    assert np.all(f.s <= reference[:5] * (1 + 1e-12))
    assert np.abs(f.s - reference[:5]).max() / reference[0] < 0.05
    assert f.u is not None and f.vt is not None
    assert quality(a, f.u, f.s, f.vt).orthogonality < 1e-12


def test_randomized_converges_on_a_decaying_spectrum() -> None:
    a, sigma = _geometric(np.random.default_rng(6), (400, 300), 0.5)
    found = truncated.randomized(a, 8, rng=np.random.default_rng(0), iterations=16)  # strict
    np.testing.assert_allclose(found.s, sigma[:8], rtol=1e-10)


# --- k = min(m, n), rank deficiency, zero ------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 6), (6, 9), (1, 7), (7, 1), (5, 5)])
@pytest.mark.parametrize("algorithm", ["arpack", "lobpcg", "propack", "randomized"])
def test_all_triplets_even_where_the_solver_stops_at_min_minus_one(
    algorithm: str, shape: tuple[int, int]
) -> None:
    # ARPACK and LOBPCG give at most min(m, n) - 1 triplets; the last is completed.
    a = np.random.default_rng(8).standard_normal(shape)
    k = min(shape)
    tol = value_tol(algorithm, a.dtype)
    assert_top_k(a, svd(a, k=k, algorithm=algorithm), k, value_tol=tol)
    sparse = scipy.sparse.csr_array(a)
    assert_top_k(a, svd(sparse, k=k, algorithm=algorithm), k, value_tol=tol)


@pytest.mark.parametrize("algorithm", ["arpack", "lobpcg", "randomized"])
def test_rank_deficient_sparse_with_k_above_the_rank(algorithm: str) -> None:
    # Rank 2 (an empty row and a column-repeating block), k = min(m, n): zero values come back
    # with orthonormal vectors.
    a = np.zeros((7, 5))
    a[0, :] = 1.0
    a[3, 1] = 2.0
    f = svd(scipy.sparse.coo_array(a), k=5, algorithm=algorithm)
    assert_top_k(a, f, 5, value_tol=value_tol(algorithm, a.dtype))
    assert f.s[2:] == pytest.approx([0, 0, 0], abs=1e-7)


@pytest.mark.parametrize("algorithm", ["auto", *ITERATIVE, "randomized"])
def test_the_zero_matrix(algorithm: str) -> None:
    for a in (scipy.sparse.csr_array((6, 4)), np.zeros((6, 4))):
        f = svd(a, k=3, algorithm=algorithm if algorithm != "auto" else "arpack")
        assert not f.s.any() and f.driver == "trivial"
        assert_top_k(np.zeros((6, 4)), f, 3)
    # Repeated entries that cancel are zero too.
    cancel = scipy.sparse.coo_array(([1.0, -1.0], ([0, 0], [1, 1])), shape=(3, 3))
    assert not svd(cancel, k=1).s.any()


# --- sparse input: formats, canonical form, never densified -----------------------------------


def test_sparse_input_is_never_densified(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sparse matrix was densified")

    for name in ("toarray", "todense"):
        monkeypatch.setattr(scipy.sparse._base._spbase, name, refuse)
    matrix = random_sparse(np.random.default_rng(1), (40, 30), fmt="coo")
    for algorithm in ("auto", *ITERATIVE, "randomized"):
        f = svd(matrix.to_scipy(), k=4, algorithm=algorithm, seed=2)
        quality(matrix.to_scipy(), f.u, f.s, f.vt)  # type: ignore[arg-type]
        svd(matrix.to_scipy(), k=30, algorithm=algorithm)  # k = min(m, n) included


def test_unsorted_and_repeated_entries_are_summed_without_touching_the_input() -> None:
    matrix = random_sparse(np.random.default_rng(2), (20, 15), fmt="csr", repeats=5)
    data, indices, indptr = (np.array(x) for x in (matrix.data, *matrix.index_arrays))
    for array in (data, indices, indptr):
        array.flags.writeable = False  # as views of a received value or of shared memory are
    given = scipy.sparse.csr_array((data, indices, indptr), shape=matrix.shape)
    assert not given.has_canonical_format
    assert_top_k(matrix, svd(given, k=4), 4)
    np.testing.assert_array_equal(given.data, matrix.data)
    np.testing.assert_array_equal(given.indices, matrix.index_arrays[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_computed_in_the_inputs_dtype(dtype: type) -> None:
    matrix = random_sparse(np.random.default_rng(3), (30, 20), dtype=dtype)
    for algorithm in ("auto", *ITERATIVE, "randomized"):
        f = svd(matrix.to_scipy(), k=3, algorithm=algorithm)
        assert f.s.dtype == f.u.dtype == f.vt.dtype == np.dtype(dtype)  # type: ignore[union-attr]


def test_sparse_requests_that_cannot_be_computed() -> None:
    a = scipy.sparse.csr_array(np.eye(4))
    with pytest.raises(ValueError, match="needs k"):
        svd(a)
    with pytest.raises(ValueError, match="densify"):
        svd(a, k=2, algorithm="dense")
    with pytest.raises(ValueError, match="dtype"):
        svd(scipy.sparse.csr_array(np.eye(4, dtype=np.int64)), k=1)
    with pytest.raises(ValueError, match="NaN"):
        svd(scipy.sparse.csr_array(np.diag([1.0, np.nan])), k=1)


# --- the automatic choice, pinned algorithms, fallbacks ---------------------------------------


@pytest.mark.parametrize(
    ("shape", "k", "sparse", "expected"),
    [
        ((500, 400), None, False, ("dense",)),  # the full SVD
        ((200, 200), 3, False, ("dense",)),  # small: LAPACK takes milliseconds
        ((500, 400), 41, False, ("dense",)),  # k above 10 % of min(m, n)
        ((500, 400), 40, False, ("arpack", "dense")),
        ((4000, 4000), 10, False, ("arpack", "dense")),  # large: ARPACK (see truncated.py)
        ((10, 10), 3, True, ("arpack",)),  # sparse, however small: never densified
        ((10, 10), 10, True, ("arpack",)),  # k = min(m, n): the last triplet is completed
    ],
)
def test_the_automatic_choice(
    shape: tuple[int, int], k: int | None, sparse: bool, expected: tuple[str, ...]
) -> None:
    assert truncated.plan(shape, k, sparse=sparse, algorithm=None) == expected
    assert truncated.plan(shape, k, sparse=sparse, algorithm="auto") == expected


def test_a_pinned_algorithm_runs_alone_and_is_recorded() -> None:
    a = np.random.default_rng(4).standard_normal((500, 400))  # auto would pick ARPACK
    assert svd(a, k=3).algorithm == "arpack"
    for algorithm in ALL:
        f = svd(a, k=3, algorithm=algorithm)
        assert f.algorithm == ("dense-topk" if algorithm == "dense" else algorithm)
        assert f.driver == {"dense": "gesdd", "randomized": "gesdd"}.get(algorithm, "svds")
    assert truncated.plan((5, 5), 2, sparse=False, algorithm="lobpcg") == ("lobpcg",)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithm": "arpack"}, "needs k"),
        ({"algorithm": "randomized", "full_matrices": True}, "needs k"),
        ({"algorithm": "jacobi", "k": 2}, "unknown algorithm"),
    ],
)
def test_invalid_algorithm_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        svd(np.ones((6, 4)), **kwargs)


def test_auto_falls_back_to_lapack_and_a_pinned_failure_is_a_compute_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_convergence(*args: Any, **kwargs: Any) -> Any:
        raise truncated.NotConverged("arpack: did not converge")

    monkeypatch.setattr(truncated, "top_k", no_convergence)
    a = np.random.default_rng(5).standard_normal((500, 400))
    f = svd(a, k=3)  # auto: ARPACK, then LAPACK
    assert (f.algorithm, f.driver) == ("dense-topk", "gesdd")
    assert_top_k(a, f, 3)
    with pytest.raises(ComputeError, match="did not converge") as caught:
        svd(a, k=3, algorithm="arpack")
    assert isinstance(caught.value, np.linalg.LinAlgError)  # the worker maps it to SVD_FAILED
    with pytest.raises(ComputeError):
        svd(scipy.sparse.csr_array(a), k=3)  # sparse: no dense fallback


def test_an_unverified_result_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = scipy.sparse.linalg.svds

    def sloppy(*args: Any, **kwargs: Any) -> Any:
        u, s, vt = real(*args, **kwargs)
        return u, s * 1.01, vt  # values off by 1 %: the triplets no longer fit A

    monkeypatch.setattr(scipy.sparse.linalg, "svds", sloppy)
    with pytest.raises(truncated.NotConverged, match="residual"):
        truncated.top_k(np.random.default_rng(6).standard_normal((40, 30)), 3, "arpack")


def test_the_same_seed_gives_the_same_factors() -> None:
    matrix = random_sparse(np.random.default_rng(9), (60, 50))
    seed = truncated.seed_from("request-1")
    assert seed == truncated.seed_from("request-1") != truncated.seed_from("request-2")
    for algorithm in ("arpack", "lobpcg", "propack", "randomized"):
        first = svd(matrix.to_scipy(), k=4, algorithm=algorithm, seed=seed)
        again = svd(matrix.to_scipy(), k=4, algorithm=algorithm, seed=seed)
        for x, y in ((first.u, again.u), (first.s, again.s), (first.vt, again.vt)):
            np.testing.assert_array_equal(x, y)  # type: ignore[arg-type]
