"""Layer-wise SDS objectives solved in Gram space.

All objectives are quadratic in W plus an L1 term, and touch the data only through
G_ii = X_iᵀX_i / N and G_ti = X_tᵀX_i / N; one iteration costs one (out x in x in) matmul
instead of a pass over all calibration tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sdsprune.linalg import damped_factor, largest_eigenvalue
from sdsprune.pruners.patterns import PatternProjector, SparsityPattern
from sdsprune.sds.config import SDSConfig


def redense(
    dense: torch.Tensor,
    start: torch.Tensor,
    gram_in: torch.Tensor,
    gram_cross: torch.Tensor,
    config: SDSConfig,
    derived: dict | None = None,
) -> torch.Tensor:
    """Step 2: every weight free again, fit W X_i to W_d X_t from ``start``.

    ``closed``: exact minimiser with the proximity term (no L1);
    ``fista``: accelerated proximal gradient, soft-threshold for L1, step 1/L;
    ``gd``: exactly the paper's plain recipe, ``redense_iters`` steps of lr / λmax(G_ii)
    from ``start`` on the reconstruction loss plus the L1/L2 terms: no proximity term
    (``mu`` is ignored), the few steps from the start are its only regularisation.

    ``derived`` caches what depends on ``gram_in`` alone (its factorisation, λmax), so the
    layers that share an input (q/k/v, gate/up) compute it once.
    """
    scale = float(torch.diagonal(gram_in).mean())
    sigma = float(dense.square().mean().sqrt())
    mu = 0.0 if config.solver == "gd" else config.mu * scale
    l2, l1 = config.lambda2 * scale, config.lambda1 * scale * sigma
    target = dense @ gram_cross  # A G_ti
    if config.solver == "closed":
        factor = _derive(derived, ("closed", mu + l2), lambda: _closed_factor(gram_in, mu + l2))
        return _redense_closed(target, start, factor, mu)
    smooth_grad = _regularised_gradient(target, start, gram_in, l2, mu)
    curvature = _derive(derived, "lambda_max", lambda: largest_eigenvalue(gram_in))
    if config.solver == "fista":
        step = 1.0 / (2 * (curvature + l2 + mu))
        return _fista(start, smooth_grad, step, l1, config.redense_iters)
    step = config.lr / curvature
    weight = start.clone()
    for _ in range(config.redense_iters):
        weight -= step * (smooth_grad(weight) + l1 * weight.sign())
    return weight


def _derive(derived: dict | None, key, compute: Callable[[], object]):
    """``compute()`` once per ``key`` in ``derived`` (every time when there is no cache)."""
    if derived is None:
        return compute()
    if key not in derived:
        derived[key] = compute()
    return derived[key]


def _closed_factor(gram_in: torch.Tensor, ridge: float) -> torch.Tensor:
    """Cholesky factor of G_ii + (μ + λ2) I in float64; with μ = λ2 = 0 and a dead input
    feature that matrix is singular, so it is dampened and retried as SparseGPT does."""
    system = gram_in.to(torch.float64, copy=True)  # its own: the ridge goes on its diagonal
    system.diagonal().add_(ridge)

    def cholesky(matrix: torch.Tensor) -> torch.Tensor | None:
        factor, info = torch.linalg.cholesky_ex(matrix)
        return factor if info == 0 else None

    return damped_factor(system, cholesky, what="the re-dense system G + (mu + lambda2) I")


def _redense_closed(target, start, factor, mu) -> torch.Tensor:
    """W = (A G_ti + μ W_start)(G_ii + (μ + λ2) I)⁻¹, from the factor of the system."""
    rhs = target + mu * start
    return torch.cholesky_solve(rhs.double().T, factor).T.to(start.dtype)


def _regularised_gradient(target, start, gram_in, l2, mu):
    def gradient(weight: torch.Tensor) -> torch.Tensor:
        grad = 2 * (weight @ gram_in - target)
        if l2:
            grad += 2 * l2 * weight
        if mu:
            grad += 2 * mu * (weight - start)
        return grad

    return gradient


def _fista(start, gradient, step, l1, iterations) -> torch.Tensor:
    current = start.clone()
    momentum_point = current.clone()
    t = 1.0
    for _ in range(iterations):
        moved = momentum_point - step * gradient(momentum_point)
        updated = soft_threshold(moved, step * l1) if l1 else moved
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        momentum_point = updated + ((t - 1) / t_next) * (updated - current)
        current, t = updated, t_next
    return current


def soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of threshold·‖·‖₁."""
    return values.sign() * (values.abs() - threshold).clamp_min(0)


def adjust(
    start: torch.Tensor,
    dense: torch.Tensor,
    gram: torch.Tensor,
    pattern: SparsityPattern,
    group: str,
    config: SDSConfig,
    check_every: int = 10,
    target: torch.Tensor | None = None,
    derived: dict | None = None,
) -> torch.Tensor:
    """Step 3b: fit the surviving weights to the dense layer's outputs.

    Projected gradient on ‖A X_t − W X‖² = tr(W G Wᵀ) − 2 tr(T Wᵀ) + const, with
    T = A G_ti (``target``; default W_d G: the dense layer on the same inputs). The
    projection keeps the largest |w| of each sparsity group, so the mask is re-chosen at
    every iteration (the paper's soft mask). Iterates are non-monotone, so the best one seen
    (checked every ``check_every`` steps, the start included) is returned: the result is
    never worse than ``start``.
    """
    if config.adjust_iters == 0:
        return start
    target = dense @ gram if target is None else target
    curvature = _derive(derived, "lambda_max", lambda: largest_eigenvalue(gram))
    accelerated = config.adjust_solver == "accelerated"
    step = 1.0 / (2 * curvature) if accelerated else config.lr / curvature

    project = PatternProjector(pattern, group)  # keeps the layer-wide threshold between steps

    best, best_value = start, fit_objective(start, gram, target)
    current = momentum_point = start
    t = 1.0
    for iteration in range(1, config.adjust_iters + 1):
        # in place where a temporary is consumed at once: the steps are memory-bound
        gradient_step = (momentum_point @ gram).sub_(target).mul_(step * 2)
        updated = project(momentum_point - gradient_step)
        if accelerated:
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            momentum_point = (updated - current).mul_((t - 1) / t_next).add_(updated)
            t = t_next
        else:
            momentum_point = updated
        current = updated
        if iteration % check_every == 0 or iteration == config.adjust_iters:
            value = fit_objective(current, gram, target)
            if value < best_value:
                best, best_value = current, value
    return best


def fit_objective(weight: torch.Tensor, gram: torch.Tensor, target: torch.Tensor) -> float:
    """tr(W G Wᵀ) − 2 tr(T Wᵀ): the layer's squared output error up to a constant."""
    return float(((weight @ gram - 2 * target) * weight).sum())
