"""Exported standalone subnets: equal outputs, save and load, tracing, torch.export and ONNX."""

import os
import random
import shutil
import stat

import pytest
import torch

from model import subnet as subnet_module
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


OLD_CANDIDATE = {"layer_num": 2, "embed_dim": [112] * 2, "num_heads": [2, 1], "mlp_ratio": [3.5, 4.0]}
NEW_CANDIDATE = {"layer_num": 3, "embed_dim": [96] * 3, "num_heads": [1, 2, 1], "mlp_ratio": [3.0, 4.0, 2.0]}


def saved_candidate(folder) -> dict | None:
    """Return the candidate of the export in ``folder``, or None when it is incomplete."""
    try:
        return load_subnet(folder).config["candidate"]
    except (FileNotFoundError, ValueError):
        return None


def test_save_subnet_kill_leaves_complete_export(tmp_path, monkeypatch):
    model = make_supernet()
    target = tmp_path / "subnet"
    save_subnet(export_subnet(model, OLD_CANDIDATE), target)
    states = []

    def record_state():
        """Record what a process killed right now would leave behind."""
        if target.exists():
            states.append(("final", saved_candidate(target)))
        else:
            siblings = [saved_candidate(path) for path in tmp_path.iterdir() if path.name.startswith(".subnet.")]
            states.append(("siblings", OLD_CANDIDATE in siblings and NEW_CANDIDATE in siblings))

    def recorded(function):
        def wrapper(*args, **kwargs):
            record_state()
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "rename", recorded(os.rename))
    monkeypatch.setattr(os, "replace", recorded(os.replace))
    monkeypatch.setattr(shutil, "rmtree", recorded(shutil.rmtree))
    monkeypatch.setattr(torch, "save", recorded(torch.save))
    save_subnet(export_subnet(model, NEW_CANDIDATE), target)
    record_state()
    monkeypatch.undo()

    assert len(states) >= 4
    for where, found in states:
        if where == "final":
            assert found in (OLD_CANDIDATE, NEW_CANDIDATE)
        else:
            assert found
    assert states[-1] == ("final", NEW_CANDIDATE)
    assert [path.name for path in tmp_path.iterdir()] == ["subnet"]


def test_save_subnet_failed_write_keeps_old_export(tmp_path, monkeypatch):
    model = make_supernet()
    target = tmp_path / "subnet"
    save_subnet(export_subnet(model, OLD_CANDIDATE), target)
    write_file = subnet_module._write_file
    calls = []

    def write_then_fail_second(path, write):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full")
        write_file(path, write)

    monkeypatch.setattr(subnet_module, "_write_file", write_then_fail_second)
    with pytest.raises(OSError, match="disk full"):
        save_subnet(export_subnet(model, NEW_CANDIDATE), target)

    assert calls == ["model.pth", "config.json"]
    assert saved_candidate(target) == OLD_CANDIDATE
    assert [path.name for path in tmp_path.iterdir()] == ["subnet"]


def test_save_subnet_rejects_a_file_path(tmp_path):
    path = tmp_path / "subnet"
    path.write_text("not a folder")
    with pytest.raises(FileExistsError, match="is a file, not a subnet folder"):
        save_subnet(export_subnet(make_supernet(), OLD_CANDIDATE), path)
    assert path.read_text() == "not a folder"


def test_load_subnet_rejects_weights_of_another_config(tmp_path):
    model = make_supernet()
    save_subnet(export_subnet(model, OLD_CANDIDATE), tmp_path / "old")
    save_subnet(export_subnet(model, NEW_CANDIDATE), tmp_path / "new")
    shutil.copy(tmp_path / "new" / "model.pth", tmp_path / "old" / "model.pth")

    with pytest.raises(ValueError) as error:
        load_subnet(tmp_path / "old")
    message = str(error.value)
    assert f"{tmp_path / 'old' / 'model.pth'} does not fit {tmp_path / 'old' / 'config.json'}" in message
    assert "unexpected keys: blocks.2." in message
    assert "cls_token is (1, 1, 96) in the file but (1, 1, 112) by the config" in message
    assert f"export the subnet to {tmp_path / 'old'} again" in message

    torch.save({"cls_token": torch.zeros(1, 1, 112)}, tmp_path / "old" / "model.pth")
    with pytest.raises(ValueError, match="missing keys: pos_embed, patch_embed.weight"):
        load_subnet(tmp_path / "old")


def test_save_subnet_uses_umask_modes(tmp_path, monkeypatch):
    model = make_supernet()
    # The umask is read once, at import; the test sets the value that it would have read.
    monkeypatch.setattr("model.subnet._UMASK", 0o022)
    save_subnet(export_subnet(model, OLD_CANDIDATE), tmp_path / "subnet")
    # Replacing an export gives the new folder the same modes.
    save_subnet(export_subnet(model, NEW_CANDIDATE), tmp_path / "subnet")
    assert stat.S_IMODE((tmp_path / "subnet").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "subnet" / "model.pth").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "subnet" / "config.json").stat().st_mode) == 0o644
