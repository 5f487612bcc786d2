"""Kendall tau-b and Spearman rho against brute-force computations, and the proxy-scores file."""

import itertools
import json
import math
import random

import pytest

from lib.correlation import (
    ScoresError,
    average_ranks,
    join_scores,
    kendall_tau,
    load_scores,
    proxy_correlation,
    spearman_rho,
)
from model.candidate import candidate_id


def brute_force_kendall(x, y):
    """tau-b from an explicit loop over every pair."""
    concordant = discordant = tied_x_only = tied_y_only = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tied_x_only += 1
        elif dy == 0:
            tied_y_only += 1
        elif dx * dy > 0:
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + tied_y_only) * (concordant + discordant + tied_x_only))
    return None if denominator == 0 else (concordant - discordant) / denominator


def brute_force_ranks(values):
    """Rank = 1 + number of smaller values + half the number of other equal values."""
    return [1 + sum(other < value for other in values) + (sum(other == value for other in values) - 1) / 2
            for value in values]


def brute_force_spearman(x, y):
    rx, ry = brute_force_ranks(x), brute_force_ranks(y)
    n = len(x)
    mean_x, mean_y = sum(rx) / n, sum(ry) / n
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(rx, ry))
    variance_x = sum((a - mean_x) ** 2 for a in rx)
    variance_y = sum((b - mean_y) ** 2 for b in ry)
    if variance_x == 0 or variance_y == 0:
        return None
    return covariance / math.sqrt(variance_x * variance_y)


def random_pairs(rng, n, levels):
    """Random pairs; a small number of levels produces many ties."""
    return [rng.randrange(levels) for _ in range(n)], [rng.randrange(levels) for _ in range(n)]


@pytest.mark.parametrize("levels", [3, 10, 1000])
def test_kendall_matches_brute_force(levels):
    rng = random.Random(levels)
    for n in (2, 3, 7, 30):
        x, y = random_pairs(rng, n, levels)
        expected = brute_force_kendall(x, y)
        actual = kendall_tau(x, y)
        if expected is None:
            assert actual is None
        else:
            assert actual == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("levels", [3, 10, 1000])
def test_spearman_matches_brute_force(levels):
    rng = random.Random(100 + levels)
    for n in (2, 3, 7, 30):
        x, y = random_pairs(rng, n, levels)
        expected = brute_force_spearman(x, y)
        actual = spearman_rho(x, y)
        if expected is None:
            assert actual is None
        else:
            assert actual == pytest.approx(expected, abs=1e-12)


def test_spearman_without_ties_uses_rank_differences():
    rng = random.Random(5)
    x = rng.sample(range(1000), 25)
    y = rng.sample(range(1000), 25)
    rx, ry = brute_force_ranks(x), brute_force_ranks(y)
    n = len(x)
    expected = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))
    assert spearman_rho(x, y) == pytest.approx(expected, abs=1e-12)


def test_kendall_without_ties_counts_inversions():
    rng = random.Random(6)
    y = rng.sample(range(50), 12)
    x = list(range(12))
    inversions = sum(y[i] > y[j] for i, j in itertools.combinations(range(12), 2))
    assert kendall_tau(x, y) == pytest.approx(1 - 4 * inversions / (12 * 11), abs=1e-12)


def test_monotone_and_reversed_orders():
    x = [0.5, 1.5, 2.0, 7.0, 9.0]
    assert kendall_tau(x, [v ** 3 for v in x]) == pytest.approx(1.0)
    assert spearman_rho(x, [v ** 3 for v in x]) == pytest.approx(1.0)
    assert kendall_tau(x, [-v for v in x]) == pytest.approx(-1.0)
    assert spearman_rho(x, [-v for v in x]) == pytest.approx(-1.0)


def test_undefined_cases_return_none():
    assert kendall_tau([1.0], [2.0]) is None
    assert spearman_rho([1.0], [2.0]) is None
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None
    assert spearman_rho([1, 2, 3], [4, 4, 4]) is None


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 10, 30, 20, 20]).tolist() == [1.5, 4.0, 1.5, 6.0, 4.0, 4.0]


@pytest.mark.parametrize("function", [kendall_tau, spearman_rho])
def test_coefficients_reject_bad_input(function):
    with pytest.raises(ValueError, match="same length"):
        function([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN or infinite"):
        function([1, float("nan"), 3], [1, 2, 3])


def candidate(embed, heads):
    return {"layer_num": 2, "embed_dim": [embed, embed], "mlp_ratio": [4.0, 3.0], "num_heads": [heads, heads]}


def write_lines(path, records):
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")


def test_load_scores_keys_by_candidate(tmp_path, caplog):
    path = tmp_path / "scores.jsonl"
    write_lines(path, [
        {"candidate": candidate(128, 2), "num_params": 0.4, "flops": 0.01, "score": 3.0, "interval": "1.0"},
        {"candidate": candidate(192, 3), "num_params": 0.8, "flops": 0.02, "score": 5.0, "interval": None},
        {"candidate": candidate(128, 2), "num_params": 0.4, "flops": 0.01, "score": 99.0, "interval": "1.0"},
    ])
    scores = load_scores(path)
    assert set(scores) == {candidate_id(candidate(128, 2)), candidate_id(candidate(192, 3))}
    assert scores[candidate_id(candidate(128, 2))]["score"] == 3.0
    assert "more than once" in caplog.text


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"candidate": {"layer_num": 1, "embed_dim": [8], "mlp_ratio": [1.0], "num_heads": [1]}}', "missing key"),
        ('{"candidate": {"layer_num": 2, "embed_dim": [8], "mlp_ratio": [1.0], "num_heads": [1]}, "score": 1}',
         "layer_num is 2"),
        ('{"candidate": {"layer_num": 1, "embed_dim": [8], "mlp_ratio": [1.0], "num_heads": [1]}, "score": "high"}',
         "score must be a number"),
    ],
)
def test_load_scores_names_bad_line(tmp_path, line, message):
    path = tmp_path / "scores.jsonl"
    path.write_text('{"candidate": ' + json.dumps(candidate(128, 2)) + ', "score": 1.0}\n\n' + line + "\n")
    with pytest.raises(ScoresError, match=message) as raised:
        load_scores(path)
    assert "line 3" in str(raised.value)


def test_load_scores_missing_and_empty_files(tmp_path):
    with pytest.raises(ScoresError, match="not found"):
        load_scores(tmp_path / "absent.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ScoresError, match="no scored candidates"):
        load_scores(empty)


def test_join_and_correlate(tmp_path):
    path = tmp_path / "scores.jsonl"
    configs = [candidate(128, 2), candidate(160, 2), candidate(192, 3), candidate(192, 2)]
    write_lines(path, [{"candidate": config, "score": score} for config, score in zip(configs[:3], [1.0, 2.0, 3.0])])
    results = [
        {"config": config, "acc1": acc1, "n_parameters": params}
        for config, acc1, params in zip(configs, [50.0, 70.0, 60.0, 10.0], [300, 100, 200, 400])
    ]

    proxy_scores = join_scores(results, load_scores(path))
    assert proxy_scores == [1.0, 2.0, 3.0, None]

    report = proxy_correlation(results, proxy_scores)
    assert report["matched"] == 3
    assert report["evaluated"] == 4
    assert report["kendall_tau"] == pytest.approx(brute_force_kendall([1, 2, 3], [50, 70, 60]))
    assert report["spearman_rho"] == pytest.approx(brute_force_spearman([1, 2, 3], [50, 70, 60]))
    assert report["params_kendall_tau"] == pytest.approx(brute_force_kendall([300, 100, 200], [50, 70, 60]))
    assert report["params_spearman_rho"] == pytest.approx(brute_force_spearman([300, 100, 200], [50, 70, 60]))


def test_correlation_needs_two_matches(caplog):
    results = [{"config": candidate(128, 2), "acc1": 1.0, "n_parameters": 1}]
    report = proxy_correlation(results, [None])
    assert report["kendall_tau"] is None
    assert report["spearman_rho"] is None
    assert "at least 2" in caplog.text
