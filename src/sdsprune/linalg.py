"""Quadratic forms of the layer-wise objectives, evaluated on second-moment matrices.

‖A X − W X‖²_F / N = tr((A − W) G (A − W)ᵀ) with G = XᵀX / N, so every reconstruction error
needs the (in x in) Gram matrix only, never the (N x in) activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from sdsprune.errors import SdspruneError

log = logging.getLogger(__name__)


def output_energy(weight: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean squared output of ``weight`` on the calibration inputs: tr(W G Wᵀ)."""
    return float(((weight @ gram) * weight).sum())


def relative_error(dense: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W_d − W) X‖² / ‖W_d X‖²: the fraction of the layer's output energy lost."""
    return output_energy(dense - weight, gram) / max(output_energy(dense, gram), 1e-30)


def largest_eigenvalue(gram: torch.Tensor, iterations: int = 60, margin: float = 1.02) -> float:
    """λmax of a symmetric PSD matrix (the Lipschitz scale of the quadratic's gradient).

    Power iteration costs a few matrix-vector products instead of a full eigendecomposition
    per layer; calibration Gram matrices have one dominant direction (λmax is hundreds of
    times the mean eigenvalue), so it converges fast. The Rayleigh quotient approaches
    λmax from below; the small ``margin`` keeps step sizes 1/L on the safe side.
    """
    matrix = gram.double()
    vector = torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        vector = matrix @ vector
        norm = vector.norm()
        if norm == 0:
            return 0.0
        vector /= norm
    return float(vector @ (matrix @ vector)) * margin


def damped_factor(
    matrix: torch.Tensor,
    factorise: Callable[[torch.Tensor], torch.Tensor | None],
    *,
    first_damp: float = 0.0,
    retry_damp: float = 0.01,
    retries: int = 5,
    what: str = "the Gram matrix",
) -> torch.Tensor:
    """``factorise(matrix + d·mean(diag)·I)``, raising d until it succeeds (SparseGPT's rule).

    ``factorise`` returns None when the matrix is not positive definite enough (a dead input
    feature, too few tokens, no ridge term). The first try uses ``first_damp`` (0: the
    matrix as given); each failure multiplies the dampening by ten, starting from
    ``retry_damp``, and says so in the log, instead of a raw linear-algebra error mid-run.

    The dampening is written onto ``matrix``'s diagonal and the diagonal restored before
    returning: a damped copy (and an identity matrix to add) would be two more in x in
    matrices beside the factor, 3 GiB in float64 for an MLP down projection of width 14336,
    which the memory plan does not and should not budget.
    """
    diagonal = torch.diagonal(matrix)
    original = diagonal.clone()
    scale = float(original.mean())
    scale = scale if scale > 0 else 1.0  # an all-zero Gram (a dead layer): damp to I
    damp = first_damp
    try:
        for attempt in range(retries + 1):
            torch.add(original, damp * scale, out=diagonal)
            factor = factorise(matrix)
            if factor is not None:
                if attempt:
                    log.warning("factorising %s needed dampening %.3g x mean(diag)", what, damp)
                return factor
            damp = damp * 10 if damp else retry_damp
    finally:
        diagonal.copy_(original)
    raise SdspruneError(
        f"{what} is not positive definite even with heavy dampening (NaN/Inf inputs?)"
    )
