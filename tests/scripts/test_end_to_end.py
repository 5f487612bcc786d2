"""End to end: demo.sh runs the search, the training and the evaluation on the digits dataset.

A shortened demo (one gradient batch, 16 training epochs) runs through the three stage scripts
into a temporary folder, with the digits dataset built into a temporary cache. The tests check the
files of every stage against each other and against a second computation. The best proxy score per
interval is recomputed from the scores file, and the accuracy of each exported subnet is measured
here on the digits validation images.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lib.checkpoint import extract_state_dict, load_checkpoint_file
from lib.config import PreferredSpace, load_interval_candidates, load_space
from lib.results import load_results
from model.candidate import candidate_id
from model.subnet import load_subnet

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_SPACE = REPO_ROOT / "experiments" / "supernet" / "supernet-demo.yaml"
INTERVAL_WIDTH = 0.1
TRAIN_EPOCHS = 16
NUM_CLASSES = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Variables of demo.sh and the stage scripts that would redirect the run if set in the caller's shell.
SCRIPT_VARIABLES = ("DATA_PATH", "NPROC", "DEVICE", "CKPT", "CFG", "CANDFILE", "SCORES", "NNODES", "NODE_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "DRY_RUN")


def demo_environment(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SCRIPT_VARIABLES}
    # 02_one_shot_training.sh starts `python` from PATH, so the interpreter running the tests comes first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env["PRENAS_CACHE"] = str(tmp_path / "cache")
    env["OUTPUT_DIR"] = str(tmp_path / "demo")
    env["SEARCH_ARGS"] = "--grad-batches 1"
    env["TRAIN_ARGS"] = f"--epochs {TRAIN_EPOCHS} --warmup-epochs 1"
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("end_to_end")
    env = demo_environment(tmp_path)
    completed = subprocess.run(
        ["bash", str(REPO_ROOT / "demo.sh")], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=900, stdin=subprocess.DEVNULL,
    )
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"demo.sh failed with status {completed.returncode}:\n{log[-6000:]}"
    return {"output": Path(env["OUTPUT_DIR"]), "cache": Path(env["PRENAS_CACHE"]), "stdout": completed.stdout,
            "log": log}


def read_scores(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def digits_validation_batch(digits_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the validation images with the 32x32 evaluation transform: ToTensor, then Normalize."""
    images, labels = [], []
    for class_index, class_folder in enumerate(sorted((digits_root / "val").iterdir())):
        for image_path in sorted(class_folder.glob("*.png")):
            pixels = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255.0
            images.append(torch.from_numpy(pixels).permute(2, 0, 1))
            labels.append(class_index)
    batch = torch.stack(images)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std, torch.tensor(labels)


@pytest.mark.slow
def test_demo_digits_built_in_cache(demo_run):
    digits_root = demo_run["cache"] / "digits"
    assert (digits_root / "digits.json").is_file()
    assert len(list((digits_root / "val").glob("*/*.png"))) == 296
    assert len(list((digits_root / "train").glob("*/*.png"))) == 1501


@pytest.mark.slow
def test_demo_search_outputs_agree(demo_run):
    output = demo_run["output"]
    space = load_space(DEMO_SPACE)
    intervals = load_interval_candidates(output / "interval_cands.json", space.supernet)
    scores = read_scores(output / "scores.jsonl")
    assert len(intervals) >= 3
    assert len(scores) > len(intervals)

    for key, candidates in intervals.items():
        assert len(candidates) == 1, key
        upper = float(key)
        assert upper - INTERVAL_WIDTH - 1e-9 < candidates[0]["num_params"] <= upper + 1e-9, key

        # The preferred candidate of an interval is the best-scored line of the scores file in it.
        in_interval = [line for line in scores if line["interval"] == key]
        best = max(in_interval, key=lambda line: line["score"])
        assert candidate_id(best["candidate"]) == candidate_id(candidates[0]), key

    preferred = load_space(output / "preferred_space.yaml")
    assert isinstance(preferred, PreferredSpace)
    chosen = [candidates[0] for candidates in intervals.values()]
    assert sorted(preferred.embed_dim) == sorted({candidate["embed_dim"][0] for candidate in chosen})
    for candidate in chosen:
        embed = candidate["embed_dim"][0]
        assert candidate["layer_num"] in preferred.depth[embed]
        for layer in range(candidate["layer_num"]):
            assert candidate["num_heads"][layer] in preferred.num_heads[embed][layer]
            assert candidate["mlp_ratio"][layer] in preferred.mlp_ratio[embed][layer]


@pytest.mark.slow
def test_demo_training_outputs(demo_run):
    train_dir = demo_run["output"] / "train"
    checkpoint = load_checkpoint_file(train_dir / "checkpoint.pth")
    assert checkpoint["epoch"] == TRAIN_EPOCHS - 1
    state = extract_state_dict(checkpoint)
    supernet = load_space(DEMO_SPACE).supernet
    assert tuple(state["head.weight"].shape) == (NUM_CLASSES, supernet.embed_dim)
    assert len({key.split(".")[1] for key in state if key.startswith("blocks.")}) == supernet.depth

    records = [json.loads(line) for line in (train_dir / "log.txt").read_text().splitlines() if line.strip()]
    assert [record["epoch"] for record in records] == list(range(TRAIN_EPOCHS))
    assert any("acc1" in key for key in records[-1])

    config = yaml.safe_load((train_dir / "config.yaml").read_text())
    assert config["epochs"] == TRAIN_EPOCHS


@pytest.mark.slow
def test_demo_evaluation_outputs(demo_run):
    output = demo_run["output"]
    eval_dir = output / "eval"
    intervals = load_interval_candidates(output / "interval_cands.json")
    results = load_results(eval_dir / "results.json")

    assert [result["interval"] for result in results] == list(intervals)
    for result, candidates in zip(results, intervals.values()):
        assert candidate_id(result["config"]) == candidate_id(candidates[0])
        assert abs(result["n_parameters"] / 1e6 - candidates[0]["num_params"]) < 1e-6
        assert result["images"] == 296

    # Ten classes: chance is 10 %, and 16 epochs of the demo recipe reach far more.
    assert max(result["acc1"] for result in results) > 50.0
    assert min(result["acc5"] for result in results) > 50.0

    assert (eval_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    correlation = json.loads((eval_dir / "proxy_correlation.json").read_text())
    assert correlation["matched"] == len(results)


@pytest.mark.slow
def test_demo_exported_subnets_match_results(demo_run):
    eval_dir = demo_run["output"] / "eval"
    results = load_results(eval_dir / "results.json")
    folders = sorted(path for path in (eval_dir / "subnets").iterdir() if path.is_dir())
    assert [folder.name for folder in folders] == [
        f"{index:02d}_interval-{result['interval']}" for index, result in enumerate(results)
    ]

    images, labels = digits_validation_batch(demo_run["cache"] / "digits")
    for folder, result in zip(folders, results):
        subnet = load_subnet(folder).eval()
        with torch.no_grad():
            correct = (subnet(images).argmax(dim=1) == labels).sum().item()

        # The exported subnet equals the supernet to float tolerance, so a near-tie may flip one image.
        assert abs(correct - result["acc1"] * len(labels) / 100.0) <= 1.0, folder.name


@pytest.mark.slow
def test_demo_prints_summary(demo_run):
    stdout = demo_run["stdout"]
    eval_dir = demo_run["output"] / "eval"
    assert "top-1 (%)" in stdout
    assert f"Pareto plot:       {eval_dir / 'pareto.png'}" in stdout
    assert f"exported subnets:  {eval_dir / 'subnets'}" in stdout
    assert stdout.rstrip().splitlines()[-1].endswith(f"all outputs are in {demo_run['output']}")

    # Each stage ends with the line that names its outputs.
    log = demo_run["log"]
    assert "search finished" in log
    assert f"interval candidates to {demo_run['output'] / 'interval_cands.json'}" in log
    assert f"checkpoints in {demo_run['output'] / 'train'}" in log
    assert f"wrote {eval_dir / 'results.json'}" in log


def test_demo_argument_rejected_before_deleting(tmp_path):
    env = demo_environment(tmp_path)
    earlier = Path(env["OUTPUT_DIR"]) / "train" / "checkpoint.pth"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run")

    rejected = subprocess.run(["bash", str(REPO_ROOT / "demo.sh"), "--epochs", "2"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    help_text = subprocess.run(["bash", str(REPO_ROOT / "demo.sh"), "--help"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=60)

    assert rejected.returncode == 2
    assert "demo.sh takes no arguments, got: --epochs 2" in rejected.stderr
    assert help_text.returncode == 0
    assert "Usage: bash demo.sh" in help_text.stdout
    assert earlier.read_bytes() == b"an earlier run"
