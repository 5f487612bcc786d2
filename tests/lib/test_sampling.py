import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib.sampling import (
    FixedSampler,
    PreferredSampler,
    SamplingError,
    SandwichSampler,
    SpaceSampler,
    candidate_groups,
    step_generator,
)


def make_candidate(embed_dim, depth, heads=3, ratio=4.0):
    return {
        "layer_num": depth,
        "embed_dim": [embed_dim] * depth,
        "mlp_ratio": [ratio] * depth,
        "num_heads": [heads] * depth,
    }


# Three groups by (embed dim, depth) of sizes 1, 2 and 4; ordered smallest to largest.
CANDIDATES = [
    make_candidate(128, 2, heads=2),
    make_candidate(160, 2, heads=2),
    make_candidate(160, 2, heads=3),
    make_candidate(192, 3, heads=2, ratio=3.0),
    make_candidate(192, 3, heads=3, ratio=3.0),
    make_candidate(192, 3, heads=2),
    make_candidate(192, 3, heads=3),
]


def key(candidate):
    return json.dumps({k: candidate[k] for k in ("layer_num", "embed_dim", "mlp_ratio", "num_heads")})


def test_preferred_draws_only_from_file():
    sampler = PreferredSampler(CANDIDATES, seed=3)
    allowed = {key(c) for c in CANDIDATES}
    counts = collections.Counter(key(c) for step in range(3500) for c in sampler.sample(0, step))

    assert set(counts) <= allowed
    assert set(counts) == allowed
    # Uniform over 7 candidates: 500 expected each, 5 sigma is about 110.
    for count in counts.values():
        assert abs(count - 500) < 110


def test_grouping_draws_group_then_member():
    sampler = PreferredSampler(CANDIDATES, group_by_dim=True, group_by_depth=True, seed=1)
    draws = [sampler.sample(0, step)[0] for step in range(6000)]
    group_counts = collections.Counter(_embed(c) for c in draws)
    member_counts = collections.Counter(key(c) for c in draws)

    # Three groups drawn uniformly: 2000 each.
    for embed in (128, 160, 192):
        assert abs(group_counts[embed] - 2000) < 200
    # Members: 2000, 1000 each in the pair, 500 each in the group of four.
    assert abs(member_counts[key(CANDIDATES[0])] - 2000) < 200
    for index in (1, 2):
        assert abs(member_counts[key(CANDIDATES[index])] - 1000) < 150
    for index in (3, 4, 5, 6):
        assert abs(member_counts[key(CANDIDATES[index])] - 500) < 110


def test_candidate_groups_by_dim_and_depth():
    candidates = [make_candidate(128, 2), make_candidate(128, 3), make_candidate(160, 2), make_candidate(128, 2, heads=2)]

    assert candidate_groups(candidates, by_dim=True, by_depth=False) == [[0, 1, 3], [2]]
    assert candidate_groups(candidates, by_dim=False, by_depth=True) == [[0, 2, 3], [1]]
    assert candidate_groups(candidates, by_dim=True, by_depth=True) == [[0, 3], [1], [2]]
    assert candidate_groups(candidates, by_dim=False, by_depth=False) == [[0], [1], [2], [3]]


def test_sandwich_includes_base_and_top():
    sampler = SandwichSampler(PreferredSampler(CANDIDATES, seed=0), middle_count=2)
    for step in range(200):
        drawn = sampler.sample(0, step)
        assert len(drawn) == 4
        assert drawn[0] == CANDIDATES[0]
        assert drawn[-1] == CANDIDATES[-1]
        for middle in drawn[1:-1]:
            assert middle not in (CANDIDATES[0], CANDIDATES[-1])
            assert key(middle) in {key(c) for c in CANDIDATES}


@pytest.mark.parametrize("include_base,include_top", [(False, True), (True, False), (False, False)])
def test_sandwich_without_base_or_top(include_base, include_top):
    sampler = SandwichSampler(
        PreferredSampler(CANDIDATES, seed=0), middle_count=1,
        include_base=include_base, include_top=include_top,
    )
    lengths = set()
    firsts = collections.Counter()
    lasts = collections.Counter()
    for step in range(300):
        drawn = sampler.sample(0, step)
        lengths.add(len(drawn))
        firsts[key(drawn[0])] += 1
        lasts[key(drawn[-1])] += 1

    assert lengths == {1 + include_base + include_top}
    if include_base:
        assert firsts == {key(CANDIDATES[0]): 300}
    else:
        assert len(firsts) > 1
    if include_top:
        assert lasts == {key(CANDIDATES[-1]): 300}
    else:
        assert len(lasts) > 1


def test_sandwich_two_candidates_reuses_them():
    sampler = SandwichSampler(PreferredSampler(CANDIDATES[:2], seed=0), middle_count=1)

    drawn = sampler.sample(0, 0)

    assert drawn[0] == CANDIDATES[0]
    assert drawn[2] == CANDIDATES[1]
    assert drawn[1] in CANDIDATES[:2]


def test_sandwich_rejects_zero_middle():
    with pytest.raises(SamplingError, match="--sandwich"):
        SandwichSampler(PreferredSampler(CANDIDATES), middle_count=0)


def test_same_subnet_for_same_step():
    first = PreferredSampler(CANDIDATES, group_by_dim=True, seed=5)
    second = PreferredSampler(list(CANDIDATES), group_by_dim=True, seed=5)
    other_seed = PreferredSampler(CANDIDATES, group_by_dim=True, seed=6)

    sequence = [key(first.sample(epoch, step)[0]) for epoch in range(3) for step in range(50)]
    # Drawn in another order: the result depends on (seed, epoch, step) only.
    reversed_sequence = [key(second.sample(epoch, step)[0]) for epoch in reversed(range(3)) for step in reversed(range(50))]

    assert sequence == list(reversed(reversed_sequence))
    assert sequence != [key(other_seed.sample(epoch, step)[0]) for epoch in range(3) for step in range(50)]


def test_same_subnet_across_processes():
    # A fresh interpreter with another hash seed plays the part of another rank.
    script = textwrap.dedent(
        """
        import json, sys
        from lib.sampling import PreferredSampler
        candidates = json.loads(sys.stdin.read())
        sampler = PreferredSampler(candidates, group_by_dim=True, group_by_depth=True, shuffle=True, seed=11)
        print(json.dumps([sampler.sample(2, step) for step in range(20)]))
        """
    )
    outputs = []
    for hash_seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", script], input=json.dumps(CANDIDATES), capture_output=True,
            text=True, check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed}, cwd=_repo_root(),
        )
        outputs.append(json.loads(result.stdout))

    sampler = PreferredSampler(CANDIDATES, group_by_dim=True, group_by_depth=True, shuffle=True, seed=11)
    assert outputs[0] == outputs[1]
    assert outputs[0] == [sampler.sample(2, step) for step in range(20)]


def test_shuffle_permutes_layers():
    candidate = {
        "layer_num": 4, "embed_dim": [192] * 4,
        "mlp_ratio": [3.0, 3.0, 4.0, 4.0], "num_heads": [2, 3, 3, 3],
    }
    sampler = PreferredSampler([candidate], shuffle=True, seed=0)
    orders = set()
    for step in range(100):
        drawn = sampler.sample(0, step)[0]
        assert sorted(drawn["mlp_ratio"]) == sorted(candidate["mlp_ratio"])
        assert sorted(drawn["num_heads"]) == sorted(candidate["num_heads"])
        assert drawn["embed_dim"] == candidate["embed_dim"]
        orders.add((tuple(drawn["mlp_ratio"]), tuple(drawn["num_heads"])))

    assert candidate["num_heads"] == [2, 3, 3, 3]
    assert len(orders) > 4


def test_space_sampler_uniform_full_space():
    space = SimpleNamespace(embed_dim=[128, 160, 192], depth=[2, 3], num_heads=[2, 3], mlp_ratio=[3.0, 4.0])
    sampler = SpaceSampler(space, seed=0)
    draws = [sampler.sample(0, step)[0] for step in range(3000)]

    embed_counts = collections.Counter(c["embed_dim"][0] for c in draws)
    depth_counts = collections.Counter(c["layer_num"] for c in draws)
    layer_heads = collections.Counter(h for c in draws for h in c["num_heads"])
    for embed in (128, 160, 192):
        assert abs(embed_counts[embed] - 1000) < 130
    for depth in (2, 3):
        assert abs(depth_counts[depth] - 1500) < 140
    assert abs(layer_heads[2] - layer_heads[3]) < 0.1 * sum(layer_heads.values())
    for c in draws:
        assert len(c["num_heads"]) == len(c["mlp_ratio"]) == len(c["embed_dim"]) == c["layer_num"]
        assert set(c["mlp_ratio"]) <= {3.0, 4.0}

    assert sampler.smallest() == make_candidate(128, 2, heads=2, ratio=3.0)
    assert sampler.largest() == make_candidate(192, 3, heads=3, ratio=4.0)


def test_space_sampler_preferred_space():
    space = SimpleNamespace(
        embed_dim=[128, 192],
        depth={128: [2], 192: [3]},
        num_heads={128: [[2], [2, 3]], 192: [[3], [3], [2, 3]]},
        mlp_ratio={128: [[4.0], [3.0]], 192: [[3.0, 4.0], [4.0], [4.0]]},
    )
    sampler = SpaceSampler(space, seed=0)
    for step in range(200):
        drawn = sampler.sample(1, step)[0]
        embed = drawn["embed_dim"][0]
        assert drawn["layer_num"] == space.depth[embed][0]
        for layer, heads in enumerate(drawn["num_heads"]):
            assert heads in space.num_heads[embed][layer]
        for layer, ratio in enumerate(drawn["mlp_ratio"]):
            assert ratio in space.mlp_ratio[embed][layer]


def test_fixed_sampler_returns_subnet():
    sampler = FixedSampler(CANDIDATES[3])

    assert all(sampler.sample(epoch, step) == [CANDIDATES[3]] for epoch in range(2) for step in range(5))


def test_empty_candidates_rejected():
    with pytest.raises(SamplingError, match="empty"):
        PreferredSampler([])


def test_negative_step_rejected():
    with pytest.raises(SamplingError, match="step"):
        step_generator(0, 0, -1)


def _embed(candidate):
    return candidate["embed_dim"][0]


def _repo_root():
    return str(Path(__file__).resolve().parents[2])
