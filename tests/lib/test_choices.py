"""Tests of the preferred-space derivation and its command line."""

import json
import subprocess
import sys

import pytest
import yaml

from lib.choices import derive_preferred_space, main, write_preferred_space
from lib.config import ConfigError, PreferredSpace, load_interval_candidates, load_space

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

# The released PreNAS-S preferred candidates: (key, depth, embed dim, num heads, mlp ratios).
SMALL_CANDIDATES = [
    ("18.0", 13, 320, "7 7 7 7 7 7 7 7 6 7 5 6 5", "4 4 3.5 4 3.5 4 4 3.5 4 4 3.5 4 4"),
    ("23.0", 13, 384, "7 7 7 7 5 7 7 5 6 5 5 6 5", "4 4 3.5 4 3.5 4 3.5 3.5 4 4 3 4 3.5"),
    ("28.0", 13, 448, "7 7 7 7 5 7 7 5 6 5 5 6 5", "4 4 3 4 3 3.5 3 3 4 3 3 4 3"),
    ("33.0", 14, 448, "7 7 7 7 7 7 7 7 5 7 5 6 5 7", "4 4 3.5 4 3.5 4 4 3.5 4 4 3.5 4 4 3.5"),
]


def write_candidates(path, rows):
    mapping = {}
    for key, depth, embed, heads, ratios in rows:
        mapping[key] = [{
            "layer_num": depth,
            "mlp_ratio": [float(value) for value in ratios.split()],
            "num_heads": [int(value) for value in heads.split()],
            "embed_dim": [embed] * depth,
            "num_params": float(key) - 0.01,
            "score": 1.0,
        }]
    path.write_text(json.dumps(mapping))
    return path


def test_derive_small_preferred_space(tmp_path):
    candidates = load_interval_candidates(write_candidates(tmp_path / "small.json", SMALL_CANDIDATES))

    config = derive_preferred_space(candidates)

    space = config["SEARCH_SPACE"]
    assert space["EMBED_DIM"] == [320, 384, 448]
    assert space["DEPTH"] == {320: [13], 384: [13], 448: [13, 14]}
    # Embed 448 joins the 28.0 and 33.0 candidates layer by layer; layer 13 exists only in 33.0.
    assert space["NUM_HEADS"][448][4] == [5, 7]
    assert space["NUM_HEADS"][448][13] == [7]
    assert space["MLP_RATIO"][448][2] == [3.0, 3.5]
    assert space["MLP_RATIO"][448][5] == [3.5, 4.0]
    assert len(space["MLP_RATIO"][448]) == 14
    assert space["NUM_HEADS"][320] == [[7]] * 8 + [[6], [7], [5], [6], [5]]
    assert config["SUPERNET"] == {"DEPTH": 14, "EMBED_DIM": 448, "MLP_RATIO": 4.0, "NUM_HEADS": 7}


def test_derived_space_loads_as_preferred_space(tmp_path):
    candidates = load_interval_candidates(write_candidates(tmp_path / "small.json", SMALL_CANDIDATES))
    write_preferred_space(tmp_path / "small.yaml", derive_preferred_space(candidates))

    space = load_space(tmp_path / "small.yaml")

    assert isinstance(space, PreferredSpace)
    assert space.depth[448] == [13, 14]
    assert space.num_heads[384][4] == [5]
    assert space.supernet.embed_dim == 448


def test_top_per_interval_keeps_leading_candidates(tmp_path):
    rows = SMALL_CANDIDATES[:1]
    path = write_candidates(tmp_path / "one.json", rows)
    data = json.loads(path.read_text())
    second = dict(data["18.0"][0], num_heads=[5] * 13)
    data["18.0"].append(second)
    path.write_text(json.dumps(data))
    candidates = load_interval_candidates(path)

    assert derive_preferred_space(candidates, top_per_interval=1)["SEARCH_SPACE"]["NUM_HEADS"][320][0] == [7]
    assert derive_preferred_space(candidates)["SEARCH_SPACE"]["NUM_HEADS"][320][0] == [5, 7]
    with pytest.raises(ConfigError, match="at least 1"):
        derive_preferred_space(candidates, top_per_interval=0)


def test_derive_rejects_embed_wider_than_heads():
    candidate = {"layer_num": 1, "embed_dim": [192], "mlp_ratio": [4.0], "num_heads": [2]}
    with pytest.raises(ConfigError, match="embed dim 192 but at most 2 heads"):
        derive_preferred_space({"1.0": [candidate]})


def test_derive_rejects_empty_mapping():
    with pytest.raises(ConfigError, match="no candidates"):
        derive_preferred_space({})


def test_cli_writes_and_refuses_overwrite(tmp_path, caplog):
    candidates = write_candidates(tmp_path / "small.json", SMALL_CANDIDATES)
    output = tmp_path / "out" / "small.yaml"

    assert main([str(candidates), str(output)]) == 0
    written = output.read_text()
    assert yaml.safe_load(written)["SUPERNET"]["NUM_HEADS"] == 7

    output.write_text("keep me\n")
    assert main([str(candidates), str(output)]) == 1
    assert output.read_text() == "keep me\n"
    assert "pass --force" in caplog.text

    assert main([str(candidates), str(output), "--force"]) == 0
    assert output.read_text() == written


def test_cli_reports_invalid_candidates(tmp_path, caplog):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"6.0": [{"layer_num": 2, "embed_dim": [192], "mlp_ratio": [4.0], "num_heads": [3]}]}))
    assert main([str(bad), str(tmp_path / "out.yaml")]) == 1
    assert "interval '6.0', candidate 0" in caplog.text
    assert not (tmp_path / "out.yaml").exists()


def test_cli_runs_as_module(tmp_path):
    candidates = write_candidates(tmp_path / "small.json", SMALL_CANDIDATES)
    output = tmp_path / "small.yaml"
    command = [sys.executable, "-m", "lib.choices", str(candidates), str(output)]

    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)

    assert first.returncode == 0, first.stderr
    assert output.exists()
    assert second.returncode == 1
    assert "already exists" in second.stderr
