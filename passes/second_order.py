"""The factor both second-order passes need: the upper Cholesky factor of the damped inverse Hessian."""

from __future__ import annotations

import numpy as np


def inverse_hessian_factor(hessian: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U upper-triangular with Uᵀ U = (H + λI)⁻¹, and the mask of inputs that never fire.

    λ starts at `damp` x mean(diag H) and grows tenfold until the factorization succeeds, so an
    ill-conditioned H (padding, dead channels, few samples) still gives a usable factor.
    """
    h = np.asarray(hessian, dtype=np.float64).copy()
    d = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    scale = max(float(np.mean(np.diag(h))), 1e-12)
    for attempt in range(6):
        try:
            # with J the flip and J H J = L Lᵀ: H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper-triangular
            lower = np.linalg.cholesky((h + damp * 10**attempt * scale * np.eye(d))[::-1, ::-1])
            return np.ascontiguousarray(np.linalg.inv(lower)[::-1, ::-1]), dead
        except np.linalg.LinAlgError:
            continue
    return np.diag(1.0 / np.sqrt(np.diag(h) + scale)), dead
