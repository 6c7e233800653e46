"""Direct, slow implementations of the published algorithms, used only as test oracles.

They work in float64 on token-space activations, re-invert the Hessian of the remaining
columns at every step (no Cholesky trick, no blocking of the updates), and run the whole
model for every block instead of streaming activations.
"""

from __future__ import annotations

import torch
from torch import nn

from sdsprune.models import block_linears, decoder_blocks


def slow_sparsegpt(W, X, n_zero_fraction=None, nm=None, blocksize=128, percdamp=0.01):
    """OBS pruning column by column with H_F⁻¹ recomputed for the remaining columns F."""
    W = W.double().clone()
    H = X.double().T @ X.double() / X.shape[0]
    cols = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    inv_rows = [torch.linalg.inv(H[j:, j:])[0] for j in range(cols)]  # row 0 of H_F⁻¹
    mask = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        if nm is None:
            sal = torch.stack([W[:, j] ** 2 / inv_rows[j][0] for j in range(start, end)], 1)
            k = int(sal.numel() * n_zero_fraction)
            order = torch.argsort(sal.flatten(), stable=True)[:k]
            block_mask = torch.zeros(sal.numel(), dtype=torch.bool)
            block_mask[order] = True
            mask[:, start:end] = block_mask.view_as(sal)
        for j in range(start, end):
            if nm is not None and (j - start) % nm[1] == 0:
                group = range(j, j + nm[1])
                sal = torch.stack([W[:, g] ** 2 / inv_rows[g][0] for g in group], 1)
                low = torch.argsort(sal, dim=1, stable=True)[:, : nm[0]]
                mask[:, j : j + nm[1]] = False
                mask[:, j : j + nm[1]].scatter_(1, low, True)
            row = inv_rows[j]
            err = torch.where(mask[:, j], W[:, j], torch.zeros_like(W[:, j])) / row[0]
            W[:, j:] -= err[:, None] * row[None, :]
            W[mask[:, j], j] = 0
    W[mask] = 0
    return W.float(), mask


def slow_wanda(W, X, fraction=None, nm=None):
    scores = W.abs().double() * X.double().norm(dim=0)[None, :]
    mask = torch.zeros_like(W, dtype=torch.bool)
    if nm is None:
        k = int(W.shape[1] * fraction)
        low = torch.argsort(scores, dim=1, stable=True)[:, :k]
        mask.scatter_(1, low, True)
    else:
        groups = scores.view(W.shape[0], -1, nm[1])
        low = torch.argsort(groups, dim=2, stable=True)[:, :, : nm[0]]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, low, True).view_as(W)
    return W.masked_fill(mask, 0), mask


def slow_admm(W, X, fraction, nm=None, iterations=20, growth=15, rho=1.0, percdamp=0.1):
    """Boža's ADMM update as published, in float64 and the code's (in x out) orientation:
    normalise by ‖X_j‖, then Z = P(W + U), U += W − Z, W = (XX + ρI)⁻¹(XY + ρ(Z − U)) with a
    fresh linear solve per step and masks from a stable full sort (no top-k, no Cholesky)."""
    X = X.double()
    gram = X.T @ X
    norm = torch.diagonal(gram).sqrt() + 1e-8
    gram = gram / norm[:, None] / norm[None, :]
    W0 = (W.double() * norm[None, :]).T  # in x out
    gram = gram + percdamp * torch.diagonal(gram).mean() * torch.eye(len(norm), dtype=X.dtype)
    xy = gram @ W0
    system = gram + rho * torch.eye(len(norm), dtype=X.dtype)
    Wc, U = W0.clone(), torch.zeros_like(W0)
    keep = torch.ones_like(W0, dtype=torch.bool)
    for step in range(iterations):
        if step < growth:
            current = fraction * (1 - (1 - (step + 1) / growth) ** 3)
            keep = ~_slow_growing_mask((Wc + U).abs(), current, fraction, nm)
        Z = (Wc + U) * keep
        U = U + Wc - Z
        Wc = torch.linalg.solve(system, xy + rho * (Z - U))
    out = ((Wc + U) * keep).T / norm[None, :]
    return out.float(), ~keep.T


def _slow_growing_mask(scores, current, final, nm):
    """True at the ``current`` share of all weights with the lowest scores; for N:M only
    among each group of M inputs' N lowest (groups run along the input axis, dim 0 here)."""
    if nm is not None:
        n, m = nm
        groups = scores.T.reshape(scores.shape[1], -1, m)
        low = torch.argsort(groups, dim=2, stable=True)[:, :, :n]
        candidate = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, low, True)
        candidate = candidate.reshape(scores.shape[1], -1).T
        if current >= final:
            return candidate
        scores = torch.where(candidate, scores, torch.full_like(scores, float("inf")))
    flat = scores.T.flatten()  # the fast code ranks in (out x in) order: ties alike
    count = int(flat.numel() * (final if current >= final else current))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.argsort(flat, stable=True)[:count]] = True
    return mask.reshape(scores.shape[1], scores.shape[0]).T


@torch.no_grad()
def slow_sequential_prune(model: nn.Module, windows: torch.Tensor, prune_layer) -> None:
    """For each block: run the whole (partly pruned) model, record every linear's inputs in
    that block, then prune all of them with ``prune_layer(W, X) -> W_new``."""
    for block in decoder_blocks(model):
        linears = block_linears(block)
        inputs = {name: [] for name in linears}
        handles = [
            layer.register_forward_hook(_recorder(inputs[name])) for name, layer in linears.items()
        ]
        for window in windows:
            model(input_ids=window[None], use_cache=False)
        for handle in handles:
            handle.remove()
        for name, layer in linears.items():
            layer.weight.data = prune_layer(
                layer.weight.data.float(), torch.cat(inputs[name]).float()
            )


def _recorder(store: list):
    def hook(_module, inputs, _output):
        store.append(inputs[0].reshape(-1, inputs[0].shape[-1]))

    return hook
