"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with second-order weight updates."""

from __future__ import annotations

import contextlib
import logging

import torch

from sdsprune.linalg import damped_factor
from sdsprune.pruners.base import InputStats, PruneOutcome, Pruner
from sdsprune.pruners.patterns import SparsityPattern, lowest_k_mask, nm_mask
from sdsprune.utils import single_threaded

log = logging.getLogger(__name__)


class SparseGPTPruner(Pruner):
    """Column-by-column pruning with the inverse-Hessian update of the remaining columns.

    Unstructured masks are chosen adaptively per block of ``blocksize`` columns (the same
    fraction in every block, the lowest w²/[H⁻¹]²_jj first); N:M masks every M columns, in
    blocks of a multiple of M columns (126 for 1:3), so that no group straddles two blocks.
    """

    name = "sparsegpt"
    needs = "gram"
    unstructured_group = "layer"

    def __init__(self, blocksize: int, percdamp: float):
        self.blocksize = blocksize
        self.percdamp = percdamp

    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: SparsityPattern
    ) -> PruneOutcome:
        assert stats is not None and stats.gram is not None, "SparseGPT needs the Hessian"
        W = weight.clone().float()
        key = ("sparsegpt_hinv", self.percdamp, str(W.device))
        if key not in stats.derived:  # once per shared input (q/k/v, gate/up)
            stats.derived[key] = self._dead_and_hinv(stats.gram.to(W.device, torch.float32))
        dead, hinv = stats.derived[key]
        W[:, dead] = 0.0
        mask = torch.zeros_like(W, dtype=torch.bool)
        columns = W.shape[1]
        blocksize = self.block_columns(pattern)
        with single_threaded() if W.device.type == "cpu" else contextlib.nullcontext():
            for start in range(0, columns, blocksize):
                end = min(start + blocksize, columns)
                self._prune_block(W, hinv, mask, start, end, pattern)
        W.masked_fill_(mask, 0.0)
        return PruneOutcome(W, mask)

    def _dead_and_hinv(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dead input features (zero diagonal) and the factor of the dampened inverse."""
        H = gram.clone()
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        return dead, inverse_hessian_cholesky(H, self.percdamp)

    def block_columns(self, pattern: SparsityPattern) -> int:
        """Columns per block: ``blocksize``, rounded down to whole N:M groups."""
        if not pattern.is_nm:
            return self.blocksize
        return max(pattern.m, self.blocksize - self.blocksize % pattern.m)

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


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp x mean(diag H).

    A rank-deficient Hessian (few tokens, dead features) can make Cholesky fail; the
    dampening is then raised tenfold and retried (see :func:`damped_factor`).
    """

    def upper_inverse(matrix: torch.Tensor) -> torch.Tensor | None:
        factor, info = torch.linalg.cholesky_ex(matrix)
        if info != 0:
            return None
        inverse = torch.cholesky_inverse(factor)
        del factor  # at most two in x in results alive beside H (the memory plan's budget)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        return upper if info == 0 else None

    return damped_factor(H, upper_inverse, first_damp=percdamp, what="the Hessian")
