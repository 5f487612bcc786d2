"""Training speed of the supernet: images per second and peak memory, one process and two.

Cases:

- ``demo``: the demo space (``experiments/supernet/supernet-demo.yaml``) with the settings of
  ``02_one_shot_training.sh demo``: 32x32 inputs, patch 8, batch 64, the digits dataset through
  the real data loader without augmentation.
- ``tiny``: the Tiny full space (``experiments/supernet/supernet-T.yaml``) at 224x224, patch 16,
  on synthetic images, for a few steps.

Each step trains one subnet drawn uniformly from the space with a fixed seed, so every
configuration trains the same subnets. Two processes use DistributedDataParallel (Gloo on CPU,
NCCL on CUDA); images/s is the total over processes. Peak memory is the peak resident set size
of a process on CPU and the peak allocated CUDA memory on GPU, the maximum over processes.

    python bench/train_speed.py                      # both cases, 1 and 2 processes, CPU
    python bench/train_speed.py --case tiny --device cuda --batch-size 128 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset, TensorDataset  # noqa: E402

from lib import distributed  # noqa: E402
from lib.allocator import keep_freed_memory  # noqa: E402
from lib.config import load_search_space  # noqa: E402
from lib.engine import NonFiniteTracker, resolve_amp_dtype, train_one_epoch  # noqa: E402
from lib.models import create_supernet  # noqa: E402
from lib.sampling import SpaceSampler  # noqa: E402

CASES = {
    "demo": {"cfg": "experiments/supernet/supernet-demo.yaml", "input_size": 32, "patch_size": 8, "batch_size": 64},
    "tiny": {"cfg": "experiments/supernet/supernet-T.yaml", "input_size": 224, "patch_size": 16, "batch_size": 8},
}


def build_loader(case: str, batch_size: int, steps: int, world_size: int, rank: int, num_workers: int) -> DataLoader:
    """Return a loader of exactly ``steps`` batches per process."""
    images_needed = batch_size * steps * world_size
    if case == "demo":
        from lib.datasets import build_dataset

        data_args = SimpleNamespace(
            data_set="DIGITS", data_path=None, download=False, input_size=32, color_jitter=0.0, aa=None,
            train_interpolation="bicubic", reprob=0.0, remode="pixel", recount=1, eval_crops=1, hflip=0.0,
            crop_padding=0,
            skip_corrupt=False, subset_per_class=None, output_dir=None,
        )
        dataset, _ = build_dataset(True, data_args)
        indices = [index % len(dataset) for index in range(images_needed)]
        dataset = Subset(dataset, indices)
    else:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(images_needed, 3, 224, 224, generator=generator)
        targets = torch.randint(0, 1000, (images_needed,), generator=generator)
        dataset = TensorDataset(images, targets)

    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    else:
        sampler = RandomSampler(dataset)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers, drop_last=True)


def measure(rank: int, world_size: int, port: int, options: dict, results) -> None:
    keep_freed_memory()  # as train.py does
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(max(1, options["threads"] // world_size))
    context = distributed.init_distributed(options["device"])
    device = context.device
    case = CASES[options["case"]]
    batch_size = options["batch_size"] or case["batch_size"]

    space = load_search_space(REPO_ROOT / case["cfg"])
    model_args = SimpleNamespace(
        input_size=case["input_size"], patch_size=case["patch_size"], drop=0.0, drop_path=0.1, gp=True,
        relative_position=True, change_qkv=True, max_relative_position=14, abs_pos=True,
    )
    num_classes = 10 if options["case"] == "demo" else 1000
    torch.manual_seed(0)
    model = create_supernet(model_args, space.supernet, num_classes).to(device)
    train_model = model
    if context.is_distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    sampler = SpaceSampler(space, seed=0)
    amp_dtype = resolve_amp_dtype(device, options["amp"])
    grad_scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    criterion = torch.nn.CrossEntropyLoss()

    def run(epoch: int, steps: int) -> dict:
        loader = build_loader(options["case"], batch_size, steps, world_size, context.rank, options["num_workers"])
        return train_one_epoch(
            train_model, model, criterion, loader, optimizer, device, epoch, sampler,
            nonfinite=NonFiniteTracker(), grad_scaler=grad_scaler, amp_dtype=amp_dtype, print_freq=0,
        )

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run(0, options["warmup"])
    stats = run(1, options["steps"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        # ru_maxrss is in KiB on Linux.
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results[context.rank] = {"images_per_second": stats["images_per_second"], "peak_memory_mib": peak_bytes / 2**20}
    distributed.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("demo", "tiny", "all"), default="all")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per process and step (default: per case)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers per process (default 0)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads shared by the processes (default: torch's count)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16/float16 autocast on CUDA (CPU always float32)")
    args = parser.parse_args()

    cases = ["demo", "tiny"] if args.case == "all" else [args.case]
    manager = mp.Manager()
    for case in cases:
        for world_size in args.processes:
            options = {
                "case": case, "device": args.device, "batch_size": args.batch_size, "steps": args.steps,
                "warmup": args.warmup, "num_workers": args.num_workers, "threads": args.threads, "amp": args.amp,
            }
            results = manager.dict()
            mp.spawn(measure, args=(world_size, free_port(), options, results), nprocs=world_size, join=True)
            record = {
                "case": case, "device": args.device, "processes": world_size,
                "batch_per_process": args.batch_size or CASES[case]["batch_size"], "steps": args.steps,
                "images_per_second": round(results[0]["images_per_second"], 1),
                "peak_memory_mib": round(max(result["peak_memory_mib"] for result in results.values()), 1),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
