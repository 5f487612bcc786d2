"""Measure the zero-shot search of the Tiny space: the gradient step, then enumeration and scoring.

Uses the settings of ``01_zero_shot_search.sh tiny``: the Tiny full space at 224x224, a data-free
gradient of 64 images at the largest subnet, ``left_super_taylor6`` scores, ``balance_taylor6_max_dim``
block scores and 1 M intervals from 5 to 12 M. The scoring stage covers everything after the
gradient: block scores, score tables, cost tables, enumeration of the 1,770 candidates, their
scores and parameter counts, and the selection per interval. It is the best of ``--repeats``
rounds; the gradient is timed once.

    python bench/search_speed.py            # a summary
    python bench/search_speed.py --json     # one JSON object per stage and line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import search  # noqa: E402
from lib.config import load_search_space  # noqa: E402
from lib.models import create_supernet  # noqa: E402
from lib.proxy import data_free_gradient  # noqa: E402
from lib.search import Choices, count_enumerated  # noqa: E402

TINY_ARGS = [
    "--cfg", str(REPO_ROOT / "experiments" / "supernet" / "supernet-T.yaml"), "--data-free",
    "--param-interval", "1.0", "--min_param_limits", "5", "--param_limits", "12",
    "--gp", "--change_qk", "--relative_position", "--batch-size", "64",
    "--score-method", "left_super_taylor6", "--block-score-method-for-head", "balance_taylor6_max_dim",
    "--block-score-method-for-mlp", "balance_taylor6_max_dim", "--cand-per-interval", "1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed scoring rounds; the best counts (default 5)")
    parser.add_argument("--device", default="cpu", help="torch device of the gradient step (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)

    args = search.get_args_parser().parse_args([*TINY_ARGS, "--device", options.device])
    space = load_search_space(args.cfg)
    choices = Choices.from_space(space)
    torch.manual_seed(args.seed)
    model = create_supernet(args, space.supernet, 1000).to(options.device)
    largest = choices.largest_candidate().to_dict()

    start = time.perf_counter()
    gradients = data_free_gradient(model, largest, batch_size=args.batch_size, input_size=args.input_size,
                                   seed=args.seed, device=options.device)
    if options.device.startswith("cuda"):
        torch.cuda.synchronize()
    gradient_seconds = time.perf_counter() - start

    scoring_seconds = float("inf")
    for _ in range(options.repeats):
        start = time.perf_counter()
        costs = search.build_costs(args, model, choices)
        result = search.score_space(args, model, choices, gradients, costs)
        scoring_seconds = min(scoring_seconds, time.perf_counter() - start)

    candidates = len(result.candidates)
    if candidates != count_enumerated(choices):
        raise RuntimeError(f"scored {candidates} candidates but the Tiny space has {count_enumerated(choices)}")
    if options.json:
        print(json.dumps({"stage": "gradient", "seconds": round(gradient_seconds, 4), "candidates": candidates}))
        print(json.dumps({"stage": "scoring", "seconds": round(scoring_seconds, 4), "candidates": candidates}))
    else:
        print(f"gradient: {gradient_seconds:.2f} s ({args.batch_size} images of {args.input_size}x{args.input_size} "
              f"at the largest Tiny subnet, {torch.get_num_threads()} threads, {options.device})")
        print(f"scoring:  {scoring_seconds:.3f} s for {candidates} candidates "
              f"({candidates / scoring_seconds:,.0f} candidates/s, best of {options.repeats})")


if __name__ == "__main__":
    main()
