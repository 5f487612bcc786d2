"""03_evaluation.sh: space selection, the missing-checkpoint message and a demo run."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from lib.results import load_results
from model.subnet import load_subnet
from model.supernet import Supernet

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "03_evaluation.sh"

DEMO_CANDIDATES = {
    "0.4": [{"layer_num": 3, "embed_dim": [96] * 3, "mlp_ratio": [3.0, 3.5, 4.0], "num_heads": [1, 2, 1]}],
    "0.6": [{"layer_num": 4, "embed_dim": [128] * 4, "mlp_ratio": [4.0] * 4, "num_heads": [2] * 4}],
}


def run_script(*args: str, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **environment}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("space", ["tiny", "small", "base"])
def test_missing_checkpoint_prints_download_address(tmp_path, space):
    completed = run_script(space, CKPT=str(tmp_path / "absent.pth"))
    assert completed.returncode == 1
    assert f"checkpoint {tmp_path / 'absent.pth'} not found" in completed.stderr
    assert f"https://idstcv.oss-cn-zhangjiakou.aliyuncs.com/PreNAS/supernet-{space}.pth" in completed.stderr


def test_unknown_space_is_rejected():
    completed = run_script("huge")
    assert completed.returncode == 2
    assert "choose tiny, small, base or demo" in completed.stderr


def write_argument_printer(folder: Path) -> Path:
    """Write a stand-in for the Python interpreter that prints the arguments it is given, one per line."""
    printer = folder / "print_arguments.sh"
    printer.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    printer.chmod(0o755)
    return printer


def test_subnet_argument_replaces_candfile(tmp_path):
    checkpoint = tmp_path / "checkpoint.pth"
    checkpoint.write_bytes(b"")
    printer = write_argument_printer(tmp_path)
    subnet = json.dumps(DEMO_CANDIDATES["0.4"][0])

    with_subnet = run_script("demo", "--subnet", subnet, CKPT=str(checkpoint), PYTHON=str(printer),
                             CANDFILE=str(tmp_path / "absent.json"))
    with_candfile = run_script("demo", CKPT=str(checkpoint), PYTHON=str(printer), CANDFILE=str(checkpoint))

    assert with_subnet.returncode == 0, with_subnet.stderr
    arguments = with_subnet.stdout.splitlines()
    assert "--candfile" not in arguments
    assert arguments[arguments.index("--subnet") + 1] == subnet
    assert with_candfile.returncode == 0, with_candfile.stderr
    arguments = with_candfile.stdout.splitlines()
    assert arguments[arguments.index("--candfile") + 1] == str(checkpoint)


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_header(flag):
    completed = run_script(flag)
    assert completed.returncode == 0
    assert "Usage: ./03_evaluation.sh [tiny|small|base|demo]" in completed.stdout
    assert "CKPT" in completed.stdout


@pytest.mark.slow
def test_demo_run_with_two_processes(tmp_path):
    torch.manual_seed(0)
    supernet = Supernet(img_size=32, patch_size=8, num_classes=10, embed_dim=128, depth=4, num_heads=2,
                        mlp_ratio=4.0, gp=True, relative_position=True, change_qkv=True)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": supernet.state_dict(), "epoch": 0}, checkpoint)
    candfile = tmp_path / "interval_cands.json"
    candfile.write_text(json.dumps(DEMO_CANDIDATES))
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(
        json.dumps({"candidate": candidates[0], "score": float(index)}) + "\n"
        for index, candidates in enumerate(DEMO_CANDIDATES.values())
    ))
    output_dir = tmp_path / "eval"

    completed = run_script(
        "demo", CKPT=str(checkpoint), CANDFILE=str(candfile), SCORES=str(scores), OUTPUT_DIR=str(output_dir),
        DATA_PATH=str(tmp_path / "digits"), NPROC="2",
    )
    assert completed.returncode == 0, completed.stderr[-4000:]

    results = load_results(output_dir / "results.json")
    assert [result["interval"] for result in results] == ["0.4", "0.6"]
    assert all(result["images"] == 296 for result in results)
    assert (output_dir / "pareto.png").is_file()
    correlation = json.loads((output_dir / "proxy_correlation.json").read_text())
    assert correlation["matched"] == 2
    subnet = load_subnet(output_dir / "subnets" / "01_interval-0.6")
    assert subnet.config["candidate"]["embed_dim"] == [128] * 4
    assert "top-1 (%)" in completed.stdout
