"""Measure images/s of the Tiny supernet and of exported subnets: eval forward and train step.

The Tiny supernet is embed 256, depth 14, 4 heads, mlp ratio 4.0, 224x224 input, patch 16,
1000 classes, global pooling, relative position and change_qkv. The candidates are the smallest
("6.0") and the largest ("11.0") released Tiny subnets. A train step is forward, cross-entropy,
backward and an AdamW step, with a different candidate each step (it alternates between the two,
and only the steps of the named candidate are timed). Each figure is the best of ``--repeats``
timed rounds after one warm-up round, as images/s (wall time) and as CPU seconds per image.
Like the entry scripts, the benchmark first raises glibc's malloc thresholds (see
``lib/allocator.py``); set ``PRENAS_DEFAULT_MALLOC=1`` to time with the defaults.

    python bench/model_speed.py            # a table
    python bench/model_speed.py --json     # one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.allocator import keep_freed_memory  # noqa: E402
from lib.argtypes import positive_int  # noqa: E402
from model.subnet import export_subnet  # noqa: E402
from model.supernet import Supernet  # noqa: E402

TINY_SUPERNET = dict(
    img_size=224, patch_size=16, num_classes=1000, embed_dim=256, depth=14, num_heads=4, mlp_ratio=4.0,
    drop_path_rate=0.1, gp=True, relative_position=True, change_qkv=True,
)

TINY_CANDIDATES = {
    "6.0": {
        "layer_num": 12,
        "embed_dim": [192] * 12,
        "num_heads": [4, 4, 4, 4, 3, 3, 3, 3, 3, 4, 3, 4],
        "mlp_ratio": [4, 4, 4, 4, 4, 3.5, 3.5, 4, 4, 3.5, 4, 4],
    },
    "11.0": {"layer_num": 14, "embed_dim": [240] * 14, "num_heads": [4] * 14, "mlp_ratio": [4.0] * 14},
}


def timed(call) -> tuple[float, float]:
    """Run ``call`` and return its wall and CPU seconds.

    The CPU time is this process's, summed over its threads, so it changes less than the wall
    time when other processes share the cores.
    """
    start, start_cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - start, time.process_time() - start_cpu


def best_rate(step, images: int, steps: int, repeats: int) -> tuple[float, float]:
    """Return the best images/s and CPU seconds per image over ``repeats`` rounds of ``steps`` calls.

    One warm-up call comes first. CPU time is counted as in :func:`timed`.
    """

    def round_of_steps() -> None:
        for index in range(steps):
            step(index)

    step(0)
    fastest, best_cpu = 0.0, float("inf")
    for _ in range(repeats):
        seconds, cpu_seconds = timed(round_of_steps)
        fastest = max(fastest, images * steps / seconds)
        best_cpu = min(best_cpu, cpu_seconds / (images * steps))
    return fastest, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--eval-batch", type=positive_int, default=32, help="eval batch size (default 32)")
    parser.add_argument("--train-batch", type=positive_int, default=16, help="train batch size (default 16)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed calls per round (default 3)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds; the best counts (default 3)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = parser.parse_args()
    # The entry scripts do the same. PRENAS_DEFAULT_MALLOC=1 keeps glibc's default thresholds.
    tuned = keep_freed_memory()
    if not args.json:
        print(f"malloc thresholds raised: {'yes' if tuned else 'no'}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    supernet = Supernet(**TINY_SUPERNET).to(device)
    eval_input = torch.randn(args.eval_batch, 3, 224, 224, device=device)
    rows = []

    supernet.eval()
    for key, candidate in TINY_CANDIDATES.items():
        supernet.set_subnet(candidate)
        exported = export_subnet(supernet, candidate)
        for name, model in (("supernet", supernet), ("exported", exported)):
            with torch.inference_mode():
                rate, cpu = best_rate(lambda _: model(eval_input), args.eval_batch, args.steps, args.repeats)
            rows.append({"model": name, "mode": "eval", "candidate": key, "batch_size": args.eval_batch,
                         "images_per_s": rate, "cpu_s_per_image": cpu})

    supernet.train()
    optimizer = torch.optim.AdamW(supernet.parameters(), lr=1e-4)
    train_input = torch.randn(args.train_batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (args.train_batch,), device=device)
    order = list(TINY_CANDIDATES.values())

    def train_step(candidate: dict) -> None:
        supernet.set_subnet(candidate)
        loss = F.cross_entropy(supernet(train_input), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for key, candidate in TINY_CANDIDATES.items():
        # Each timed step follows an untimed step on another candidate, so every step sets a new subnet.
        other = order[1] if candidate is order[0] else order[0]
        train_step(candidate)
        best, best_cpu = 0.0, float("inf")
        images = args.train_batch * args.steps
        for _ in range(args.repeats):
            seconds = cpu_seconds = 0.0
            for _ in range(args.steps):
                train_step(other)
                wall, cpu = timed(lambda: train_step(candidate))
                seconds, cpu_seconds = seconds + wall, cpu_seconds + cpu
            best, best_cpu = max(best, images / seconds), min(best_cpu, cpu_seconds / images)
        rows.append({"model": "supernet", "mode": "train", "candidate": key, "batch_size": args.train_batch,
                     "images_per_s": best, "cpu_s_per_image": best_cpu})

    for row in rows:
        row["images_per_s"] = round(row["images_per_s"], 2)
        row["cpu_s_per_image"] = round(row["cpu_s_per_image"], 4)
        if args.json:
            print(json.dumps(row))
    if not args.json:
        print(f"{'model':<10}{'mode':<7}{'candidate':<11}{'batch':>6}{'images/s':>10}{'CPU s/image':>13}")
        for row in rows:
            print(
                f"{row['model']:<10}{row['mode']:<7}{row['candidate']:<11}{row['batch_size']:>6}"
                f"{row['images_per_s']:>10.2f}{row['cpu_s_per_image']:>13.4f}"
            )


if __name__ == "__main__":
    main()
