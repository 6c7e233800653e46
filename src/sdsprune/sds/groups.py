"""Exact N:M pattern choice per group under the full second-moment matrix.

Projected gradient keeps the largest |w| of each group of M inputs: a magnitude rule that
ignores how inputs correlate. Here each group is re-solved exactly instead: with every
other weight of the row fixed, the layer error ‖(a − w) X‖² is a quadratic in the group's M
weights, so for each of the C(M, N) ways to zero N of them the best values of the survivors
have a closed form, and the pattern with the lowest error wins. One sweep visits every group
once (block coordinate descent), all rows and all patterns at a time; the error never
increases, because a group only changes when a candidate lowers it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from sdsprune.pruners.patterns import SparsityPattern


def refine_groups(
    weight: torch.Tensor,
    dense: torch.Tensor,
    gram: torch.Tensor,
    pattern: SparsityPattern,
    sweeps: int = 1,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight`` (N:M sparse) with each group's pattern and values re-chosen ``sweeps``
    times to minimise tr(W G Wᵀ) − 2 tr(T Wᵀ), T = ``target`` (default W_d G: the error
    tr((W_d − W) G (W_d − W)ᵀ) up to a constant; A G_ti for dense-input targets)."""
    if sweeps == 0 or not pattern.is_nm:
        return weight
    work = weight.double().clone()
    gram64 = gram.double()
    target = dense.double() @ gram64 if target is None else target.double()
    residual = target - work @ gram64  # the negative half-gradient, kept up to date
    patterns = _Patterns.all(pattern, gram64.device)
    damping = 1e-9 * float(torch.diagonal(gram64).mean())
    width = max(pattern.m, (BLOCK_COLUMNS // pattern.m) * pattern.m)
    for _ in range(sweeps):
        for first in range(0, work.shape[1], width):
            block = slice(first, min(first + width, work.shape[1]))
            _sweep_block(work, residual, gram64, block, pattern.m, patterns, damping)
    return work.to(weight.dtype)


# Columns whose groups are updated before the rest of the residual is: each group's change
# touches only the block's residual columns, and the other columns get the block's summed
# change in one matmul (SparseGPT's lazy batch update); updating the whole residual after
# every group made the search memory-bound (a 4096 x 4096 layer: 1024 full passes).
BLOCK_COLUMNS = 128


def _sweep_block(work, residual, gram, block: slice, m: int, patterns, damping) -> None:
    """Re-choose every group inside the column ``block``, then bring the residual up to date."""
    before = work[:, block].clone()
    local = residual[:, block].clone()
    gram_block = gram[block, block]
    for offset in range(0, before.shape[1], m):
        cols = slice(offset, offset + m)
        current = work[:, block][:, cols]
        new = patterns.best_values(current, local[:, cols], gram_block[cols, cols], damping)
        local += (current - new) @ gram_block[cols, :]
        work[:, block.start + offset : block.start + offset + m] = new
    residual += (before - work[:, block]) @ gram[block, :]


@dataclass
class _Patterns:
    """Every way to keep M − N of a group's M positions: survivor and zero indices."""

    keep: torch.Tensor  # patterns x (M − N)
    zero: torch.Tensor  # patterns x N

    @classmethod
    def all(cls, pattern: SparsityPattern, device: torch.device) -> _Patterns:
        keeps, zeros = [], []
        for kept in itertools.combinations(range(pattern.m), pattern.m - pattern.n):
            keeps.append(list(kept))
            zeros.append([i for i in range(pattern.m) if i not in kept])
        return cls(torch.tensor(keeps, device=device), torch.tensor(zeros, device=device))

    def best_values(
        self, current: torch.Tensor, residual: torch.Tensor, block: torch.Tensor, damping: float
    ) -> torch.Tensor:
        """The group's new values for every row (rows x M): the best pattern's optimum, or
        the current values where no pattern lowers the error.

        With g the group's part of T − W G (G d for d = a − w when T = a G), H = G_group,group and δ = w − v the change of
        the group's values, the error changes by 2 δᵀg + δᵀHδ; zeroing positions Z and
        keeping T, the optimum is v_T = w_T + H_TT⁻¹ (g_T + H_TZ w_Z).
        """
        h_tt = block[self.keep[:, :, None], self.keep[:, None, :]]  # P x T x T
        h_tz = block[self.keep[:, :, None], self.zero[:, None, :]]  # P x T x Z
        eye = torch.eye(h_tt.shape[-1], dtype=block.dtype, device=block.device)
        rhs = residual[:, self.keep] + torch.einsum("rpz,ptz->rpt", current[:, self.zero], h_tz)
        systems = (h_tt + damping * eye)[:, None]  # P x 1 x T x T, shared by every row
        step = torch.linalg.solve(systems, rhs.transpose(0, 1).unsqueeze(-1))  # P x rows x T x 1
        values = torch.zeros(current.shape[0], *self.keep.shape[:1], current.shape[1],
                             dtype=current.dtype, device=current.device)  # fmt: skip
        survivors = current[:, self.keep] + step.squeeze(-1).transpose(0, 1)  # rows x P x T
        values.scatter_(2, self.keep.expand(current.shape[0], -1, -1), survivors)
        delta = current[:, None, :] - values
        change = 2 * (delta * residual[:, None, :]).sum(-1)
        change += torch.einsum("rpi,ij,rpj->rp", delta, block, delta)
        best = change.min(dim=1)
        chosen = values[torch.arange(current.shape[0], device=current.device), best.indices]
        return torch.where((best.values < 0)[:, None], chosen, current)
