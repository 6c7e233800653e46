"""The statistics behind ``compare`` and ``bench``: is a measured difference real?

**Paired bootstrap intervals** (``compare``). Every model of a comparison is scored on the
*same* examples and the *same* perplexity chunks, so the question "is A better than B" is
about the per-item differences, not about two independent accuracies: two pruned models that
agree on 90% of the examples differ far less than their separate standard errors suggest. The
bootstrap resamples the items (with replacement, the same items for both models) and reads
the 95% interval off the resampled statistic; an interval that excludes "no difference" (0,
or a ratio of 1) is significant.

A suite of tasks is resampled *within* each task (a stratified bootstrap) and combined with
the weights of the suite mean, so a task with few examples contributes its own uncertainty.
Perplexity is ``exp(mean chunk NLL)``, so the ratio of two perplexities on resampled chunks is
``exp(mean of the paired NLL differences)``: the same machinery with an exponential at the end.
The share of the base method's gap to dense that a method closes (:func:`gap_closed`) is a
ratio of two such means, resampled on the same chunks for all three models.

**An exact rank test** (``bench``). Whether one backend's timings tend to be smaller than
another's: the two-sided Mann-Whitney U test (:func:`rank_test_p`), with the exact
distribution of U, so that it holds for the handful of repeats a benchmark runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from sdsprune.errors import SdspruneError

# Fixed, so that an interval is reproducible and every comparison uses the same resamples.
RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
# Resamples drawn at once: bounds the index matrix (block x items) to a few tens of MB.
_BLOCK = 250


@dataclass(frozen=True)
class Stratum:
    """One task's (or corpus's) paired per-item values and its weight in the statistic."""

    method: np.ndarray  # per item: correctness (0/1) or chunk NLL, of the method
    reference: np.ndarray  # the same items, the reference model
    weight: float = 1.0


@dataclass(frozen=True)
class Interval:
    """A paired difference (or ratio) with its bootstrap interval.

    ``null`` is the value meaning "no difference": 0 for differences, 1 for ratios.
    """

    estimate: float
    low: float
    high: float
    null: float
    resamples: int
    items: int

    @property
    def significant(self) -> bool:
        return not self.low <= self.null <= self.high

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def accuracy_difference(
    strata: Sequence[Stratum], *, resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """Weighted mean over strata of (method accuracy - reference accuracy), with its interval.

    One stratum per task, weighted as in the suite mean (1/T each; a composite task's
    subtasks share their task's weight). Values are 0/1 correctness per example.
    """
    differences, weights = _paired_differences(strata)
    indices = draw_indices([len(d) for d in differences], resamples, seed)
    return _interval(differences, weights, indices, null=0.0, transform=None)


def perplexity_ratio(
    method_nll: Sequence[float],
    reference_nll: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """PPL(method) / PPL(reference) on the same chunks, with its interval over resampled chunks.

    Each perplexity is ``exp(mean chunk NLL)`` (the reference protocol), so the ratio is
    ``exp(mean(method NLL - reference NLL))``.
    """
    differences, weights = _paired_differences(
        [Stratum(np.asarray(method_nll), np.asarray(reference_nll))]
    )
    indices = draw_indices([len(differences[0])], resamples, seed)
    return _interval(differences, weights, indices, null=1.0, transform=np.exp)


def gap_closed(
    method_nll: Sequence[float],
    base_nll: Sequence[float],
    dense_nll: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval | None:
    """Share of the base's log-perplexity gap to dense that the method closes, with its interval.

    ``ln(PPL_base / PPL_method) / ln(PPL_base / PPL_dense)``: 1 means the method reaches dense,
    0 no better than its base, below 0 worse than its base. A ratio to the base does not say
    how near dense the method comes (0.64x closes all of a 1.56x gap but a third of a 4x
    one); the share says how much of what pruning lost the method recovers.

    Log-perplexities are mean chunk NLLs, so the share is ``mean(base - method) / mean(base -
    dense)``, and each resample draws the same chunks for all three models. The share exists
    only while the base is worse than dense: None unless that gap is itself significant (the
    lower end of its interval above 0). Then at most about (1 - LEVEL) / 2 of the resamples have
    no gap; they are left out of the interval, and ``resamples`` counts those kept.
    """
    (recovered, gap), _ = _paired_differences(
        [
            Stratum(np.asarray(base_nll), np.asarray(method_nll)),
            Stratum(np.asarray(base_nll), np.asarray(dense_nll)),
        ]
    )
    indices = draw_indices([len(gap)], resamples, seed)
    resampled_gap = resampled_statistic([gap], [1.0], indices)
    if percentile_interval(resampled_gap)[0] <= 0:
        return None
    kept = resampled_gap > 0
    shares = resampled_statistic([recovered], [1.0], indices)[kept] / resampled_gap[kept]
    low, high = percentile_interval(shares)
    return Interval(
        estimate=float(recovered.mean() / gap.mean()),
        low=low,
        high=high,
        null=0.0,
        resamples=int(kept.sum()),
        items=len(gap),
    )


def draw_indices(sizes: Sequence[int], resamples: int, seed: int) -> list[np.ndarray]:
    """Resample indices per stratum (``resamples x size`` each) from one seeded generator.

    Drawn in blocks of resamples, stratum after stratum within a block, so memory stays
    bounded; the same sizes and seed always give the same indices.
    """
    if resamples < 1:
        raise SdspruneError(f"the bootstrap needs at least one resample (got {resamples})")
    rng = np.random.default_rng(seed)
    blocks: list[list[np.ndarray]] = [[] for _ in sizes]
    for start in range(0, resamples, _BLOCK):
        count = min(_BLOCK, resamples - start)
        for stratum, size in enumerate(sizes):
            blocks[stratum].append(rng.integers(0, size, size=(count, size)))
    return [np.concatenate(parts) for parts in blocks]


def resampled_statistic(
    differences: Sequence[np.ndarray], weights: Sequence[float], indices: Sequence[np.ndarray]
) -> np.ndarray:
    """For each resample: the weighted sum over strata of the mean resampled difference."""
    total = np.zeros(len(indices[0]))
    for values, weight, rows in zip(differences, weights, indices, strict=True):
        total += weight * values[rows].mean(axis=1)
    return total


def percentile_interval(resampled: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of the resampled statistic (linear interpolation)."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def _paired_differences(strata: Sequence[Stratum]) -> tuple[list[np.ndarray], list[float]]:
    if not strata:
        raise SdspruneError("a paired comparison needs at least one task or corpus")
    differences, weights = [], []
    for stratum in strata:
        method = np.asarray(stratum.method, dtype=float)
        reference = np.asarray(stratum.reference, dtype=float)
        if method.shape != reference.shape or method.ndim != 1 or method.size == 0:
            raise SdspruneError(
                f"paired values must cover the same items (got {method.shape} and "
                f"{reference.shape})"
            )
        differences.append(method - reference)
        weights.append(float(stratum.weight))
    return differences, weights


def _interval(differences, weights, indices, *, null: float, transform) -> Interval:
    estimate = sum(w * float(d.mean()) for d, w in zip(differences, weights, strict=True))
    low, high = percentile_interval(resampled_statistic(differences, weights, indices))
    if transform is not None:
        estimate, low, high = (float(transform(v)) for v in (estimate, low, high))
    return Interval(
        estimate=estimate,
        low=low,
        high=high,
        null=null,
        resamples=len(indices[0]),
        items=sum(len(d) for d in differences),
    )


def rank_test_p(first: list[float], second: list[float]) -> float:
    """Two-sided exact p-value of the Mann-Whitney U test (ties count one half)."""
    wins = sum((a < b) + 0.5 * (a == b) for a in first for b in second)
    counts = u_distribution(len(first), len(second))
    total = sum(counts)
    at_most = sum(counts[: math.floor(wins) + 1]) / total
    at_least = sum(counts[math.ceil(wins) :]) / total
    return min(1.0, 2 * min(at_most, at_least))


@functools.cache
def u_distribution(n: int, m: int) -> tuple[int, ...]:
    """How many of the C(n+m, n) orderings of two samples give U = 0, 1, ..., n·m: the
    coefficients of the Gaussian binomial [n+m choose n]_q, as a product of
    (1 - q^(m+i)) / (1 - q^i) for i = 1..n (each division exact)."""
    poly = [1] + [0] * (n * m)
    for i in range(1, n + 1):
        for k in range(len(poly) - 1, m + i - 1, -1):  # times (1 - q^(m+i))
            poly[k] -= poly[k - m - i]
        for k in range(i, len(poly)):  # divided by (1 - q^i)
            poly[k] += poly[k - i]
    return tuple(poly)
