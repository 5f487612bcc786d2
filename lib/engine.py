"""Supernet training and evaluation loops.

``train_one_epoch`` trains, at every step, the subnets that a candidate sampler returns for
(epoch, step). ``evaluate`` measures the active subnet on a validation loader. It is exact under
several processes when the loader uses :class:`lib.distributed.ShardSampler`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lib.distributed import all_reduce_sum, get_world_size
from lib.progress import ProgressLog, loop_length
from lib.sampling import CandidateSampler

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss."""


@dataclass
class NonFiniteTracker:
    """Counts consecutive steps skipped for a non-finite loss.

    Args:
        max_consecutive: raise :class:`NonFiniteLossError` when this many steps in a row were
            skipped.
    """

    max_consecutive: int = 10
    consecutive: int = 0
    total: int = 0

    def record(self, finite: bool, candidates: list[dict], epoch: int, step: int) -> None:
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        logger.warning(
            "non-finite loss at epoch %d step %d; skipped the step (%d in a row) for candidates %s",
            epoch, step, self.consecutive, candidates,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"the loss was non-finite for {self.consecutive} consecutive steps (last at epoch "
                f"{epoch} step {step}, candidates {candidates})"
            )


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    """Return an autocast context for ``amp_dtype``, or a no-op context when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(
    model: nn.Module,
    supernet: nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    candidate_sampler: CandidateSampler,
    *,
    nonfinite: NonFiniteTracker,
    grad_scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    clip_grad: float | None = None,
    mixup_fn: Callable | None = None,
    model_ema=None,
    lr_scheduler=None,
    update_lr_per_step: bool = False,
    print_freq: int = 10,
    total_epochs: int | None = None,
) -> dict[str, float]:
    """Train one epoch, sampling the subnets of every step from ``candidate_sampler``.

    With several candidates per step (sandwich sampling) each one's loss is scaled by
    ``1 / count`` and their gradients are accumulated before one optimizer step.

    Args:
        model: the module to call, possibly wrapped in DistributedDataParallel.
        supernet: the unwrapped supernet, on which subnets are set.
        criterion: loss of (logits, targets).
        loader: training batches of (images, targets).
        optimizer: the optimizer.
        device: the device of the model.
        epoch: zero-based epoch, which also seeds the candidate sampler.
        candidate_sampler: returns the candidates of each (epoch, step).
        nonfinite: tracker of consecutive non-finite losses, kept across epochs.
        grad_scaler: loss scaler for float16 autocast; None otherwise.
        amp_dtype: autocast dtype, or None for float32.
        clip_grad: max global gradient norm, or None for no clipping.
        mixup_fn: timm ``Mixup`` applied to each batch, or None.
        model_ema: timm ``ModelEmaV3`` updated after each optimizer step, or None.
        lr_scheduler: timm scheduler, stepped per update when ``update_lr_per_step``.
        update_lr_per_step: call ``lr_scheduler.step_update`` after every step.
        print_freq: log a progress line every this many steps (rank 0 logs at INFO).
        total_epochs: the number of epochs, for the progress line only.

    Returns:
        ``loss`` (mean over processes and non-skipped steps, identical on every process), ``lr`` (at the last step),
        ``skipped_steps`` and ``images_per_second``.
    """
    model.train()
    steps_per_epoch = len(loader)
    world_size = get_world_size()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]

    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    finite_steps = torch.zeros((), device=device, dtype=torch.float64)
    window_loss = torch.zeros((), device=device, dtype=torch.float64)
    window_steps = 0
    skipped = 0
    images_seen = 0
    epoch_start = time.perf_counter()
    window_start = epoch_start
    window_images = 0

    for step, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        candidates = candidate_sampler.sample(epoch, step)

        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device, dtype=torch.float32)
        for candidate in candidates:
            supernet.set_subnet(candidate)
            with autocast_context(device, amp_dtype):
                logits = model(images)
                loss = criterion(logits, targets) / len(candidates)
            if grad_scaler is not None:
                grad_scaler.scale(loss).backward()
            else:
                loss.backward()
            step_loss += loss.detach().float()

        # The loss is averaged over processes so that all of them take the same skip decision:
        # a NaN on one rank reaches every rank through the gradient all-reduce.
        if world_size > 1:
            step_loss = all_reduce_sum(step_loss) / world_size
        # NOTE: reading this flag is the one host-device synchronisation per step outside
        # logging. It is needed to skip the optimizer step before a NaN reaches the weights.
        finite = bool(torch.isfinite(step_loss))
        nonfinite.record(finite, candidates, epoch, step)
        num_updates = epoch * steps_per_epoch + step + 1
        if finite:
            _optimizer_step(optimizer, parameters, grad_scaler, clip_grad)
            if model_ema is not None:
                model_ema.update(supernet, step=num_updates)
            loss_sum += step_loss
            finite_steps += 1
            window_loss += step_loss
            window_steps += 1
        else:
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
        if lr_scheduler is not None and update_lr_per_step:
            lr_scheduler.step_update(num_updates=num_updates)

        batch_images = images.shape[0] * world_size
        images_seen += batch_images
        window_images += batch_images
        if print_freq > 0 and ((step + 1) % print_freq == 0 or step + 1 == steps_per_epoch):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            mean_loss = window_loss.item() / max(window_steps, 1)
            throughput = window_images / max(now - window_start, 1e-9)
            step_seconds = (now - epoch_start) / (step + 1)
            remaining = step_seconds * (steps_per_epoch - step - 1)
            epoch_label = f"{epoch}/{total_epochs}" if total_epochs else str(epoch)
            run_eta = ""
            if total_epochs:
                # The estimate counts training steps only, so evaluation between epochs comes on top.
                run_remaining = remaining + step_seconds * steps_per_epoch * max(total_epochs - epoch - 1, 0)
                run_eta = f" (run {datetime.timedelta(seconds=int(run_remaining))})"
            logger.info(
                "epoch %s [%d/%d] loss %.4f lr %.3e images/s %.1f eta %s%s",
                epoch_label, step + 1, steps_per_epoch, mean_loss,
                optimizer.param_groups[0]["lr"], throughput,
                datetime.timedelta(seconds=int(remaining)), run_eta,
            )
            window_loss.zero_()
            window_steps = 0
            window_images = 0
            window_start = now

    elapsed = time.perf_counter() - epoch_start
    return {
        "loss": loss_sum.item() / finite_steps.item() if finite_steps.item() > 0 else math.nan,
        "lr": optimizer.param_groups[0]["lr"],
        "skipped_steps": skipped,
        "images_per_second": images_seen / max(elapsed, 1e-9),
    }


def _optimizer_step(
    optimizer: torch.optim.Optimizer,
    parameters: list[torch.Tensor],
    grad_scaler: torch.amp.GradScaler | None,
    clip_grad: float | None,
) -> None:
    """Step the optimizer, clipping the gradient norm first in both the scaled and float32 paths."""
    if grad_scaler is not None:
        if clip_grad is not None:
            grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        grad_scaler.step(optimizer)
        grad_scaler.update()
        return

    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    optimizer.step()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    expected_count: int | None = None,
    label: str = "eval",
) -> dict[str, float]:
    """Measure top-1, top-5 and cross-entropy of ``model`` on ``loader``.

    Every process evaluates its shard. Correct counts, loss sums and sample counts are summed
    across processes, so with an unpadded sampler each image counts exactly once. Batches of
    shape [B, ncrops, C, H, W] are evaluated per crop, and the logits are averaged over crops.

    Args:
        model: the model in its evaluated configuration (the active subnet).
        loader: batches of (images, targets).
        device: the device of the model.
        amp_dtype: autocast dtype, or None for float32.
        expected_count: the dataset size; when given, a different total count raises.
        label: the start of the progress lines, logged every 30 s on long evaluations.

    Returns:
        ``acc1`` and ``acc5`` in percent, mean ``loss``, and ``count`` (images evaluated).

    Raises:
        RuntimeError: the processes evaluated ``count != expected_count`` images, for example
            because the sampler padded or dropped samples.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)
    progress = ProgressLog(logger, label, loop_length(loader))

    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        crops = 1
        if images.ndim == 5:
            batch_size, crops = images.shape[:2]
            images = images.flatten(0, 1)

        with autocast_context(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        if crops > 1:
            logits = logits.view(batch_size, crops, -1).mean(dim=1)

        top_k = min(5, logits.shape[1])
        predictions = logits.topk(top_k, dim=1).indices
        hits = predictions.eq(targets.unsqueeze(1))
        totals[0] += hits[:, :1].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += nn.functional.cross_entropy(logits, targets, reduction="sum")
        totals[3] += targets.shape[0]
        progress.update(targets.shape[0] * get_world_size())

    all_reduce_sum(totals)
    model.train(was_training)

    count = int(totals[3].item())
    if expected_count is not None and count != expected_count:
        raise RuntimeError(
            f"evaluated {count} images but the validation set has {expected_count}; the "
            "evaluation sampler must visit each image exactly once (use ShardSampler)"
        )
    if count == 0:
        raise RuntimeError("the validation loader yielded no images; check the validation set")
    return {
        "acc1": 100.0 * totals[0].item() / count,
        "acc5": 100.0 * totals[1].item() / count,
        "loss": totals[2].item() / count,
        "count": count,
    }


def resolve_amp_dtype(device: torch.device, amp: bool, amp_dtype: str = "auto") -> torch.dtype | None:
    """Return the autocast dtype for training on ``device``, or None for float32.

    On CUDA with ``amp``: bfloat16 where the GPU supports it, else float16 (``auto``), or the
    dtype named. On CPU autocast is used only when bfloat16 is named explicitly, because CPU
    autocast is often slower than float32.
    """
    if amp_dtype not in ("auto", "bfloat16", "float16"):
        raise ValueError(f"unknown AMP dtype {amp_dtype!r}; use auto, bfloat16 or float16")
    if not amp:
        return None
    if device.type == "cuda":
        if amp_dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return getattr(torch, amp_dtype)
    if amp_dtype == "bfloat16":
        return torch.bfloat16
    if amp_dtype == "float16":
        raise ValueError("float16 autocast is not supported for CPU training; use --amp-dtype bfloat16 or --no-amp")
    return None
