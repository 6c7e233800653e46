"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with second-order weight updates."""

from __future__ import annotations

import contextlib
import logging

import torch

from sdsprune.errors import SdspruneError
from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.patterns import SparsityPattern, lowest_k_mask, nm_mask
from sdsprune.utils import single_threaded

log = logging.getLogger(__name__)


class SparseGPTPruner(Pruner):
    """Column-by-column pruning with the inverse-Hessian update of the remaining columns.

    Unstructured masks are chosen adaptively per block of ``blocksize`` columns (the same
    fraction in every block, the lowest w²/[H⁻¹]²_jj first); N:M masks every M columns.
    """

    name = "sparsegpt"
    needs = "gram"
    unstructured_group = "layer"

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize = blocksize
        self.percdamp = percdamp

    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern
    ) -> PruneOutcome:
        assert stats is not None and stats.gram is not None, "SparseGPT needs the Hessian"
        W = weight.clone().float()
        H = stats.gram.to(W.device, torch.float32).clone()
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        hinv = inverse_hessian_cholesky(H, self.percdamp)
        mask = torch.zeros_like(W, dtype=torch.bool)
        columns = W.shape[1]
        with single_threaded() if W.device.type == "cpu" else contextlib.nullcontext():
            for start in range(0, columns, self.blocksize):
                end = min(start + self.blocksize, columns)
                self._prune_block(W, hinv, mask, start, end, pattern)
        W.masked_fill_(mask, 0.0)
        return PruneOutcome(W, mask)

    @staticmethod
    def _prune_block(W, hinv, mask, start, end, pattern) -> None:
        block = W[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = torch.diagonal(hinv_block)
        errors = torch.zeros_like(block)
        block_mask = mask[:, start:end]
        if not pattern.is_nm:
            saliency = block.square() / diag.square()
            block_mask |= lowest_k_mask(
                saliency.reshape(1, -1), int(saliency.numel() * pattern.fraction)
            ).view_as(saliency)
        for col in range(end - start):
            if pattern.is_nm and col % pattern.m == 0:
                group = slice(col, col + pattern.m)
                saliency = block[:, group].square() / diag[group].square()
                block_mask[:, group] = nm_mask(saliency, pattern.n, pattern.m)
            w = block[:, col]
            q = w.masked_fill(block_mask[:, col], 0.0)
            err = (w - q) / diag[col]
            # a rank-1 matmul, as the reference does: measured 1.4x faster per layer than
            # the broadcast product on CPU (576 x 1536 layer, 2:4: 0.59 s vs 0.82 s)
            block[:, col:] -= err.unsqueeze(1) @ hinv_block[col, col:].unsqueeze(0)
            block[:, col] = q
            errors[:, col] = err
        W[:, start:end] = block
        W[:, end:] -= errors @ hinv[start:end, end:]


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float, retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp x mean(diag H).

    A rank-deficient Hessian (few tokens, dead features) can make Cholesky fail; we then
    retry with ten times the dampening and say so, rather than crash mid-run.
    """
    mean_diag = torch.diagonal(H).mean()
    damp = percdamp
    for attempt in range(retries):
        regularised = H + damp * mean_diag * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
        factor, info = torch.linalg.cholesky_ex(regularised)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                if attempt:
                    log.warning("Cholesky needed dampening %.3g x mean(diag H)", damp)
                return upper
        damp *= 10
    raise SdspruneError(
        "the Hessian is not positive definite even with heavy dampening (NaN/Inf inputs?)"
    )
