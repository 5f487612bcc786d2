"""Tests for search-space YAML and interval-candidates JSON loading."""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from lib.config import (
    ConfigError,
    PreferredSpace,
    SearchSpace,
    SupernetConfig,
    format_interval_key,
    load_interval_candidates,
    load_search_space,
    load_space,
    save_interval_candidates,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO_ROOT / "experiments" / "supernet"

TINY_SUPERNET = {"EMBED_DIM": 256, "DEPTH": 14, "NUM_HEADS": 4, "MLP_RATIO": 4.0}
TINY_FULL_SPACE = {"EMBED_DIM": [192, 216, 240], "DEPTH": [12, 13, 14], "NUM_HEADS": [3, 4], "MLP_RATIO": [3.5, 4.0]}

PREFERRED_YAML = """\
SUPERNET: {EMBED_DIM: 256, DEPTH: 4, NUM_HEADS: 4, MLP_RATIO: 4}
SEARCH_SPACE:
  EMBED_DIM: [192, 240]
  DEPTH:
    192: [3]
    240: [3, 4]
  NUM_HEADS:
    192: [[4], [3], [3, 4]]
    240: [[3, 4], [3], [4], [4]]
  MLP_RATIO:
    192: [[4], [3.5], [4]]
    240: [[4], [3.5, 4], [4], [3.5]]
RETRAIN: {DEPTH: 3, EMBED_DIM: 192, NUM_HEADS: [4, 3, 3], MLP_RATIO: [4, 3.5, 4]}
"""


def write_yaml(tmp_path, data) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def full_space(**search_space_changes):
    search_space = dict(TINY_FULL_SPACE, **search_space_changes)
    return {"SUPERNET": dict(TINY_SUPERNET), "SEARCH_SPACE": search_space}


def preferred_space():
    return yaml.safe_load(PREFERRED_YAML)


def expect_problem(path, *fragments):
    """Load ``path``, expect a ConfigError, and check that one problem contains every fragment."""
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    matching = [problem for problem in caught.value.problems if all(part in problem for part in fragments)]
    assert matching, f"no problem mentions {fragments}: {caught.value.problems}"
    return caught.value


# ---------------------------------------------------------------------------------------------
# Accepted files


@pytest.mark.parametrize(
    "name, supernet, embed_dims, depths, heads, ratios",
    [
        ("supernet-T.yaml", (256, 14, 4, 4.0), [192, 216, 240], [12, 13, 14], [3, 4], [3.5, 4.0]),
        ("supernet-S.yaml", (448, 14, 7, 4.0), [320, 384, 448], [13, 14], [5, 6, 7], [3.0, 3.5, 4.0]),
        ("supernet-B.yaml", (640, 16, 10, 4.0), [528, 576, 624], [14, 15, 16], [9, 10], [3.0, 3.5, 4.0]),
        ("supernet-demo.yaml", (128, 4, 2, 4.0), [96, 112, 128], [3, 4], [1, 2], [3.0, 3.5, 4.0]),
    ],
)
def test_experiment_configs_load(name, supernet, embed_dims, depths, heads, ratios):
    space = load_search_space(EXPERIMENTS / name)

    assert isinstance(space, SearchSpace)
    assert space.supernet == SupernetConfig(*supernet)
    assert space.embed_dim == embed_dims
    assert space.depth == depths
    assert space.num_heads == heads
    assert space.mlp_ratio == ratios
    assert space.retrain is None


def test_preferred_space_loads(tmp_path):
    space = load_space(write_yaml(tmp_path, PREFERRED_YAML))

    assert isinstance(space, PreferredSpace)
    assert space.supernet == SupernetConfig(256, 4, 4, 4.0)
    assert space.embed_dim == [192, 240]
    assert space.depth == {192: [3], 240: [3, 4]}
    assert space.num_heads[240] == [[3, 4], [3], [4], [4]]
    assert space.mlp_ratio[192] == [[4.0], [3.5], [4.0]]
    assert all(isinstance(ratio, float) for layers in space.mlp_ratio.values() for layer in layers for ratio in layer)
    assert isinstance(space.supernet.mlp_ratio, float)


def test_retrain_becomes_candidate(tmp_path):
    space = load_space(write_yaml(tmp_path, PREFERRED_YAML))

    assert space.retrain == {
        "layer_num": 3,
        "embed_dim": [192, 192, 192],
        "num_heads": [4, 3, 3],
        "mlp_ratio": [4.0, 3.5, 4.0],
    }


def test_load_search_space_rejects_preferred(tmp_path):
    path = write_yaml(tmp_path, PREFERRED_YAML)

    with pytest.raises(ConfigError, match="preferred space"):
        load_search_space(path)


# ---------------------------------------------------------------------------------------------
# Rejected files: one test per problem


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found.*absent.yaml"):
        load_space(tmp_path / "absent.yaml")


def test_malformed_yaml_names_line(tmp_path):
    path = write_yaml(tmp_path, "SUPERNET:\n  EMBED_DIM: [256,\n  DEPTH: 14\nSEARCH_SPACE: {\n")

    with pytest.raises(ConfigError) as caught:
        load_space(path)
    message = str(caught.value)
    assert "invalid YAML" in message
    assert str(path) in message
    assert "line " in message


def test_duplicate_key(tmp_path):
    text = yaml.safe_dump(full_space()) + "SUPERNET: {EMBED_DIM: 128}\n"
    path = write_yaml(tmp_path, text)

    with pytest.raises(ConfigError, match="duplicate key 'SUPERNET'"):
        load_space(path)


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_space(write_yaml(tmp_path, "- 1\n- 2\n"))


def test_unknown_top_level_key(tmp_path):
    data = full_space()
    data["SEARCHSPACE"] = {}
    expect_problem(write_yaml(tmp_path, data), "unknown key 'SEARCHSPACE'")


def test_unknown_search_space_key(tmp_path):
    data = full_space(EMBED=[192])
    expect_problem(write_yaml(tmp_path, data), "unknown key 'EMBED'", "SEARCH_SPACE")


def test_unknown_supernet_key(tmp_path):
    data = full_space()
    data["SUPERNET"]["HEADS"] = 4
    expect_problem(write_yaml(tmp_path, data), "unknown key 'HEADS'", "SUPERNET")


def test_missing_supernet_key(tmp_path):
    data = full_space()
    del data["SUPERNET"]["DEPTH"]
    expect_problem(write_yaml(tmp_path, data), "SUPERNET is missing key 'DEPTH'")


def test_missing_search_space(tmp_path):
    data = full_space()
    del data["SEARCH_SPACE"]
    expect_problem(write_yaml(tmp_path, data), "missing key 'SEARCH_SPACE'")


def test_embed_above_supernet(tmp_path):
    data = full_space(EMBED_DIM=[192, 320])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.EMBED_DIM", "320", "SUPERNET.EMBED_DIM 256")


def test_heads_above_supernet_heads(tmp_path):
    data = full_space(NUM_HEADS=[3, 5])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.NUM_HEADS", "5", "SUPERNET.NUM_HEADS 4")


def test_heads_width_above_supernet_embed(tmp_path):
    data = full_space(EMBED_DIM=[192])
    data["SUPERNET"].update(EMBED_DIM=300, NUM_HEADS=5)
    expect_problem(write_yaml(tmp_path, data), "SUPERNET.NUM_HEADS 5", "q/k/v width 320", "EMBED_DIM 300")


def test_heads_width_fits_supernet_embed(tmp_path):
    data = full_space(EMBED_DIM=[192], NUM_HEADS=[4, 5])
    data["SUPERNET"].update(EMBED_DIM=320, NUM_HEADS=5)

    assert load_space(write_yaml(tmp_path, data)).num_heads == [4, 5]


def test_preferred_heads_above_supernet(tmp_path):
    data = preferred_space()
    data["SEARCH_SPACE"]["NUM_HEADS"][192][1] = [3, 5]
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.NUM_HEADS[192][1]", "5", "SUPERNET.NUM_HEADS 4")


def test_depth_above_supernet(tmp_path):
    data = full_space(DEPTH=[12, 15])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.DEPTH", "15", "SUPERNET.DEPTH 14")


def test_ratio_above_supernet(tmp_path):
    data = full_space(MLP_RATIO=[3.5, 4.5])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.MLP_RATIO", "4.5", "SUPERNET.MLP_RATIO 4")


def test_preferred_ratio_above_supernet(tmp_path):
    data = preferred_space()
    data["SEARCH_SPACE"]["MLP_RATIO"][240][1] = [3.5, 4.5]
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.MLP_RATIO[240][1]", "4.5")


def test_preferred_depth_above_supernet(tmp_path):
    data = preferred_space()
    data["SEARCH_SPACE"]["DEPTH"][192] = [3, 5]
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.DEPTH[192]", "5", "SUPERNET.DEPTH 4")


def test_per_layer_list_too_short(tmp_path):
    data = preferred_space()
    data["SEARCH_SPACE"]["NUM_HEADS"][240] = [[3, 4], [3], [4]]
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.NUM_HEADS[240]", "3 per-layer lists", "largest DEPTH", "4")


def test_per_layer_list_too_long(tmp_path):
    data = preferred_space()
    data["SEARCH_SPACE"]["MLP_RATIO"][192].append([4])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.MLP_RATIO[192]", "4 per-layer lists")


def test_preferred_map_missing_embed(tmp_path):
    data = preferred_space()
    del data["SEARCH_SPACE"]["DEPTH"][240]
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.DEPTH", "no entry for embed dim 240")


def test_preferred_map_extra_embed(tmp_path):
    data = preferred_space()
    data["SEARCH_SPACE"]["NUM_HEADS"][216] = [[3]]
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.NUM_HEADS", "embed dim 216", "not in SEARCH_SPACE.EMBED_DIM")


def test_empty_list(tmp_path):
    data = full_space(DEPTH=[])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.DEPTH", "empty list")


def test_empty_per_layer_list(tmp_path):
    data = preferred_space()
    data["SEARCH_SPACE"]["MLP_RATIO"][192][2] = []
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.MLP_RATIO[192][2]", "empty list")


def test_non_numeric_choice(tmp_path):
    data = full_space(MLP_RATIO=[3.5, "four"])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.MLP_RATIO[1]", "'four'", "must be a number")


def test_non_integer_embed(tmp_path):
    data = full_space(EMBED_DIM=[192, 216.5])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.EMBED_DIM[1]", "216.5", "whole number")


def test_non_numeric_supernet_value(tmp_path):
    data = full_space()
    data["SUPERNET"]["DEPTH"] = "fourteen"
    expect_problem(write_yaml(tmp_path, data), "SUPERNET.DEPTH", "'fourteen'")


def test_boolean_is_not_a_number(tmp_path):
    data = full_space(NUM_HEADS=[3, True])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.NUM_HEADS[1]", "True")


def test_zero_depth(tmp_path):
    data = full_space(DEPTH=[0, 12])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.DEPTH[0]", "at least 1")


def test_non_numeric_per_layer_value(tmp_path):
    data = preferred_space()
    data["SEARCH_SPACE"]["NUM_HEADS"][240][0] = [3, "x"]
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.NUM_HEADS[240][0][1]", "'x'")


def test_list_instead_of_scalar_list(tmp_path):
    data = full_space(EMBED_DIM=192)
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.EMBED_DIM", "must be a list")


def test_duplicate_choice(tmp_path):
    data = full_space(DEPTH=[12, 12, 13])
    expect_problem(write_yaml(tmp_path, data), "SEARCH_SPACE.DEPTH", "more than once")


def test_retrain_bad_subnet(tmp_path):
    data = preferred_space()
    data["RETRAIN"]["NUM_HEADS"] = [4, 3]
    expect_problem(write_yaml(tmp_path, data), "RETRAIN", "num_heads")


def test_retrain_unknown_key(tmp_path):
    data = preferred_space()
    data["RETRAIN"]["LAYERS"] = 3
    expect_problem(write_yaml(tmp_path, data), "unknown key 'LAYERS'", "RETRAIN")


def test_every_problem_reported(tmp_path):
    data = full_space(EMBED_DIM=[512], DEPTH=[20])
    error = expect_problem(write_yaml(tmp_path, data), "EMBED_DIM")

    assert len(error.problems) == 2
    assert "DEPTH" in error.problems[1]


# ---------------------------------------------------------------------------------------------
# Interval candidates


def tiny_candidate(depth=12, embed=192, heads=4, ratio=4.0, **extra):
    return dict(layer_num=depth, embed_dim=[embed] * depth, num_heads=[heads] * depth, mlp_ratio=[ratio] * depth,
                **extra)


def test_interval_keys_are_clean_decimals(tmp_path):
    path = tmp_path / "candidates.json"
    save_interval_candidates(path, {0.1 + 0.2: [tiny_candidate()], 6: [tiny_candidate()], "11.0": [tiny_candidate()]})

    data = json.loads(path.read_text())
    assert list(data) == ["0.3", "6.0", "11.0"]
    assert "0.30000000000000004" not in path.read_text()


def test_format_interval_key_values():
    assert format_interval_key(6) == "6.0"
    assert format_interval_key("6.0") == "6.0"
    assert format_interval_key(2.5 * 3) == "7.5"
    assert format_interval_key(0.7 + 0.1) == "0.8"


@pytest.mark.parametrize("bad_key", ["six", "-1", "0", "nan"])
def test_format_interval_key_rejects(bad_key):
    with pytest.raises(ConfigError, match="interval key"):
        format_interval_key(bad_key)


def test_interval_candidates_round_trip(tmp_path):
    path = tmp_path / "candidates.json"
    mapping = {7.0: [tiny_candidate(embed=216, num_params=6.99, score=1.5)], 6.0: [tiny_candidate(), tiny_candidate(heads=3)]}
    save_interval_candidates(path, mapping)

    supernet = SupernetConfig(256, 14, 4, 4.0)
    loaded = load_interval_candidates(path, supernet)
    assert list(loaded) == ["6.0", "7.0"]
    assert loaded["6.0"] == [tiny_candidate(), tiny_candidate(heads=3)]
    assert loaded["7.0"][0]["num_params"] == 6.99
    assert loaded["7.0"][0]["score"] == 1.5
    assert not list(tmp_path.glob("*.tmp"))


def test_interval_candidate_above_supernet(tmp_path):
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps({"6.0": [tiny_candidate()], "7.0": [tiny_candidate(), tiny_candidate(embed=320)]}))

    with pytest.raises(ConfigError, match=r"interval '7.0', candidate 1: .*embed_dim=320"):
        load_interval_candidates(path, SupernetConfig(256, 14, 4, 4.0))


def test_interval_candidate_layout_checked_without_supernet(tmp_path):
    path = tmp_path / "candidates.json"
    broken = tiny_candidate()
    broken["mlp_ratio"] = broken["mlp_ratio"][:-1]
    path.write_text(json.dumps({"6.0": [broken]}))

    with pytest.raises(ConfigError, match=r"interval '6.0', candidate 0: .*mlp_ratio"):
        load_interval_candidates(path)


def test_interval_candidates_invalid_json(tmp_path):
    path = tmp_path / "candidates.json"
    path.write_text('{"6.0": [\n  {"layer_num": 12,,}\n]}')

    with pytest.raises(ConfigError, match="invalid JSON.*line 2"):
        load_interval_candidates(path)


def test_interval_candidates_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_interval_candidates(tmp_path / "absent.json")


def test_interval_candidates_bad_key(tmp_path):
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps({"tiny": [tiny_candidate()]}))

    with pytest.raises(ConfigError, match="interval key 'tiny'"):
        load_interval_candidates(path)


def test_interval_candidates_same_bound_twice(tmp_path):
    path = tmp_path / "candidates.json"
    path.write_text(textwrap.dedent("""\
        {"6": [{"layer_num": 1, "embed_dim": [64], "num_heads": [1], "mlp_ratio": [1.0]}],
         "6.0": [{"layer_num": 1, "embed_dim": [64], "num_heads": [1], "mlp_ratio": [1.0]}]}
    """))

    with pytest.raises(ConfigError, match="same bound"):
        load_interval_candidates(path)


def test_interval_candidates_empty_interval(tmp_path):
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps({"6.0": []}))

    with pytest.raises(ConfigError, match="non-empty list"):
        load_interval_candidates(path)
