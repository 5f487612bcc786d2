"""Exported standalone subnets: equal outputs, save and load, tracing, torch.export and ONNX."""

import random

import pytest
import torch

from model.subnet import SubnetViT, export_subnet, load_subnet, save_subnet
from model.supernet import Supernet


def make_supernet(**changes) -> Supernet:
    args = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0,
                relative_position=True, change_qkv=True, gp=True)
    args.update(changes)
    torch.manual_seed(0)
    model = Supernet(**args).eval()
    # Give biases and layer norms non-default values so that their slicing is exercised too.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def random_candidate(rng: random.Random, model: Supernet) -> dict:
    depth = rng.randint(1, model.super_depth)
    embed = rng.choice([64, 96, 112, 128])
    return {
        "layer_num": depth,
        "embed_dim": [embed] * depth,
        "num_heads": [rng.randint(1, model.super_num_heads) for _ in range(depth)],
        "mlp_ratio": [rng.choice([2.0, 3.0, 3.5, 4.0]) for _ in range(depth)],
    }


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"relative_position": False},
        {"gp": False, "abs_pos": False},
        {"change_qkv": False, "relative_position": False, "embed_dim": 96, "num_heads": 2},
    ],
    ids=["relative", "plain", "cls-token-no-pos", "grouped-qkv"],
)
def test_export_matches_supernet_on_random_candidates(options):
    model = make_supernet(**options)
    rng = random.Random(42)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(25):
        candidate = random_candidate(rng, model)
        if not model.change_qkv:
            candidate["embed_dim"] = [rng.choice([48, 96])] * candidate["layer_num"]
        model.set_subnet(candidate)
        with torch.no_grad():
            expected = model(x)
            exported = export_subnet(model)(x)
        assert torch.allclose(exported, expected, atol=1e-5), candidate


def test_export_leaves_active_subnet_unchanged():
    model = make_supernet()
    active = model.subnet
    export_subnet(model, random_candidate(random.Random(3), model))
    assert model.subnet == active


def test_export_holds_only_the_subnet_parameters():
    model = make_supernet()
    candidate = {"layer_num": 3, "embed_dim": [96] * 3, "num_heads": [1, 2, 1], "mlp_ratio": [3.0, 4.0, 2.0]}
    subnet = export_subnet(model, candidate)
    # The supernet's count adds cls token and pos embed as embed * (patches + 2); the exported model
    # stores them as (patches + 2) * embed values too, so both counts are equal.
    assert sum(p.numel() for p in subnet.parameters()) == model.num_params(candidate)


def test_saved_subnet_loads_without_supernet(tmp_path):
    model = make_supernet()
    candidate = {"layer_num": 2, "embed_dim": [112] * 2, "num_heads": [2, 1], "mlp_ratio": [3.5, 4.0]}
    subnet = export_subnet(model, candidate)
    save_subnet(subnet, tmp_path / "subnet")
    loaded = load_subnet(tmp_path / "subnet")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), subnet(x))
    assert isinstance(loaded, SubnetViT)
    assert loaded.config["candidate"] == candidate


def test_load_subnet_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_subnet(tmp_path)


def test_load_subnet_rejects_foreign_config(tmp_path):
    (tmp_path / "config.json").write_text('{"layers": 3}')
    (tmp_path / "model.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="not an exported subnet config"):
        load_subnet(tmp_path)


def test_exported_subnet_traces_and_exports():
    model = make_supernet()
    candidate = {"layer_num": 3, "embed_dim": [128] * 3, "num_heads": [2, 1, 2], "mlp_ratio": [4.0, 3.0, 2.0]}
    subnet = export_subnet(model, candidate)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = subnet(x)
        traced = torch.jit.trace(subnet, x)
        assert torch.allclose(traced(torch.cat([x, x])[:2]), expected, atol=1e-6)
        program = torch.export.export(subnet, (x,))
        assert torch.allclose(program.module()(x), expected, atol=1e-6)


def test_exported_subnet_runs_in_onnx_runtime():
    import onnxruntime

    model = make_supernet()
    candidate = {"layer_num": 3, "embed_dim": [112] * 3, "num_heads": [2, 1, 2], "mlp_ratio": [4.0, 3.0, 2.0]}
    subnet = export_subnet(model, candidate)
    program = torch.onnx.export(
        subnet, (torch.randn(2, 3, 32, 32),), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    input_name = session.get_inputs()[0].name
    # Batch sizes other than the traced one check that the batch dimension stayed dynamic.
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        logits = session.run(None, {input_name: x.numpy()})[0]
        with torch.no_grad():
            expected = subnet(x)
        assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-5)
