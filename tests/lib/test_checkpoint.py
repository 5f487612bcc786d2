import argparse
import logging
import os
import stat
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from lib.checkpoint import (
    CheckpointError,
    adapt_for_finetune,
    args_to_plain,
    extract_state_dict,
    load_checkpoint_file,
    load_supernet_weights,
    remove_stale_temporaries,
    save_checkpoint,
)
from model.supernet import Supernet

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "prenas-compat" / "supernet.pth"


def make_supernet(**overrides):
    settings = dict(
        img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=2, num_heads=2,
        mlp_ratio=4.0, relative_position=True, change_qkv=True, max_relative_position=14, gp=True,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    return Supernet(**settings)


def test_save_and_load_roundtrip(tmp_path):
    model = make_supernet()
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(lr=0.1, output_dir=tmp_path, opt_betas=None)

    save_checkpoint({"model": model.state_dict(), "epoch": 3, "args": args_to_plain(args)}, path)
    loaded = load_checkpoint_file(path)

    assert loaded["epoch"] == 3
    assert loaded["args"] == {"lr": 0.1, "output_dir": str(tmp_path), "opt_betas": None}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


def test_save_rejects_namespace(tmp_path):
    with pytest.raises(TypeError, match="args_to_plain"):
        save_checkpoint({"args": argparse.Namespace(lr=1.0)}, tmp_path / "x.pth")


def test_load_allows_namespace_args(tmp_path):
    # The released checkpoints pickle their argparse arguments.
    path = tmp_path / "released.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=5e-4, gp=True)}, path)

    loaded = load_checkpoint_file(path)

    assert loaded["args"].lr == 5e-4
    assert loaded["args"].gp is True


def test_load_rejects_other_objects(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {"w": torch.ones(2)}, "path": Path("/tmp")}, path)

    with pytest.raises(CheckpointError, match=str(path)) as error:
        load_checkpoint_file(path)
    assert "pathlib" in str(error.value)


class _RunsCommand:
    """A pickle payload that would run a shell command if it were ever unpickled without restrictions."""

    def __reduce__(self):
        return os.system, ("touch should-never-exist",)


def test_load_rejects_blocked_function(tmp_path):
    path = tmp_path / "malicious.pth"
    torch.save({"model": {"w": torch.ones(2)}, "payload": _RunsCommand()}, path)

    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path)

    assert f"checkpoint {path} refers to posix.system" in str(error.value)
    assert "nothing in the file was run" in str(error.value)
    assert not (Path.cwd() / "should-never-exist").exists()


@pytest.mark.parametrize("content", [b"hello, a text file named like a checkpoint\n", b"{"])
def test_text_file_reported_as_corrupt(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)

    with pytest.raises(CheckpointError, match="corrupt or truncated") as error:
        load_checkpoint_file(path)
    assert str(path) in str(error.value)


def test_directory_reported_as_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory; pass the checkpoint file inside it"):
        load_checkpoint_file(tmp_path)


def test_namespace_allowed_only_during_load(tmp_path):
    path = tmp_path / "released.pth"
    torch.save({"args": argparse.Namespace(lr=5e-4)}, path)
    load_checkpoint_file(path)

    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


def test_truncated_file_reported_by_path(tmp_path):
    model = make_supernet()
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match="corrupt or truncated") as error:
        load_checkpoint_file(path)
    assert str(path) in str(error.value)


def test_garbage_file_reported_by_path(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")

    with pytest.raises(CheckpointError, match="corrupt or truncated") as error:
        load_checkpoint_file(path)
    assert str(path) in str(error.value)


def test_missing_file_reported_by_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as error:
        load_checkpoint_file(tmp_path / "nope.pth")
    assert "nope.pth" in str(error.value)


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, path)
    original_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", original_save)

    assert load_checkpoint_file(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


def test_save_uses_umask_mode(tmp_path, monkeypatch):
    # The umask is read once, at import; the test sets the value that it would have read.
    monkeypatch.setattr("lib.fileio._UMASK", 0o022)
    save_checkpoint({"epoch": 1}, tmp_path / "checkpoint.pth")
    assert stat.S_IMODE((tmp_path / "checkpoint.pth").stat().st_mode) == 0o644


def test_extract_strips_prefixes(caplog):
    weights = {"module.head.weight": torch.ones(1), "module._orig_mod.norm.bias": torch.zeros(1)}

    with caplog.at_level(logging.INFO, logger="lib.checkpoint"):
        state = extract_state_dict({"model": weights, "epoch": 3})

    assert sorted(state) == ["head.weight", "norm.bias"]
    assert "'module.' from 2" in caplog.text
    assert "'_orig_mod.' from 1" in caplog.text


def test_extract_bare_state_dict():
    weights = OrderedDict(a=torch.ones(1), b=torch.zeros(2))

    state = extract_state_dict(weights)

    assert list(state) == ["a", "b"]


def test_extract_rejects_non_tensors():
    with pytest.raises(CheckpointError, match="no state dict"):
        extract_state_dict({"epoch": 3, "optimizer": {}})


def test_load_weights_fixture_roundtrip():
    # The reference-layout fixture: every key and shape must match a supernet of its size.
    model = make_supernet(embed_dim=192, depth=3, num_heads=3, gp=False)
    state = extract_state_dict(load_checkpoint_file(FIXTURE))

    load_supernet_weights(model, state)

    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)


def test_mismatch_max_relative_position():
    source = make_supernet(max_relative_position=7)
    target = make_supernet(max_relative_position=14)

    with pytest.raises(CheckpointError) as error:
        load_supernet_weights(target, source.state_dict())
    message = str(error.value)
    assert "shape mismatch" in message
    assert "embeddings_table_v" in message
    assert "--max_relative_position 7" in message
    assert "16 rows" in message


def test_mismatch_class_count():
    source = make_supernet(num_classes=100)

    with pytest.raises(CheckpointError) as error:
        load_supernet_weights(make_supernet(num_classes=10), source.state_dict())
    assert "100 classes" in str(error.value)
    assert "head.weight" in str(error.value)


def test_mismatch_depth():
    source = make_supernet(depth=3)

    with pytest.raises(CheckpointError) as error:
        load_supernet_weights(make_supernet(depth=2), source.state_dict())
    message = str(error.value)
    assert "unexpected in the checkpoint" in message
    assert "blocks.2." in message
    assert "3 blocks and the model 2" in message


def test_mismatch_embed_dim():
    source = make_supernet(embed_dim=192, num_heads=3)

    with pytest.raises(CheckpointError) as error:
        load_supernet_weights(make_supernet(), source.state_dict())
    assert "embed dim is 192 and the model's 128" in str(error.value)


def test_mismatch_missing_relative_position():
    source = make_supernet(relative_position=False)

    with pytest.raises(CheckpointError) as error:
        load_supernet_weights(make_supernet(), source.state_dict())
    assert "missing from the checkpoint" in str(error.value)
    assert "drop --relative_position" in str(error.value)


def test_finetune_adapts_head_and_pos_embed(caplog):
    source = make_supernet(num_classes=100, img_size=32)
    target = make_supernet(num_classes=10, img_size=48)

    with caplog.at_level(logging.INFO, logger="lib.checkpoint"):
        adapted, dropped = adapt_for_finetune(target, source.state_dict())
    load_supernet_weights(target, adapted, allow_missing=dropped)

    assert sorted(dropped) == ["head.bias", "head.weight"]
    assert target.pos_embed.shape == (1, 37, 128)
    assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])
    assert torch.equal(target.blocks[1].fc1.weight, source.blocks[1].fc1.weight)
    assert "dropped the checkpoint's head (100 classes)" in caplog.text
    assert "4x4 to a 6x6" in caplog.text


def test_finetune_same_size_is_identity():
    source = make_supernet()
    target = make_supernet()

    adapted, dropped = adapt_for_finetune(target, source.state_dict())

    assert dropped == []
    for key, value in source.state_dict().items():
        assert torch.equal(adapted[key], value)


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np

    from lib.checkpoint import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    expected = (torch.rand(4), np.random.rand(4), random.random())
    save_checkpoint({"rng": state}, tmp_path / "rng.pth")

    restore_rng_state(load_checkpoint_file(tmp_path / "rng.pth")["rng"])
    actual = (torch.rand(4), np.random.rand(4), random.random())

    assert torch.equal(expected[0], actual[0])
    assert np.array_equal(expected[1], actual[1])
    assert expected[2] == actual[2]


def test_stale_temporaries_removed(tmp_path):
    stale = tmp_path / ".checkpoint.pth.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    checkpoint = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, checkpoint)
    other = tmp_path / ".notes.txt.tmp"
    other.write_text("not a checkpoint temporary")

    assert remove_stale_temporaries(tmp_path) == 1

    assert not stale.exists()
    assert load_checkpoint_file(checkpoint)["epoch"] == 1
    assert other.exists()
