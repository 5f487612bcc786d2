"""Tests of the random and evolution search strategies."""

import numpy as np
import pytest

from lib.evolution import EvolutionSettings, _Sampler, evolution_search, random_search
from lib.search import (
    AdditiveCost,
    IntervalGrid,
    SearchError,
    choice_counts,
    iteration_search,
    reallocate,
    scores_for_embed,
)
from model.supernet import Supernet
from search_helpers import DEMO, random_block_scores



def synthetic_score(batch) -> np.ndarray:
    """A score that prefers wide heads early and wide mlps late, so reallocation matters."""
    layers = np.arange(batch.num_heads.shape[1])
    return (batch.num_heads / (1.0 + layers)).sum(1) + (batch.mlp_ratio * layers).sum(1) + batch.embed_dim / 100


@pytest.fixture(scope="module")
def demo_supernet():
    return Supernet(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0,
                    gp=True, relative_position=True, change_qkv=True)


@pytest.mark.parametrize("strategy", [random_search, evolution_search])
def test_sampling_search_is_repeatable_and_respects_intervals(demo_supernet, strategy):
    heads, mlp = random_block_scores(DEMO, seed=5)
    cost = AdditiveCost(demo_supernet.num_params, DEMO, "parameter count")
    grid = IntervalGrid(0.3, 0.9, 0.2)
    settings = EvolutionSettings(population_num=12, max_epochs=4, select_num=5, mutation_num=6, crossover_num=6,
                                 reallocate=True)

    first = strategy(DEMO, synthetic_score, cost, grid, heads, mlp, 1, settings, seed=7)
    second = strategy(DEMO, synthetic_score, cost, grid, heads, mlp, 1, settings, seed=7)
    other = strategy(DEMO, synthetic_score, cost, grid, heads, mlp, 1, settings, seed=8)

    assert first.selected == second.selected
    np.testing.assert_array_equal(first.scores, second.scores)
    assert not np.array_equal(first.candidates.num_heads, other.candidates.num_heads)
    keys = {(first.candidates.candidate(row)) for row in range(len(first.candidates))}
    assert len(keys) == len(first.candidates), "a candidate was scored twice"
    np.testing.assert_array_equal(first.costs, cost(first.candidates))
    for interval, rows in first.selected.items():
        assert all(first.interval_index[row] == interval for row in rows)
        members = np.flatnonzero(first.interval_index == interval)
        assert first.scores[rows[0]] == first.scores[members].max()
    assert len(first.selected) == len(grid)


def test_evolution_children_are_reallocated(demo_supernet):
    heads, mlp = random_block_scores(DEMO, seed=6)
    cost = AdditiveCost(demo_supernet.num_params, DEMO, "parameter count")
    settings = EvolutionSettings(population_num=10, max_epochs=3, select_num=4, mutation_num=5, crossover_num=5,
                                 reallocate=True)
    result = evolution_search(DEMO, synthetic_score, cost, IntervalGrid(0.3, 0.9, 0.6), heads, mlp, 1, settings)

    for row in range(len(result.candidates)):
        candidate = result.candidates.candidate(row)
        head_scores = scores_for_embed(heads, candidate.embed_dim, DEMO.num_heads)
        assert list(candidate.num_heads) == reallocate(
            choice_counts(candidate.num_heads, DEMO.num_heads), DEMO.num_heads, head_scores)


def test_evolution_finds_interval_optimum_of_small_space(demo_supernet):
    heads, mlp = random_block_scores(DEMO, seed=9)
    cost = AdditiveCost(demo_supernet.num_params, DEMO, "parameter count")
    grid = IntervalGrid(0.3, 0.9, 0.6)
    exhaustive = iteration_search(DEMO, synthetic_score, cost, grid, heads, mlp)
    settings = EvolutionSettings(population_num=20, max_epochs=20, select_num=10, mutation_num=20,
                                 crossover_num=20, reallocate=True)

    evolved = evolution_search(DEMO, synthetic_score, cost, grid, heads, mlp, 1, settings, seed=1)

    assert evolved.scores[evolved.selected[0][0]] == pytest.approx(exhaustive.scores[exhaustive.selected[0][0]])


def test_random_search_warns_on_sparse_interval(demo_supernet, caplog):
    cost = AdditiveCost(demo_supernet.num_params, DEMO, "parameter count")
    settings = EvolutionSettings(population_num=5, max_tries_factor=3)
    # 0.27-0.28 M holds only the smallest subnets.
    result = random_search(DEMO, synthetic_score, cost, IntervalGrid(0.27, 0.28, 0.01), None, None, 1, settings)
    assert "of 5 new candidates" in caplog.text
    assert len(result.candidates) < 5


@pytest.mark.parametrize("field,value,message", [
    ("population_num", 0, "population_num must be at least 1"),
    ("mutation_num", -1, "mutation_num must not be negative"),
    ("m_prob", 1.5, "m_prob must be a probability"),
])
def test_evolution_settings_reject_invalid_values(field, value, message):
    with pytest.raises(SearchError, match=message):
        EvolutionSettings(**{field: value})


def test_random_counts_cover_all_layers():
    sampler = _Sampler(DEMO, synthetic_score, None, None, None, None, EvolutionSettings(), seed=0)
    seen = set()
    for _ in range(500):
        counts = sampler.random_counts(4, 3)
        assert sum(counts) == 4
        assert min(counts) >= 0
        seen.add(tuple(counts))
    assert (2, 0, 2) in seen
