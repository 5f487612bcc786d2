"""Supernet flags: the check of a checkpoint's saved flags against this run's."""

import argparse

import pytest

from lib.checkpoint import CheckpointError
from lib.models import add_model_args, check_checkpoint_flags


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return parser.parse_args(list(flags))


RUN_FLAGS = ("--gp", "--change_qkv", "--relative_position", "--input-size", "32", "--patch_size", "8")


def test_same_flags_accepted():
    args = parse(*RUN_FLAGS)
    check_checkpoint_flags({"args": vars(parse(*RUN_FLAGS))}, args, "run.pth")


def test_checkpoint_without_args_accepted():
    check_checkpoint_flags({"model": {}}, parse(), "released.pth")


def test_every_difference_listed():
    saved = vars(parse(*RUN_FLAGS))
    args = parse("--change_qkv", "--relative_position", "--input-size", "64", "--patch_size", "8", "--no_abs_pos")
    with pytest.raises(CheckpointError) as error:
        check_checkpoint_flags({"args": saved}, args, "run.pth")
    message = str(error.value)
    assert "checkpoint run.pth was trained with other supernet flags" in message
    assert "--gp in the checkpoint, no --gp here" in message
    assert "no --no_abs_pos in the checkpoint, --no_abs_pos here" in message
    assert "--input-size 32 in the checkpoint, --input-size 64 here" in message
    assert "patch_size" not in message


def test_released_namespace_args_read():
    # The released checkpoints pickle the original argparse.Namespace, which has no_abs_pos.
    saved = argparse.Namespace(gp=True, change_qkv=True, relative_position=True, no_abs_pos=False,
                               max_relative_position=14, input_size=224, patch_size=16)
    check_checkpoint_flags({"args": saved}, parse("--gp", "--change_qkv", "--relative_position"), "released.pth")
    with pytest.raises(CheckpointError, match="--relative_position in the checkpoint, no --relative_position here"):
        check_checkpoint_flags({"args": saved}, parse("--gp", "--change_qkv"), "released.pth")
    saved.no_abs_pos = True
    with pytest.raises(CheckpointError, match="--no_abs_pos in the checkpoint, no --no_abs_pos here"):
        check_checkpoint_flags({"args": saved}, parse("--gp", "--change_qkv", "--relative_position"), "released.pth")


def test_input_size_not_multiple_of_patch_rejected():
    from lib.config import ConfigError, load_space
    from lib.models import create_supernet

    space = load_space("experiments/supernet/supernet-demo.yaml")
    args = parse("--input-size", "33", "--patch_size", "8", "--change_qkv")

    with pytest.raises(ConfigError, match="--input-size 33 is not a multiple of --patch_size 8"):
        create_supernet(args, space.supernet, 10)


def test_max_relative_position_ignored_without_relative_position():
    saved = vars(parse("--change_qkv", "--max_relative_position", "14"))
    check_checkpoint_flags({"args": saved}, parse("--change_qkv", "--max_relative_position", "7"), "run.pth")
    with pytest.raises(CheckpointError, match="--max_relative_position 14 in the checkpoint"):
        check_checkpoint_flags(
            {"args": saved}, parse("--change_qkv", "--relative_position", "--max_relative_position", "7"), "run.pth"
        )
