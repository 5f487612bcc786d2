"""Preferred one-shot training of a weight-entangled ViT supernet.

At every step the supernet trains a subnet drawn from the preferred candidates of an
interval-candidates file (``--candfile``), optionally grouped by embed dim and depth or
sandwiched between the smallest and largest candidate. Without ``--candfile`` it samples
uniformly from the whole search space of ``--cfg`` (the AutoFormer baseline), and with
``--mode retrain`` it trains one fixed subnet.

Single process::

    python train.py --cfg experiments/supernet/supernet-demo.yaml --candfile CANDIDATES.json ...

Several processes (Gloo on CPU, NCCL on CUDA)::

    torchrun --nproc_per_node 8 train.py --device cuda ...

The run folder (``--output_dir``) receives ``config.yaml`` (the resolved arguments),
``checkpoint.pth`` after every epoch, ``checkpoint-N.pth`` every ``--save-freq`` epochs,
``log.txt`` (one JSON line per epoch), ``run.log`` and TensorBoard files under ``tb/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from lib import distributed
from lib.allocator import keep_freed_memory
from lib.argtypes import non_negative_float, positive_float, rate_below_one
from lib.checkpoint import (
    CheckpointError,
    adapt_for_finetune,
    args_to_plain,
    extract_state_dict,
    load_checkpoint_file,
    load_supernet_weights,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from lib.config import ConfigError, load_interval_candidates, load_space
from lib.datasets import DataError, add_data_args, build_dataset
from lib.distributed import DistributedError, ShardSampler
from lib.engine import NonFiniteLossError, NonFiniteTracker, evaluate, resolve_amp_dtype, train_one_epoch
from lib.fileio import output_folder_problem, write_text_atomic
from lib.logger import MetricsWriter, setup_logging
from lib.models import add_model_args, check_checkpoint_flags, create_supernet
from lib.resume import (
    LATEST_CHECKPOINT,
    build_checkpoint,
    find_resume_checkpoint,
    gather_rng_states,
    load_resume_state,
    restart_hint,
)
from lib.sampling import (
    CandidateSampler,
    FixedSampler,
    PreferredSampler,
    SamplingError,
    SandwichSampler,
    SpaceSampler,
)
from model.candidate import CandidateError

logger = logging.getLogger("train")

# The reference scales the learning rate linearly with the total batch size over this value.
LR_REFERENCE_BATCH = 512.0


class UsageError(ValueError):
    """Command-line arguments that cannot work together."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "PreNAS preferred one-shot training",
        description="Train a supernet on preferred candidates, uniformly over a search space, or one subnet.",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per process and step (default 64)")
    parser.add_argument("--epochs", type=int, default=300, help="training epochs (default 300)")

    group = parser.add_argument_group("candidate sampling")
    group.add_argument("--mode", default="super", choices=("super", "retrain"),
                       help="super: train the supernet on sampled subnets; retrain: train one fixed subnet")
    group.add_argument("--candfile", default="", help="interval-candidates JSON; training samples only these candidates")
    group.add_argument("--subnet", default="",
                       help="retrain mode: candidate JSON (a string or a file); default: RETRAIN of --cfg")
    group.add_argument("--group-by-dim", action="store_true", help="draw an embed-dim group uniformly, then a member")
    group.add_argument("--group-by-depth", action="store_true", help="draw a depth group uniformly, then a member")
    group.add_argument("--sandwich", type=int, default=0, metavar="K",
                       help="train K drawn candidates plus the smallest and the largest at every step (default 0: off)")
    group.add_argument("--no-sandwich-base", action="store_true", help="leave the smallest candidate out of the sandwich")
    group.add_argument("--no-sandwich-top", action="store_true", help="leave the largest candidate out of the sandwich")
    group.add_argument("--shuffle", action="store_true",
                       help="permute the per-layer num heads and mlp ratios of each drawn candidate")

    add_model_args(parser)
    group = parser.add_argument_group("model averaging")
    group.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False,
                       help="keep an exponential moving average of the supernet weights (default: off)")
    group.add_argument("--model-ema-decay", type=rate_below_one, default=0.99996, help="EMA decay per step (default 0.99996)")
    group.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA weights on the CPU")

    group = parser.add_argument_group("optimizer")
    group.add_argument("--opt", default="adamw", help="timm optimizer name (default adamw)")
    group.add_argument("--opt-eps", type=float, default=1e-8, help="optimizer epsilon (default 1e-8)")
    group.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas (default: the optimizer's)")
    group.add_argument("--clip-grad", type=positive_float, default=None, metavar="NORM",
                       help="clip the global gradient norm to NORM (default: no clipping)")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    group.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (default 0.05)")

    group = parser.add_argument_group("learning-rate schedule")
    group.add_argument("--sched", default="cosine", help="timm scheduler name (default cosine)")
    group.add_argument("--lr", type=float, default=5e-4,
                       help="learning rate for a total batch of 512, scaled linearly with the total batch (default 5e-4)")
    group.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="PCT",
                       help="learning-rate noise on/off epoch fractions")
    group.add_argument("--lr-noise-pct", type=float, default=0.67, help="learning-rate noise limit (default 0.67)")
    group.add_argument("--lr-noise-std", type=float, default=1.0, help="learning-rate noise std (default 1.0)")
    group.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at the start of warmup (default 1e-6)")
    group.add_argument("--min-lr", type=float, default=1e-5, help="floor of the cosine schedule (default 1e-5)")
    group.add_argument("--decay-epochs", type=float, default=30, help="epochs between step decays (default 30)")
    group.add_argument("--warmup-epochs", type=int, default=5, help="warmup epochs (default 5)")
    group.add_argument("--cooldown-epochs", type=int, default=10,
                       help="epochs at min lr after the cycle, for schedulers that use them (default 10)")
    group.add_argument("--patience-epochs", type=int, default=10, help="plateau scheduler patience (default 10)")
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1, help="step-decay factor (default 0.1)")
    group.add_argument("--sched-on-updates", action="store_true",
                       help="update the learning rate after every step instead of every epoch")

    group = parser.add_argument_group("regularisation")
    group.add_argument("--smoothing", type=rate_below_one, default=0.1, help="label smoothing (default 0.1)")
    group.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=True,
                       help="repeated augmentation: with several processes each image appears 3 times per "
                            "epoch, on different processes (default: on)")
    group.add_argument("--mixup", type=non_negative_float, default=0.8, help="mixup alpha; 0 turns mixup off (default 0.8)")
    group.add_argument("--cutmix", type=non_negative_float, default=1.0, help="cutmix alpha; 0 turns cutmix off (default 1.0)")
    group.add_argument("--cutmix-minmax", type=float, nargs="+", default=None, help="cutmix min/max box ratio")
    group.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch (default 1)")
    group.add_argument("--mixup-switch-prob", type=float, default=0.5,
                       help="probability of cutmix instead of mixup when both are on (default 0.5)")
    group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"),
                       help="mixup parameters per batch, pair or element (default batch)")

    add_data_args(parser)

    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default="output/train", help="run folder for checkpoints and logs")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cuda or cpu (default: cuda when available)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--resume", default="", help="checkpoint to continue training from")
    group.add_argument("--auto-resume", action="store_true",
                       help=f"continue from {LATEST_CHECKPOINT} in --output_dir when it exists")
    group.add_argument("--start_epoch", type=int, default=0, help="first epoch when not resuming (default 0)")
    group.add_argument("--finetune", default="",
                       help="initialise from a supernet checkpoint of another dataset or input size")
    group.add_argument("--eval", action="store_true",
                       help="only evaluate the candidates (every one of --candfile) and write results.json")
    group.add_argument("--dist-eval", action="store_true",
                       help="accepted for compatibility; evaluation is always distributed and exact")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="mixed precision on CUDA (default: on); on CPU only with --amp-dtype bfloat16")
    group.add_argument("--amp-dtype", default="auto", choices=("auto", "bfloat16", "float16"),
                       help="autocast dtype; auto: bfloat16 where the GPU supports it, else float16 with a loss scaler")
    group.add_argument("--max-nonfinite", type=int, default=10,
                       help="abort after this many consecutive steps with a non-finite loss (default 10)")
    group.add_argument("--save-freq", type=int, default=10, help="keep checkpoint-N.pth every N epochs (default 10)")
    group.add_argument("--eval-freq", type=int, default=1, help="evaluate every N epochs and after the last (default 1)")
    group.add_argument("--eval-all-candidates", action="store_true",
                       help="evaluate every candidate of --candfile instead of the smallest and the largest")
    group.add_argument("--print-freq", type=int, default=10, help="log a progress line every N steps (default 10)")
    group.add_argument("--deterministic", action="store_true",
                       help="use deterministic algorithms only (slower; for exact reproduction)")
    group.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                       help="do not write TensorBoard files")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject argument values and combinations that cannot work, naming the value and the fix."""
    positive = {"--batch-size": args.batch_size, "--epochs": args.epochs, "--save-freq": args.save_freq,
                "--eval-freq": args.eval_freq, "--max-nonfinite": args.max_nonfinite}
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.sandwich < 0:
        raise UsageError(f"--sandwich must be 0 (off) or a positive number of drawn candidates, got {args.sandwich}")
    if args.print_freq < 0:
        raise UsageError(f"--print-freq must be 0 (no progress lines) or positive, got {args.print_freq}")

    if not args.cfg:
        raise UsageError("--cfg is required: pass the search-space YAML whose SUPERNET block sizes the supernet")
    if mixup_active(args) and args.batch_size % 2:
        raise UsageError(
            f"mixup and cutmix pair images within a batch, so --batch-size must be even, got {args.batch_size}; "
            "change it or pass --mixup 0 --cutmix 0"
        )
    if args.amp and args.amp_dtype == "float16" and args.device.startswith("cpu"):
        raise UsageError("float16 autocast is not supported for CPU training; use --amp-dtype bfloat16 or --no-amp")

    if args.mode == "retrain" and args.candfile and not args.eval:
        raise UsageError("--mode retrain trains one subnet; pass it with --subnet or RETRAIN in --cfg, not --candfile")
    if args.mode == "super" and args.subnet:
        raise UsageError("--subnet is for --mode retrain; in --mode super use --candfile")
    if args.mode == "super" and not args.candfile and (args.group_by_dim or args.group_by_depth or args.shuffle):
        raise UsageError("--group-by-dim, --group-by-depth and --shuffle need --candfile")
    if args.eval and not (args.resume or args.auto_resume or args.finetune):
        raise UsageError("--eval needs trained weights: pass --resume CHECKPOINT")
    if args.resume and args.finetune:
        raise UsageError(
            "--resume continues a run and --finetune starts a new one from other weights; pass one of them"
        )
    if args.cutmix_minmax is not None:
        box_ratios = args.cutmix_minmax
        if len(box_ratios) != 2 or not 0.0 < box_ratios[0] < box_ratios[1] <= 1.0:
            raise UsageError(
                f"--cutmix-minmax takes two box ratios MIN MAX with 0 < MIN < MAX <= 1, got {box_ratios}"
            )
    # Two betas for Adam-type optimizers, three for Adan.
    if args.opt_betas is not None and (
        len(args.opt_betas) not in (2, 3) or not all(0.0 <= beta < 1.0 for beta in args.opt_betas)
    ):
        raise UsageError(f"--opt-betas takes two or three values in [0, 1), got {args.opt_betas}")

    for flag, path in (("--resume", args.resume), ("--finetune", args.finetune), ("--candfile", args.candfile)):
        if path and Path(path).is_dir():
            raise UsageError(f"{flag} {path} is a directory; pass the file inside it")
        if path and not Path(path).is_file():
            raise UsageError(f"{flag} file {path} not found; check the path")

    # A new run would overwrite the checkpoint of the earlier one and append to its log.
    latest = Path(args.output_dir) / LATEST_CHECKPOINT
    if args.eval and args.auto_resume and not (args.resume or args.finetune) and not latest.exists():
        raise UsageError(f"--eval --auto-resume found no {latest}, so there are no trained weights to evaluate")
    # Resuming a checkpoint of this folder continues its run, but one from elsewhere would overwrite it.
    continues_this_run = args.auto_resume or (
        args.resume is not None and Path(args.resume).resolve().parent == Path(args.output_dir).resolve()
    )
    if not args.eval and not continues_this_run and latest.exists():
        raise UsageError(
            f"{latest} exists from an earlier run; pass --auto-resume to continue that run, or pass "
            "another --output_dir to start a new one"
        )


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def main(args: argparse.Namespace) -> int:
    keep_freed_memory()
    problem = output_folder_problem("--output_dir", args.output_dir)
    if problem:
        # Checked before logging starts, because the log file goes into this folder.
        logging.basicConfig(level=logging.INFO)
        logger.error("%s", problem)
        return 2
    context = distributed.init_distributed(args.device)
    output_dir = Path(args.output_dir)
    setup_logging(context.rank, output_dir)
    try:
        return run(args, context, output_dir)
    except (UsageError, ConfigError, CandidateError, CheckpointError, DataError, SamplingError) as error:
        logger.error("%s", error)
        return 2
    except NonFiniteLossError as error:
        logger.error(
            "%s. Training stopped. Retry with --no-amp (or a lower --lr, or --clip-grad) and %s.",
            error, restart_hint(output_dir, "resume from the last good checkpoint with"),
        )
        return 1
    except KeyboardInterrupt:
        logger.error("training interrupted; to continue it, %s", restart_hint(output_dir, "resume with"))
        return 130
    finally:
        distributed.cleanup()


def run(args: argparse.Namespace, context: distributed.DistContext, output_dir: Path) -> int:
    check_args(args)
    device = context.device
    seed_everything(args.seed + context.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    space = load_space(args.cfg)
    candidates = []
    if args.candfile:
        # Every candidate is checked against the supernet before any data or model is built.
        intervals = load_interval_candidates(args.candfile, space.supernet)
        candidates = [(f"{key}_{index}", candidate) for key, members in intervals.items()
                      for index, candidate in enumerate(members)]

    dataset_train, num_classes = build_dataset(True, args)
    dataset_val, _ = build_dataset(False, args)
    model = create_supernet(args, space.supernet, num_classes).to(device)
    candidates = [(label, check_model_candidate(model, candidate, label)) for label, candidate in candidates]
    # Evaluation of a candidate file (--mode retrain --eval --candfile, as in the reference's
    # evaluation command) needs no fixed subnet.
    retrain_subnet = None
    if args.mode == "retrain" and not (args.eval and candidates):
        retrain_subnet = resolve_retrain_subnet(args, space, model)
    candidates.sort(key=lambda item: model.num_params(item[1]))

    resume_path = find_resume_checkpoint(args, output_dir)
    # With --auto-resume, --finetune starts the run and a later restart resumes its checkpoint.
    if args.finetune and resume_path is None:
        load_finetune_weights(model, args.finetune)
    elif args.finetune:
        logger.info("--finetune %s is not used: the run continues from %s", args.finetune, resume_path)

    train_loader, val_loader = build_loaders(args, context, dataset_train, dataset_val)
    eval_candidates = select_eval_candidates(args, candidates, space, retrain_subnet, model)

    if args.eval:
        return evaluate_only(args, model, resume_path, val_loader, len(dataset_val), eval_candidates, device, output_dir)

    amp_dtype = resolve_amp_dtype(device, args.amp, args.amp_dtype)
    grad_scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    world_size = context.world_size
    scaled_lr = args.lr * args.batch_size * world_size / LR_REFERENCE_BATCH
    optimizer, lr_scheduler = build_optimizer(args, model, scaled_lr, len(train_loader))
    model_ema = build_model_ema(args, model)

    mixup_fn, criterion = build_loss(args, num_classes)
    candidate_sampler = build_candidate_sampler(args, candidates, space, retrain_subnet)

    train_model = model
    if context.is_distributed:
        # Blocks beyond the sampled depth get no gradient, hence find_unused_parameters.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
        )

    resolved = {
        "world_size": world_size, "scaled_lr": scaled_lr, "num_classes": num_classes,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
        "train_images": len(dataset_train), "val_images": len(dataset_val),
        "candidates": len(candidates),
    }
    logger.info(
        "training %s: %d epoch(s), %d process(es), batch %d per process, lr %.3g (scaled from %.3g), %s, "
        "%d training and %d validation images, %d classes, output %s",
        describe_sampling(args, candidates), args.epochs, world_size, args.batch_size, scaled_lr, args.lr,
        resolved["amp_dtype"], len(dataset_train), len(dataset_val), num_classes, output_dir,
    )

    start_epoch = args.start_epoch
    rng_states = None
    best_acc1: dict[str, float] = {}
    if resume_path is not None:
        start_epoch, rng_states, best_acc1 = load_resume_state(
            resume_path, args, model, optimizer, lr_scheduler, grad_scaler, model_ema, world_size,
        )
    if start_epoch >= args.epochs:
        if resume_path is None:
            logger.info("nothing to train: --start_epoch %d is not below --epochs %d", start_epoch, args.epochs)
        else:
            logger.info("nothing to train: the checkpoint has finished %d of %d epochs", start_epoch, args.epochs)
        return 0
    if context.is_main:
        # Written only now: a resume that is rejected or has nothing to train keeps the earlier file.
        config_text = yaml.safe_dump({**args_to_plain(args), "resolved": resolved}, sort_keys=True)
        write_text_atomic(output_dir / "config.yaml", config_text)
        remove_stale_temporaries(output_dir)
    # Restored last, so the random state matches the uninterrupted run at this epoch.
    if rng_states is not None:
        restore_rng_state(rng_states[context.rank])

    metrics = MetricsWriter(output_dir, enabled=context.is_main, tensorboard=args.tensorboard)
    metrics.drop_from(start_epoch)
    nonfinite = NonFiniteTracker(max_consecutive=args.max_nonfinite)
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        lr_scheduler.step(epoch)

        train_stats = train_one_epoch(
            train_model, model, criterion, train_loader, optimizer, device, epoch, candidate_sampler,
            nonfinite=nonfinite, grad_scaler=grad_scaler, amp_dtype=amp_dtype, clip_grad=args.clip_grad,
            mixup_fn=mixup_fn, model_ema=model_ema, lr_scheduler=lr_scheduler,
            update_lr_per_step=args.sched_on_updates, print_freq=args.print_freq, total_epochs=args.epochs,
        )
        scalars = {f"train/{key}": value for key, value in train_stats.items()}

        last_epoch = epoch + 1 == args.epochs
        if (epoch + 1) % args.eval_freq == 0 or last_epoch:
            for label, candidate in eval_candidates:
                model.set_subnet(candidate)
                stats = evaluate(model, val_loader, device, amp_dtype, expected_count=len(dataset_val))
                best_acc1[label] = max(best_acc1.get(label, 0.0), stats["acc1"])
                scalars.update({
                    f"val/{label}/acc1": stats["acc1"], f"val/{label}/acc5": stats["acc5"],
                    f"val/{label}/loss": stats["loss"], f"val/{label}/params": model.num_params(candidate),
                })
                logger.info(
                    "epoch %d: %s subnet (%.3f M params) acc1 %.2f acc5 %.2f loss %.4f (best acc1 %.2f)",
                    epoch, label, model.num_params(candidate) / 1e6, stats["acc1"], stats["acc5"],
                    stats["loss"], best_acc1[label],
                )

        rng_states = gather_rng_states()
        if context.is_main:
            # The log line goes first: a kill between the two leaves a line that the resumed run
            # drops and writes again, whereas a checkpoint without its line would lose the line.
            metrics.write(epoch, scalars)
            state = build_checkpoint(
                model, optimizer, lr_scheduler, grad_scaler, model_ema, epoch, args, rng_states, best_acc1,
            )
            save_checkpoint(state, output_dir / LATEST_CHECKPOINT)
            if (epoch + 1) % args.save_freq == 0:
                save_checkpoint(state, output_dir / f"checkpoint-{epoch + 1}.pth")
        distributed.barrier()

    metrics.close()
    elapsed = time.time() - start_time
    logger.info("training finished in %s; checkpoints in %s", format_seconds(elapsed), output_dir)
    return 0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def check_model_candidate(model, candidate: dict, label: str) -> dict:
    try:
        return model.check_candidate(candidate)
    except CandidateError as error:
        raise CandidateError(f"candidate {label} does not fit the supernet: {error}") from error


def resolve_retrain_subnet(args: argparse.Namespace, space, model) -> dict:
    if args.subnet:
        text = args.subnet
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise UsageError(f"--subnet {text!r} is neither a JSON object nor an existing file")
            text = path.read_text(encoding="utf-8")
        try:
            candidate = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"--subnet is not valid JSON ({error.msg} at column {error.colno})") from error
        return check_model_candidate(model, candidate, "--subnet")
    if space.retrain is None:
        raise UsageError(f"--mode retrain needs --subnet JSON or a RETRAIN section in {args.cfg}")
    return check_model_candidate(model, space.retrain, "RETRAIN")


def load_finetune_weights(model, path: str) -> None:
    state_dict = extract_state_dict(load_checkpoint_file(path))
    adapted, dropped = adapt_for_finetune(model, state_dict)
    load_supernet_weights(model, adapted, allow_missing=dropped)
    logger.info("fine-tuning from %s", path)


def build_loaders(args, context, dataset_train, dataset_val) -> tuple[DataLoader, DataLoader]:
    if context.is_distributed:
        if args.repeated_aug:
            from timm.data.distributed_sampler import RepeatAugSampler

            sampler_train = RepeatAugSampler(dataset_train, num_replicas=context.world_size, rank=context.rank)
        else:
            sampler_train = DistributedSampler(dataset_train, shuffle=True, seed=args.seed)
    else:
        # Single process: a plain shuffle, as in the reference (repeated augmentation needs
        # several processes to put the copies of an image on different ones).
        sampler_train = RandomSampler(dataset_train)

    # Workers are recreated each epoch (no persistent workers) so that their random seeds come
    # from the restored generator state and a resumed run reproduces the data augmentation.
    train_loader = DataLoader(
        dataset_train, sampler=sampler_train, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and context.device.type == "cuda", drop_last=True,
    )
    val_loader = DataLoader(
        dataset_val, sampler=ShardSampler(len(dataset_val)), batch_size=2 * args.batch_size,
        num_workers=args.num_workers, pin_memory=args.pin_mem and context.device.type == "cuda", drop_last=False,
    )
    if len(train_loader) == 0:
        raise UsageError(
            f"the training set has {len(sampler_train)} images per process, fewer than --batch-size "
            f"{args.batch_size}; lower the batch size"
        )
    return train_loader, val_loader


def build_optimizer(args, model, lr: float, steps_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer_kwargs = {"eps": args.opt_eps}
    if args.opt_betas:
        optimizer_kwargs["betas"] = tuple(args.opt_betas)
    try:
        optimizer = create_optimizer_v2(
            model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum, **optimizer_kwargs,
        )
        lr_scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
            noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=steps_per_epoch,
        )
    except (AssertionError, ValueError, TypeError) as error:
        raise UsageError(f"invalid optimizer or scheduler (--opt {args.opt!r}, --sched {args.sched!r}): {error}") from error
    if lr_scheduler is None:
        raise UsageError(f"unknown --sched {args.sched!r}; use a timm scheduler such as cosine, step or plateau")
    return optimizer, lr_scheduler


def build_model_ema(args, model):
    if not args.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=args.model_ema_decay, device=torch.device("cpu") if args.model_ema_force_cpu else None)


def build_loss(args, num_classes: int):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active(args):
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=num_classes,
        )
        # Mixup already smooths the soft targets.
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def build_candidate_sampler(args, candidates, space, retrain_subnet) -> CandidateSampler:
    if retrain_subnet is not None:
        return FixedSampler(retrain_subnet)
    if candidates:
        sampler: CandidateSampler = PreferredSampler(
            [candidate for _, candidate in candidates], group_by_dim=args.group_by_dim,
            group_by_depth=args.group_by_depth, shuffle=args.shuffle, seed=args.seed,
        )
    else:
        sampler = SpaceSampler(space, seed=args.seed)
    if args.sandwich > 0:
        sampler = SandwichSampler(
            sampler, middle_count=args.sandwich, include_base=not args.no_sandwich_base,
            include_top=not args.no_sandwich_top,
        )
    return sampler


def describe_sampling(args, candidates) -> str:
    if args.mode == "retrain":
        return "one fixed subnet"
    if not candidates:
        return "uniform sampling over the search space"
    grouping = [name for name, on in (("embed dim", args.group_by_dim), ("depth", args.group_by_depth)) if on]
    text = f"{len(candidates)} preferred candidates"
    if grouping:
        text += " grouped by " + " and ".join(grouping)
    if args.sandwich:
        text += f", sandwich of {args.sandwich}"
    return text


def select_eval_candidates(args, candidates, space, retrain_subnet, model) -> list[tuple[str, dict]]:
    """Return (label, candidate) pairs to evaluate: smallest and largest, or all with --eval-all-candidates."""
    if retrain_subnet is not None:
        return [("subnet", retrain_subnet)]
    if candidates:
        if args.eval_all_candidates or args.eval:
            return list(candidates)
        if len(candidates) == 1:
            return [("largest", candidates[0][1])]
        return [("smallest", candidates[0][1]), ("largest", candidates[-1][1])]
    sampler = SpaceSampler(space)
    return [("smallest", model.check_candidate(sampler.smallest())), ("largest", model.check_candidate(sampler.largest()))]


def evaluate_only(args, model, resume_path, val_loader, val_count, eval_candidates, device, output_dir) -> int:
    if resume_path is not None:
        checkpoint = load_checkpoint_file(resume_path)
        check_checkpoint_flags(checkpoint, args, resume_path)
        load_supernet_weights(model, extract_state_dict(checkpoint))
    amp_dtype = resolve_amp_dtype(device, args.amp, args.amp_dtype)
    results = []
    for label, candidate in eval_candidates:
        model.set_subnet(candidate)
        stats = evaluate(model, val_loader, device, amp_dtype, expected_count=val_count)
        n_parameters = model.num_params(candidate)
        logger.info("%s (%.3f M params): acc1 %.2f acc5 %.2f loss %.4f",
                    label, n_parameters / 1e6, stats["acc1"], stats["acc5"], stats["loss"])
        results.append({**stats, "n_parameters": n_parameters, "config": candidate, "label": label})
    if distributed.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        logger.info("wrote %s", output_dir / "results.json")
    return 0


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(math.ceil(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


if __name__ == "__main__":
    try:
        parsed = get_args_parser().parse_args()
        sys.exit(main(parsed))
    except DistributedError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
