"""Tests of the proxy gradient, the vectorised subnet scores and the block scores."""

import random

import numpy as np
import pytest
import torch

from lib.proxy import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ProxyError,
    SubnetScorer,
    data_free_batch,
    data_free_gradient,
    data_gradient,
    head_block_scores,
    mlp_block_scores,
    needs_gradient,
)
from lib.search import Candidate, CandidateBatch
from model.supernet import Supernet

SUMMING_METHODS = ("left_super_taylor6", "left_super_taylor5", "left_super_taylor9", "left_super_l1norm")
HEAD_DIM = 64


def make_supernet(**overrides) -> Supernet:
    settings = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
                    gp=True, relative_position=True, change_qkv=True)
    settings.update(overrides)
    torch.manual_seed(0)
    return Supernet(**settings)


@pytest.fixture(scope="module")
def weights_and_gradients():
    """Parameters and gradients with every entry random, biases and layer norms included."""
    model = make_supernet()
    generator = torch.Generator().manual_seed(1)
    parameters = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    gradients = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    return model, parameters, gradients


def sliced_parameters(state: dict, candidate: Candidate) -> list[torch.Tensor]:
    """Build the tensors a subnet uses, slicing each supernet weight explicitly."""
    embed = candidate.embed_dim
    tensors = [
        state["patch_embed_super.proj.weight"][:embed],
        state["patch_embed_super.proj.bias"][:embed],
        state["norm.weight"][:embed],
        state["norm.bias"][:embed],
        state["head.weight"][:, :embed],
        state["head.bias"],
    ]
    for layer, (heads, ratio) in enumerate(zip(candidate.num_heads, candidate.mlp_ratio)):
        prefix = f"blocks.{layer}."
        width = HEAD_DIM * heads
        hidden = int(embed * ratio)
        # Row 3*j + t belongs to q (t=0), k (t=1) or v (t=2); the subnet regroups them as q, k, v.
        rows = [3 * j + t for t in range(3) for j in range(width)]
        tensors += [
            state[prefix + "attn.qkv.weight"][rows][:, :embed],
            state[prefix + "attn.qkv.bias"][rows],
            state[prefix + "attn.proj.weight"][:embed, :width],
            state[prefix + "attn.proj.bias"][:embed],
            state[prefix + "attn_layer_norm.weight"][:embed],
            state[prefix + "attn_layer_norm.bias"][:embed],
            state[prefix + "ffn_layer_norm.weight"][:embed],
            state[prefix + "ffn_layer_norm.bias"][:embed],
            state[prefix + "fc1.weight"][:hidden, :embed],
            state[prefix + "fc1.bias"][:hidden],
            state[prefix + "fc2.weight"][:embed, :hidden],
            state[prefix + "fc2.bias"][:embed],
        ]
    return tensors


def brute_force_score(method: str, parameters: dict, gradients: dict, candidate: Candidate) -> float:
    weights = [tensor.double() for tensor in sliced_parameters(parameters, candidate)]
    grads = [tensor.double() for tensor in sliced_parameters(gradients, candidate)]
    if method == "left_super_taylor6":
        return float(sum((w * g).abs().sum() for w, g in zip(weights, grads)))
    if method == "left_super_taylor5":
        return float(abs(sum((w * g).sum() for w, g in zip(weights, grads))))
    if method == "left_super_taylor9":
        return float(sum(g.abs().sum() for g in grads))
    if method == "left_super_l1norm":
        return float(sum(w.abs().sum() for w in weights))
    raise ValueError(method)


def random_candidates(count: int, seed: int, max_embed=192, max_depth=4, max_heads=3) -> list[Candidate]:
    rng = random.Random(seed)
    candidates = []
    for _ in range(count):
        depth = rng.randint(1, max_depth)
        candidates.append(Candidate(
            embed_dim=rng.randint(1, max_embed),
            num_heads=tuple(rng.randint(1, max_heads) for _ in range(depth)),
            mlp_ratio=tuple(rng.choice([0.5, 1.0, 2.5, 3.0, 3.5, 4.0]) for _ in range(depth)),
        ))
    # Edge cases: the largest subnet, and embed dims below the q/k/v width.
    candidates.append(Candidate(max_embed, (max_heads,) * max_depth, (4.0,) * max_depth))
    candidates.append(Candidate(40, (3, 1), (4.0, 2.5)))
    return candidates


@pytest.mark.parametrize("method", SUMMING_METHODS)
def test_vectorised_score_matches_brute_force(weights_and_gradients, method):
    _, parameters, gradients = weights_and_gradients
    candidates = random_candidates(25, seed=3)
    scorer = SubnetScorer(parameters, gradients, method, depth=4)

    scores = scorer.score(CandidateBatch.from_candidates(candidates))

    for candidate, score in zip(candidates, scores):
        expected = brute_force_score(method, parameters, gradients, candidate)
        assert score == pytest.approx(expected, rel=1e-9), candidate


def test_score_at_real_gradient_matches_brute_force():
    model = make_supernet(drop_rate=0.2, drop_path_rate=0.3)
    largest = model.largest_candidate()
    gradients = data_free_gradient(model, largest, batch_size=6, input_size=32, seed=5)
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    candidates = random_candidates(10, seed=4)

    scores = SubnetScorer(parameters, gradients, "left_super_taylor6", depth=4).score(
        CandidateBatch.from_candidates(candidates))

    for candidate, score in zip(candidates, scores):
        assert score == pytest.approx(brute_force_score("left_super_taylor6", parameters, gradients, candidate),
                                      rel=1e-9)
    assert scores.min() > 0


def test_score_single_candidate_equals_batch(weights_and_gradients):
    _, parameters, gradients = weights_and_gradients
    candidates = random_candidates(6, seed=8)
    scorer = SubnetScorer(parameters, gradients, "left_super_taylor6", depth=4)

    together = scorer.score(CandidateBatch.from_candidates(candidates))
    alone = [scorer.score(CandidateBatch.from_candidates([c]))[0] for c in candidates]

    np.testing.assert_allclose(together, alone, rtol=1e-12)


def test_scorer_rejects_oversized_candidates(weights_and_gradients):
    _, parameters, gradients = weights_and_gradients
    scorer = SubnetScorer(parameters, gradients, "left_super_taylor6", depth=4)

    with pytest.raises(ProxyError, match="deeper"):
        scorer.score(CandidateBatch.from_candidates([Candidate(64, (1,) * 5, (1.0,) * 5)]))
    with pytest.raises(ProxyError, match="q/k/v width 256"):
        scorer.score(CandidateBatch.from_candidates([Candidate(64, (4,), (1.0,))]))
    with pytest.raises(ProxyError, match="embed dim 200"):
        scorer.score(CandidateBatch.from_candidates([Candidate(200, (1,), (1.0,))]))
    with pytest.raises(ProxyError, match="hidden width"):
        scorer.score(CandidateBatch.from_candidates([Candidate(192, (1,), (4.5,))]))


def test_scorer_rejects_unknown_and_params_methods(weights_and_gradients):
    _, parameters, gradients = weights_and_gradients
    with pytest.raises(ProxyError, match="unknown score method 'taylor6'"):
        SubnetScorer(parameters, gradients, "taylor6", depth=4)
    with pytest.raises(ProxyError, match="cost model"):
        SubnetScorer(parameters, gradients, "params", depth=4)
    with pytest.raises(ProxyError, match="needs the proxy gradient"):
        SubnetScorer(parameters, None, "left_super_taylor6", depth=4).score(
            CandidateBatch.from_candidates([Candidate(64, (1,), (1.0,))]))


def test_l1norm_needs_no_gradient(weights_and_gradients):
    _, parameters, _ = weights_and_gradients
    candidate = Candidate(100, (2, 3), (3.0, 4.0))
    score = SubnetScorer(parameters, None, "left_super_l1norm", depth=4).score(
        CandidateBatch.from_candidates([candidate]))[0]
    assert score == pytest.approx(brute_force_score("left_super_l1norm", parameters, parameters, candidate), rel=1e-9)


def test_needs_gradient():
    assert needs_gradient("left_super_taylor6", ["deeper_is_better", "deeper_is_better"])
    assert not needs_gradient("params", ["deeper_is_better", "deeper_is_better"])
    assert not needs_gradient("left_super_l1norm", ["deeper_is_better"])
    assert needs_gradient("params", ["balance_taylor6_max_dim", "deeper_is_better"])
    with pytest.raises(ProxyError, match="unknown block score method"):
        needs_gradient("params", ["balance_taylor5"])


# ---------------------------------------------------------------------------------------------
# Gradient


def test_data_free_batch_split_across_ranks():
    whole = data_free_batch(10, 16, seed=3)
    for world_size in (2, 3):
        parts = [data_free_batch(10, 16, seed=3, rank=rank, world_size=world_size) for rank in range(world_size)]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    assert not torch.equal(data_free_batch(10, 16, seed=4), whole)


def test_data_free_batch_channel_statistics():
    images = data_free_batch(64, 32, seed=0)
    assert images.shape == (64, 3, 32, 32)
    for channel in range(3):
        assert images[:, channel].mean().item() == pytest.approx(IMAGENET_MEAN[channel], abs=0.01)
        assert images[:, channel].std().item() == pytest.approx(IMAGENET_STD[channel], abs=0.01)


def test_data_free_batch_rejects_small_batch():
    with pytest.raises(ProxyError, match="raise --batch-size to at least 4"):
        data_free_batch(3, 16, seed=0, rank=0, world_size=4)


def test_data_free_gradient_sums_rank_shares():
    model = make_supernet(drop_rate=0.3, drop_path_rate=0.5)
    largest = model.largest_candidate()
    whole = data_free_gradient(model, largest, batch_size=6, input_size=32, seed=2)
    # Without a process group the all-reduce is a no-op, so each call returns one rank's share.
    shares = [data_free_gradient(model, largest, batch_size=6, input_size=32, seed=2, rank=rank, world_size=2)
              for rank in range(2)]

    for name, gradient in whole.items():
        torch.testing.assert_close(shares[0][name] + shares[1][name], gradient, rtol=1e-4, atol=1e-6)
    assert whole["blocks.0.fc1.weight"].abs().sum() > 0


def test_gradient_ignores_dropout():
    model = make_supernet(drop_rate=0.3, drop_path_rate=0.5)
    model.train()
    largest = model.largest_candidate()
    first = data_free_gradient(model, largest, batch_size=4, input_size=32, seed=1)
    second = data_free_gradient(model, largest, batch_size=4, input_size=32, seed=1)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


def test_gradient_restores_model_state():
    model = make_supernet()
    model.train()
    small = {"layer_num": 2, "embed_dim": [64, 64], "mlp_ratio": [1.0, 2.0], "num_heads": [1, 2]}
    model.set_subnet(small)

    gradients = data_free_gradient(model, model.largest_candidate(), batch_size=2, input_size=32, seed=0)

    assert model.training
    assert model.subnet["num_heads"] == [1, 2]
    assert all(p.grad is None for p in model.parameters())
    # The gradient was taken at the largest subnet: deep layers and wide heads have gradients.
    assert gradients["blocks.3.attn.qkv.weight"][-3:].abs().sum() > 0


def test_data_gradient_is_mean_over_batches():
    model = make_supernet()
    largest = model.largest_candidate()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 3, 32, 32, generator=generator), torch.randint(0, 10, (3,), generator=generator))
               for _ in range(3)]

    gradients = data_gradient(model, largest, batches, max_batches=2)

    model.eval()
    model.zero_grad()
    for images, labels in batches[:2]:
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(gradients[name], parameter.grad / 2, rtol=1e-5, atol=1e-8)


def test_data_gradient_rejects_empty_loader():
    model = make_supernet()
    with pytest.raises(ProxyError, match="no batch"):
        data_gradient(model, model.largest_candidate(), [])


# ---------------------------------------------------------------------------------------------
# Block scores


def brute_force_head_scores(parameters, gradients, method, embed, lower, upper, depth):
    """Score of raising each layer from ``lower`` to ``upper`` heads, by explicit row selection."""
    scores = []
    for layer in range(depth):
        name = f"blocks.{layer}.attn.qkv.weight"
        weight, gradient = parameters[name].double(), gradients[name].double()
        element = (weight * gradient).abs()
        if method.startswith("balance"):
            element = element / weight.abs().sum() / gradient.abs().sum()
        rows = [3 * j + t for t in range(3) for j in range(HEAD_DIM * lower, HEAD_DIM * upper)]
        scores.append(float(element[rows][:, :embed].sum().abs()))
    return np.array(scores)


def brute_force_mlp_scores(parameters, gradients, method, embed, lower, upper, depth):
    scores = []
    for layer in range(depth):
        total = 0.0
        for name, axis in ((f"blocks.{layer}.fc1.weight", 0), (f"blocks.{layer}.fc2.weight", 1)):
            weight, gradient = parameters[name].double(), gradients[name].double()
            element = (weight * gradient).abs()
            if method.startswith("balance"):
                element = element / weight.abs().sum() / gradient.abs().sum()
            start, stop = int(embed * lower), int(embed * upper)
            block = element[start:stop, :embed] if axis == 0 else element[:embed, start:stop]
            total += float(block.sum().abs())
        scores.append(total)
    return np.array(scores)


@pytest.mark.parametrize("method", ["balance_taylor6_max_dim", "balance_taylor6", "taylor6"])
def test_block_scores_match_brute_force(weights_and_gradients, method):
    _, parameters, gradients = weights_and_gradients
    # The space's largest embed dim (192) is the supernet's, so restricting to it changes nothing.
    embed_dims, head_choices, ratio_choices = [128, 160, 192], [1, 2, 3], [2.0, 3.5, 4.0]

    head = head_block_scores(parameters, gradients, method, embed_dims=embed_dims, num_heads=head_choices,
                             depth=4)
    mlp = mlp_block_scores(parameters, gradients, method, embed_dims=embed_dims, mlp_ratios=ratio_choices,
                           depth=4)

    for embed in embed_dims:
        table_embed = 192 if method.endswith("max_dim") else embed
        for lower, upper in zip(head_choices, head_choices[1:]):
            expected = brute_force_head_scores(parameters, gradients, method, table_embed, lower, upper, 4)
            np.testing.assert_allclose(head[(embed, upper)], expected, rtol=1e-9)
        for lower, upper in zip(ratio_choices, ratio_choices[1:]):
            expected = brute_force_mlp_scores(parameters, gradients, method, table_embed, lower, upper, 4)
            np.testing.assert_allclose(mlp[(embed, upper)], expected, rtol=1e-9)
    assert set(head) == {(e, h) for e in embed_dims for h in (2, 3)}


def test_balance_normalises_over_the_largest_embed_dim(weights_and_gradients):
    _, parameters, gradients = weights_and_gradients
    head = head_block_scores(parameters, gradients, "balance_taylor6_max_dim", embed_dims=[96, 128],
                             num_heads=[1, 2], depth=1)
    weight = parameters["blocks.0.attn.qkv.weight"][:, :128].double()
    gradient = gradients["blocks.0.attn.qkv.weight"][:, :128].double()
    element = (weight * gradient).abs() / weight.abs().sum() / gradient.abs().sum()
    rows = [3 * j + t for t in range(3) for j in range(64, 128)]
    assert head[(96, 2)][0] == pytest.approx(float(element[rows].sum()), rel=1e-9)
    assert head[(128, 2)][0] == head[(96, 2)][0]


def test_deeper_is_better_has_no_block_scores(weights_and_gradients):
    _, parameters, gradients = weights_and_gradients
    assert head_block_scores(parameters, None, "deeper_is_better", embed_dims=[64], num_heads=[1, 2], depth=4) is None
    assert mlp_block_scores(parameters, None, "deeper_is_better", embed_dims=[64], mlp_ratios=[1.0], depth=4) is None
    with pytest.raises(ProxyError, match="unknown block score method 'balance_taylor5_max_dim'"):
        head_block_scores(parameters, gradients, "balance_taylor5_max_dim", embed_dims=[64], num_heads=[1, 2],
                          depth=4)
