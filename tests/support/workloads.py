"""Requests with a known cost, for fault tests that need the pool busy for a while."""

from __future__ import annotations

import numpy as np

from schemas import codec
from tests.support.kafka_io import make_request


def slow_svd_request(seed: int) -> tuple[str, codec.EncodedMessage]:
    """Seconds of one BLAS thread even on a fast core, in a modest message: the thin dense SVD
    of a 3000x3000 float32 matrix (U and Vt computed in full, about 1e11 flops), of which only
    the top 10 triplets are returned. 34 MiB in, under 300 KiB out: near-limit messages (64 MiB)
    can exhaust the test broker's 512 MiB heap. About 7 s here, 2.5 s or more on a fast core."""
    matrix = np.random.default_rng(seed).standard_normal((3000, 3000)).astype(np.float32)
    return make_request(matrix, options={"k": 10, "algorithm": "dense"})
