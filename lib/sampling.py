"""Candidate samplers for supernet training.

Each training step trains one or more subnets. A sampler returns them for a given
(epoch, step) from a random generator seeded with (seed, epoch, step) alone, so every process
of a distributed job draws the same subnets without communicating. That matters because
DistributedDataParallel averages gradients across processes, which is only meaningful when
all of them trained the same subnet.

Samplers:

- :class:`PreferredSampler`: uniform over the candidates of an interval-candidates file, or
  with grouping by embed dim and/or depth, a group uniformly and then a member uniformly.
  Preferred one-shot training.
- :class:`SpaceSampler`: uniform over a search space, each layer's num heads and mlp ratio
  drawn independently. The AutoFormer baseline (uniform sampling).
- :class:`FixedSampler`: always the same subnet (retrain mode).
- :class:`SandwichSampler`: wraps one of the above; each step trains the smallest
  candidate, ``middle_count`` drawn ones and the largest candidate.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Candidate = dict[str, Any]


class SamplingError(ValueError):
    """Invalid sampler settings or an empty candidate list."""


def step_generator(seed: int, epoch: int, step: int) -> np.random.Generator:
    """Return the random generator for one training step, identical on every process."""
    for name, value in (("seed", seed), ("epoch", epoch), ("step", step)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise SamplingError(f"{name} must be a non-negative integer, got {value!r}")
    return np.random.default_rng([int(seed), int(epoch), int(step)])


class CandidateSampler(ABC):
    """Draws the subnets that one training step trains."""

    seed: int

    @abstractmethod
    def draw(self, rng: np.random.Generator, exclude: Sequence[Candidate] = ()) -> Candidate:
        """Draw one candidate, avoiding those in ``exclude`` where others remain."""

    @abstractmethod
    def smallest(self) -> Candidate:
        """Return the smallest candidate (the base of a sandwich)."""

    @abstractmethod
    def largest(self) -> Candidate:
        """Return the largest candidate (the top of a sandwich)."""

    def sample(self, epoch: int, step: int) -> list[Candidate]:
        """Return the candidates to train at ``step`` of ``epoch``."""
        return [self.draw(step_generator(self.seed, epoch, step))]


def candidate_groups(
    candidates: Sequence[Mapping], *, by_dim: bool, by_depth: bool
) -> list[list[int]]:
    """Group candidate indices by embed dim and/or depth, groups in order of first appearance.

    With neither key every candidate forms its own group, so a uniform draw over groups is a
    uniform draw over candidates.
    """
    if not (by_dim or by_depth):
        return [[index] for index in range(len(candidates))]

    groups: dict[tuple, list[int]] = {}
    for index, candidate in enumerate(candidates):
        key: tuple = ()
        if by_dim:
            key += (_embed_dim(candidate),)
        if by_depth:
            key += (int(candidate["layer_num"]),)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


class PreferredSampler(CandidateSampler):
    """Draws from a fixed list of candidates, optionally a group first.

    Args:
        candidates: the candidates, ordered from smallest to largest; the first is the
            sandwich base and the last the sandwich top.
        group_by_dim: group candidates by embed dim, draw a group uniformly, then a member.
        group_by_depth: group by depth (combined with ``group_by_dim`` when both are set).
        shuffle: permute the per-layer num heads and mlp ratios of each drawn candidate
            (two independent permutations), which trains layer assignments outside the file.
        seed: base seed shared by all processes.
    """

    def __init__(
        self,
        candidates: Sequence[Mapping],
        *,
        group_by_dim: bool = False,
        group_by_depth: bool = False,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if not candidates:
            raise SamplingError("the candidate list is empty; pass a candidate file with at least one candidate")
        self.candidates = [dict(candidate) for candidate in candidates]
        self.groups = candidate_groups(self.candidates, by_dim=group_by_dim, by_depth=group_by_depth)
        self.shuffle = shuffle
        self.seed = seed
        logger.info(
            "preferred sampling over %d candidates in %d groups%s",
            len(self.candidates), len(self.groups), ", layers shuffled" if shuffle else "",
        )

    def draw(self, rng: np.random.Generator, exclude: Sequence[Candidate] = ()) -> Candidate:
        excluded = {id(candidate) for candidate in exclude}
        eligible_groups = [
            [index for index in group if id(self.candidates[index]) not in excluded]
            for group in self.groups
        ]
        eligible_groups = [group for group in eligible_groups if group]
        if not eligible_groups:
            # Every candidate is excluded (a file with only the base and the top), so any of
            # them may be drawn again.
            eligible_groups = self.groups

        group = eligible_groups[int(rng.integers(len(eligible_groups)))]
        candidate = self.candidates[group[int(rng.integers(len(group)))]]
        if not self.shuffle:
            return candidate

        shuffled = copy.deepcopy(candidate)
        shuffled["num_heads"] = [shuffled["num_heads"][i] for i in rng.permutation(len(shuffled["num_heads"]))]
        shuffled["mlp_ratio"] = [shuffled["mlp_ratio"][i] for i in rng.permutation(len(shuffled["mlp_ratio"]))]
        return shuffled

    def smallest(self) -> Candidate:
        return self.candidates[0]

    def largest(self) -> Candidate:
        return self.candidates[-1]


class SpaceSampler(CandidateSampler):
    """Draws uniformly from a search space.

    Embed dim and depth are drawn uniformly; then each layer's num heads and mlp ratio
    independently. Works for a full space (plain lists) and for a preferred space (depth a
    map from embed dim to depths, num heads and mlp ratio maps from embed dim to per-layer
    lists of allowed values).

    Args:
        space: an object with attributes ``embed_dim``, ``depth``, ``num_heads`` and
            ``mlp_ratio`` (``lib.config.SearchSpace`` or ``PreferredSpace``).
        seed: base seed shared by all processes.
    """

    def __init__(self, space: Any, *, seed: int = 0) -> None:
        self.embed_dims = [int(value) for value in space.embed_dim]
        if not self.embed_dims:
            raise SamplingError("the search space has no EMBED_DIM choices")
        self.depth = space.depth
        self.num_heads = space.num_heads
        self.mlp_ratio = space.mlp_ratio
        self.seed = seed

    def draw(self, rng: np.random.Generator, exclude: Sequence[Candidate] = ()) -> Candidate:
        return self._build(lambda choices: choices[int(rng.integers(len(choices)))])

    def smallest(self) -> Candidate:
        return self._build(min)

    def largest(self) -> Candidate:
        return self._build(max)

    def _build(self, choose) -> Candidate:
        embed_dim = choose(self.embed_dims)
        depth = int(choose(_per_embed(self.depth, embed_dim)))
        num_heads = [int(choose(_layer_choices(self.num_heads, embed_dim, layer))) for layer in range(depth)]
        mlp_ratio = [float(choose(_layer_choices(self.mlp_ratio, embed_dim, layer))) for layer in range(depth)]
        return {
            "layer_num": depth,
            "embed_dim": [embed_dim] * depth,
            "mlp_ratio": mlp_ratio,
            "num_heads": num_heads,
        }


class FixedSampler(CandidateSampler):
    """Always returns the same subnet (retrain mode)."""

    def __init__(self, candidate: Mapping) -> None:
        self.candidate = dict(candidate)
        self.seed = 0

    def draw(self, rng: np.random.Generator, exclude: Sequence[Candidate] = ()) -> Candidate:
        return self.candidate

    def smallest(self) -> Candidate:
        return self.candidate

    def largest(self) -> Candidate:
        return self.candidate

    def sample(self, epoch: int, step: int) -> list[Candidate]:
        return [self.candidate]


class SandwichSampler(CandidateSampler):
    """Trains the smallest, ``middle_count`` drawn and the largest candidate at every step.

    The drawn ones avoid the base and the top where other candidates exist. The order is
    base, drawn ones, top.

    Args:
        inner: the sampler that draws the middle candidates and names smallest and largest.
        middle_count: how many candidates to draw per step besides base and top (>= 1).
        include_base: train the smallest candidate at every step.
        include_top: train the largest candidate at every step.
    """

    def __init__(
        self,
        inner: CandidateSampler,
        *,
        middle_count: int,
        include_base: bool = True,
        include_top: bool = True,
    ) -> None:
        if middle_count < 1:
            raise SamplingError(f"sandwich middle count must be >= 1, got {middle_count}; pass --sandwich K with K >= 1")
        self.inner = inner
        self.middle_count = middle_count
        self.include_base = include_base
        self.include_top = include_top
        self.seed = inner.seed

    def draw(self, rng: np.random.Generator, exclude: Sequence[Candidate] = ()) -> Candidate:
        return self.inner.draw(rng, exclude)

    def smallest(self) -> Candidate:
        return self.inner.smallest()

    def largest(self) -> Candidate:
        return self.inner.largest()

    def sample(self, epoch: int, step: int) -> list[Candidate]:
        rng = step_generator(self.seed, epoch, step)
        base = [self.smallest()] if self.include_base else []
        top = [self.largest()] if self.include_top else []
        middles = [self.inner.draw(rng, base + top) for _ in range(self.middle_count)]
        return base + middles + top


def _embed_dim(candidate: Mapping) -> int:
    embed_dim = candidate["embed_dim"]
    if isinstance(embed_dim, (list, tuple)):
        return int(embed_dim[0])
    return int(embed_dim)


def _per_embed(choices: Any, embed_dim: int) -> Sequence:
    if isinstance(choices, Mapping):
        return choices[embed_dim]
    return choices


def _layer_choices(choices: Any, embed_dim: int, layer: int) -> Sequence:
    """Allowed values of one layer: a plain list, or a per-embed list of per-layer lists."""
    if isinstance(choices, Mapping):
        per_layer = choices[embed_dim]
        return per_layer[layer]
    return choices
