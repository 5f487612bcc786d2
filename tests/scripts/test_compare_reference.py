"""Argument checks and the module swap of bench/compare_reference.py."""

import subprocess
import sys
from pathlib import Path

import model.supernet
from bench.compare_reference import load_reference_class

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(*arguments):
    return subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "compare_reference.py"), *arguments],
                          capture_output=True, text=True, timeout=120)


def test_missing_reference_checkout_named(tmp_path):
    result = run_benchmark("--reference", str(tmp_path / "PreNAS"))
    assert result.returncode != 0
    assert str(tmp_path / "PreNAS" / "model" / "supernet_transformer.py") in result.stderr
    assert "not found" in result.stderr


def test_zero_rounds_rejected(tmp_path):
    result = run_benchmark("--reference", str(tmp_path), "--rounds", "0")
    assert result.returncode == 2
    assert "--rounds: must be at least 1, got 0" in result.stderr


def test_reference_import_restores_own_model(tmp_path):
    package = tmp_path / "model"
    package.mkdir()
    (package / "supernet_transformer.py").write_text("class Vision_TransformerSuper:\n    origin = 'reference'\n")
    reference_class = load_reference_class(tmp_path)
    assert reference_class.origin == "reference"
    assert sys.modules["model.supernet"] is model.supernet
    assert "model.supernet_transformer" not in sys.modules
    assert str(tmp_path) not in sys.path
