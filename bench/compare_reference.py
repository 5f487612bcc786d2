"""Time this supernet and the original PreNAS supernet side by side, in one process.

Both models are the Tiny supernet of ``bench/model_speed.py`` (embed 256, depth 14, 4 heads, mlp
ratio 4.0, 224x224, patch 16, 1000 classes, global pooling, relative position, change_qkv, qkv
bias). This supernet's state dict is loaded into the original one, and their logits are compared
before any timing, so both compute the same function.

The modes and candidates are those of ``bench/model_speed.py``: eval forward at batch 32, and a
train step (forward, cross-entropy, backward, AdamW step) at batch 16 in which every timed step
follows a step on the other candidate. Rounds alternate between the two models, so a slow
moment of the machine hits both. Each round times ``--steps`` calls after the warm-up. The
figures are the best and the median round in images/s, and the ratios of this implementation's
figures to the original's.

By default both run with the C library's default malloc settings. With ``--keep-freed-memory``
both run with the raised thresholds that this repository's entry scripts set.

The original code is not part of this repository: pass a checkout of it with ``--reference``
(the directory that contains its ``model/supernet_transformer.py``).

    python bench/compare_reference.py --reference ../PreNAS
    python bench/compare_reference.py --reference ../PreNAS --json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.model_speed import TINY_CANDIDATES, TINY_SUPERNET, timed  # noqa: E402
from lib.allocator import keep_freed_memory  # noqa: E402
from lib.argtypes import positive_int  # noqa: E402
from model.supernet import Supernet  # noqa: E402


def load_reference_class(root: Path):
    """Import ``Vision_TransformerSuper`` from a checkout of the original code.

    The original code imports its own top-level ``model`` package, which has the same name as
    this repository's. This repository's ``model`` modules are set aside while the original is
    imported and put back afterwards. Classes already imported keep their own modules.
    """
    if not (root / "model" / "supernet_transformer.py").is_file():
        raise SystemExit(
            f"error: {root / 'model' / 'supernet_transformer.py'} not found; "
            "pass the root directory of a checkout of the original PreNAS code with --reference"
        )
    own = {name: module for name, module in sys.modules.items() if name == "model" or name.startswith("model.")}
    for name in own:
        del sys.modules[name]
    # The package is built by hand from the checkout's folder: a plain import would find this
    # repository's ``model`` first when the checkout's folder has no __init__.py.
    directory = root / "model"
    init = directory / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location("model", init, submodule_search_locations=[str(directory)])
    else:
        spec = importlib.machinery.ModuleSpec("model", None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(directory)]
    sys.modules["model"] = package
    sys.path.insert(0, str(root))
    try:
        if spec.loader is not None:
            spec.loader.exec_module(package)
        return importlib.import_module("model.supernet_transformer").Vision_TransformerSuper
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name == "model" or name.startswith("model.")]:
            del sys.modules[name]
        sys.modules.update(own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="root of a checkout of the original PreNAS code")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--eval-batch", type=positive_int, default=32, help="eval batch size (default 32)")
    parser.add_argument("--train-batch", type=positive_int, default=16, help="train batch size (default 16)")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed calls per round (default 2)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="rounds per model, of which the best and the median are reported (default 5)")
    parser.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"],
                        help="what to time (default: eval train)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="raise glibc's malloc thresholds as this repository's entry scripts do; "
                        "the setting applies to the whole process, so to both models")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = parser.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit(
            "error: could not raise the malloc thresholds: the C library is not glibc, or "
            "PRENAS_DEFAULT_MALLOC or a MALLOC_*/GLIBC_TUNABLES variable is set; unset them or drop --keep-freed-memory"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    reference_class = load_reference_class(args.reference.resolve())
    ours = Supernet(**TINY_SUPERNET)
    # The original constructor defaults to no qkv bias, and its released supernets have one.
    reference = reference_class(**TINY_SUPERNET, qkv_bias=True)
    reference.load_state_dict(ours.state_dict(), strict=True)
    models = {
        "ours": (ours, ours.set_subnet),
        "reference": (reference, reference.set_sample_config),
    }

    check_input = torch.randn(2, 3, 224, 224)
    for key, candidate in TINY_CANDIDATES.items():
        outputs = []
        for model, set_subnet in models.values():
            model.eval()
            set_subnet(candidate)
            with torch.no_grad():
                outputs.append(model(check_input))
        difference = (outputs[0] - outputs[1]).abs().max().item()
        if difference > 1e-4:
            raise SystemExit(
                f"error: the logits of candidate {key} differ by {difference:.2e}, so the two supernets compute "
                "different functions; check that --reference is a checkout of the original PreNAS code"
            )
        if not args.json:
            print(f"candidate {key}: max abs logit difference {difference:.1e}")

    eval_input = torch.randn(args.eval_batch, 3, 224, 224)
    train_input = torch.randn(args.train_batch, 3, 224, 224)
    labels = torch.randint(0, 1000, (args.train_batch,))
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, (model, _) in models.items()}

    def eval_round(name: str, candidate: dict) -> tuple[float, float]:
        model, set_subnet = models[name]
        set_subnet(candidate)
        wall = cpu = 0.0
        with torch.no_grad():
            for _ in range(args.steps):
                seconds, cpu_seconds = timed(lambda: model(eval_input))
                wall, cpu = wall + seconds, cpu + cpu_seconds
        return wall, cpu

    def train_step(name: str, candidate: dict) -> None:
        model, set_subnet = models[name]
        set_subnet(candidate)
        loss = F.cross_entropy(model(train_input), labels)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    def train_round(name: str, candidate: dict) -> tuple[float, float]:
        other = next(c for c in TINY_CANDIDATES.values() if c is not candidate)
        wall = cpu = 0.0
        for _ in range(args.steps):
            train_step(name, other)
            seconds, cpu_seconds = timed(lambda: train_step(name, candidate))
            wall, cpu = wall + seconds, cpu + cpu_seconds
        return wall, cpu

    for mode in args.modes:
        batch = args.eval_batch if mode == "eval" else args.train_batch
        run_round = eval_round if mode == "eval" else train_round
        for name, (model, _) in models.items():
            model.train(mode == "train")
        for key, candidate in TINY_CANDIDATES.items():
            rates = {name: [] for name in models}
            cpu_per_image = {name: [] for name in models}
            for name in models:  # warm-up
                run_round(name, candidate)
            for _ in range(args.rounds):
                for name in models:
                    wall, cpu = run_round(name, candidate)
                    rates[name].append(batch * args.steps / wall)
                    cpu_per_image[name].append(cpu / (batch * args.steps))
            row = {"mode": mode, "candidate": key, "batch_size": batch, "keep_freed_memory": args.keep_freed_memory}
            for name in models:
                row[f"{name}_best"] = round(max(rates[name]), 2)
                row[f"{name}_median"] = round(statistics.median(rates[name]), 2)
                row[f"{name}_cpu_s_per_image"] = round(min(cpu_per_image[name]), 4)
            row["speedup_best"] = round(row["ours_best"] / row["reference_best"], 3)
            row["speedup_median"] = round(row["ours_median"] / row["reference_median"], 3)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(
                    f"{mode:<6}{key:<6} batch {batch:>3}  ours {row['ours_best']:6.2f} / {row['ours_median']:6.2f}"
                    f"  reference {row['reference_best']:6.2f} / {row['reference_median']:6.2f} images/s (best / median)"
                    f"  speed-up {row['speedup_best']:.2f}x / {row['speedup_median']:.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
