"""What a successful SVD gives back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.headers import Encoding
from schemas.models import SvdResultMeta

FloatArray = npt.NDArray[np.floating[Any]]


# eq=False: numpy arrays do not compare to a single bool, and identity is what a result has.
@dataclass(frozen=True, eq=False, slots=True)
class SvdResult:
    """A = u @ diag(s) @ vt; ``s`` descending. ``u`` and ``vt`` are None when compute_uv=False.

    The arrays are read-only: a binary reply is viewed in place, never copied. ``meta`` carries
    the service's timings, the worker that answered and, on request, quality figures.
    """

    request_id: str
    u: FloatArray | None
    s: FloatArray
    vt: FloatArray | None
    meta: SvdResultMeta
    encoding: Encoding

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.s.dtype
