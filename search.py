"""Zero-shot search of PreNAS: score every subnet of a search space with a zero-cost proxy.

The supernet is built at initialisation, or loaded with ``--resume``. One gradient is taken at the
largest subnet of the search space, and every candidate is scored with the proxy. The best
``--cand-per-interval`` candidates of each parameter-count (or FLOPs) interval are the preferred
candidates.

Outputs (written by rank 0 only): the interval-candidates JSON (``--interval-cands-output``), one
JSON line per scored candidate (``--scores-output``) and the derived preferred-space YAML
(``--choices-output``).

Single process, data-free, on CPU::

    python search.py --cfg experiments/supernet/supernet-T.yaml --gp --change_qk --relative_position \\
        --data-free --device cpu --min_param_limits 5 --param_limits 12 --param-interval 1.0 \\
        --interval-cands-output output/search_tiny/interval_cands.json

Several processes (Gloo on CPU, NCCL on CUDA)::

    torchrun --nproc_per_node 8 search.py --device cuda ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lib import distributed
from lib.argtypes import non_negative_int, positive_int
from lib.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, load_supernet_weights
from lib.choices import derive_preferred_space, write_preferred_space
from lib.config import ConfigError, load_search_space, save_interval_candidates
from lib.datasets import SUBSET_LIST_NAME, DataError, add_data_args, build_dataset, default_cache_dir
from lib.distributed import DistributedError
from lib.entry import run_entry_point
from lib.evolution import EvolutionSettings, evolution_search, random_search
from lib.fileio import file_write_problem, folder_write_problem, write_text_atomic
from lib.logger import LOG_FILE_NAME, setup_logging
from lib.models import add_model_args, create_supernet
from lib.proxy import (
    BLOCK_SCORE_METHODS,
    SCORE_METHODS,
    ProxyError,
    SubnetScorer,
    data_free_gradient,
    data_gradient,
    head_block_scores,
    mlp_block_scores,
    needs_gradient,
)
from lib.search import (
    FLOPS_SCALE,
    PARAMS_SCALE,
    AdditiveCost,
    Choices,
    IntervalGrid,
    SearchError,
    SearchResult,
    count_enumerated,
    iteration_search,
)
from model.candidate import HEAD_DIM, CandidateError

logger = logging.getLogger("search")

DEFAULT_NUM_CLASSES = 1000


class UsageError(ValueError):
    """Command-line arguments that cannot work together."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "PreNAS zero-shot search",
        description="Score every subnet of a search space with a zero-cost proxy and keep the best per interval.",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="data-free: images in the whole batch, split across processes; with data: images "
                             "per process and batch (default 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="'cuda' or 'cpu' (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the supernet initialisation, the data-free batch and the sampling (default 0)")
    parser.add_argument("--resume", default="", help="score the weights of this supernet checkpoint")
    parser.add_argument("--output_dir", default=None, help="folder for run.log (default: log to stderr only)")
    parser.add_argument("--dist-eval", action="store_true",
                        help="accepted for the reference's command line; the search evaluates nothing")

    group = parser.add_argument_group("proxy")
    group.add_argument("--data-free", action="store_true",
                       help="take the gradient on a random ImageNet-statistics batch; needs no dataset")
    group.add_argument("--grad-batches", type=non_negative_int, default=0,
                       help="with data: training batches per process for the mean gradient; 0 uses the whole "
                            "training set (default 0)")
    group.add_argument("--nb-classes", type=positive_int, default=None,
                       help=f"classes of the head with --data-free (default: from --resume, else "
                            f"{DEFAULT_NUM_CLASSES})")
    group.add_argument("--score-method", default="left_super_taylor6", choices=SCORE_METHODS,
                       help="subnet proxy score (default left_super_taylor6: sum of |theta * grad|)")
    group.add_argument("--block-score-method-for-head", default="balance_taylor6_max_dim", choices=BLOCK_SCORE_METHODS,
                       help="layer scores that place larger num heads (default balance_taylor6_max_dim)")
    group.add_argument("--block-score-method-for-mlp", default="balance_taylor6_max_dim", choices=BLOCK_SCORE_METHODS,
                       help="layer scores that place larger mlp ratios (default balance_taylor6_max_dim)")

    group = parser.add_argument_group("intervals and outputs")
    group.add_argument("--constraint", default="params", choices=("params", "flops"),
                       help="bin candidates by parameter count in M (default) or by FLOPs in G")
    group.add_argument("--min_param_limits", type=float, default=4.0,
                       help="lower bound of the first interval, in M params or G FLOPs (default 4)")
    group.add_argument("--param_limits", type=float, default=12.0,
                       help="no interval extends above this, in M params or G FLOPs (default 12)")
    group.add_argument("--param-interval", type=float, default=2.0,
                       help="interval width, in M params or G FLOPs (default 2)")
    group.add_argument("--cand-per-interval", type=positive_int, default=1,
                       help="candidates kept per interval (default 1)")
    group.add_argument("--interval-cands-output", default="output/search/interval_cands.json",
                       help="interval-candidates JSON to write (default output/search/interval_cands.json)")
    group.add_argument("--scores-output", default=None,
                       help="JSON lines file with every scored candidate (default: not written)")
    group.add_argument("--choices-output", default=None,
                       help="preferred-space YAML derived from the selected candidates (default: not written)")

    group = parser.add_argument_group("search strategy")
    group.add_argument("--search-mode", default="iteration", choices=("iteration", "random", "evolution"),
                       help="iteration: score every count distribution; random or evolution: sample (default iteration)")
    group.add_argument("--legacy-enumeration", action="store_true",
                       help="enumerate as the reference does, which for three or more choices skips every "
                            "distribution where a middle choice has no layer")
    group.add_argument("--population-num", type=positive_int, default=50,
                       help="random and evolution: candidates per interval or generation (default 50)")
    group.add_argument("--max-epochs", type=positive_int, default=20, help="evolution: generations per interval (default 20)")
    group.add_argument("--select-num", type=positive_int, default=20, help="evolution: parents per generation (default 20)")
    group.add_argument("--mutation-num", type=non_negative_int, default=25,
                       help="evolution: mutants per generation (default 25)")
    group.add_argument("--crossover-num", type=non_negative_int, default=25,
                       help="evolution: crossovers per generation (default 25)")
    group.add_argument("--m_prob", type=float, default=0.2,
                       help="evolution: per-layer mutation probability of num heads and mlp ratio (default 0.2)")
    group.add_argument("--s_prob", type=float, default=0.4,
                       help="evolution: mutation probability of depth and of embed dim (default 0.4)")
    group.add_argument("--reallocate", action="store_true",
                       help="random and evolution: place sampled choices by block scores instead of at random layers")

    add_model_args(parser)
    add_data_args(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# Supernet and gradient


def resolve_num_classes(args: argparse.Namespace, checkpoint_state: dict | None, dataset_classes: int | None) -> int:
    """Return the head's class count from the dataset, the checkpoint or ``--nb-classes``, which must agree."""
    sources = {}
    if dataset_classes is not None:
        sources["the training set"] = dataset_classes
    if checkpoint_state is not None:
        if "head.weight" not in checkpoint_state:
            raise CheckpointError(f"checkpoint {args.resume} has no head.weight; it is not a supernet checkpoint")
        sources[f"checkpoint {args.resume}"] = int(checkpoint_state["head.weight"].shape[0])
    if args.nb_classes is not None:
        sources["--nb-classes"] = args.nb_classes

    counts = set(sources.values())
    if len(counts) > 1:
        listing = ", ".join(f"{source}: {count}" for source, count in sources.items())
        if args.nb_classes is not None:
            fix = "make --nb-classes match the checkpoint or drop it"
        else:
            fix = "resume from a checkpoint trained on this --data-set, or pass the --data-set it was trained on"
        raise UsageError(f"the class counts disagree ({listing}); {fix}")
    return counts.pop() if counts else DEFAULT_NUM_CLASSES


def build_supernet(args, space, context, checkpoint_state, num_classes):
    # timm's random erasing and auto-augment draw from Python's random module, so a real-data
    # gradient is repeatable only when that is seeded too.
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model = create_supernet(args, space.supernet, num_classes)
    if checkpoint_state is not None:
        load_supernet_weights(model, checkpoint_state)
        logger.info("scoring the weights of %s", args.resume)
    return model.to(context.device)


def gradient_loader(args: argparse.Namespace, dataset, context) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                 seed=args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and context.device.type == "cuda", drop_last=False,
                      generator=torch.Generator().manual_seed(args.seed))


def proxy_gradient(args, model, largest: dict, context, dataset) -> dict[str, torch.Tensor] | None:
    if not needs_gradient(args.score_method, [args.block_score_method_for_head, args.block_score_method_for_mlp]):
        logger.info("the chosen methods read no gradient; skipping the backward pass")
        return None

    start = time.perf_counter()
    if args.data_free:
        logger.info("taking the data-free gradient: %d images of %dx%d at the largest subnet",
                    args.batch_size, args.input_size, args.input_size)
        gradients = data_free_gradient(model, largest, batch_size=args.batch_size, input_size=args.input_size,
                                       seed=args.seed, rank=context.rank, world_size=context.world_size,
                                       device=context.device)
    else:
        loader = gradient_loader(args, dataset, context)
        batches = args.grad_batches or len(loader)
        logger.info("taking the mean gradient over %d batch(es) of %d images per process", batches, args.batch_size)
        gradients = data_gradient(model, largest, loader, max_batches=args.grad_batches, device=context.device)
    logger.info("gradient done in %.1f s", time.perf_counter() - start)
    return gradients


# ---------------------------------------------------------------------------------------------
# Search


def check_args(args: argparse.Namespace) -> None:
    if not args.cfg:
        raise UsageError("--cfg is missing; pass a full search-space YAML such as experiments/supernet/supernet-T.yaml")
    if not args.change_qkv:
        raise UsageError("the proxy scores assume 64-wide heads with interleaved q/k/v rows; pass --change_qkv "
                         "(or --change_qk), as every PreNAS search does")
    if args.data_free and args.grad_batches:
        raise UsageError("--grad-batches applies to the gradient on data; drop it or drop --data-free")
    if not args.data_free and args.nb_classes is not None:
        raise UsageError("--nb-classes applies to --data-free; with data the training set sets the class count")


def output_files(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Return (description, path) of every file this run writes: the three outputs and those in --output_dir."""
    outputs = [("--interval-cands-output", args.interval_cands_output)]
    if args.scores_output:
        outputs.append(("--scores-output", args.scores_output))
    if args.choices_output:
        outputs.append(("--choices-output", args.choices_output))
    if args.output_dir is not None:
        outputs.append((f"the log file {LOG_FILE_NAME} in --output_dir", os.path.join(args.output_dir, LOG_FILE_NAME)))
        if not args.data_free and (args.subset_per_class is not None or args.data_set == "EVO_IMNET"):
            outputs.append((f"the subset file list {SUBSET_LIST_NAME} in --output_dir",
                            os.path.join(args.output_dir, SUBSET_LIST_NAME)))
    return outputs


def _resolve(path: str) -> Path:
    """Return ``path`` absolute with symbolic links followed, or only absolute where they loop."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _same_file(first: Path, second: Path) -> bool:
    """Return True if two resolved paths name one file, hard links included."""
    if first == second:
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def check_paths(args: argparse.Namespace) -> None:
    """Reject, before any work, outputs that collide or overwrite an input, and locations that cannot be written."""
    inputs = [("--cfg", args.cfg)] + ([("--resume", args.resume)] if args.resume else [])
    resolved_inputs = [(flag, _resolve(path)) for flag, path in inputs]
    # (description, path as given, resolved path, whether it is written as a file rather than a folder)
    seen: list[tuple[str, str, Path, bool]] = []
    if args.output_dir is not None:
        seen.append(("--output_dir", args.output_dir, _resolve(args.output_dir), False))
    for description, path in output_files(args):
        resolved = _resolve(path)
        for input_flag, input_path in resolved_inputs:
            if _same_file(resolved, input_path):
                raise UsageError(f"{description} {path} is the {input_flag} input file, which the search would "
                                 f"overwrite; choose another output path")
        for earlier, earlier_path, earlier_resolved, earlier_is_file in seen:
            if _same_file(resolved, earlier_resolved):
                raise UsageError(f"{earlier} and {description} both name {path}, so one would overwrite the other; "
                                 f"give each output its own path")
            if earlier_is_file and earlier_resolved in resolved.parents:
                raise UsageError(f"{description} {path} lies inside {earlier} {earlier_path}, which is written as a "
                                 f"file; choose output paths that do not nest")
            if resolved in earlier_resolved.parents:
                raise UsageError(f"{earlier} {earlier_path} lies inside {description} {path}, which is written as a "
                                 f"file; choose output paths that do not nest")
        seen.append((description, path, resolved, True))

    if args.output_dir is not None:
        problem = folder_write_problem(args.output_dir)
        if problem:
            raise UsageError(f"--output_dir {args.output_dir} cannot hold {LOG_FILE_NAME}: {problem}; "
                             f"choose another --output_dir")
    for description, path in output_files(args):
        problem = file_write_problem(path)
        if problem:
            raise UsageError(f"{description} {path} cannot be written: {problem}; choose another path")
    if not args.data_free and args.data_set == "DIGITS":
        # The digits are built on first use. A path that exists is read as a build, and build_digits
        # reports one that is incomplete or not a folder.
        if args.data_path:
            description, folder = "--data-path", Path(args.data_path).expanduser()
        else:
            description, folder = "the digits cache folder (set by $PRENAS_CACHE)", default_cache_dir() / "digits"
        problem = None if os.path.lexists(folder) else folder_write_problem(folder)
        if problem:
            raise UsageError(f"{description} {folder} cannot be created: {problem}; choose another --data-path")


def run_search(args, choices: Choices, score, cost, grid: IntervalGrid, head_scores, mlp_scores) -> SearchResult:
    if args.search_mode == "iteration":
        total = count_enumerated(choices, args.legacy_enumeration)
        logger.info("enumerating and scoring %d candidates%s", total,
                    " (legacy enumeration)" if args.legacy_enumeration else "")
        return iteration_search(choices, score, cost, grid, head_scores, mlp_scores, args.cand_per_interval,
                                args.legacy_enumeration)

    settings = EvolutionSettings(
        population_num=args.population_num, max_epochs=args.max_epochs, select_num=args.select_num,
        mutation_num=args.mutation_num, crossover_num=args.crossover_num, m_prob=args.m_prob, s_prob=args.s_prob,
        reallocate=args.reallocate,
    )
    strategy = random_search if args.search_mode == "random" else evolution_search
    logger.info("%s search over %d interval(s)", args.search_mode, len(grid))
    return strategy(choices, score, cost, grid, head_scores, mlp_scores, args.cand_per_interval, settings, args.seed)


def interval_candidates(result: SearchResult, grid: IntervalGrid, params: np.ndarray) -> dict[str, list[dict]]:
    """Return interval key -> selected candidates with ``num_params`` (M) and ``score``, as the reference writes them."""
    mapping = {}
    for interval, rows in result.selected.items():
        mapping[grid.keys[interval]] = [
            dict(result.candidates.candidate(row).to_dict(), num_params=float(params[row]) / PARAMS_SCALE,
                 score=float(result.scores[row]))
            for row in rows
        ]
    return mapping


def scores_lines(result: SearchResult, grid: IntervalGrid, params: np.ndarray, flops: np.ndarray) -> str:
    lines = []
    for row in range(len(result.candidates)):
        interval = int(result.interval_index[row])
        lines.append(json.dumps({
            "candidate": result.candidates.candidate(row).to_dict(),
            "num_params": float(params[row]) / PARAMS_SCALE,
            "flops": float(flops[row]) / FLOPS_SCALE,
            "score": float(result.scores[row]),
            "interval": grid.keys[interval] if interval >= 0 else None,
        }))
    return "\n".join(lines) + "\n"


@dataclass
class Costs:
    """Vectorised parameter and FLOPs counts, and the intervals of the chosen constraint."""

    params: AdditiveCost
    flops: AdditiveCost
    grid: IntervalGrid

    @property
    def constraint(self) -> AdditiveCost:
        return self.params if self.grid.unit == "M" else self.flops


def build_costs(args: argparse.Namespace, model, choices: Choices) -> Costs:
    params = AdditiveCost(model.num_params, choices, "parameter count", seed=args.seed)
    flops = AdditiveCost(model.flops, choices, "FLOPs", seed=args.seed)
    if args.constraint == "params":
        grid = IntervalGrid(args.min_param_limits, args.param_limits, args.param_interval, PARAMS_SCALE, "M")
    else:
        grid = IntervalGrid(args.min_param_limits, args.param_limits, args.param_interval, FLOPS_SCALE, "G")
    return Costs(params, flops, grid)


@contextmanager
def _one_thread():
    """Run torch CPU ops on one thread inside the block, restoring the thread count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def score_space(args: argparse.Namespace, model, choices: Choices, gradients, costs: Costs) -> SearchResult:
    """Compute the block scores and the score tables, then run the search strategy."""
    # The table building is a few hundred small memory-bound ops. On a busy CPU, OpenMP's
    # synchronisation made them up to 50x slower with two threads than with one.
    with _one_thread():
        return _score_space(args, model, choices, gradients, costs)


def _score_space(args: argparse.Namespace, model, choices: Choices, gradients, costs: Costs) -> SearchResult:
    parameters = {name: parameter.detach() for name, parameter in model.named_parameters()}
    depth = model.super_depth
    head_scores = head_block_scores(parameters, gradients, args.block_score_method_for_head,
                                    embed_dims=choices.embed_dim, num_heads=choices.num_heads, depth=depth,
                                    head_dim=HEAD_DIM)
    mlp_scores = mlp_block_scores(parameters, gradients, args.block_score_method_for_mlp,
                                  embed_dims=choices.embed_dim, mlp_ratios=choices.mlp_ratio, depth=depth)
    if args.score_method == "params":
        def score(batch):
            return costs.params(batch) / PARAMS_SCALE
    else:
        score = SubnetScorer(parameters, gradients, args.score_method, depth=depth, head_dim=HEAD_DIM,
                             embed_dims=choices.embed_dim).score
    return run_search(args, choices, score, costs.constraint, costs.grid, head_scores, mlp_scores)


def write_outputs(args: argparse.Namespace, result: SearchResult, costs: Costs) -> list[str]:
    """Write the requested files and return a description of each."""
    params = costs.params(result.candidates)
    mapping = interval_candidates(result, costs.grid, params)
    for key, candidates in mapping.items():
        logger.info("interval %s: %s", key, "; ".join(
            f"{c['num_params']:.3f} M, score {c['score']:.6g}, depth {c['layer_num']}, embed dim {c['embed_dim'][0]}"
            for c in candidates))

    written = []

    @contextmanager
    def writing(flag: str, path: str):
        try:
            yield
        except OSError as error:
            written_note = f" (already wrote {', '.join(written)})" if written else ""
            raise UsageError(f"cannot write {flag} {path}: {error.strerror or error}{written_note}; "
                             f"free space or choose another path and run the search again") from error

    with writing("--interval-cands-output", args.interval_cands_output):
        save_interval_candidates(args.interval_cands_output, mapping)
    written.append(f"interval candidates to {args.interval_cands_output}")
    if args.scores_output:
        flops = costs.flops(result.candidates)
        with writing("--scores-output", args.scores_output):
            write_text_atomic(Path(args.scores_output), scores_lines(result, costs.grid, params, flops))
        written.append(f"{len(result.candidates)} scores to {args.scores_output}")
    if args.choices_output:
        # check_paths has made sure that this is neither --cfg nor another output.
        with writing("--choices-output", args.choices_output):
            write_preferred_space(args.choices_output, derive_preferred_space(mapping), force=True)
        written.append(f"the preferred space to {args.choices_output}")
    return written


def search(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    check_args(args)
    check_paths(args)
    context = distributed.init_distributed(args.device)
    setup_logging(context.rank, args.output_dir)
    logger.info("arguments: %s", vars(args))

    space = load_search_space(args.cfg)
    choices = Choices.from_space(space)
    checkpoint_state = extract_state_dict(load_checkpoint_file(args.resume)) if args.resume else None
    dataset, dataset_classes = (None, None) if args.data_free else build_dataset(True, args)
    num_classes = resolve_num_classes(args, checkpoint_state, dataset_classes)
    model = build_supernet(args, space, context, checkpoint_state, num_classes)

    costs = build_costs(args, model, choices)
    smallest, largest = choices.smallest_candidate(), choices.largest_candidate()
    logger.info("search space spans %.3f-%.3f M params and %.3f-%.3f G FLOPs; intervals %s",
                costs.params.single(smallest) / PARAMS_SCALE, costs.params.single(largest) / PARAMS_SCALE,
                costs.flops.single(smallest) / FLOPS_SCALE, costs.flops.single(largest) / FLOPS_SCALE,
                ", ".join(costs.grid.describe(index) for index in range(len(costs.grid))))

    gradients = proxy_gradient(args, model, largest.to_dict(), context, dataset)
    search_start = time.perf_counter()
    result = score_space(args, model, choices, gradients, costs)
    logger.info("scored %d candidates in %.2f s", len(result.candidates), time.perf_counter() - search_start)
    if not result.selected:
        grid = costs.grid
        raise SearchError(f"no scored candidate falls into the intervals {grid.describe(0)} to "
                          f"{grid.describe(len(grid) - 1)}; set --min_param_limits and --param_limits within the "
                          f"search space's range logged above")

    if context.is_main:
        written = write_outputs(args, result, costs)
        logger.info("search finished in %.1f s: wrote %s", time.perf_counter() - start, ", ".join(written))
    distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    errors = (UsageError, ConfigError, CandidateError, CheckpointError, DataError, DistributedError, ProxyError,
              SearchError)
    return run_entry_point(lambda: search(args), errors, logger)


if __name__ == "__main__":
    sys.exit(main())
