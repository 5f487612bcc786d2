"""Resuming a training run: finding and loading its checkpoint, and building the next one.

A training checkpoint contains the supernet weights, the optimizer, scheduler, gradient-scaler
and EMA states, the finished epoch, the run's arguments as plain data, every process's random
state and the best top-1 per evaluated subnet label (see docs/formats.md).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from lib import distributed
from lib.checkpoint import (
    CheckpointError,
    args_to_plain,
    capture_rng_state,
    extract_state_dict,
    load_checkpoint_file,
    load_supernet_weights,
)
from lib.models import check_checkpoint_flags

logger = logging.getLogger(__name__)

LATEST_CHECKPOINT = "checkpoint.pth"


def restart_hint(output_dir: Path, resume_words: str) -> str:
    """Return how to go on after a stopped run: resume from its latest checkpoint, or restart without one."""
    latest = output_dir / LATEST_CHECKPOINT
    if latest.exists():
        return f"{resume_words} --resume {latest} (or --auto-resume with the same --output_dir)"
    return f"restart the run, because no checkpoint was written yet ({latest} does not exist)"


def find_resume_checkpoint(args, output_dir: Path) -> Path | None:
    if args.resume:
        return Path(args.resume)
    if args.auto_resume:
        latest = output_dir / LATEST_CHECKPOINT
        if latest.exists():
            logger.info("auto-resume: found %s", latest)
            return latest
        logger.info("auto-resume: no %s yet, starting from scratch", latest)
    return None


def load_resume_state(path, args, model, optimizer, lr_scheduler, grad_scaler, model_ema, world_size):
    """Load weights and training state from ``path``.

    Returns the next epoch, the saved RNG states (None when they cannot be restored) and the best
    top-1 so far per evaluated subnet label.
    """
    checkpoint = load_checkpoint_file(path)
    check_checkpoint_flags(checkpoint, args, path)
    load_supernet_weights(model, extract_state_dict(checkpoint))
    missing = [key for key in ("optimizer", "lr_scheduler", "epoch") if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has weights but no training state ({', '.join(missing)} missing); "
            "use --finetune to start a new run from its weights"
        )
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if grad_scaler is not None and checkpoint.get("scaler"):
        grad_scaler.load_state_dict(checkpoint["scaler"])
    if model_ema is not None:
        if checkpoint.get("model_ema"):
            model_ema.module.load_state_dict(checkpoint["model_ema"])
        else:
            logger.warning("checkpoint %s has no EMA weights; the EMA restarts from the current weights", path)

    saved_args = checkpoint.get("args")
    saved_epochs = saved_args.get("epochs") if isinstance(saved_args, dict) else None
    main_process = distributed.is_main_process()
    if main_process and saved_epochs is not None and saved_epochs != args.epochs:
        # The scheduler state restored above keeps the schedule of the first run.
        if args.epochs > saved_epochs:
            consequence = f"epochs after {saved_epochs} continue at the end value of that schedule"
        else:
            consequence = f"the run stops at epoch {args.epochs}, before that schedule ends"
        logger.warning(
            "checkpoint %s belongs to a run of %d epoch(s) and this run has --epochs %d: the learning-rate "
            "schedule of the checkpoint is kept, so %s. To train with another schedule, start a new run "
            "(with --finetune %s for its weights)",
            path, saved_epochs, args.epochs, consequence, path,
        )
    changed = changed_settings(saved_args, args) if main_process and isinstance(saved_args, dict) else []
    if changed:
        logger.warning(
            "checkpoint %s was written with other settings (%s); this run goes on with the new values, "
            "and config.yaml now records them", path, "; ".join(changed),
        )

    epoch = int(checkpoint["epoch"])
    rng_states = checkpoint.get("rng_states")
    if rng_states is not None and len(rng_states) != world_size:
        logger.warning(
            "checkpoint %s was written by %d process(es), this run has %d: random states are not restored, "
            "so the continuation is not an exact replay", path, len(rng_states), world_size,
        )
        rng_states = None
    logger.info("resumed from %s at the end of epoch %d", path, epoch)
    best_acc1 = {str(label): float(value) for label, value in (checkpoint.get("best_acc1") or {}).items()}
    return epoch + 1, rng_states, best_acc1


# Settings whose change during a run alters what is trained, compared on resume. --epochs has its
# own warning, and paths of data and outputs may move between machines.
RESUME_SETTINGS = (
    "cfg", "candfile", "mode", "batch_size", "lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay",
    "opt", "sandwich", "smoothing", "mixup", "cutmix", "drop_path", "data_set", "input_size", "seed",
)


def changed_settings(saved: dict, args: argparse.Namespace) -> list[str]:
    """List the settings of RESUME_SETTINGS that differ between a checkpoint's arguments and ``args``.

    The file settings are compared as absolute paths, so a relative and an absolute spelling of
    one file do not count as a change.
    """
    current = args_to_plain(args)

    def comparable(name: str, value):
        return os.path.abspath(value) if name in ("cfg", "candfile") and isinstance(value, str) else value

    return [
        f"{name} {saved[name]!r} then, {current[name]!r} now"
        for name in RESUME_SETTINGS
        if name in saved and name in current and comparable(name, saved[name]) != comparable(name, current[name])
    ]


def gather_rng_states() -> list[dict]:
    """Return every process's random state, indexed by rank (a collective call)."""
    state = capture_rng_state()
    if not distributed.is_initialized():
        return [state]
    gathered: list = [None] * distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def build_checkpoint(model, optimizer, lr_scheduler, grad_scaler, model_ema, epoch, args, rng_states, best_acc1) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "epoch": epoch,
        "args": args_to_plain(args),
        "rng_states": rng_states,
        "best_acc1": dict(best_acc1),
    }
