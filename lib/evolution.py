"""Sampling strategies of the zero-shot search: "random" and "evolution".

Both search one interval at a time and never score a candidate twice in a run. Their settings
default to the reference implementation's: 50 candidates per population, 20 generations, 20
parents, 25 mutations with a per-layer probability of 0.2 and a depth and embed dim probability
of 0.4, and 25 crossovers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lib.search import (
    BlockScores,
    Candidate,
    CandidateBatch,
    Choices,
    CostFunction,
    IntervalGrid,
    ScoreFunction,
    SearchError,
    SearchResult,
    choice_counts,
    reallocate,
    scores_for_embed,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvolutionSettings:
    """Settings of the sampling strategies; the defaults are the reference's.

    Args:
        population_num: candidates sampled per interval (random) or per generation (evolution).
        max_epochs: generations per interval.
        select_num: parents kept per generation.
        mutation_num: mutated children per generation.
        crossover_num: crossed-over children per generation.
        m_prob: per-layer probability of mutating num heads and, separately, mlp ratio.
        s_prob: probability of mutating the depth and, separately, the embed dim.
        reallocate: place sampled choices by block scores; otherwise at random layers. Mutation and
            crossover always reallocate by block scores.
        max_tries_factor: random sampling gives up after this many tries per wanted candidate,
            for intervals that hold fewer candidates than wanted.
    """

    population_num: int = 50
    max_epochs: int = 20
    select_num: int = 20
    mutation_num: int = 25
    crossover_num: int = 25
    m_prob: float = 0.2
    s_prob: float = 0.4
    reallocate: bool = False
    max_tries_factor: int = 100

    def __post_init__(self) -> None:
        for name in ("population_num", "max_epochs", "select_num", "max_tries_factor"):
            if getattr(self, name) < 1:
                raise SearchError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("mutation_num", "crossover_num"):
            if getattr(self, name) < 0:
                raise SearchError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("m_prob", "s_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SearchError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")


class _Sampler:
    """Shared state of the sampling strategies: the random generator, scored candidates, visited set."""

    def __init__(self, choices: Choices, score: ScoreFunction, cost: CostFunction, grid: IntervalGrid,
                 head_scores: BlockScores | None, mlp_scores: BlockScores | None,
                 settings: EvolutionSettings, seed: int) -> None:
        self.choices = choices
        self.score_function = score
        self.cost_function = cost
        self.grid = grid
        self.head_scores = head_scores
        self.mlp_scores = mlp_scores
        self.settings = settings
        self.rng = random.Random(seed)
        self.visited: set[Candidate] = set()
        self.scored: list[Candidate] = []
        self.scores: dict[Candidate, float] = {}
        self.costs: dict[Candidate, float] = {}

    def random_counts(self, depth: int, num_choices: int) -> list[int]:
        """Split ``depth`` layers among the choices, visiting the choices in random order."""
        order = list(range(num_choices))
        self.rng.shuffle(order)
        counts = [0] * num_choices
        left = depth
        for index in order[:-1]:
            counts[index] = self.rng.randint(0, left)
            left -= counts[index]
        counts[order[-1]] = left
        return counts

    def place(self, counts: list[int], choices: tuple, embed_dim: int, block_scores: BlockScores | None,
              by_scores: bool) -> list:
        if by_scores:
            return reallocate(counts, choices, scores_for_embed(block_scores, embed_dim, choices))
        depth = sum(counts)
        random_scores = [None] + [np.array([self.rng.random() for _ in range(depth)]) for _ in choices[1:]]
        return reallocate(counts, choices, random_scores)

    def reallocated(self, embed_dim: int, num_heads: Sequence[int], mlp_ratio: Sequence[float]) -> Candidate:
        mlp = self.place(choice_counts(mlp_ratio, self.choices.mlp_ratio), self.choices.mlp_ratio, embed_dim,
                         self.mlp_scores, by_scores=True)
        heads = self.place(choice_counts(num_heads, self.choices.num_heads), self.choices.num_heads, embed_dim,
                           self.head_scores, by_scores=True)
        return Candidate(embed_dim, tuple(heads), tuple(mlp))

    def random_candidate(self) -> Candidate:
        depth = self.rng.choice(self.choices.depth)
        embed_dim = self.rng.choice(self.choices.embed_dim)
        by_scores = self.settings.reallocate
        mlp = self.place(self.random_counts(depth, len(self.choices.mlp_ratio)), self.choices.mlp_ratio,
                         embed_dim, self.mlp_scores, by_scores)
        heads = self.place(self.random_counts(depth, len(self.choices.num_heads)), self.choices.num_heads,
                           embed_dim, self.head_scores, by_scores)
        return Candidate(embed_dim, tuple(heads), tuple(mlp))

    def accept(self, candidate: Candidate, interval: int) -> bool:
        """Return whether ``candidate`` is new and falls into ``interval``, and if so mark it visited.

        Intervals include their lower bound only, as in the iteration strategy. The reference's
        sampling strategies include both bounds.
        """
        if candidate in self.visited:
            return False
        cost = float(self.cost_function(CandidateBatch.from_candidates([candidate]))[0])
        if int(self.grid.index(np.array([cost]))[0]) != interval:
            return False
        self.visited.add(candidate)
        self.costs[candidate] = cost
        return True

    def collect(self, make: Callable[[], Candidate | None], wanted: int, interval: int,
                into: list[Candidate], max_tries: int, warn: bool = True) -> None:
        """Append accepted candidates from ``make`` to ``into`` until it has ``wanted`` or the tries run out."""
        tries = 0
        while len(into) < wanted and tries < max_tries:
            tries += 1
            candidate = make()
            if candidate is not None and self.accept(candidate, interval):
                into.append(candidate)
        if warn and len(into) < wanted:
            logger.warning("interval %s: found %d of %d new candidates after %d tries",
                           self.grid.describe(interval), len(into), wanted, tries)

    def score(self, candidates: list[Candidate]) -> None:
        pending = [candidate for candidate in candidates if candidate not in self.scores]
        if not pending:
            return
        values = self.score_function(CandidateBatch.from_candidates(pending))
        for candidate, value in zip(pending, values):
            self.scores[candidate] = float(value)
            self.scored.append(candidate)

    def best(self, candidates: Iterable[Candidate], count: int) -> list[Candidate]:
        # sorted is stable, so earlier candidates win ties.
        return sorted(candidates, key=lambda candidate: self.scores[candidate], reverse=True)[:count]

    def mutate(self, parents: list[Candidate]) -> Candidate:
        settings, choices, rng = self.settings, self.choices, self.rng
        parent = rng.choice(parents)
        depth, embed_dim = parent.depth, parent.embed_dim
        heads, mlp = list(parent.num_heads), list(parent.mlp_ratio)

        if rng.random() < settings.s_prob:
            new_depth = rng.choice(choices.depth)
            if new_depth > depth:
                mlp += [rng.choice(choices.mlp_ratio) for _ in range(new_depth - depth)]
                heads += [rng.choice(choices.num_heads) for _ in range(new_depth - depth)]
            else:
                mlp, heads = mlp[:new_depth], heads[:new_depth]
            depth = new_depth
        for layer in range(depth):
            if rng.random() < settings.m_prob:
                mlp[layer] = rng.choice(choices.mlp_ratio)
        for layer in range(depth):
            if rng.random() < settings.m_prob:
                heads[layer] = rng.choice(choices.num_heads)
        if rng.random() < settings.s_prob:
            embed_dim = rng.choice(choices.embed_dim)
        return self.reallocated(embed_dim, heads, mlp)

    def crossover(self, parents: list[Candidate]) -> Candidate | None:
        """Mix two parents of equal depth layer by layer; None when no such pair turns up in 50 draws."""
        rng = self.rng
        for _ in range(50):
            first, second = rng.choice(parents), rng.choice(parents)
            if first.depth == second.depth:
                break
        else:
            return None
        embed_dim = rng.choice([first.embed_dim, second.embed_dim])
        mlp = [rng.choice(pair) for pair in zip(first.mlp_ratio, second.mlp_ratio)]
        heads = [rng.choice(pair) for pair in zip(first.num_heads, second.num_heads)]
        return self.reallocated(embed_dim, heads, mlp)

    def result(self, selected: dict[int, list[Candidate]]) -> SearchResult:
        batch = CandidateBatch.from_candidates(self.scored)
        row = {candidate: index for index, candidate in enumerate(self.scored)}
        costs = np.array([self.costs[candidate] for candidate in self.scored], dtype=np.float64)
        return SearchResult(
            candidates=batch,
            scores=np.array([self.scores[candidate] for candidate in self.scored], dtype=np.float64),
            costs=costs,
            interval_index=self.grid.index(costs),
            selected={interval: [row[candidate] for candidate in best] for interval, best in selected.items() if best},
        )


def random_search(
    choices: Choices,
    score: ScoreFunction,
    cost: CostFunction,
    grid: IntervalGrid,
    head_scores: BlockScores | None,
    mlp_scores: BlockScores | None,
    candidates_per_interval: int = 1,
    settings: EvolutionSettings = EvolutionSettings(),
    seed: int = 0,
) -> SearchResult:
    """Sample ``population_num`` new candidates per interval, score them, keep the best per interval."""
    sampler = _Sampler(choices, score, cost, grid, head_scores, mlp_scores, settings, seed)
    selected = {}
    for interval in range(len(grid)):
        population: list[Candidate] = []
        sampler.collect(sampler.random_candidate, settings.population_num, interval, population,
                        max_tries=settings.population_num * settings.max_tries_factor)
        sampler.score(population)
        selected[interval] = sampler.best(population, candidates_per_interval)
        logger.info("interval %s: sampled and scored %d candidates", grid.describe(interval), len(population))
    return sampler.result(selected)


def evolution_search(
    choices: Choices,
    score: ScoreFunction,
    cost: CostFunction,
    grid: IntervalGrid,
    head_scores: BlockScores | None,
    mlp_scores: BlockScores | None,
    candidates_per_interval: int = 1,
    settings: EvolutionSettings = EvolutionSettings(),
    seed: int = 0,
) -> SearchResult:
    """Evolve a population in each interval and keep the best candidates found there.

    Each interval starts from ``population_num`` random candidates. Each generation scores its new
    candidates and keeps the best ``select_num`` so far as parents. The next generation consists of
    ``mutation_num`` mutants and ``crossover_num`` crossovers of the parents, topped up with random
    candidates to ``population_num``. Every child is reallocated by block scores, and no candidate
    is scored twice in a search. As in the reference, an interval stops after ``max_epochs``
    generations or after the second generation that adds nothing to the parents.
    """
    sampler = _Sampler(choices, score, cost, grid, head_scores, mlp_scores, settings, seed)
    selected = {}
    for interval in range(len(grid)):
        population: list[Candidate] = []
        sampler.collect(sampler.random_candidate, settings.population_num, interval, population,
                        max_tries=settings.population_num * settings.max_tries_factor)
        parents: list[Candidate] = []
        best: list[Candidate] = []
        generations_without_gain = 0

        for epoch in range(settings.max_epochs):
            if generations_without_gain >= 2 or not population:
                break
            sampler.score(population)
            new_parents = sampler.best(parents + population, settings.select_num)
            if not set(new_parents) - set(parents):
                generations_without_gain += 1
            parents = new_parents
            best = sampler.best(best + population, candidates_per_interval)
            logger.info("interval %s, generation %d/%d: best score %.6g from %d candidates",
                        grid.describe(interval), epoch + 1, settings.max_epochs,
                        sampler.scores[best[0]], len(population))
            if epoch + 1 == settings.max_epochs:
                break

            population = []
            # Mutation and crossover get ten tries per wanted child, as in the reference, and
            # random candidates fill the generation up to population_num.
            sampler.collect(lambda: sampler.mutate(parents), settings.mutation_num, interval, population,
                            max_tries=10 * settings.mutation_num, warn=False)
            crossovers: list[Candidate] = []
            sampler.collect(lambda: sampler.crossover(parents), settings.crossover_num, interval, crossovers,
                            max_tries=10 * settings.crossover_num, warn=False)
            population += crossovers
            sampler.collect(sampler.random_candidate, settings.population_num, interval, population,
                            max_tries=settings.population_num * settings.max_tries_factor)

        selected[interval] = best
    return sampler.result(selected)
