"""Zero-shot search: candidates, count enumeration, reallocation, intervals and the "iteration" strategy.

A subnet of a full search space is described here by its embed dim, its depth, and how many
layers take each num heads and each mlp ratio choice. Reallocation turns such counts into
per-layer choices, giving the larger choices to the layers with the higher block scores. The
"iteration" strategy enumerates every count distribution. The sampling strategies "random" and
"evolution" are in :mod:`lib.evolution`.

This module needs no torch and computes no proxy score or parameter count itself. Callers pass
functions that score and cost a :class:`CandidateBatch`, so any proxy can drive any strategy.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np

from lib.progress import ProgressLog

logger = logging.getLogger(__name__)

# Per-layer scores of raising a layer to a choice, keyed by (embed dim, choice). None stands for
# "deeper_is_better", which ranks deeper layers first without scores.
BlockScores = Mapping[tuple[int, float], np.ndarray]

# Raw units per interval unit: parameters per million, complexity count per G.
PARAMS_SCALE = 10**6
FLOPS_SCALE = 10**9


class SearchError(ValueError):
    """Invalid search settings, such as empty intervals or a cost model that does not fit."""


# ---------------------------------------------------------------------------------------------
# Candidates


@dataclass(frozen=True)
class Candidate:
    """One subnet: a single embed dim and one num heads and mlp ratio per layer.

    Args:
        embed_dim: embed dim of every layer.
        num_heads: num heads per layer; its length is the depth.
        mlp_ratio: mlp ratio per layer, as long as ``num_heads``.
    """

    embed_dim: int
    num_heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]

    @property
    def depth(self) -> int:
        return len(self.num_heads)

    def to_dict(self) -> dict[str, Any]:
        """Return the candidate in the key order of the reference's interval-candidates files."""
        return {
            "layer_num": self.depth,
            "mlp_ratio": [float(ratio) for ratio in self.mlp_ratio],
            "num_heads": [int(heads) for heads in self.num_heads],
            "embed_dim": [int(self.embed_dim)] * self.depth,
        }

    @classmethod
    def from_dict(cls, candidate: Mapping[str, Any]) -> Candidate:
        """Build from a candidate dict; the dict must already be validated (one embed dim)."""
        return cls(
            embed_dim=int(candidate["embed_dim"][0]),
            num_heads=tuple(int(heads) for heads in candidate["num_heads"]),
            mlp_ratio=tuple(float(ratio) for ratio in candidate["mlp_ratio"]),
        )


@dataclass
class CandidateBatch:
    """Candidates as arrays, for vectorised scoring and costing.

    Layers beyond a candidate's depth hold 0 in ``num_heads`` and ``mlp_ratio``.

    Args:
        embed_dim: (N,) embed dims.
        depth: (N,) depths.
        num_heads: (N, D) num heads per layer, D the largest depth in the batch.
        mlp_ratio: (N, D) mlp ratios per layer.
    """

    embed_dim: np.ndarray
    depth: np.ndarray
    num_heads: np.ndarray
    mlp_ratio: np.ndarray

    def __len__(self) -> int:
        return len(self.embed_dim)

    def candidate(self, index: int) -> Candidate:
        depth = int(self.depth[index])
        return Candidate(
            embed_dim=int(self.embed_dim[index]),
            num_heads=tuple(int(heads) for heads in self.num_heads[index, :depth]),
            mlp_ratio=tuple(float(ratio) for ratio in self.mlp_ratio[index, :depth]),
        )

    @classmethod
    def from_candidates(cls, candidates: Sequence[Candidate]) -> CandidateBatch:
        max_depth = max((candidate.depth for candidate in candidates), default=0)
        batch = cls.empty(len(candidates), max_depth)
        for row, candidate in enumerate(candidates):
            batch.embed_dim[row] = candidate.embed_dim
            batch.depth[row] = candidate.depth
            batch.num_heads[row, : candidate.depth] = candidate.num_heads
            batch.mlp_ratio[row, : candidate.depth] = candidate.mlp_ratio
        return batch

    @classmethod
    def empty(cls, size: int, max_depth: int) -> CandidateBatch:
        return cls(
            embed_dim=np.zeros(size, dtype=np.int64),
            depth=np.zeros(size, dtype=np.int64),
            num_heads=np.zeros((size, max_depth), dtype=np.int64),
            mlp_ratio=np.zeros((size, max_depth), dtype=np.float64),
        )

    @classmethod
    def concatenate(cls, batches: Sequence[CandidateBatch]) -> CandidateBatch:
        max_depth = max((batch.num_heads.shape[1] for batch in batches), default=0)

        def padded(array: np.ndarray) -> np.ndarray:
            return np.pad(array, ((0, 0), (0, max_depth - array.shape[1])))

        return cls(
            embed_dim=np.concatenate([batch.embed_dim for batch in batches]),
            depth=np.concatenate([batch.depth for batch in batches]),
            num_heads=np.concatenate([padded(batch.num_heads) for batch in batches]),
            mlp_ratio=np.concatenate([padded(batch.mlp_ratio) for batch in batches]),
        )


@dataclass(frozen=True)
class Choices:
    """The choices of a full search space, each sorted in increasing order.

    Args:
        embed_dim: embed dim choices.
        depth: depth choices.
        num_heads: num heads choices.
        mlp_ratio: mlp ratio choices.
    """

    embed_dim: tuple[int, ...]
    depth: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]

    @classmethod
    def from_space(cls, space: Any) -> Choices:
        """Take the choices of a ``lib.config.SearchSpace`` (or any object with the same list fields)."""
        return cls(
            embed_dim=tuple(sorted(int(value) for value in space.embed_dim)),
            depth=tuple(sorted(int(value) for value in space.depth)),
            num_heads=tuple(sorted(int(value) for value in space.num_heads)),
            mlp_ratio=tuple(sorted(float(value) for value in space.mlp_ratio)),
        )

    def largest_candidate(self) -> Candidate:
        depth = max(self.depth)
        return Candidate(max(self.embed_dim), (max(self.num_heads),) * depth, (max(self.mlp_ratio),) * depth)

    def smallest_candidate(self) -> Candidate:
        depth = min(self.depth)
        return Candidate(min(self.embed_dim), (min(self.num_heads),) * depth, (min(self.mlp_ratio),) * depth)


# ---------------------------------------------------------------------------------------------
# Count distributions and reallocation


def enumerate_distributions(depth: int, num_choices: int, legacy: bool = False) -> list[tuple[int, ...]]:
    """List every way to split ``depth`` layers among ``num_choices`` choices, as per-choice counts.

    The counts come from cut points ``0 <= c_1 <= ... <= c_{k-1} <= depth`` over the layer
    positions, in lexicographic order of the cut points: choice j gets ``c_{j+1} - c_j`` layers.
    That gives ``C(depth + k - 1, k - 1)`` distributions. With ``legacy`` the cut points must be
    strictly increasing, as in the reference implementation: ``C(depth + 1, k - 1)`` distributions,
    among which no choice strictly between the first and the last ever has zero layers.
    """
    if depth < 0 or num_choices < 1:
        raise SearchError(f"cannot split depth {depth} among {num_choices} choices; need depth >= 0 and >= 1 choice")
    positions = range(depth + 1)
    if legacy:
        cut_sets = itertools.combinations(positions, num_choices - 1)
    else:
        cut_sets = itertools.combinations_with_replacement(positions, num_choices - 1)

    distributions = []
    for cuts in cut_sets:
        edges = (0, *cuts, depth)
        distributions.append(tuple(edges[j + 1] - edges[j] for j in range(num_choices)))
    return distributions


def reallocate(
    counts: Sequence[int],
    choices: Sequence[Any],
    layer_scores: Sequence[np.ndarray | None] | None,
) -> list:
    """Assign per-layer choices from per-choice counts, giving larger choices to higher-scoring layers.

    Args:
        counts: layers per choice, aligned with ``choices``; they sum to the depth.
        choices: the choices in increasing order.
        layer_scores: ``layer_scores[j]`` holds, per layer, the score of raising that layer to
            ``choices[j]`` (entry 0 is unused). None ranks layers by depth alone
            ("deeper_is_better"): the first layers take the smallest choice.

    Returns:
        The choice of each layer. From the largest choice down to the second smallest, each choice
        takes its count of the unassigned layers with the highest scores for it. Among equal
        scores the deeper layer wins. The remaining layers take the smallest choice.
    """
    depth = sum(counts)
    if layer_scores is None:
        assignment = []
        for choice, count in zip(choices, counts):
            assignment.extend([choice] * count)
        return assignment

    assignment: list = [None] * depth
    for index in range(len(choices) - 1, 0, -1):
        count = counts[index]
        if count == 0:
            continue
        scores = layer_scores[index]
        free = [layer for layer in range(depth) if assignment[layer] is None]
        ranked = sorted(free, key=lambda layer: (float(scores[layer]), layer), reverse=True)
        for layer in ranked[:count]:
            assignment[layer] = choices[index]
    return [choices[0] if choice is None else choice for choice in assignment]


def scores_for_embed(block_scores: BlockScores | None, embed_dim: int, choices: Sequence[Any]) -> list | None:
    """Return the per-choice layer scores of ``embed_dim`` in the form :func:`reallocate` takes."""
    if block_scores is None:
        return None
    scores: list = [None]
    for choice in choices[1:]:
        try:
            scores.append(block_scores[(embed_dim, choice)])
        except KeyError:
            raise SearchError(f"no block scores for embed dim {embed_dim} and choice {choice}") from None
    return scores


def choice_counts(values: Sequence[Any], choices: Sequence[Any]) -> list[int]:
    counts = [0] * len(choices)
    for value in values:
        counts[choices.index(value)] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# Enumeration ("iteration" strategy)


def enumerate_group(
    choices: Choices,
    embed_dim: int,
    depth: int,
    head_scores: BlockScores | None,
    mlp_scores: BlockScores | None,
    legacy: bool = False,
) -> CandidateBatch:
    """Enumerate the candidates of one embed dim and depth: every mlp assignment with every heads assignment.

    The mlp assignment varies slowest, as in the reference's loop.
    """
    mlp_layer_scores = scores_for_embed(mlp_scores, embed_dim, choices.mlp_ratio)
    head_layer_scores = scores_for_embed(head_scores, embed_dim, choices.num_heads)
    mlp_assignments = [
        reallocate(counts, choices.mlp_ratio, mlp_layer_scores)
        for counts in enumerate_distributions(depth, len(choices.mlp_ratio), legacy)
    ]
    head_assignments = [
        reallocate(counts, choices.num_heads, head_layer_scores)
        for counts in enumerate_distributions(depth, len(choices.num_heads), legacy)
    ]

    mlp_array = np.asarray(mlp_assignments, dtype=np.float64).reshape(len(mlp_assignments), depth)
    head_array = np.asarray(head_assignments, dtype=np.int64).reshape(len(head_assignments), depth)
    size = len(mlp_assignments) * len(head_assignments)
    return CandidateBatch(
        embed_dim=np.full(size, embed_dim, dtype=np.int64),
        depth=np.full(size, depth, dtype=np.int64),
        num_heads=np.tile(head_array, (len(mlp_assignments), 1)),
        mlp_ratio=np.repeat(mlp_array, len(head_assignments), axis=0),
    )


def enumerate_candidates(
    choices: Choices,
    head_scores: BlockScores | None,
    mlp_scores: BlockScores | None,
    legacy: bool = False,
) -> CandidateBatch:
    """Enumerate every candidate of the search space, embed dim slowest, then depth."""
    groups = [
        enumerate_group(choices, embed_dim, depth, head_scores, mlp_scores, legacy)
        for embed_dim in choices.embed_dim
        for depth in choices.depth
    ]
    return CandidateBatch.concatenate(groups)


def count_enumerated(choices: Choices, legacy: bool = False) -> int:
    """Return how many candidates :func:`enumerate_candidates` yields, in closed form."""
    def distributions(depth: int, num_choices: int) -> int:
        if legacy:
            return math.comb(depth + 1, num_choices - 1)
        return math.comb(depth + num_choices - 1, num_choices - 1)

    per_embed = sum(
        distributions(depth, len(choices.mlp_ratio)) * distributions(depth, len(choices.num_heads))
        for depth in choices.depth
    )
    return len(choices.embed_dim) * per_embed


# ---------------------------------------------------------------------------------------------
# Intervals


def _to_decimal(value: Any, name: str) -> Decimal:
    # repr of a float is its shortest round-trip form, so 0.1 becomes Decimal("0.1") exactly.
    text = repr(value) if isinstance(value, float) else str(value)
    try:
        result = Decimal(text)
    except InvalidOperation:
        raise SearchError(f"{name} must be a number, got {value!r}") from None
    if not result.is_finite():
        raise SearchError(f"{name} must be a finite number, got {value!r}")
    return result


def format_decimal(value: Decimal) -> str:
    """Format a bound as a clean decimal with at least one decimal place: "6.0", "0.3", "2.25"."""
    if value == value.to_integral_value():
        return f"{int(value)}.0"
    return format(value.normalize(), "f")


class IntervalGrid:
    """Consecutive intervals ``[lower + k * width, lower + (k + 1) * width)`` that end at or below ``upper``.

    Bounds are exact decimals in millions of parameters or in G, and each interval is named by
    its upper bound ("6.0" for 5 to 6 M). Values are compared in raw units (parameters or the raw
    complexity count), in which the bounds are whole numbers for up to six (params) or nine
    (FLOPs) decimal places.

    Args:
        lower: lower bound of the first interval.
        upper: no interval extends above this.
        width: width of each interval.
        scale: raw units per interval unit, :data:`PARAMS_SCALE` or :data:`FLOPS_SCALE`.
        unit: unit name for messages, "M" or "G".
    """

    def __init__(self, lower: Any, upper: Any, width: Any, scale: int = PARAMS_SCALE, unit: str = "M") -> None:
        self.lower = _to_decimal(lower, "the lower limit")
        self.upper = _to_decimal(upper, "the upper limit")
        self.width = _to_decimal(width, "the interval width")
        self.scale = scale
        self.unit = unit
        if self.width <= 0:
            raise SearchError(f"the interval width must be positive, got {width!r} {unit}")
        if self.lower < 0:
            raise SearchError(f"the lower limit must not be negative, got {lower!r} {unit}")
        count = int((self.upper - self.lower) // self.width) if self.upper >= self.lower else 0
        if count < 1:
            raise SearchError(
                f"no interval of width {width} {unit} fits between the limits {lower} and {upper} {unit}; "
                f"raise the upper limit or narrow the interval"
            )
        self.bounds = [self.lower + index * self.width for index in range(count + 1)]
        self.keys = [format_decimal(bound) for bound in self.bounds[1:]]
        self._raw_bounds = np.array([float(bound * scale) for bound in self.bounds], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, raw_values: np.ndarray) -> np.ndarray:
        """Return the interval index of each raw value, or -1 for a value outside every interval."""
        raw_values = np.asarray(raw_values, dtype=np.float64)
        index = np.searchsorted(self._raw_bounds, raw_values, side="right") - 1
        outside = (index < 0) | (index >= len(self.keys))
        return np.where(outside, -1, index)

    def describe(self, index: int) -> str:
        return f"{format_decimal(self.bounds[index])}-{self.keys[index]} {self.unit}"


def top_per_interval(interval_index: np.ndarray, scores: np.ndarray, count: int) -> dict[int, list[int]]:
    """Return, per interval, the rows of the ``count`` highest scores, earlier rows first among ties."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    selected: dict[int, list[int]] = {}
    for row in order:
        interval = int(interval_index[row])
        if interval < 0:
            continue
        rows = selected.setdefault(interval, [])
        if len(rows) < count:
            rows.append(int(row))
    return dict(sorted(selected.items()))


# ---------------------------------------------------------------------------------------------
# Additive cost model


class AdditiveCost:
    """Vectorised cost (parameter count or complexity count) of candidates, built from a per-candidate function.

    The parameter and complexity counts of the supernet add a part that depends only on the embed
    dim to one term per used layer. Each layer term depends on the embed dim, num heads and mlp
    ratio of that layer. This class reads those parts off ``cost_function`` with candidates of one
    and two layers. It then checks the sum against ``cost_function`` on the largest and smallest
    candidates and on ``num_checks`` random ones.

    Args:
        cost_function: cost of one candidate dict, e.g. ``Supernet.num_params``.
        choices: the search space's choices.
        name: what the cost is, for messages.
        num_checks: random candidates checked against ``cost_function``.
        seed: seed of those random candidates.
    """

    def __init__(
        self,
        cost_function: Callable[[dict], float],
        choices: Choices,
        name: str = "cost",
        num_checks: int = 8,
        seed: int = 0,
    ) -> None:
        self.choices = choices
        self.name = name
        embed_count, head_count, ratio_count = len(choices.embed_dim), len(choices.num_heads), len(choices.mlp_ratio)
        self._base = np.zeros(embed_count, dtype=np.float64)
        self._layer = np.zeros((embed_count, head_count, ratio_count), dtype=np.float64)

        first_heads, first_ratio = choices.num_heads[0], choices.mlp_ratio[0]
        for e, embed_dim in enumerate(choices.embed_dim):
            one_layer = float(cost_function(Candidate(embed_dim, (first_heads,), (first_ratio,)).to_dict()))
            for h, heads in enumerate(choices.num_heads):
                for r, ratio in enumerate(choices.mlp_ratio):
                    two_layers = Candidate(embed_dim, (heads, first_heads), (ratio, first_ratio)).to_dict()
                    self._layer[e, h, r] = float(cost_function(two_layers)) - one_layer
            self._base[e] = one_layer - self._layer[e, 0, 0]

        self._check(cost_function, num_checks, seed)

    def __call__(self, batch: CandidateBatch) -> np.ndarray:
        used = np.arange(batch.num_heads.shape[1])[None, :] < batch.depth[:, None]
        embed_index = self._index(batch.embed_dim, self.choices.embed_dim, True, "embed dim")
        head_index = self._index(batch.num_heads, self.choices.num_heads, used, "num heads")
        ratio_index = self._index(batch.mlp_ratio, self.choices.mlp_ratio, used, "mlp ratio")

        layers = self._layer[embed_index[:, None], head_index, ratio_index]
        return self._base[embed_index] + np.where(used, layers, 0.0).sum(axis=1)

    def single(self, candidate: Candidate) -> float:
        """Return the cost of one candidate."""
        return float(self(CandidateBatch.from_candidates([candidate]))[0])

    def _index(self, values: np.ndarray, allowed: tuple, used, name: str) -> np.ndarray:
        """Return the index of each value among ``allowed`` (0 where not ``used``)."""
        allowed_array = np.asarray(allowed)
        index = np.minimum(np.searchsorted(allowed_array, values), len(allowed) - 1)
        invalid = (allowed_array[index] != values) & used
        if np.any(invalid):
            raise SearchError(
                f"{name} {values[invalid][0]} is not a choice of the search space {list(allowed)}; "
                f"the {self.name} tables cover only the space's choices"
            )
        return np.where(used, index, 0)

    def _check(self, cost_function, num_checks: int, seed: int) -> None:
        rng = random.Random(seed)
        candidates = [self.choices.largest_candidate(), self.choices.smallest_candidate()]
        for _ in range(num_checks):
            depth = rng.choice(self.choices.depth)
            candidates.append(Candidate(
                rng.choice(self.choices.embed_dim),
                tuple(rng.choice(self.choices.num_heads) for _ in range(depth)),
                tuple(rng.choice(self.choices.mlp_ratio) for _ in range(depth)),
            ))
        expected = np.array([float(cost_function(candidate.to_dict())) for candidate in candidates])
        actual = self(CandidateBatch.from_candidates(candidates))
        if not np.allclose(actual, expected, rtol=1e-9, atol=1e-6):
            worst = int(np.argmax(np.abs(actual - expected)))
            raise SearchError(
                f"the {self.name} of the supernet is not a sum of per-layer terms: candidate "
                f"{candidates[worst].to_dict()} has {self.name} {expected[worst]} but the tables give {actual[worst]}"
            )


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class SearchResult:
    """Every scored candidate and the ones selected per interval.

    Args:
        candidates: every scored candidate, in the order they were scored.
        scores: (N,) proxy scores.
        costs: (N,) raw constraint values (parameters or complexity count).
        interval_index: (N,) interval of each candidate, -1 outside every interval.
        selected: interval index -> rows of ``candidates``, best first.
    """

    candidates: CandidateBatch
    scores: np.ndarray
    costs: np.ndarray
    interval_index: np.ndarray
    selected: dict[int, list[int]] = field(default_factory=dict)


ScoreFunction = Callable[[CandidateBatch], np.ndarray]
CostFunction = Callable[[CandidateBatch], np.ndarray]


def iteration_search(
    choices: Choices,
    score: ScoreFunction,
    cost: CostFunction,
    grid: IntervalGrid,
    head_scores: BlockScores | None,
    mlp_scores: BlockScores | None,
    candidates_per_interval: int = 1,
    legacy: bool = False,
) -> SearchResult:
    """Score every enumerated candidate and keep the best ``candidates_per_interval`` per interval."""
    groups = [(embed_dim, depth) for embed_dim in choices.embed_dim for depth in choices.depth]
    progress = ProgressLog(logger, "scored embed dim / depth group", len(groups), interval=2.0, log_ends=True)
    batches, scores, costs = [], [], []
    total = 0
    for embed_dim, depth in groups:
        batch = enumerate_group(choices, embed_dim, depth, head_scores, mlp_scores, legacy)
        batches.append(batch)
        scores.append(np.asarray(score(batch), dtype=np.float64))
        costs.append(np.asarray(cost(batch), dtype=np.float64))
        total += len(batch)
        progress.update(detail=f" (embed dim {embed_dim}, depth {depth}, {total} candidates so far)")

    result = SearchResult(
        candidates=CandidateBatch.concatenate(batches),
        scores=np.concatenate(scores),
        costs=np.concatenate(costs),
        interval_index=np.empty(0, dtype=np.int64),
    )
    result.interval_index = grid.index(result.costs)
    result.selected = top_per_interval(result.interval_index, result.scores, candidates_per_interval)
    return result
