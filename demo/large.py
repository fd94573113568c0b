"""``python -m demo --large N``: one N x N float64 full SVD through the object store, verified.

The matrix (8 N^2 bytes) goes to the store and the request carries its reference; the worker
reads it, computes, and writes U, S and Vt (16 N^2 bytes) back; the SDK fetches and verifies
them. What no Kafka record could carry, end to end. The check costs O(N^2 k), not another SVD:
A v_i = s_i u_i for the leading k triplets, and the orthonormality of those vectors.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import numpy as np

from producer_sdk import AsyncSvdClient

_CHECKED_TRIPLETS = 256


@dataclass(frozen=True)
class LargeReport:
    n: int
    round_trip_s: float
    compute_s: float
    residual: float
    orthogonality: float
    client_peak_rss_bytes: int

    @property
    def ok(self) -> bool:
        tolerance = 1e-12 * self.n
        return self.residual <= tolerance and self.orthogonality <= tolerance

    def describe(self) -> str:
        mib = self.n * self.n * 8 / (1 << 20)
        return (
            f"{self.n} x {self.n} float64 full SVD ({mib:.0f} MiB in, {2 * mib:.0f} MiB of U and "
            f"Vt out, through the store): round trip {self.round_trip_s:.1f} s, of which compute "
            f"{self.compute_s:.1f} s in the worker; leading {_CHECKED_TRIPLETS} triplets: "
            f"residual {self.residual:.1e}, orthogonality {self.orthogonality:.1e}; client peak "
            f"RSS {self.client_peak_rss_bytes / (1 << 30):.2f} GiB"
        )


async def run_large(bootstrap: str, topics: dict[str, str], n: int, seed: int = 7) -> LargeReport:
    """One full SVD of a random ``n`` x ``n`` matrix; the client's store comes from
    SVD_CLIENT_STORE_*."""
    a = np.random.default_rng(seed).standard_normal((n, n))
    async with AsyncSvdClient(
        bootstrap_servers=bootstrap,
        requests_topic=topics["requests"],
        results_topic=topics["results"],
        default_timeout_s=4 * 3600.0,
    ) as client:
        started = time.perf_counter()
        r = await client.svd(a, full_matrices=True)
        round_trip = time.perf_counter() - started
    assert r.u is not None and r.vt is not None
    k = min(_CHECKED_TRIPLETS, n)
    u, v = r.u[:, :k], r.vt[:k].T
    residual = float(np.linalg.norm(a @ v - u * r.s[:k]) / np.linalg.norm(a))
    orthogonality = float(max(np.abs(u.T @ u - np.eye(k)).max(), np.abs(v.T @ v - np.eye(k)).max()))
    return LargeReport(
        n=n,
        round_trip_s=round_trip,
        compute_s=r.meta.timings.compute_ms / 1000,
        residual=residual,
        orthogonality=orthogonality,
        client_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
