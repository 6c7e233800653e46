"""Paired bootstrap intervals and the rank test, checked by hand or by enumeration on cases
small enough to write out."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sdsprune import stats
from sdsprune.errors import SdspruneError
from sdsprune.stats import Stratum, accuracy_difference, perplexity_ratio, rank_test_p

# Per-example differences method - reference: [+1, 0, -1].
METHOD = np.array([1, 1, 0])
REFERENCE = np.array([0, 1, 1])
# Five resamples of the three examples, written out.
INDICES = np.array([[0, 0, 0], [0, 1, 2], [2, 2, 1], [1, 1, 1], [0, 2, 2]])


def test_resampled_interval_equals_a_hand_computation():
    differences = [METHOD - REFERENCE]
    resampled = stats.resampled_statistic(differences, [1.0], [INDICES])
    # Means of [1,1,1], [1,0,-1], [-1,-1,0], [0,0,0], [1,-1,-1]:
    assert resampled == pytest.approx([1, 0, -2 / 3, 0, -1 / 3])
    low, high = stats.percentile_interval(resampled)
    # Sorted: -2/3, -1/3, 0, 0, 1. The 2.5th percentile sits at position 0.025 * 4 = 0.1,
    # the 97.5th at 3.9 (linear interpolation between neighbours).
    assert low == pytest.approx(-2 / 3 + 0.1 * (1 / 3))
    assert high == pytest.approx(0 + 0.9 * (1 - 0))


def test_strata_are_resampled_separately_and_weighted():
    second = [np.array([1.0, 1.0]), np.array([0.0, 1.0])]  # differences [1, 0]
    rows = np.array([[0, 0], [1, 1], [0, 1], [1, 0], [1, 1]])
    resampled = stats.resampled_statistic(
        [METHOD - REFERENCE, second[0] - second[1]], [0.5, 0.5], [INDICES, rows]
    )
    first_means = np.array([1, 0, -2 / 3, 0, -1 / 3])
    second_means = np.array([1, 0, 0.5, 0.5, 0])
    assert resampled == pytest.approx(0.5 * first_means + 0.5 * second_means)


def test_public_function_uses_the_seeded_draws():
    """The interval is the percentile interval of the resamples ``draw_indices`` gives, and
    the estimate is the difference on all examples (not a bootstrap mean)."""
    interval = accuracy_difference([Stratum(METHOD, REFERENCE)], resamples=5, seed=3)
    indices = stats.draw_indices([3], 5, 3)
    expected = stats.percentile_interval(
        stats.resampled_statistic([METHOD - REFERENCE], [1.0], indices)
    )
    assert (interval.low, interval.high) == pytest.approx(expected)
    assert interval.estimate == 0.0 and interval.items == 3 and interval.resamples == 5
    again = accuracy_difference([Stratum(METHOD, REFERENCE)], resamples=5, seed=3)
    assert again == interval
    # Drawn in blocks: more resamples than one block still give one index row each.
    assert stats.draw_indices([4, 7], 600, 0)[1].shape == (600, 7)


def test_identical_methods_give_an_interval_containing_zero():
    rng = np.random.default_rng(1)
    correct = rng.integers(0, 2, size=300)
    interval = accuracy_difference([Stratum(correct, correct)])
    assert interval.estimate == 0 and interval.low <= 0 <= interval.high
    assert not interval.significant
    nll = rng.normal(3.0, 0.2, size=40)
    ratio = perplexity_ratio(nll, nll)
    assert ratio.estimate == 1.0 and ratio.low <= 1 <= ratio.high and not ratio.significant


def test_a_consistent_difference_is_significant():
    reference = np.zeros(200)
    method = np.where(np.arange(200) % 4 == 0, 1.0, 0.0)  # right on a quarter more examples
    interval = accuracy_difference([Stratum(method, reference)])
    assert interval.estimate == pytest.approx(0.25)
    assert 0 < interval.low < 0.25 < interval.high and interval.significant


def test_perplexity_ratio_is_the_ratio_of_perplexities():
    reference = np.array([2.0, 3.0, 4.0, 2.5])
    method = reference - np.array([0.1, 0.2, 0.1, 0.2])
    ratio = perplexity_ratio(method, reference)
    ppl = math.exp(method.mean()) / math.exp(reference.mean())
    assert ratio.estimate == pytest.approx(ppl)
    # Every chunk improves by 0.1 or 0.2 nats: the interval lies within exp(-0.2)..exp(-0.1).
    bounds = (math.exp(-0.2) - 1e-12, math.exp(-0.1) + 1e-12)  # up to rounding
    assert bounds[0] <= ratio.low <= ratio.estimate <= ratio.high <= bounds[1]
    assert ratio.significant and ratio.to_dict()["significant"] is True


def test_unpaired_values_are_refused():
    with pytest.raises(SdspruneError, match="same items"):
        accuracy_difference([Stratum(np.ones(3), np.ones(4))])
    with pytest.raises(SdspruneError, match="at least one"):
        accuracy_difference([])


@pytest.mark.parametrize("sizes", [(4, 4), (5, 5), (3, 6), (6, 2)])
def test_rank_test_p_equals_enumerating_every_ordering(sizes):
    n, m = sizes
    rng = np.random.default_rng(n * 10 + m)
    first = rng.random(n).tolist()
    second = (rng.random(m) + 0.3).tolist()
    pooled = first + second

    def wins(chosen):
        a = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(n + m) if i not in chosen]
        return sum(x < y for x in a for y in b)

    observed = wins(range(n))
    null = [wins(c) for c in itertools.combinations(range(n + m), n)]
    low = sum(u <= observed for u in null) / len(null)
    high = sum(u >= observed for u in null) / len(null)
    assert rank_test_p(first, second) == pytest.approx(min(1.0, 2 * min(low, high)))


# Per-chunk NLLs of a base pruner, the method built on it and the dense model.
BASE_NLL = np.array([4.0, 4.4, 4.2, 4.6])
METHOD_NLL = np.array([3.5, 3.9, 3.8, 4.0])
DENSE_NLL = np.array([2.9, 3.0, 3.1, 3.2])


def test_gap_closed_equals_a_hand_computation():
    """Log-perplexities are mean chunk NLLs: 4.3 (base), 3.8 (method), 3.05 (dense), so the
    method closes 0.5 / 1.25 = 40% of the gap; each resample draws the same chunks for all."""
    share = stats.gap_closed(METHOD_NLL, BASE_NLL, DENSE_NLL, resamples=50, seed=3)
    ppl = {
        name: math.exp(nll.mean())
        for name, nll in [("base", BASE_NLL), ("method", METHOD_NLL), ("dense", DENSE_NLL)]
    }
    by_hand = math.log(ppl["base"] / ppl["method"]) / math.log(ppl["base"] / ppl["dense"])
    assert abs(share.estimate - 0.4) < 1e-9 and abs(share.estimate - by_hand) < 1e-9
    (rows,) = stats.draw_indices([4], 50, 3)
    resampled = [
        (BASE_NLL[r] - METHOD_NLL[r]).mean() / (BASE_NLL[r] - DENSE_NLL[r]).mean() for r in rows
    ]
    assert (share.low, share.high) == pytest.approx(stats.percentile_interval(np.array(resampled)))
    assert share.low <= share.estimate <= share.high
    assert share.null == 0.0 and share.significant and share.resamples == 50 and share.items == 4
    assert share.to_dict()["significant"] is True


def test_gap_closed_of_identical_chunks_has_a_zero_width_interval():
    """The worked example: base 72.22, SDS 46.54, dense 18.30 closes 32% of the gap."""
    base, method, dense = (np.full(6, math.log(ppl)) for ppl in (72.22, 46.54, 18.30))
    share = stats.gap_closed(method, base, dense)
    expected = math.log(72.22 / 46.54) / math.log(72.22 / 18.30)
    assert abs(share.estimate - expected) < 1e-9 and round(share.estimate, 3) == 0.320
    assert share.low == pytest.approx(share.estimate, abs=1e-12)
    assert share.high == pytest.approx(share.estimate, abs=1e-12)
    worse = stats.gap_closed(base + 0.1, base, dense)  # worse than the base: a negative share
    assert worse.estimate < 0 and worse.high < 0


def test_gap_closed_needs_a_clear_gap_and_paired_chunks():
    """No share of a gap that may not exist: the base as good as dense gives None."""
    assert stats.gap_closed(METHOD_NLL, DENSE_NLL, DENSE_NLL) is None
    noisy = DENSE_NLL + np.array([0.3, -0.3, 0.2, -0.2])  # no better or worse on average
    assert stats.gap_closed(METHOD_NLL, noisy, DENSE_NLL) is None
    with pytest.raises(SdspruneError, match="same items"):
        stats.gap_closed(METHOD_NLL, BASE_NLL, DENSE_NLL[:3])


def test_gap_closed_leaves_out_resamples_without_a_gap():
    """One chunk on which the base beats dense: resamples that draw it four times or more
    (under 2.5% of them) have no gap to close; the interval is read from the others."""
    dense = np.full(20, 3.0)
    base = dense + np.r_[np.full(19, 0.1), -0.5]
    method = base - 0.05
    share = stats.gap_closed(method, base, dense)
    (rows,) = stats.draw_indices([20], stats.RESAMPLES, stats.SEED)
    gaps = (base[rows] - dense[rows]).mean(axis=1)
    kept = gaps > 0
    assert 0 < stats.RESAMPLES - share.resamples == (~kept).sum() < 0.025 * stats.RESAMPLES
    expected = stats.percentile_interval(0.05 / gaps[kept])
    assert (share.low, share.high) == pytest.approx(expected)
    assert share.estimate == pytest.approx(0.05 / ((19 * 0.1 - 0.5) / 20))
