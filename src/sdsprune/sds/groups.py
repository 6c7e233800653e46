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
    solver = _GroupSolver(gram64, pattern)
    width = max(pattern.m, (BLOCK_COLUMNS // pattern.m) * pattern.m)
    for _ in range(sweeps):
        for first in range(0, work.shape[1], width):
            block = slice(first, min(first + width, work.shape[1]))
            _sweep_block(work, residual, gram64, block, solver)
    return work.to(weight.dtype)


# Columns whose groups are updated before the rest of the residual is: each group's change
# touches only the block's residual columns, and the other columns get the block's summed
# change in one matmul (SparseGPT's lazy batch update); updating the whole residual after
# every group made the search memory-bound (a 4096 x 4096 layer: 1024 full passes).
BLOCK_COLUMNS = 128


def _sweep_block(work, residual, gram, block: slice, solver: _GroupSolver) -> None:
    """Re-choose every group inside the column ``block``, then bring the residual up to date."""
    m = solver.m
    before = work[:, block].clone()
    local = residual[:, block].clone()
    gram_block = gram[block, block]
    for offset in range(0, before.shape[1], m):
        cols = slice(offset, offset + m)
        group = (block.start + offset) // m
        current = work[:, block.start + offset : block.start + offset + m]
        new = solver.best_values(group, current, local[:, cols])
        local += (current - new) @ gram_block[cols, :]
        work[:, block.start + offset : block.start + offset + m] = new
    residual += (before - work[:, block]) @ gram[block, :]


class _GroupSolver:
    """Per group of M inputs and per pattern (which M − N positions survive), the pieces of
    the closed-form optimum, computed for all groups at once before the sweep.

    With g the group's part of T − W G (G d for d = a − w when T = a G), H = G_group,group
    and δ = w − v the change of the group's values, the error changes by 2 δᵀg + δᵀHδ;
    zeroing positions Z and keeping T, the optimum is v_T = w_T + H_TT⁻¹ (g_T + H_TZ w_Z).
    """

    def __init__(self, gram: torch.Tensor, pattern: SparsityPattern):
        self.m = m = pattern.m
        keeps = list(itertools.combinations(range(m), m - pattern.n))
        zeros = [[i for i in range(m) if i not in kept] for kept in keeps]
        self.keep = torch.tensor(keeps, device=gram.device)  # P x T
        self.zero = torch.tensor(zeros, device=gram.device)  # P x Z
        groups = gram.shape[0] // m
        self.blocks = gram.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        h_tt = self.blocks[:, self.keep[:, :, None], self.keep[:, None, :]]  # groups x P x T x T
        damping = 1e-9 * float(torch.diagonal(gram).mean())  # a dead input must not break it
        eye = torch.eye(h_tt.shape[-1], dtype=gram.dtype, device=gram.device)
        self.inverse = torch.linalg.inv(h_tt + damping * eye)
        self.h_tz = self.blocks[:, self.keep[:, :, None], self.zero[:, None, :]]  # g x P x T x Z

    def best_values(self, group: int, current: torch.Tensor, residual: torch.Tensor):
        """The group's new values for every row (rows x M): the best pattern's optimum, or
        the current values where no pattern lowers the error."""
        rows = current.shape[0]
        rhs = residual[:, self.keep] + torch.einsum(
            "rpz,ptz->rpt", current[:, self.zero], self.h_tz[group]
        )
        survivors = current[:, self.keep] + torch.einsum("rpt,pst->rps", rhs, self.inverse[group])
        values = current.new_zeros(rows, self.keep.shape[0], self.m)
        values.scatter_(2, self.keep.expand(rows, -1, -1), survivors)
        delta = current[:, None, :] - values
        change = ((2 * residual[:, None, :] + delta @ self.blocks[group]) * delta).sum(-1)
        best = change.min(dim=1)
        chosen = values[torch.arange(rows, device=current.device), best.indices]
        return torch.where((best.values < 0)[:, None], chosen, current)
