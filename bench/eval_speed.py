"""Measure evaluation images/s of the released Tiny candidates, through the supernet and exported.

Each candidate of ``interval_cands/tiny.json`` is evaluated with ``lib.engine.evaluate`` (the loop
that evaluate.py runs) on synthetic 224x224 images with random labels. The same candidate is
timed twice: set on the Tiny supernet of ``experiments/supernet/tiny.yaml`` (embed 256, depth 14,
4 heads, mlp ratio 4.0, patch 16, 1000 classes, global pooling, relative position, change_qkv)
and as a standalone subnet from ``model.subnet.export_subnet``. The weights are random, which
does not change the speed. A warm-up batch of 4 images runs before ``--batches`` timed batches.

    python bench/eval_speed.py              # a table
    python bench/eval_speed.py --json       # one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lib.allocator import keep_freed_memory  # noqa: E402
from lib.config import load_interval_candidates, load_space  # noqa: E402
from lib.engine import evaluate  # noqa: E402
from model.subnet import export_subnet  # noqa: E402
from model.supernet import Supernet  # noqa: E402


def images_per_second(model: torch.nn.Module, loader: DataLoader, warmup: DataLoader, device: torch.device) -> float:
    """Return images/s of ``lib.engine.evaluate`` over ``loader``, after one call on ``warmup``."""
    evaluate(model, warmup, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    metrics = evaluate(model, loader, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return metrics["count"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per candidate and path (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--candfile", default=str(REPO_ROOT / "interval_cands" / "tiny.json"),
                        help="interval-candidates file (default interval_cands/tiny.json)")
    parser.add_argument("--cfg", default=str(REPO_ROOT / "experiments" / "supernet" / "tiny.yaml"),
                        help="search-space YAML of the supernet (default experiments/supernet/tiny.yaml)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = parser.parse_args()
    keep_freed_memory()  # as the entry scripts do

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    supernet_config = load_space(args.cfg).supernet
    candidates = load_interval_candidates(args.candfile, supernet_config)

    torch.manual_seed(0)
    supernet = Supernet(
        img_size=224, patch_size=16, num_classes=1000, embed_dim=supernet_config.embed_dim,
        depth=supernet_config.depth, num_heads=supernet_config.num_heads, mlp_ratio=supernet_config.mlp_ratio,
        gp=True, relative_position=True, change_qkv=True,
    ).to(device).eval()
    images = torch.randn(args.batch_size * args.batches, 3, 224, 224)
    labels = torch.randint(0, 1000, (images.shape[0],))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size)
    warmup = DataLoader(TensorDataset(images[:4], labels[:4]), batch_size=4)

    if not args.json:
        print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
              f"{args.batches} timed batches per figure")
        print(f"{'interval':>8}  {'params (M)':>10}  {'FLOPs (G)':>9}  {'supernet img/s':>14}  {'exported img/s':>14}")
    for key, interval_candidates in candidates.items():
        for candidate in interval_candidates:
            supernet.set_subnet(candidate)
            supernet_rate = images_per_second(supernet, loader, warmup, device)
            exported_rate = images_per_second(export_subnet(supernet, candidate), loader, warmup, device)
            record = {
                "interval": key,
                "n_parameters": supernet.num_params(candidate),
                "flops_g": supernet.flops(candidate) / 1e9,
                "supernet_images_per_second": supernet_rate,
                "exported_images_per_second": exported_rate,
                "threads": torch.get_num_threads(),
                "batch_size": args.batch_size,
                "device": str(device),
            }
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print(f"{key:>8}  {record['n_parameters'] / 1e6:>10.3f}  {record['flops_g']:>9.3f}  "
                      f"{supernet_rate:>14.1f}  {exported_rate:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
