"""results.json records, the text table, the Pareto front and the plot."""

import json
import math
import random

import pytest
from PIL import Image

from lib.results import (
    ResultsError,
    format_table,
    load_results,
    make_result,
    pareto_front,
    plot_pareto,
    save_results,
)

CANDIDATE = {"layer_num": 2, "embed_dim": [128, 128], "mlp_ratio": [3.0, 4.0], "num_heads": [3, 2], "num_params": 0.44}
METRICS = {"acc1": 75.5, "acc5": 92.25, "loss": 1.125, "count": 296}


def test_make_result_units_and_keys():
    result = make_result(CANDIDATE, METRICS, n_parameters=440522, flops=2.5e9, macs=12345, interval="1.0")
    assert result["config"] == {key: CANDIDATE[key] for key in ("layer_num", "embed_dim", "mlp_ratio", "num_heads")}
    assert result["flops"] == 2.5
    assert result["n_parameters"] == 440522
    assert isinstance(result["n_parameters"], int)
    assert result["macs"] == 12345
    assert result["images"] == 296
    assert result["interval"] == "1.0"


def test_results_round_trip(tmp_path):
    results = [
        make_result(CANDIDATE, METRICS, n_parameters=440522, flops=7.7e6, macs=7000000, interval="1.0"),
        make_result(CANDIDATE, {**METRICS, "acc1": 80.0}, n_parameters=500000, flops=8.1e6, macs=8000000),
    ]
    path = save_results(tmp_path / "results.json", results)
    assert load_results(path) == results


def test_results_write_nan_as_null(tmp_path):
    result = make_result(CANDIDATE, {**METRICS, "loss": math.nan}, n_parameters=1, flops=1.0, macs=1)
    path = save_results(tmp_path / "results.json", [result])
    assert json.loads(path.read_text())[0]["loss"] is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "invalid JSON"),
        ('{"acc1": 1}', "JSON list"),
        ("[3]", "record 0 must be a JSON object"),
        ('[{"config": {}, "acc1": 1, "acc5": 2, "loss": 3, "flops": 4, "macs": 5}]', "n_parameters"),
    ],
)
def test_load_results_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ResultsError, match=message):
        load_results(path)


def test_load_results_missing_file(tmp_path):
    with pytest.raises(ResultsError, match="not found"):
        load_results(tmp_path / "absent.json")


def brute_force_front(costs, accuracies):
    front = []
    for i in range(len(costs)):
        beaten = any(
            costs[j] <= costs[i] and accuracies[j] >= accuracies[i]
            and (costs[j] < costs[i] or accuracies[j] > accuracies[i])
            for j in range(len(costs))
        )
        if not beaten:
            front.append(i)
    return front


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 12)
        costs = [rng.randint(0, 5) for _ in range(n)]
        accuracies = [rng.randint(0, 5) for _ in range(n)]
        front = pareto_front(costs, accuracies)
        expected = brute_force_front(costs, accuracies)
        # Exact duplicates of a front point are all unbeaten; the front draws one of them.
        assert {(costs[i], accuracies[i]) for i in front} == {(costs[i], accuracies[i]) for i in expected}
        assert [costs[i] for i in front] == sorted(costs[i] for i in front)


def test_table_lists_every_result_and_correlation():
    results = [
        make_result(CANDIDATE, METRICS, n_parameters=440522, flops=7.7e6, macs=7000000, interval="1.0"),
        make_result(CANDIDATE, {**METRICS, "acc1": 12.5}, n_parameters=900000, flops=8.1e6, macs=8000000),
    ]
    results[0]["proxy_score"] = 2.5
    results[1]["proxy_score"] = None
    correlation = {"metric": "acc1", "evaluated": 2, "matched": 1, "kendall_tau": None, "spearman_rho": None,
                   "params_kendall_tau": None, "params_spearman_rho": None}
    lines = format_table(results, correlation).splitlines()
    assert "proxy score" in lines[0]
    assert lines[1].split() == ["1.0", "2", "128", "0.441", "0.008", "0.007", "75.50", "92.25", "1.1250", "2.5"]
    assert lines[2].split()[0] == "#1"
    assert lines[2].split()[-1] == "-"
    assert "Kendall tau -" in lines[4]
    assert "1 of 2 candidates" in lines[4]


def test_plot_writes_png(tmp_path):
    results = [
        make_result(CANDIDATE, {**METRICS, "acc1": acc1}, n_parameters=params, flops=params * 20.0, macs=1,
                    interval=key)
        for key, acc1, params in [("1.0", 60.0, 440522), ("2.0", 70.0, 900000), ("3.0", 65.0, 1200000)]
    ]
    path = plot_pareto(results, tmp_path / "plots" / "pareto.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 600
