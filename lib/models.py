"""Command-line flags of the supernet and its construction from a search-space config."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from lib.argtypes import positive_int, rate_below_one
from lib.checkpoint import CheckpointError
from lib.config import ConfigError
from model.supernet import Supernet


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add the supernet flags shared by search.py, train.py and evaluate.py (the reference's names)."""
    group = parser.add_argument_group("supernet")
    group.add_argument("--cfg", required=False, help="search-space YAML whose SUPERNET block sets the supernet size")
    group.add_argument("--input-size", type=positive_int, default=224, help="input height and width in pixels (default 224)")
    group.add_argument("--patch_size", type=positive_int, default=16, help="patch height and width in pixels (default 16)")
    group.add_argument("--gp", action="store_true", help="classify the mean of the patch tokens instead of the cls token")
    group.add_argument(
        "--change_qkv",
        "--change_qk",
        dest="change_qkv",
        action="store_true",
        help="64-wide heads whose number sets the q/k/v width per layer (on in every PreNAS supernet)",
    )
    group.add_argument("--relative_position", action="store_true", help="add 2D relative-position terms in attention")
    group.add_argument(
        "--max_relative_position", type=positive_int, default=14, help="clip of relative distances in patches (default 14)"
    )
    group.add_argument(
        "--no_abs_pos", dest="abs_pos", action="store_false", help="drop the learned absolute position embedding"
    )
    group.add_argument("--drop", type=rate_below_one, default=0.0, help="dropout rate at the supernet embed dim (default 0)")
    group.add_argument(
        "--drop-path", type=rate_below_one, default=0.1, help="stochastic-depth rate of the last block (default 0.1)"
    )


def create_supernet(args: argparse.Namespace, supernet_config, num_classes: int) -> Supernet:
    """Build the supernet that ``supernet_config`` (a ``lib.config.SupernetConfig``) and the flags describe.

    Raises:
        ConfigError: ``--input-size`` is not a multiple of ``--patch_size``.
    """
    if args.input_size % args.patch_size:
        raise ConfigError(
            f"--input-size {args.input_size} is not a multiple of --patch_size {args.patch_size}; "
            "change one of them so that the patches tile the image"
        )
    return Supernet(
        img_size=args.input_size,
        patch_size=args.patch_size,
        in_chans=3,
        num_classes=num_classes,
        embed_dim=supernet_config.embed_dim,
        depth=supernet_config.depth,
        num_heads=supernet_config.num_heads,
        mlp_ratio=supernet_config.mlp_ratio,
        qkv_bias=True,
        drop_rate=args.drop,
        attn_drop_rate=0.0,
        drop_path_rate=args.drop_path,
        pre_norm=True,
        gp=args.gp,
        relative_position=args.relative_position,
        change_qkv=args.change_qkv,
        max_relative_position=args.max_relative_position,
        abs_pos=args.abs_pos,
    )


# Flags that change what the supernet computes, in the order of the error message. gp, change_qkv
# and (without an absolute position embedding) input_size change no state-dict key or shape, so
# only the arguments saved in the checkpoint can tell that they differ.
_ARCHITECTURE_FLAGS = {
    "gp": "--gp",
    "change_qkv": "--change_qkv",
    "relative_position": "--relative_position",
    "max_relative_position": "--max_relative_position",
    "abs_pos": "--no_abs_pos",
    "input_size": "--input-size",
    "patch_size": "--patch_size",
}


def _flag_words(name: str, value: object) -> str:
    flag = _ARCHITECTURE_FLAGS[name]
    if name == "abs_pos":
        return f"no {flag}" if value else flag
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def check_checkpoint_flags(checkpoint: Mapping, args: argparse.Namespace, path) -> None:
    """Compare the supernet flags saved in a checkpoint with this run's and reject a difference.

    Checkpoints written by train.py save their arguments as a dict, and the released ones as an
    ``argparse.Namespace`` (whose ``no_abs_pos`` is read as ``abs_pos``). A checkpoint without
    saved arguments, or without one of the flags, is not checked for it.

    Raises:
        CheckpointError: a flag differs; the message lists the checkpoint's value and this run's.
    """
    saved = checkpoint.get("args")
    if isinstance(saved, argparse.Namespace):
        saved = vars(saved)
    if not isinstance(saved, Mapping):
        return
    saved = dict(saved)
    if "abs_pos" not in saved and "no_abs_pos" in saved:
        saved["abs_pos"] = not saved["no_abs_pos"]

    differences = []
    relative_position = bool(saved.get("relative_position")) or bool(getattr(args, "relative_position", False))
    for name in _ARCHITECTURE_FLAGS:
        if name not in saved or not hasattr(args, name):
            continue
        if name == "max_relative_position" and not relative_position:
            continue
        if saved[name] != getattr(args, name):
            differences.append(
                f"{_flag_words(name, saved[name])} in the checkpoint, {_flag_words(name, getattr(args, name))} here"
            )
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was trained with other supernet flags: {'; '.join(differences)}. "
            "Pass the checkpoint's flags, because the weights only compute the trained model with them"
        )
