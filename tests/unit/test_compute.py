"""consumer.compute: correctness of the factors, shapes, options, fallback and errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from consumer import compute
from consumer.compute import ComputeError, output_shapes, quality, relative_tolerance, svd

SHAPES = [(40, 12), (12, 40), (25, 25), (1, 7), (7, 1)]
DTYPES = [np.float32, np.float64]


def _random(shape: tuple[int, int], dtype: npt.DTypeLike, seed: int = 0) -> npt.NDArray[Any]:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("full_matrices", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_factors_reconstruct_and_are_orthonormal(
    shape: tuple[int, int], dtype: type, full_matrices: bool
) -> None:
    a = _random(shape, dtype)
    before = a.copy()
    f = svd(a, full_matrices=full_matrices)
    assert f.u is not None and f.vt is not None
    expected = output_shapes(*shape, full_matrices=full_matrices, compute_uv=True, k=None)
    assert (f.u.shape, f.s.shape, f.vt.shape) == (expected.u, expected.s, expected.vt)
    assert f.u.dtype == f.s.dtype == f.vt.dtype == np.dtype(dtype)
    assert (f.driver, f.algorithm) == ("gesdd", "dense")
    assert np.all(np.diff(f.s) <= 0) and np.all(f.s >= 0)
    tol = relative_tolerance(dtype, a.size)
    reconstruction, orthogonality = quality(a, f.u, f.s, f.vt)
    assert reconstruction < tol and orthogonality < tol
    if full_matrices:  # quality() skips the extra columns; check them here
        m, n = shape
        assert np.abs(f.u.T.astype(np.float64) @ f.u - np.eye(m)).max() < tol
        assert np.abs(f.vt.astype(np.float64) @ f.vt.T - np.eye(n)).max() < tol
    np.testing.assert_array_equal(a, before)  # the input is never overwritten


@pytest.mark.parametrize("order", ["C", "F"])
def test_input_left_intact_in_either_memory_order(order: str) -> None:
    a = np.asarray(_random((30, 20), np.float64), order=order)
    before = a.copy()
    svd(a)
    svd(a, compute_uv=False)
    np.testing.assert_array_equal(a, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_values_only_matches_full(shape: tuple[int, int], dtype: type) -> None:
    a = _random(shape, dtype, seed=1)
    values = svd(a, compute_uv=False)
    assert values.u is None and values.vt is None
    assert values.s.dtype == np.dtype(dtype)
    rtol = 1e-4 if dtype is np.float32 else 1e-12
    np.testing.assert_allclose(values.s, svd(a).s, rtol=rtol, atol=rtol * float(values.s[0]))


@pytest.mark.parametrize("compute_uv", [True, False])
def test_top_k_is_the_leading_slice(compute_uv: bool) -> None:
    a = _random((30, 18), np.float64, seed=2)
    full = svd(a)
    top = svd(a, k=5, compute_uv=compute_uv)
    assert top.algorithm == "dense-topk"
    np.testing.assert_allclose(top.s, full.s[:5], rtol=1e-12)
    if compute_uv:
        assert top.u is not None and top.vt is not None and full.u is not None
        assert top.u.shape == (30, 5) and top.vt.shape == (5, 18)
        assert top.u.flags.c_contiguous or top.u.flags.f_contiguous  # a copy, not a view
        # Singular vectors are defined up to sign; the rank-5 approximation is not.
        approx = (top.u * top.s) @ top.vt
        assert full.vt is not None
        np.testing.assert_allclose(approx, (full.u[:, :5] * full.s[:5]) @ full.vt[:5], atol=1e-10)
        # Eckart-Young: the truncation error is the norm of the discarded values.
        expected = np.linalg.norm(full.s[5:]) / np.linalg.norm(full.s)
        assert quality(a, top.u, top.s, top.vt).reconstruction == pytest.approx(expected)
    else:
        assert top.u is None and top.vt is None


def test_k_equal_to_min_dimension_is_allowed() -> None:
    a = _random((6, 4), np.float64)
    assert svd(a, k=4).s.shape == (4,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "outside"),
        ({"k": 5}, "outside"),
        ({"k": -1}, "outside"),
        ({"k": True}, "integer"),
        ({"k": 2, "full_matrices": True}, "cannot be combined"),
    ],
)
def test_invalid_options_are_value_errors(kwargs: dict[str, Any], match: str) -> None:
    a = _random((6, 4), np.float64)
    with pytest.raises(ValueError, match=match):
        svd(a, **kwargs)
    with pytest.raises(ValueError, match=match):
        output_shapes(
            6,
            4,
            full_matrices=kwargs.get("full_matrices", False),
            compute_uv=True,
            k=kwargs["k"],
        )


@pytest.mark.parametrize(
    ("a", "match"),
    [
        (np.zeros(5), "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.zeros((3, 3), dtype=np.int64), "dtype"),
        (np.zeros((3, 3), dtype=np.complex128), "dtype"),
        (np.zeros((0, 3)), "at least one"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0]], dtype=np.float32), "NaN"),
    ],
)
def test_invalid_matrices_are_value_errors(a: npt.NDArray[Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        svd(a)


def test_output_shapes() -> None:
    thin = output_shapes(5, 3, full_matrices=False, compute_uv=True, k=None)
    assert (thin.u, thin.s, thin.vt) == ((5, 3), (3,), (3, 3))
    full = output_shapes(5, 3, full_matrices=True, compute_uv=True, k=None)
    assert (full.u, full.s, full.vt) == ((5, 5), (3,), (3, 3))
    top = output_shapes(3, 5, full_matrices=False, compute_uv=True, k=2)
    assert (top.u, top.s, top.vt) == ((3, 2), (2,), (2, 5))
    values = output_shapes(3, 5, full_matrices=True, compute_uv=False, k=None)
    assert (values.u, values.s, values.vt) == (None, (3,), None)


def test_ill_conditioned_matrix() -> None:
    # Singular values from 1 down to 1e-12 (condition number 1e12), random singular vectors.
    rng = np.random.default_rng(3)
    n = 40
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    sigma = np.logspace(0, -12, n)
    a = (u * sigma) @ v.T
    f = svd(a)
    assert f.u is not None and f.vt is not None
    # Singular values are perfectly conditioned: absolute error ~ eps * sigma_max.
    np.testing.assert_allclose(f.s, sigma, rtol=0, atol=1e-13)
    reconstruction, orthogonality = quality(a, f.u, f.s, f.vt)
    assert reconstruction < 1e-13 and orthogonality < 1e-12


def test_rank_deficient_and_zero_matrices() -> None:
    a = np.outer(np.arange(1.0, 6.0), np.arange(1.0, 4.0))  # rank 1
    f = svd(a)
    assert f.u is not None and f.vt is not None
    assert f.s[1:] == pytest.approx([0, 0], abs=1e-12)
    assert quality(a, f.u, f.s, f.vt).reconstruction < 1e-14
    zero = svd(np.zeros((4, 3)))
    assert zero.u is not None and zero.vt is not None
    assert not zero.s.any()
    assert quality(np.zeros((4, 3)), zero.u, zero.s, zero.vt).reconstruction == 0.0


def _fail_gesdd(calls: list[str]) -> Any:
    real = compute._lapack_svd

    def fake(a: npt.NDArray[Any], *, driver: str, **kwargs: Any) -> Any:
        calls.append(driver)
        if driver == "gesdd":
            raise np.linalg.LinAlgError("SVD did not converge")
        return real(a, driver=driver, **kwargs)

    return fake


@pytest.mark.parametrize("compute_uv", [True, False])
def test_gesvd_fallback_is_recorded(monkeypatch: pytest.MonkeyPatch, compute_uv: bool) -> None:
    calls: list[str] = []
    monkeypatch.setattr(compute, "_lapack_svd", _fail_gesdd(calls))
    a = _random((20, 10), np.float64, seed=4)
    f = svd(a, compute_uv=compute_uv)
    assert calls == ["gesdd", "gesvd"]
    assert f.driver == "gesvd"
    np.testing.assert_allclose(f.s, np.linalg.svd(a, compute_uv=False), rtol=1e-12)
    if compute_uv:
        assert f.u is not None and f.vt is not None
        assert quality(a, f.u, f.s, f.vt).reconstruction < 1e-13
    top = svd(a, k=3, compute_uv=compute_uv)
    assert (top.driver, top.algorithm) == ("gesvd", "dense-topk")


def test_both_drivers_failing_raise_compute_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(a: npt.NDArray[Any], *, driver: str, **kwargs: Any) -> Any:
        raise np.linalg.LinAlgError(f"{driver} did not converge")

    monkeypatch.setattr(compute, "_lapack_svd", fail)
    with pytest.raises(ComputeError) as caught:
        svd(_random((5, 5), np.float64))
    assert isinstance(caught.value, np.linalg.LinAlgError)  # callers catching LinAlgError
    assert "gesvd" in str(caught.value.__cause__)


def test_factors_pickle() -> None:
    import pickle

    f = svd(_random((6, 4), np.float32))
    back = pickle.loads(pickle.dumps(f))  # noqa: S301 (our own bytes, round-tripped)
    assert back.driver == f.driver
    np.testing.assert_array_equal(back.s, f.s)


# --- property tests against numpy ------------------------------------------------------------

_TOLERANCE = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}


@st.composite
def matrices(draw: st.DrawFn) -> npt.NDArray[Any]:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12))
    elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=150, deadline=None)
@given(matrices())
def test_singular_values_match_numpy(a: npt.NDArray[Any]) -> None:
    reference = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    # Below the dtype's smallest normal number (float32 subnormals) there is no relative accuracy.
    scale = max(float(reference[0]), float(np.finfo(a.dtype).tiny))
    # |error in each singular value| <= c * eps * ||A||_2 (Weyl), for both paths.
    bound = _TOLERANCE[a.dtype] * np.sqrt(a.size) * scale
    for f in (svd(a), svd(a, compute_uv=False)):
        assert f.s.dtype == a.dtype
        assert np.abs(f.s.astype(np.float64) - reference).max() <= bound


@settings(max_examples=60, deadline=None)
@given(matrices(), st.data())
def test_top_k_values_match_numpy(a: npt.NDArray[Any], data: st.DataObject) -> None:
    k = data.draw(st.integers(1, min(a.shape)))
    reference = np.linalg.svd(a.astype(np.float64), compute_uv=False)[:k]
    f = svd(a, k=k)
    assert f.u is not None and f.vt is not None
    assert f.u.shape == (a.shape[0], k) and f.vt.shape == (k, a.shape[1])
    bound = _TOLERANCE[a.dtype] * np.sqrt(a.size) * max(float(reference[0]), 1e-300)
    assert np.abs(f.s.astype(np.float64) - reference).max() <= bound


@pytest.mark.parametrize(
    ("matrix", "kwargs"),
    [
        (np.random.default_rng(5).standard_normal((60, 40)) * 1e300, {}),
        (np.random.default_rng(5).standard_normal((60, 40)) * 1e-300, {}),
        (np.random.default_rng(5).standard_normal((60, 40)).astype(np.float32) * 1e30, {}),
        (
            np.random.default_rng(5).standard_normal((60, 40)) * 1e300,
            {"k": 3, "algorithm": "arpack"},
        ),
        (scipy.sparse.random(60, 40, density=0.2, random_state=5, format="csr") * 1e300, {"k": 3}),
    ],
    ids=["huge", "tiny", "huge-float32", "huge-arpack", "huge-sparse"],
)
def test_extreme_scales_are_computed_as_well_as_ordinary_ones(
    matrix: Any, kwargs: dict[str, Any]
) -> None:
    # Squares of these entries overflow or underflow the dtype; ARPACK failed on them.
    factors = compute.svd(matrix, **kwargs)
    assert factors.u is not None and factors.vt is not None and np.isfinite(factors.s).all()
    figures = compute.quality(matrix, factors.u, factors.s, factors.vt)
    tol = 1e-3 if factors.s.dtype == np.float32 else 1e-6
    assert figures.orthogonality < tol
    if "k" not in kwargs:
        assert figures.reconstruction < tol


def test_singular_values_beyond_the_dtype_come_back_infinite_for_the_caller_to_refuse() -> None:
    for matrix in (np.full((4, 4), 1e308), scipy.sparse.coo_array(np.full((2, 2), 1e308))):
        factors = compute.svd(matrix, k=1)
        assert np.isinf(factors.s[0])
