"""Safe checkpoint loading, state-dict cleaning with a shape report, and atomic saving.

Checkpoints are always read with ``torch.load(..., weights_only=True)``. The released PreNAS
and AutoFormer checkpoints hold ``{'model': state_dict, 'optimizer': ..., 'args': Namespace}``,
so ``argparse.Namespace`` is the one class allowed beyond tensors and plain data, and only for
the duration of the load. This project writes its own arguments as a plain dict.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import random
import re
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib.fileio import default_file_mode

logger = logging.getLogger(__name__)

# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_MAX_KEYS_LISTED = 8
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_REL_TABLE_KEY = re.compile(r"^blocks\.\d+\.attn\.rel_pos_embed_[kv]\.embeddings_table_[vh]$")
# The message part in which torch's weights-only unpickler names a rejected class.
# torch words it "Unsupported global: GLOBAL module.Class" for a class that could be allowed, and
# "unsupported GLOBAL module.name whose module ... is blocked" for blocked modules such as posix.
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, unsafe, or does not fit the model."""


def load_checkpoint_file(path: str | Path) -> dict:
    """Load a checkpoint file onto the CPU with a weights-only unpickler.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, contains objects other than
            tensors, plain data and ``argparse.Namespace``, or is not a dict.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path")

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        disallowed = _UNSUPPORTED_GLOBAL.search(str(error))
        if disallowed:
            raise CheckpointError(
                f"checkpoint {path} refers to {disallowed.group(1)}, which a weights-only load "
                "rejects, so nothing in the file was run; only tensors, plain data and "
                "argparse.Namespace are allowed, so re-save it with plain data"
            ) from error
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({error}); use an earlier checkpoint"
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, zipfile.BadZipFile) as error:
        # A file that is not a torch checkpoint at all (text, for example) surfaces as a KeyError
        # or IndexError from the unpickler.
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error}); "
            "use an earlier checkpoint"
        ) from error

    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {path} contains a {type(obj).__name__}, expected a dict "
            "(a state dict or {'model': state_dict, ...})"
        )
    return obj


def extract_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Return the model state dict from a checkpoint, without wrapper prefixes.

    Accepts ``{'model': state_dict, ...}``, ``{'state_dict': state_dict, ...}`` or a bare
    state dict. Strips the ``module.`` and ``_orig_mod.`` prefixes that DistributedDataParallel
    and ``torch.compile`` add, and logs how many keys lost which prefix.

    Raises:
        CheckpointError: no state dict is found or it contains non-tensor values.
    """
    if "model" in obj and isinstance(obj["model"], Mapping):
        state_dict = obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state_dict = obj["state_dict"]
    else:
        state_dict = obj

    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            "no state dict found: expected a 'model' entry or a mapping of tensors, but "
            f"{_format_keys(not_tensors)} are not tensors (top-level keys: {_format_keys(obj)})"
        )

    stripped_counts: dict[str, int] = {}
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if new_key.startswith(prefix):
                    new_key = new_key[len(prefix):]
                    stripped_counts[prefix] = stripped_counts.get(prefix, 0) + 1
                    changed = True
        if new_key in cleaned:
            raise CheckpointError(
                f"state dict key {key!r} collides with another key after stripping wrapper "
                f"prefixes {WRAPPER_PREFIXES}; the checkpoint mixes wrapped and unwrapped keys"
            )
        cleaned[new_key] = value

    for prefix, count in stripped_counts.items():
        logger.info("stripped prefix %r from %d state-dict keys", prefix, count)
    return cleaned


def load_supernet_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    allow_missing: Iterable[str] = (),
) -> None:
    """Copy ``state_dict`` into ``model``, requiring the same keys and shapes.

    Args:
        model: the supernet (not wrapped in DistributedDataParallel).
        state_dict: cleaned tensors, see :func:`extract_state_dict`.
        allow_missing: keys that may be absent from ``state_dict`` (for example a head that
            fine-tuning dropped); those parameters keep their current values.

    Raises:
        CheckpointError: listing missing, unexpected and shape-mismatched keys, and the
            likely cause (another max_relative_position, class count, depth, embed dim,
            input size or position-embedding setting).
    """
    model_state = model.state_dict()
    allowed = set(allow_missing)
    missing = [key for key in model_state if key not in state_dict and key not in allowed]
    unexpected = [key for key in state_dict if key not in model_state]
    mismatched = [
        key for key in state_dict
        if key in model_state and tuple(state_dict[key].shape) != tuple(model_state[key].shape)
    ]

    if missing or unexpected or mismatched:
        lines = ["checkpoint weights do not fit the supernet:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            lines.append(
                f"  unexpected in the checkpoint ({len(unexpected)}): {_format_keys(unexpected)}"
            )
        if mismatched:
            lines.append(f"  shape mismatch ({len(mismatched)}):")
            for key in mismatched[:_MAX_KEYS_LISTED]:
                lines.append(
                    f"    {key}: checkpoint {tuple(state_dict[key].shape)}, "
                    f"model {tuple(model_state[key].shape)}"
                )
            if len(mismatched) > _MAX_KEYS_LISTED:
                lines.append(f"    ... and {len(mismatched) - _MAX_KEYS_LISTED} more")
        causes = diagnose_mismatch(model_state, state_dict)
        if causes:
            lines.append("likely cause:")
            lines.extend(f"  - {cause}" for cause in causes)
        raise CheckpointError("\n".join(lines))

    model.load_state_dict(dict(state_dict), strict=not allowed)


def diagnose_mismatch(
    model_state: Mapping[str, torch.Tensor],
    checkpoint_state: Mapping[str, torch.Tensor],
) -> list[str]:
    """Name the architecture settings that differ between a model and a checkpoint."""
    causes = []

    def shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
        return tuple(state[key].shape) if key in state else None

    model_rel = sorted(key for key in model_state if _REL_TABLE_KEY.match(key))
    checkpoint_rel = sorted(key for key in checkpoint_state if _REL_TABLE_KEY.match(key))
    if checkpoint_rel and not model_rel:
        causes.append(
            "the checkpoint has relative-position tables but the model has none; "
            "pass --relative_position"
        )
    elif model_rel and not checkpoint_rel:
        causes.append(
            "the model has relative-position tables but the checkpoint has none; "
            "drop --relative_position"
        )
    else:
        for key in checkpoint_rel:
            if key in model_state and checkpoint_state[key].shape[0] != model_state[key].shape[0]:
                checkpoint_rows = checkpoint_state[key].shape[0]
                model_rows = model_state[key].shape[0]
                causes.append(
                    f"relative-position tables have {checkpoint_rows} rows in the checkpoint and "
                    f"{model_rows} in the model (rows = 2 * max_relative_position + 2): the "
                    f"checkpoint was trained with --max_relative_position "
                    f"{_format_number((checkpoint_rows - 2) / 2)}, the model uses "
                    f"{_format_number((model_rows - 2) / 2)}"
                )
                break

    model_head, checkpoint_head = shape(model_state, "head.weight"), shape(checkpoint_state, "head.weight")
    if model_head and checkpoint_head and model_head[0] != checkpoint_head[0]:
        causes.append(
            f"the checkpoint's head has {checkpoint_head[0]} classes and the model's "
            f"{model_head[0]}: use the dataset the checkpoint was trained on, or --finetune "
            "to drop the head"
        )

    model_depth = _count_blocks(model_state)
    checkpoint_depth = _count_blocks(checkpoint_state)
    if model_depth != checkpoint_depth:
        causes.append(
            f"the checkpoint has {checkpoint_depth} blocks and the model {model_depth}: the "
            "config's SUPERNET DEPTH must match the checkpoint's depth"
        )

    model_embed = _embed_dim(model_state)
    checkpoint_embed = _embed_dim(checkpoint_state)
    if model_embed and checkpoint_embed and model_embed != checkpoint_embed:
        causes.append(
            f"the checkpoint's embed dim is {checkpoint_embed} and the model's {model_embed}: "
            "the config's SUPERNET EMBED_DIM (and NUM_HEADS) must match the checkpoint"
        )
    elif model_embed and model_embed == checkpoint_embed:
        mlp_cause = _diagnose_mlp_ratio(model_state, checkpoint_state, model_embed)
        if mlp_cause:
            causes.append(mlp_cause)

    model_pos, checkpoint_pos = shape(model_state, "pos_embed"), shape(checkpoint_state, "pos_embed")
    if model_pos and not checkpoint_pos:
        causes.append("the checkpoint has no pos_embed but the model has one; pass --no_abs_pos")
    elif checkpoint_pos and not model_pos:
        causes.append("the checkpoint has a pos_embed but the model has none; drop --no_abs_pos")
    elif model_pos and checkpoint_pos and model_pos[1] != checkpoint_pos[1]:
        causes.append(
            f"pos_embed holds {checkpoint_pos[1]} tokens in the checkpoint and {model_pos[1]} in "
            "the model: --input-size or --patch_size differ from training; --finetune "
            "interpolates pos_embed"
        )
    return causes


def adapt_for_finetune(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Adapt a supernet checkpoint to a model for another dataset or input size.

    Drops ``head.*`` when the class count differs. Resamples the patch grid of ``pos_embed``
    (bicubic, the cls token kept) when the token count differs. Logs each change.

    Returns:
        The adapted state dict and the keys dropped from it, which the model keeps at their
        initial values.
    """
    from timm.layers import resample_abs_pos_embed

    model_state = model.state_dict()
    adapted = dict(state_dict)
    dropped: list[str] = []

    if "head.weight" in adapted and "head.weight" in model_state:
        checkpoint_classes = adapted["head.weight"].shape[0]
        model_classes = model_state["head.weight"].shape[0]
        if checkpoint_classes != model_classes:
            dropped = [key for key in adapted if key.startswith("head.")]
            for key in dropped:
                del adapted[key]
            logger.info(
                "fine-tuning: dropped the checkpoint's head (%d classes) for a new head of %d classes",
                checkpoint_classes, model_classes,
            )

    if "pos_embed" in adapted and "pos_embed" in model_state:
        old = adapted["pos_embed"]
        new_tokens = model_state["pos_embed"].shape[1]
        if old.shape[1] != new_tokens:
            old_side = math.isqrt(old.shape[1] - 1)
            new_side = math.isqrt(new_tokens - 1)
            if old_side * old_side != old.shape[1] - 1 or new_side * new_side != new_tokens - 1:
                raise CheckpointError(
                    f"cannot interpolate pos_embed from {old.shape[1]} to {new_tokens} tokens: "
                    "both must be one cls token plus a square grid of patches"
                )
            adapted["pos_embed"] = resample_abs_pos_embed(
                old.float(), new_size=[new_side, new_side], old_size=[old_side, old_side],
                num_prefix_tokens=1, interpolation="bicubic", antialias=True,
            ).to(old.dtype)
            logger.info(
                "fine-tuning: interpolated pos_embed from a %dx%d to a %dx%d patch grid",
                old_side, old_side, new_side, new_side,
            )
    return adapted, dropped


def save_checkpoint(obj: Mapping, path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` atomically: a temporary file, then a rename.

    A crash while writing leaves any previous file at ``path`` intact.

    Raises:
        TypeError: ``obj`` contains an ``argparse.Namespace`` at its top level; store
            ``vars(args)`` (see :func:`args_to_plain`) so the file loads with weights only.
    """
    for key, value in obj.items():
        if isinstance(value, argparse.Namespace):
            raise TypeError(
                f"checkpoint entry {key!r} is an argparse.Namespace; store args_to_plain(args) "
                "so the file loads with weights_only=True"
            )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(file_descriptor, "wb") as handle:
            torch.save(dict(obj), handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file with mode 0600, so give it the mode that open() would.
        os.chmod(temp_name, default_file_mode())
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files that :func:`save_checkpoint` leaves when a process is killed mid-write.

    Call it only where no other process is saving into ``folder``. Returns the number deleted.
    """
    removed = 0
    for stale in Path(folder).glob(".*.pth.*.tmp"):
        if stale.is_file():
            stale.unlink()
            removed += 1
    if removed:
        logger.info("removed %d temporary checkpoint file(s) of an interrupted save in %s", removed, folder)
    return removed


def args_to_plain(args: argparse.Namespace | Mapping) -> dict:
    """Return the arguments as a dict of plain values (paths and other objects as strings)."""
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {key: _to_plain(value) for key, value in items.items()}


def _to_plain(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _to_plain(item) for key, item in value.items()}
    return str(value)


def _format_keys(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_KEYS_LISTED])
    more = len(keys) - _MAX_KEYS_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _count_blocks(state: Mapping[str, torch.Tensor]) -> int:
    indices = {int(match.group(1)) for key in state if (match := _BLOCK_KEY.match(key))}
    return max(indices) + 1 if indices else 0


def _embed_dim(state: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("cls_token", "norm.weight", "pos_embed"):
        if key in state:
            return int(state[key].shape[-1])
    return None


def _diagnose_mlp_ratio(
    model_state: Mapping[str, torch.Tensor],
    checkpoint_state: Mapping[str, torch.Tensor],
    embed_dim: int,
) -> str | None:
    for key in model_state:
        if key.endswith(".fc1.weight") and key in checkpoint_state:
            model_rows = model_state[key].shape[0]
            checkpoint_rows = checkpoint_state[key].shape[0]
            if model_rows != checkpoint_rows:
                return (
                    f"fc1 has {checkpoint_rows} hidden units in the checkpoint and {model_rows} in "
                    f"the model: the config's SUPERNET MLP_RATIO must be "
                    f"{_format_number(checkpoint_rows / embed_dim)}"
                )
    return None


def capture_rng_state() -> dict:
    """Return the torch, CUDA, numpy and Python random states as tensors and plain data.

    Plain data keeps the checkpoint loadable with ``weights_only=True``, which rejects the
    numpy arrays that ``numpy.random.get_state`` returns.
    """
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "algorithm": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype("int64")),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {"version": python_state[0], "state": list(python_state[1]), "gauss_next": python_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Restore the random states written by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["algorithm"],
        numpy_state["keys"].numpy().astype("uint32"),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
