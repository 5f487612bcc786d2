"""Tests of enumeration, reallocation, intervals, the cost model and the sampling strategies."""

import itertools
import math

import numpy as np
import pytest

from lib.config import format_interval_key
from lib.search import (
    FLOPS_SCALE,
    AdditiveCost,
    Candidate,
    CandidateBatch,
    Choices,
    IntervalGrid,
    SearchError,
    choice_counts,
    count_enumerated,
    enumerate_candidates,
    enumerate_distributions,
    iteration_search,
    reallocate,
    scores_for_embed,
    top_per_interval,
)
from model.supernet import Supernet
from search_helpers import DEMO, random_block_scores

TINY = Choices(embed_dim=(192, 216, 240), depth=(12, 13, 14), num_heads=(3, 4), mlp_ratio=(3.5, 4.0))
SMALL = Choices(embed_dim=(320, 384, 448), depth=(13, 14), num_heads=(5, 6, 7), mlp_ratio=(3.0, 3.5, 4.0))


@pytest.fixture(scope="module")
def demo_supernet():
    return Supernet(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0,
                    gp=True, relative_position=True, change_qkv=True)


# ---------------------------------------------------------------------------------------------
# Distributions


@pytest.mark.parametrize("depth,num_choices", [(0, 1), (1, 3), (4, 2), (12, 2), (13, 3), (16, 3), (6, 4)])
def test_distribution_count_is_stars_and_bars(depth, num_choices):
    distributions = enumerate_distributions(depth, num_choices)

    assert len(distributions) == math.comb(depth + num_choices - 1, num_choices - 1)
    assert len(set(distributions)) == len(distributions)
    assert all(len(counts) == num_choices and sum(counts) == depth for counts in distributions)
    assert all(min(counts) >= 0 for counts in distributions)


def test_distributions_include_empty_middle_choice():
    assert (2, 0, 2) in enumerate_distributions(4, 3)
    assert (2, 0, 2) not in enumerate_distributions(4, 3, legacy=True)


@pytest.mark.parametrize("depth,num_choices", [(1, 3), (4, 2), (12, 2), (13, 3), (16, 3), (6, 4)])
def test_legacy_distributions_follow_reference_rule(depth, num_choices):
    legacy = enumerate_distributions(depth, num_choices, legacy=True)

    # Cut points without repetition: C(depth + 1, k - 1) splits, and every middle choice gets a layer.
    assert len(legacy) == math.comb(depth + 1, num_choices - 1)
    expected = {counts for counts in enumerate_distributions(depth, num_choices) if min(counts[1:-1], default=1) >= 1}
    assert set(legacy) == expected


def test_distributions_reject_invalid_input():
    with pytest.raises(SearchError, match="depth -1"):
        enumerate_distributions(-1, 2)
    with pytest.raises(SearchError, match="0 choices"):
        enumerate_distributions(3, 0)


# ---------------------------------------------------------------------------------------------
# Reallocation


def test_reallocation_follows_each_choice_scores():
    scores = [None, np.array([0.3, 1.0, 0.2, 0.8]), np.array([0.1, 0.9, 0.5, 0.2])]
    # Choice 5 goes to layer 1 (0.9); choice 4 to the best two of the rest by its scores: 3 and 0.
    assert reallocate((1, 2, 1), (3, 4, 5), scores) == [4, 5, 3, 4]


def test_reallocation_puts_larger_choices_on_higher_scores():
    rng = np.random.default_rng(0)
    choices = (1.0, 2.0, 3.0, 4.0)
    for _ in range(200):
        depth = int(rng.integers(1, 10))
        shared = rng.random(depth)
        counts = list(rng.multinomial(depth, [0.25] * 4))
        assignment = reallocate(counts, choices, [None, shared, shared, shared])

        assert choice_counts(assignment, list(choices)) == counts
        for a, b in itertools.combinations(range(depth), 2):
            if shared[a] > shared[b]:
                assert assignment[a] >= assignment[b]
            elif shared[a] < shared[b]:
                assert assignment[a] <= assignment[b]


def test_reallocation_prefers_deeper_layer_on_ties():
    flat = np.ones(4)
    assert reallocate((3, 1), (3, 4), [None, flat]) == [3, 3, 3, 4]
    assert reallocate((1, 2, 1), (1, 2, 3), [None, flat, flat]) == [1, 2, 2, 3]


def test_deeper_is_better_fills_layers_in_order():
    assert reallocate((2, 0, 3), (3.0, 3.5, 4.0), None) == [3.0, 3.0, 4.0, 4.0, 4.0]


def test_scores_for_embed_reports_missing_key():
    with pytest.raises(SearchError, match="embed dim 200 and choice 4"):
        scores_for_embed({(192, 4): np.ones(3)}, 200, (3, 4))
    assert scores_for_embed(None, 192, (3, 4)) is None


# ---------------------------------------------------------------------------------------------
# Enumeration


def test_tiny_enumeration_has_reference_count():
    heads, mlp = random_block_scores(TINY, seed=0)
    assert len(enumerate_candidates(TINY, heads, mlp)) == 1770
    assert len(enumerate_candidates(TINY, heads, mlp, legacy=True)) == 1770
    assert count_enumerated(TINY) == count_enumerated(TINY, legacy=True) == 1770


@pytest.mark.parametrize("legacy", [False, True])
def test_enumeration_count_matches_closed_form(legacy):
    heads, mlp = random_block_scores(SMALL, seed=1)
    batch = enumerate_candidates(SMALL, heads, mlp, legacy=legacy)

    per_embed = sum(
        (math.comb(d + 1, 2) if legacy else math.comb(d + 2, 2)) ** 2 for d in SMALL.depth
    )
    assert len(batch) == count_enumerated(SMALL, legacy) == 3 * per_embed
    rows = {(int(e), int(d), tuple(h), tuple(r))
            for e, d, h, r in zip(batch.embed_dim, batch.depth, batch.num_heads, batch.mlp_ratio)}
    assert len(rows) == len(batch)


def test_enumerated_candidates_are_reallocated():
    heads, mlp = random_block_scores(DEMO, seed=2)
    batch = enumerate_candidates(DEMO, heads, mlp)
    for row in range(0, len(batch), 7):
        candidate = batch.candidate(row)
        head_counts = choice_counts(candidate.num_heads, DEMO.num_heads)
        ratio_counts = choice_counts(candidate.mlp_ratio, DEMO.mlp_ratio)
        assert list(candidate.num_heads) == reallocate(
            head_counts, DEMO.num_heads, scores_for_embed(heads, candidate.embed_dim, DEMO.num_heads))
        assert list(candidate.mlp_ratio) == reallocate(
            ratio_counts, DEMO.mlp_ratio, scores_for_embed(mlp, candidate.embed_dim, DEMO.mlp_ratio))


def test_candidate_batch_round_trip():
    candidates = [Candidate(96, (1, 2, 2), (3.0, 4.0, 3.5)), Candidate(128, (2,) * 4, (4.0,) * 4)]
    batch = CandidateBatch.from_candidates(candidates)
    assert [batch.candidate(i) for i in range(2)] == candidates
    assert batch.num_heads[0, 3] == 0
    assert batch.mlp_ratio[0, 3] == 0
    assert Candidate.from_dict(candidates[0].to_dict()) == candidates[0]
    assert list(candidates[0].to_dict()) == ["layer_num", "mlp_ratio", "num_heads", "embed_dim"]


# ---------------------------------------------------------------------------------------------
# Intervals


@pytest.mark.parametrize("lower,upper,width,keys", [
    (5, 12, 1.0, ["6.0", "7.0", "8.0", "9.0", "10.0", "11.0", "12.0"]),
    (13, 33, 5.0, ["18.0", "23.0", "28.0", "33.0"]),
    (30, 70, 12.0, ["42.0", "54.0", "66.0"]),
    (0.3, 0.9, 0.1, ["0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]),
    (1.2, 2.0, 0.25, ["1.45", "1.7", "1.95"]),
])
def test_interval_keys_are_clean_decimals(lower, upper, width, keys):
    grid = IntervalGrid(lower, upper, width)
    assert grid.keys == keys
    assert [format_interval_key(key) for key in grid.keys] == keys


def test_interval_index_boundaries():
    grid = IntervalGrid(0.3, 0.9, 0.1)
    raw = np.array([299_999, 300_000, 399_999, 400_000, 899_999, 900_000, 10**7])
    assert grid.index(raw).tolist() == [-1, 0, 0, 1, 5, -1, -1]


def test_interval_grid_in_flops():
    grid = IntervalGrid(1.2, 2.0, 0.4, scale=FLOPS_SCALE, unit="G")
    assert grid.keys == ["1.6", "2.0"]
    assert grid.index(np.array([1.38e9, 1.6e9, 2.1e9])).tolist() == [0, 1, -1]
    assert grid.describe(0) == "1.2-1.6 G"


def test_interval_grid_rejects_bad_limits():
    with pytest.raises(SearchError, match="width must be positive"):
        IntervalGrid(5, 12, 0)
    with pytest.raises(SearchError, match="no interval of width 5 M fits"):
        IntervalGrid(5, 8, 5)
    with pytest.raises(SearchError, match="must be a number"):
        IntervalGrid("five", 12, 1)


def test_top_per_interval_breaks_ties_by_order():
    interval = np.array([0, 0, 1, 0, -1, 1])
    scores = np.array([1.0, 3.0, 2.0, 3.0, 9.0, 2.0])
    assert top_per_interval(interval, scores, 2) == {0: [1, 3], 1: [2, 5]}
    assert top_per_interval(interval, scores, 1) == {0: [1], 1: [2]}


# ---------------------------------------------------------------------------------------------
# Cost model


def test_additive_cost_matches_supernet_counts(demo_supernet):
    heads, mlp = random_block_scores(DEMO, seed=3)
    batch = enumerate_candidates(DEMO, heads, mlp)
    params = AdditiveCost(demo_supernet.num_params, DEMO, "parameter count")(batch)
    flops = AdditiveCost(demo_supernet.flops, DEMO, "FLOPs")(batch)

    for row in range(len(batch)):
        candidate = batch.candidate(row).to_dict()
        assert params[row] == demo_supernet.num_params(candidate)
        assert flops[row] == pytest.approx(demo_supernet.flops(candidate), rel=1e-12)


def test_additive_cost_rejects_non_additive_function():
    def squared_depth(candidate):
        return candidate["layer_num"] ** 2

    with pytest.raises(SearchError, match="not a sum of per-layer terms"):
        AdditiveCost(squared_depth, DEMO, "squared depth")


def test_additive_cost_rejects_choice_outside_space(demo_supernet):
    cost = AdditiveCost(demo_supernet.num_params, DEMO, "parameter count")
    with pytest.raises(SearchError, match="mlp ratio 2.0 is not a choice"):
        cost(CandidateBatch.from_candidates([Candidate(96, (1, 2, 2), (3.0, 2.0, 4.0))]))
    with pytest.raises(SearchError, match="embed dim 100"):
        cost(CandidateBatch.from_candidates([Candidate(100, (1, 2, 2), (3.0, 3.0, 4.0))]))


# ---------------------------------------------------------------------------------------------
# Strategies


def synthetic_score(batch: CandidateBatch) -> np.ndarray:
    """A score that prefers wide heads early and wide mlps late, so reallocation matters."""
    layers = np.arange(batch.num_heads.shape[1])
    return (batch.num_heads / (1.0 + layers)).sum(1) + (batch.mlp_ratio * layers).sum(1) + batch.embed_dim / 100


def test_iteration_search_keeps_best_per_interval(demo_supernet):
    heads, mlp = random_block_scores(DEMO, seed=4)
    cost = AdditiveCost(demo_supernet.num_params, DEMO, "parameter count")
    grid = IntervalGrid(0.3, 0.9, 0.1)

    result = iteration_search(DEMO, synthetic_score, cost, grid, heads, mlp, candidates_per_interval=2)

    assert len(result.candidates) == count_enumerated(DEMO)
    for interval, rows in result.selected.items():
        members = np.flatnonzero(result.interval_index == interval)
        best = members[np.argsort(-result.scores[members], kind="stable")][:2]
        assert rows == best.tolist()
        bounds = grid._raw_bounds[interval], grid._raw_bounds[interval + 1]
        assert all(bounds[0] <= result.costs[row] < bounds[1] for row in rows)
    assert set(result.selected) == set(np.unique(result.interval_index[result.interval_index >= 0]).tolist())
