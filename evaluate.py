"""Search-free evaluation: every preferred subnet inherits the trained supernet's weights.

Each candidate of an interval-candidates file (``--candfile``) is evaluated on the validation
set in file order. Without a file, the candidate of ``--subnet``, the config's ``RETRAIN``
subnet (``--mode retrain``) or the largest subnet (``--mode super``) is evaluated::

    python evaluate.py --cfg experiments/supernet/tiny.yaml --candfile interval_cands/tiny.json \\
        --resume supernet-tiny.pth --gp --change_qkv --relative_position \\
        --data-set IMNET --data-path DATA --output_dir output/tiny/eval

Under ``torchrun --nproc_per_node N`` every process evaluates its own shard of the validation
set and the counts are summed, so each image counts exactly once, with no padding
(``lib.engine.evaluate`` raises if the total differs from the dataset size).

``--output_dir`` receives ``results.json`` (one record per candidate, see ``lib.results``),
``pareto.png``, ``args.json`` and ``run.log``; with ``--scores`` also ``proxy_correlation.json``;
with ``--export-dir`` one standalone subnet folder per candidate. Every output but ``run.log`` is
written after the last candidate is evaluated, so a run that fails earlier leaves the previous
run's outputs as they were.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lib import distributed
from lib.argtypes import positive_int
from lib.checkpoint import CheckpointError, args_to_plain, extract_state_dict, load_checkpoint_file, load_supernet_weights
from lib.config import ConfigError, SupernetConfig, format_interval_key, load_interval_candidates, load_space
from lib.correlation import ScoresError, join_scores, load_scores, proxy_correlation
from lib.datasets import DataError, add_data_args, build_dataset
from lib.distributed import DistributedError, ShardSampler
from lib.engine import evaluate
from lib.entry import run_entry_point
from lib.fileio import output_folder_problem
from lib.logger import setup_logging
from lib.models import add_model_args, check_checkpoint_flags, create_supernet
from lib.results import ResultsError, format_table, make_result, plot_pareto, save_results, write_json
from model.candidate import CandidateError, largest_candidate
from model.subnet import export_subnet, save_subnet
from model.supernet import Supernet

logger = logging.getLogger("evaluate")

RESULTS_FILE = "results.json"
PARETO_FILE = "pareto.png"
CORRELATION_FILE = "proxy_correlation.json"
ARGS_FILE = "args.json"
# A candidate file's num_params (M) and the supernet's count may differ by rounding only.
NUM_PARAMS_TOLERANCE_M = 1e-5


class EvaluationError(ValueError):
    """Arguments, checkpoints or data that cannot be evaluated together."""


# (interval key or None, candidate dict)
LabelledCandidate = tuple[Any, dict]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "PreNAS search-free evaluation",
        description="Evaluate the preferred subnets of a trained supernet on a validation set.",
    )
    add_model_args(parser)
    add_data_args(parser, training=False)

    group = parser.add_argument_group("evaluation")
    group.add_argument("--resume", default=None, metavar="CHECKPOINT",
                       help="supernet checkpoint: a released supernet-{tiny,small,base}.pth or a checkpoint.pth "
                            "written by train.py (required)")
    group.add_argument("--candfile", default=None,
                       help="interval-candidates JSON; every candidate is evaluated, in file order")
    group.add_argument("--subnet", default=None, metavar="JSON",
                       help="a candidate (or a list of candidates) as inline JSON or a path to a JSON file, "
                            "evaluated instead of --candfile")
    group.add_argument("--mode", default="retrain", choices=("retrain", "super"),
                       help="without --candfile or --subnet: evaluate the config's RETRAIN subnet (retrain, "
                            "the default) or the largest subnet of the supernet (super)")
    group.add_argument("--batch-size", type=positive_int, default=64, help="images per batch and process (default 64)")
    group.add_argument("--output_dir", default="output/eval",
                       help="folder for results.json, pareto.png and the log; created if missing (default output/eval)")
    group.add_argument("--export-dir", default=None,
                       help="also write each candidate as a standalone subnet (config.json + model.pth) "
                            "into a folder of this directory")
    group.add_argument("--scores", default=None, metavar="FILE.jsonl",
                       help="proxy scores written by the search's --scores-output; reports Kendall tau and "
                            "Spearman rho between proxy score and top-1 accuracy")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cuda or cpu (default cuda when available)")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                       help="autocast on CUDA (bfloat16 where supported, else float16); ignored on CPU (default off)")
    group.add_argument("--eval", action="store_true",
                       help="accepted for compatibility with the reference's command line; evaluate.py always evaluates")
    group.add_argument("--dist-eval", action="store_true",
                       help="accepted for compatibility; under torchrun the validation set is always sharded exactly")
    return parser


# ---------------------------------------------------------------------------------------------
# Candidates


def _interval_file_order(path: Path) -> list[str]:
    """Return the interval keys of a candidates file in the order the file lists them."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    return [format_interval_key(key) for key in raw]


def _parse_subnet_option(text: str, supernet: SupernetConfig) -> list[dict]:
    inline = text.lstrip().startswith(("{", "["))
    where = "--subnet" if inline else f"--subnet file {text}"
    try:
        value = json.loads(text if inline else Path(text).read_text(encoding="utf-8"))
    except OSError as error:
        raise EvaluationError(
            f"{where} cannot be read ({error.strerror}); pass a JSON file or an inline candidate object"
        ) from error
    except json.JSONDecodeError as error:
        raise EvaluationError(
            f"{where} is not valid JSON ({error.msg}); pass a candidate object such as "
            '\'{"layer_num": 12, "embed_dim": [192, ...], "mlp_ratio": [...], "num_heads": [...]}\' '
            "or the path of a JSON file"
        ) from error

    candidates = value if isinstance(value, list) else [value]
    if not candidates:
        raise EvaluationError(f"{where} is an empty list; give at least one candidate")
    checked = []
    for index, candidate in enumerate(candidates):
        try:
            checked.append(supernet.check_candidate(candidate))
        except CandidateError as error:
            raise EvaluationError(f"{where}, candidate {index}: {error}") from error
    return checked


def load_candidates(args: argparse.Namespace, space) -> list[LabelledCandidate]:
    """Return the candidates to evaluate with their interval keys, checked against ``space.supernet``.

    Raises:
        EvaluationError: both --candfile and --subnet are given, --subnet is invalid, or
            ``--mode retrain`` has neither a file nor a RETRAIN section.
        ConfigError: the candidates file is invalid or contains a candidate outside the supernet.
    """
    if args.candfile and args.subnet:
        raise EvaluationError("pass either --candfile or --subnet, not both")

    if args.subnet:
        return [(None, candidate) for candidate in _parse_subnet_option(args.subnet, space.supernet)]

    if args.candfile:
        path = Path(args.candfile)
        intervals = load_interval_candidates(path, space.supernet)
        return [(key, candidate) for key in _interval_file_order(path) for candidate in intervals[key]]

    if args.mode == "super":
        largest = largest_candidate(space.supernet.embed_dim, space.supernet.depth, space.supernet.num_heads,
                                    space.supernet.mlp_ratio)
        return [(None, space.supernet.check_candidate(largest))]
    if space.retrain is None:
        raise EvaluationError(
            f"--cfg {args.cfg} has no RETRAIN section; pass --candfile or --subnet, or --mode super "
            f"for the largest subnet"
        )
    return [(None, space.retrain)]


# ---------------------------------------------------------------------------------------------
# Supernet


def _checkpoint_summary(state: Mapping[str, torch.Tensor]) -> str:
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("blocks.")}
    parts = [f"{max(blocks) + 1 if blocks else 0} blocks"]
    if "cls_token" in state:
        parts.append(f"embed dim {state['cls_token'].shape[-1]}")
    if "pos_embed" in state:
        parts.append(f"pos_embed of {state['pos_embed'].shape[1]} tokens")
    if "head.weight" in state:
        parts.append(f"a head of {state['head.weight'].shape[0]} classes")
    return ", ".join(parts)


def load_supernet(args: argparse.Namespace, supernet: SupernetConfig) -> Supernet:
    """Build the supernet of ``--cfg`` and the flags and load the weights of ``--resume`` into it.

    The class count is the number of rows of the checkpoint's ``head.weight``. Returns the
    supernet on the CPU in eval mode.

    Raises:
        CheckpointError: the file is missing or unreadable, was trained with other supernet flags
            (when it saved its arguments), has no head, or its tensors do not fit the supernet.
            The message then lists the missing, unexpected and mismatched keys with their shapes
            and the likely cause.
    """
    checkpoint = load_checkpoint_file(args.resume)
    check_checkpoint_flags(checkpoint, args, args.resume)
    state = extract_state_dict(checkpoint)
    if "head.weight" not in state:
        raise CheckpointError(
            f"checkpoint {args.resume} has no head.weight, so it is not a supernet checkpoint; "
            f"pass a supernet-*.pth or a checkpoint.pth written by train.py"
        )

    num_classes = int(state["head.weight"].shape[0])
    model = create_supernet(args, supernet, num_classes)
    try:
        load_supernet_weights(model, state)
    except CheckpointError as error:
        tokens = (args.input_size // args.patch_size) ** 2 + 1
        raise CheckpointError(
            f"checkpoint {args.resume} ({_checkpoint_summary(state)}) does not match the supernet of "
            f"--cfg {args.cfg} (depth {supernet.depth}, embed dim {supernet.embed_dim}, mlp ratio "
            f"{supernet.mlp_ratio:g}) with --input-size {args.input_size} and --patch_size {args.patch_size} "
            f"({tokens} tokens).\n{error}"
        ) from error
    return model.eval()


def check_candidates(model: Supernet, candidates: list[LabelledCandidate], args: argparse.Namespace) -> list[LabelledCandidate]:
    """Validate the candidates against the built supernet, whose flags can restrict them further than --cfg.

    Raises:
        EvaluationError: naming the candidate's position, its interval and the problem.
    """
    checked = []
    for index, (interval, candidate) in enumerate(candidates):
        try:
            checked.append((interval, model.check_candidate(candidate)))
        except CandidateError as error:
            hint = "" if args.change_qkv else "; PreNAS supernets are built with --change_qkv"
            raise EvaluationError(f"candidate {index} (interval {interval}) does not fit the supernet: {error}{hint}") from error
    return checked


def check_num_params(model: Supernet, candidates: list[LabelledCandidate]) -> None:
    """Warn when a candidate's ``num_params`` (M) differs from the supernet's count."""
    for interval, candidate in candidates:
        listed = candidate.get("num_params")
        if not isinstance(listed, (int, float)):
            continue
        counted = model.num_params(candidate) / 1e6
        if abs(counted - listed) > NUM_PARAMS_TOLERANCE_M:
            logger.warning(
                "candidate of interval %s lists num_params %.6f M but this supernet counts %.6f M; the file "
                "was written for another class count, input size or patch size",
                interval, listed, counted,
            )


# ---------------------------------------------------------------------------------------------
# Data and evaluation


def build_val_loader(args: argparse.Namespace, dataset: Dataset, device: torch.device) -> DataLoader:
    """Return a loader over this process's shard of ``dataset``, every image in exactly one shard."""
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=ShardSampler(len(dataset)),
        num_workers=args.num_workers,
        pin_memory=bool(args.pin_mem) and device.type == "cuda",
        drop_last=False,
    )


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """Return the autocast dtype of ``--amp``: bfloat16 on CUDA where supported, else float16; None on CPU."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def evaluate_candidate(
    model: Supernet,
    candidate: Mapping[str, Any],
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    expected_count: int | None = None,
    label: str = "eval",
) -> dict[str, float]:
    """Set ``candidate`` on the supernet and return ``lib.engine.evaluate``'s metrics for it."""
    model.set_subnet(candidate)
    return evaluate(model, loader, device, amp_dtype, expected_count=expected_count, label=label)


def export_name(index: int, interval: str | None) -> str:
    """Return the folder name of an exported candidate: its position, then its interval key."""
    return f"{index:02d}" if interval is None else f"{index:02d}_interval-{interval}"


def check_output_folder(flag: str, value: str | None) -> None:
    """Check, without writing anything, that the folder ``value`` of ``flag`` exists or can be created and is writable.

    Raises:
        EvaluationError: ``value`` is empty, a file, under a file, or in a folder without write permission.
    """
    problem = output_folder_problem(flag, value)
    if problem:
        raise EvaluationError(problem)


def _check_classes(dataset_classes: int, model: Supernet, args: argparse.Namespace) -> None:
    if dataset_classes > model.num_classes:
        raise EvaluationError(
            f"the validation set of --data-set {args.data_set} has {dataset_classes} classes but the head of "
            f"checkpoint {args.resume} has {model.num_classes}; evaluate on the dataset the supernet was trained on"
        )
    if dataset_classes < model.num_classes:
        logger.warning(
            "the validation set has %d classes and the checkpoint's head %d; predictions of the other classes "
            "count as errors", dataset_classes, model.num_classes,
        )


def run(args: argparse.Namespace, context: distributed.DistContext) -> list[dict]:
    """Check every input, evaluate each candidate and write the outputs on rank 0."""
    if not args.cfg:
        raise EvaluationError("--cfg is required: the search-space YAML whose SUPERNET block matches the checkpoint")
    if not args.resume:
        raise EvaluationError("--resume is required: the supernet checkpoint to evaluate")
    if not Path(args.resume).is_file():
        raise CheckpointError(f"checkpoint {args.resume} not found; check --resume")

    space = load_space(args.cfg)
    candidates = load_candidates(args, space)
    if args.export_dir is not None:
        # A file where a candidate's export folder goes would otherwise fail only after the evaluation.
        for index, (interval, _) in enumerate(candidates):
            check_output_folder("--export-dir", str(Path(args.export_dir) / export_name(index, interval)))
    scores = load_scores(args.scores) if args.scores else None
    dataset, dataset_classes = build_dataset(False, args)
    model = load_supernet(args, space.supernet)
    _check_classes(dataset_classes, model, args)
    candidates = check_candidates(model, candidates, args)
    check_num_params(model, candidates)

    output_dir = Path(args.output_dir)
    export_dir = Path(args.export_dir) if args.export_dir is not None else None
    device = context.device
    model.to(device)
    amp_dtype = autocast_dtype(device, args.amp)
    loader = build_val_loader(args, dataset, device)
    logger.info(
        "evaluating %d candidate(s) of %s on %d validation images (%d process(es), batch %d per process)",
        len(candidates), args.candfile or ("--subnet" if args.subnet else f"--mode {args.mode}"), len(dataset),
        context.world_size, args.batch_size,
    )

    results = []
    for index, (interval, candidate) in enumerate(candidates):
        # Candidates of --subnet or --mode have no interval.
        name = "subnet" if interval is None else f"interval {interval}"
        metrics = evaluate_candidate(
            model, candidate, loader, device, amp_dtype, expected_count=len(dataset),
            label=f"[{index + 1}/{len(candidates)}] {name} eval",
        )
        result = make_result(
            candidate, metrics,
            n_parameters=model.num_params(candidate), flops=model.flops(candidate), macs=model.macs(candidate),
            interval=interval,
        )
        results.append(result)
        logger.info(
            "[%d/%d] %s: %.3f M params, top-1 %.2f %%, top-5 %.2f %%, loss %.4f",
            index + 1, len(candidates), name, result["n_parameters"] / 1e6,
            result["acc1"], result["acc5"], result["loss"],
        )
        if not math.isfinite(result["loss"]):
            logger.warning(
                "[%d/%d] %s: the loss is %s, so the weights of %s may contain NaN or Inf values; "
                "check the checkpoint or evaluate an earlier one",
                index + 1, len(candidates), name, result["loss"], args.resume,
            )

    if context.is_main:
        write_outputs(args, model, candidates, results, scores, output_dir, export_dir)
    return results


def write_outputs(
    args: argparse.Namespace,
    model: Supernet,
    candidates: list[LabelledCandidate],
    results: list[dict],
    scores: Mapping[str, Mapping] | None,
    output_dir: Path,
    export_dir: Path | None,
) -> None:
    """Write args.json, results.json, pareto.png, the proxy correlation and the exported subnets, and print the table.

    Without ``scores``, a proxy_correlation.json of an earlier run is deleted, since it does not
    describe these results.
    """
    correlation = None
    if scores is not None:
        proxy_scores = join_scores(results, scores)
        for result, score in zip(results, proxy_scores):
            result["proxy_score"] = score
        correlation = {"scores_file": str(args.scores), **proxy_correlation(results, proxy_scores)}
        # results.json stays a list of candidate records, as in the reference, so each record
        # carries the coefficients of the whole evaluated set.
        for result in results:
            result["proxy_kendall_tau"] = correlation["kendall_tau"]
            result["proxy_spearman_rho"] = correlation["spearman_rho"]

    write_json(output_dir / ARGS_FILE, args_to_plain(args))
    if correlation is None:
        (output_dir / CORRELATION_FILE).unlink(missing_ok=True)
    else:
        write_json(output_dir / CORRELATION_FILE, correlation)
    save_results(output_dir / RESULTS_FILE, results)
    plot_pareto(results, output_dir / PARETO_FILE)
    print(format_table(results, correlation), flush=True)
    written = [output_dir / RESULTS_FILE, output_dir / PARETO_FILE, output_dir / ARGS_FILE]
    if correlation is not None:
        written.append(output_dir / CORRELATION_FILE)

    if export_dir is not None:
        for index, (interval, candidate) in enumerate(candidates):
            save_subnet(export_subnet(model, candidate), export_dir / export_name(index, interval))
        written.append(export_dir)
    logger.info("wrote %s", ", ".join(str(path) for path in written))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> None:
        # Checked before setup_logging creates --output_dir for run.log and before any data or model is loaded.
        check_output_folder("--output_dir", args.output_dir)
        check_output_folder("--export-dir", args.export_dir)
        context = distributed.init_distributed(args.device)
        setup_logging(context.rank, args.output_dir if context.is_main else None)
        run(args, context)

    errors = (EvaluationError, ConfigError, CandidateError, CheckpointError, DataError, DistributedError,
              ScoresError, ResultsError)
    return run_entry_point(body, errors, logger)


if __name__ == "__main__":
    sys.exit(main())
