"""Measure the zero-shot search of the Tiny space: the gradient step, then enumeration and scoring.

Uses the settings of ``01_zero_shot_search.sh tiny``: the Tiny full space at 224x224, a data-free
gradient of 64 images at the largest subnet, ``left_super_taylor6`` scores, ``balance_taylor6_max_dim``
block scores and 1 M intervals from 5 to 12 M. The scoring stage covers everything after the
gradient: block scores, score tables, cost tables, enumeration of the 1,770 candidates, their
scores and parameter counts, and the selection per interval. It is the best of ``--repeats``
rounds; the gradient is timed once.

    python bench/search_speed.py            # a summary
    python bench/search_speed.py --json     # one JSON object per stage and line

``--naive N`` also times the straightforward method on the first N candidates: slice every weight
and gradient tensor of each candidate and sum ``|theta * grad|``, one candidate at a time, as the
reference code does.
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
from lib.allocator import keep_freed_memory  # noqa: E402
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


def naive_score(parameters: dict, gradients: dict, candidate: dict) -> float:
    """Sum ``|theta * grad|`` over explicitly sliced copies of the tensors one candidate uses."""
    embed = candidate["embed_dim"][0]
    names_and_slices = [
        ("patch_embed_super.proj.weight", lambda t: t[:embed]),
        ("patch_embed_super.proj.bias", lambda t: t[:embed]),
        ("norm.weight", lambda t: t[:embed]),
        ("norm.bias", lambda t: t[:embed]),
        ("head.weight", lambda t: t[:, :embed]),
        ("head.bias", lambda t: t),
    ]
    for layer in range(candidate["layer_num"]):
        width = 64 * candidate["num_heads"][layer]
        hidden = int(embed * candidate["mlp_ratio"][layer])
        prefix = f"blocks.{layer}."
        names_and_slices += [
            (prefix + "attn.qkv.weight", lambda t, w=width: torch.cat([t[i:3 * w:3, :embed] for i in range(3)])),
            (prefix + "attn.qkv.bias", lambda t, w=width: torch.cat([t[i:3 * w:3] for i in range(3)])),
            (prefix + "attn.proj.weight", lambda t, w=width: t[:embed, :w]),
            (prefix + "fc1.weight", lambda t, h=hidden: t[:h, :embed]),
            (prefix + "fc1.bias", lambda t, h=hidden: t[:h]),
            (prefix + "fc2.weight", lambda t, h=hidden: t[:embed, :h]),
        ]
        names_and_slices += [(prefix + name, lambda t: t[:embed]) for name in (
            "attn.proj.bias", "attn_layer_norm.weight", "attn_layer_norm.bias", "ffn_layer_norm.weight",
            "ffn_layer_norm.bias", "fc2.bias")]
    return float(sum((cut(parameters[name]) * cut(gradients[name])).abs().sum() for name, cut in names_and_slices))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed scoring rounds; the best counts (default 5)")
    parser.add_argument("--device", default="cpu", help="torch device of the gradient step (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--naive", type=int, default=0, metavar="N",
                        help="also time one-at-a-time slicing on the first N candidates (default 0: skip)")
    options = parser.parse_args()
    keep_freed_memory()  # as the entry scripts do
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
    stages = [("gradient", gradient_seconds, candidates), ("scoring", scoring_seconds, candidates)]

    if options.naive:
        parameters = {name: parameter.detach() for name, parameter in model.named_parameters()}
        count = min(options.naive, candidates)
        start = time.perf_counter()
        naive = [naive_score(parameters, gradients, result.candidates.candidate(row).to_dict()) for row in range(count)]
        stages.append(("naive_scoring", time.perf_counter() - start, count))
        worst = max(abs(a - b) / abs(b) for a, b in zip(result.scores[:count], naive))
        if worst > 1e-4:
            raise RuntimeError(f"vectorised and naive scores differ by up to {worst:.2e} (relative)")

    if options.json:
        for stage, seconds, count in stages:
            print(json.dumps({"stage": stage, "seconds": round(seconds, 4), "candidates": count}))
        return
    print(f"gradient: {gradient_seconds:.2f} s ({args.batch_size} images of {args.input_size}x{args.input_size} "
          f"at the largest Tiny subnet, {torch.get_num_threads()} threads, {options.device})")
    print(f"scoring:  {scoring_seconds:.3f} s for {candidates} candidates "
          f"({candidates / scoring_seconds:,.0f} candidates/s, best of {options.repeats})")
    for stage, seconds, count in stages[2:]:
        print(f"naive:    {seconds:.3f} s for {count} candidates ({seconds / count * 1000:.2f} ms each)")


if __name__ == "__main__":
    main()
