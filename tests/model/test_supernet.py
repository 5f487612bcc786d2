"""Supernet forward, counts and candidate checks against reference data and brute-force computations."""

import copy
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.candidate import CandidateError, candidate_id, check_candidate
from model.layers import attention, relative_position_index
from model.subnet import export_subnet
from model.supernet import Supernet

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "prenas-compat"

# The arguments that the reference logits were computed with.
FIXTURE_ARGS = dict(
    img_size=32,
    patch_size=8,
    in_chans=3,
    num_classes=10,
    embed_dim=192,
    depth=3,
    num_heads=3,
    mlp_ratio=4.0,
    qkv_bias=True,
    drop_path_rate=0.1,
    pre_norm=True,
    gp=False,
    relative_position=True,
    max_relative_position=14,
    change_qkv=True,
    abs_pos=True,
)

TINY_ARGS = dict(embed_dim=256, depth=14, num_heads=4, mlp_ratio=4.0, gp=True, relative_position=True, change_qkv=True)

# Released Tiny candidates: (interval key, depth, embed dim, num heads, mlp ratios, params in M).
TINY_RELEASED = [
    ("6.0", 12, 192, [4, 4, 4, 4, 3, 3, 3, 3, 3, 4, 3, 4], [4, 4, 4, 4, 4, 3.5, 3.5, 4, 4, 3.5, 4, 4], 5.99476),
    ("7.0", 12, 216, [4, 4, 4, 4, 4, 3, 3, 3, 4, 4, 3, 4], [4, 3.5, 4, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5], 6.997192),
    ("8.0", 12, 240, [3] * 12, [4, 3.5, 4, 4, 3.5, 3.5, 3.5, 4, 4, 3.5, 4, 3.5], 7.996552),
    ("9.0", 12, 240, [4] * 12, [4, 4, 4, 4, 4, 3.5, 4, 4, 4, 3.5, 4, 4], 8.967016),
    ("10.0", 14, 240, [4, 4, 4, 4, 4, 3, 3, 3, 4, 4, 3, 4, 3, 4], [4, 4, 4, 4, 4, 3.5, 3.5, 4, 4, 3.5, 4, 3.5, 4, 4], 9.978232),
    ("11.0", 14, 240, [4] * 14, [4.0] * 14, 10.517272),
]


def tiny_candidate(depth, embed, heads, ratios):
    return {"layer_num": depth, "embed_dim": [embed] * depth, "num_heads": heads, "mlp_ratio": ratios}


def random_candidate(rng: random.Random, model: Supernet, embeds, ratios) -> dict:
    depth = rng.randint(1, model.super_depth)
    return {
        "layer_num": depth,
        "embed_dim": [rng.choice(embeds)] * depth,
        "num_heads": [rng.randint(1, model.super_num_heads) for _ in range(depth)],
        "mlp_ratio": [rng.choice(ratios) for _ in range(depth)],
    }


@pytest.fixture(scope="module")
def fixture_model():
    model = Supernet(**FIXTURE_ARGS)
    state = torch.load(FIXTURE / "supernet.pth", map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE / "reference.pt", map_location="cpu", weights_only=True)


def test_fixture_logits_match_reference(fixture_model, reference):
    for config, expected in zip(reference["configs"], reference["logits"]):
        fixture_model.set_subnet(config)
        with torch.no_grad():
            logits = fixture_model(reference["images"])
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max().item() < 1e-4, config


def test_fixture_parameter_counts_match(fixture_model, reference):
    for config, expected in zip(reference["configs"], reference["n_parameters"]):
        assert fixture_model.num_params(config) == expected, config


def test_fixture_configs_differ_from_each_other(fixture_model, reference):
    # Guards the comparison above: a model that ignored the candidate would give equal logits.
    outputs = []
    for config in reference["configs"]:
        fixture_model.set_subnet(config)
        with torch.no_grad():
            outputs.append(fixture_model(reference["images"]))
    for first in range(len(outputs)):
        for second in range(first + 1, len(outputs)):
            assert (outputs[first] - outputs[second]).abs().max() > 0.1


def test_tiny_released_parameter_counts():
    model = Supernet(**TINY_ARGS)
    for key, depth, embed, heads, ratios, params in TINY_RELEASED:
        assert model.num_params(tiny_candidate(depth, embed, heads, ratios)) / 1e6 == pytest.approx(params, abs=1e-9), key


def test_tiny_smallest_flops_match_published():
    model = Supernet(**TINY_ARGS)
    _, depth, embed, heads, ratios, _ = TINY_RELEASED[0]
    assert round(model.flops(tiny_candidate(depth, embed, heads, ratios)) / 1e9, 2) == 1.38


def brute_force_num_params(model: Supernet, candidate: dict) -> int:
    """Count by slicing every used tensor of the state dict, following the reference's rule."""
    state = model.state_dict()
    embed = candidate["embed_dim"][0]
    total = state["patch_embed_super.proj.weight"][:embed].numel() + embed
    for index in range(candidate["layer_num"]):
        width = 64 * candidate["num_heads"][index]
        hidden = int(embed * candidate["mlp_ratio"][index])
        prefix = f"blocks.{index}."
        total += state[prefix + "attn.qkv.weight"][: 3 * width, :embed].numel() + 3 * width
        total += state[prefix + "attn.proj.weight"][:embed, :width].numel() + embed
        total += 4 * embed
        total += state[prefix + "fc1.weight"][:hidden, :embed].numel() + hidden
        total += state[prefix + "fc2.weight"][:embed, :hidden].numel() + embed
        for name in ("k", "v"):
            for table in ("v", "h"):
                total += state[f"{prefix}attn.rel_pos_embed_{name}.embeddings_table_{table}"][:, :64].numel()
    total += 2 * embed + state["head.weight"][:, :embed].numel() + state["head.bias"].numel()
    return total + embed * (model.num_patches + 2)


def test_num_params_matches_brute_force():
    model = Supernet(img_size=32, patch_size=4, num_classes=7, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
                     relative_position=True, change_qkv=True)
    rng = random.Random(0)
    for _ in range(30):
        candidate = random_candidate(rng, model, [96, 128, 192], [2.5, 3.0, 4.0])
        assert model.num_params(candidate) == brute_force_num_params(model, candidate)


def test_macs_match_flop_counter_without_relative_position():
    model = Supernet(img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=3, num_heads=2, gp=True,
                     change_qkv=True).eval()
    rng = random.Random(1)
    for _ in range(5):
        candidate = random_candidate(rng, model, [64, 96, 128], [3.0, 4.0])
        subnet = export_subnet(model, candidate)
        flops = []
        for batch in (1, 2):
            # The flop counter counts the matrix products of the math kernel but not those inside a fused one.
            with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
                subnet(torch.randn(batch, 3, 32, 32))
            flops.append(counter.get_total_flops())
        # The difference leaves out work done once per call, such as folding a bias into another.
        assert flops[1] - flops[0] == 2 * model.macs(candidate)


def dense_relative_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, scale, k_tables, v_tables, max_rel):
    """Attention with relative position computed the direct way: one embedding vector per token pair."""
    batch, tokens, _ = x.shape
    width = qkv_weight.shape[0] // 3
    qkv = F.linear(x, qkv_weight, qkv_bias).view(batch, tokens, width, 3)
    q, k, v = (qkv[..., t].reshape(batch, tokens, heads, -1).transpose(1, 2) for t in range(3))
    grid = math.isqrt(tokens - 1)

    def pair_embeddings(table_v, table_h):
        embeddings = torch.zeros(tokens, tokens, table_v.shape[1], dtype=x.dtype)
        for i in range(tokens):
            for j in range(tokens):
                if i == 0 or j == 0:
                    vertical = horizontal = 0
                else:
                    vertical = max(-max_rel, min(max_rel, (j - 1) // grid - (i - 1) // grid)) + max_rel + 1
                    horizontal = max(-max_rel, min(max_rel, (j - 1) % grid - (i - 1) % grid)) + max_rel + 1
                embeddings[i, j] = table_v[vertical] + table_h[horizontal]
        return embeddings

    r_k = pair_embeddings(*k_tables)
    r_v = pair_embeddings(*v_tables)
    logits = (q @ k.transpose(-2, -1) + torch.einsum("bhid,ijd->bhij", q, r_k)) * scale
    weights = logits.softmax(-1)
    out = weights @ v + torch.einsum("bhij,ijd->bhid", weights, r_v)
    return F.linear(out.transpose(1, 2).reshape(batch, tokens, width), proj_weight, proj_bias)


@pytest.mark.parametrize("fused", [False, True], ids=["materialized", "fused"])
@pytest.mark.parametrize("grid,max_rel", [(4, 14), (5, 2)])
def test_relative_attention_matches_dense_pairs(grid, max_rel, fused):
    generator = torch.Generator().manual_seed(grid)
    tokens, embed, heads, head_dim = grid * grid + 1, 24, 2, 8
    width = heads * head_dim
    rows = 2 * max_rel + 2
    x = torch.randn(3, tokens, embed, generator=generator, dtype=torch.float64)
    qkv_weight = torch.randn(3 * width, embed, generator=generator, dtype=torch.float64, requires_grad=True)
    qkv_bias = torch.randn(3 * width, generator=generator, dtype=torch.float64)
    proj_weight = torch.randn(embed, width, generator=generator, dtype=torch.float64)
    tables = [torch.randn(rows, head_dim, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    scale = head_dim**-0.5

    dense = dense_relative_attention(x, qkv_weight, qkv_bias, proj_weight, None, heads, scale, tables[:2], tables[2:], max_rel)
    factored = attention(
        x, qkv_weight, qkv_bias, proj_weight, None, heads, scale, "interleaved",
        torch.cat(tables[:2]), torch.cat(tables[2:]), relative_position_index(tokens, max_rel), fused=fused,
    )
    assert torch.allclose(factored, dense, atol=1e-10)

    dense_grads = torch.autograd.grad(dense.square().sum(), [qkv_weight, *tables])
    factored_grads = torch.autograd.grad(factored.square().sum(), [qkv_weight, *tables])
    for dense_grad, factored_grad in zip(dense_grads, factored_grads):
        assert torch.allclose(factored_grad, dense_grad, atol=1e-9)


def test_gradients_only_reach_sliced_weights():
    model = Supernet(img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=3, num_heads=2, mlp_ratio=4.0,
                     relative_position=True, change_qkv=True, gp=True)
    candidate = {"layer_num": 2, "embed_dim": [96, 96], "num_heads": [1, 2], "mlp_ratio": [3.0, 4.0]}
    model.set_subnet(candidate)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in model.named_parameters()}

    def outside(name, *used):
        """The gradient of ``name`` with the used slice zeroed."""
        grad = grads[name].clone()
        grad[used] = 0
        return grad

    embed = 96
    assert grads["patch_embed_super.proj.weight"][:embed].abs().sum() > 0
    assert outside("patch_embed_super.proj.weight", slice(None, embed)).abs().max() == 0
    assert outside("cls_token", slice(None), slice(None), slice(None, embed)).abs().max() == 0
    assert outside("pos_embed", slice(None), slice(None), slice(None, embed)).abs().max() == 0
    for index, (heads, ratio) in enumerate(zip(candidate["num_heads"], candidate["mlp_ratio"])):
        width, hidden = 64 * heads, int(embed * ratio)
        prefix = f"blocks.{index}."
        assert grads[prefix + "attn.qkv.weight"][: 3 * width, :embed].abs().sum() > 0
        assert outside(prefix + "attn.qkv.weight", slice(None, 3 * width), slice(None, embed)).abs().max() == 0
        assert outside(prefix + "attn.proj.weight", slice(None, embed), slice(None, width)).abs().max() == 0
        assert outside(prefix + "fc1.weight", slice(None, hidden), slice(None, embed)).abs().max() == 0
        assert outside(prefix + "fc2.weight", slice(None, embed), slice(None, hidden)).abs().max() == 0
        assert outside(prefix + "attn_layer_norm.weight", slice(None, embed)).abs().max() == 0
    unused = [name for name in grads if name.startswith("blocks.2.")]
    assert unused
    for name in unused:
        assert grads[name].abs().max() == 0, name
    assert outside("head.weight", slice(None), slice(None, embed)).abs().max() == 0


def test_subnet_survives_dtype_cast_and_deepcopy():
    model = Supernet(img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=3, num_heads=2,
                     relative_position=True, change_qkv=True).eval()
    candidate = {"layer_num": 2, "embed_dim": [64, 64], "num_heads": [2, 1], "mlp_ratio": [2.0, 4.0]}
    model.set_subnet(candidate)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)

    clone = copy.deepcopy(model)
    assert candidate_id(clone.subnet) == candidate_id(candidate)
    with torch.no_grad():
        assert torch.equal(clone(x), expected)

    model.to(torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(x.double()), expected.double(), atol=1e-5)
    # The layers slice the live parameters: a change to a used weight changes the output.
    with torch.no_grad():
        model.blocks[0].fc1.weight[0, 0] += 1.0
        assert not torch.allclose(model(x.double()), expected.double(), atol=1e-5)


def test_deepcopy_keeps_own_storage():
    model = Supernet(img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=2, num_heads=2, change_qkv=True)
    clone = copy.deepcopy(model)
    assert clone.head.weight.data_ptr() != model.head.weight.data_ptr()
    assert candidate_id(clone.subnet) == candidate_id(model.subnet)


TINY_LIMITS = dict(embed_dim=256, depth=14, num_heads=4, mlp_ratio=4.0)


def valid_tiny(**changes):
    candidate = tiny_candidate(12, 192, [4] * 12, [4.0] * 12)
    candidate.update(changes)
    return candidate


@pytest.mark.parametrize(
    "candidate,message",
    [
        (tiny_candidate(16, 192, [4] * 16, [4.0] * 16), "layer_num=16"),
        (valid_tiny(embed_dim=[320] * 12), "embed_dim=320"),
        (valid_tiny(num_heads=[5] + [4] * 11), "num_heads=5"),
        (valid_tiny(mlp_ratio=[4.5] + [4.0] * 11), "mlp_ratio=4.5"),
        (valid_tiny(mlp_ratio=[4.0] * 11), "has 11 values but layer_num is 12"),
        (valid_tiny(embed_dim=[192] * 11 + [216]), "repeat one value"),
        ({"layer_num": 12, "embed_dim": [192] * 12, "mlp_ratio": [4.0] * 12}, "missing key"),
        (valid_tiny(layer_num=0), "layer_num=0"),
        (valid_tiny(num_heads=[0] + [4] * 11), "num_heads=0"),
        (valid_tiny(mlp_ratio="4.0"), "must be a list"),
        (valid_tiny(layer_num=12.5), "whole number"),
    ],
)
def test_invalid_candidate_rejected(candidate, message):
    with pytest.raises(CandidateError, match=message):
        check_candidate(candidate, **TINY_LIMITS)


def test_set_subnet_rejects_deep_candidate_without_change():
    model = Supernet(**TINY_ARGS)
    before = model.subnet
    with pytest.raises(CandidateError, match="layer_num=16 is outside the supernet's depth range 1..14"):
        model.set_subnet(tiny_candidate(16, 192, [4] * 16, [4.0] * 16))
    assert model.subnet == before


def test_check_candidate_keeps_extra_keys():
    checked = check_candidate({**valid_tiny(), "num_params": 5.9, "score": 1.5}, **TINY_LIMITS)
    assert checked["num_params"] == 5.9
    assert checked["score"] == 1.5
    assert checked["mlp_ratio"] == [4.0] * 12


def test_input_size_mismatch_is_reported():
    model = Supernet(img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=2, num_heads=2, change_qkv=True)
    with pytest.raises(ValueError, match=r"\(64, 64\) pixels but the supernet was built for 32x32"):
        model(torch.randn(1, 3, 64, 64))


def test_training_after_inference_mode():
    model = Supernet(img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=2, num_heads=2,
                     relative_position=True, change_qkv=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert model.blocks[0].attn.rel_pos_embed_k.embeddings_table_v.grad is not None


def test_bfloat16_autocast_close_to_float32():
    torch.manual_seed(0)
    model = Supernet(img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0,
                     relative_position=True, change_qkv=True, gp=True)
    model.set_subnet({"layer_num": 2, "embed_dim": [96, 96], "num_heads": [1, 2], "mlp_ratio": [2.0, 1.5]})
    images = torch.randn(4, 3, 32, 32)
    reference = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    logits.float().sum().backward()
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(logits.float(), reference, atol=5e-2, rtol=5e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_embed_dim_above_64_per_head():
    # The search-space check allows 64 * NUM_HEADS <= EMBED_DIM; the relative-position tables
    # are then wider than the heads and are sliced to 64 columns.
    torch.manual_seed(0)
    model = Supernet(img_size=32, patch_size=8, num_classes=10, embed_dim=192, depth=3, num_heads=2, mlp_ratio=4.0,
                     gp=True, relative_position=True, change_qkv=True).eval()
    candidate = {"layer_num": 2, "embed_dim": [160, 160], "mlp_ratio": [3.0, 4.0], "num_heads": [2, 1]}
    model.set_subnet(candidate)
    images = torch.randn(3, 3, 32, 32)

    exported = export_subnet(model, candidate)

    assert torch.allclose(model(images), exported(images), atol=1e-6)
    assert model.num_params(candidate) == sum(parameter.numel() for parameter in exported.parameters())
    with pytest.raises(ValueError, match="at least 64 x num heads"):
        Supernet(embed_dim=192, depth=1, num_heads=4, change_qkv=True)
