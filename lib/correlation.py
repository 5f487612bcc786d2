"""Rank correlation between proxy scores and measured accuracy.

The zero-shot search writes one JSON line per scored candidate (its ``--scores-output``).
:func:`load_scores` reads that file and :func:`join_scores` attaches each evaluated candidate's
proxy score. :func:`proxy_correlation` reports Kendall's tau-b and Spearman's rho between the proxy
scores and top-1 accuracy. It reports the same coefficients for the parameter count, a baseline
that a useful proxy has to beat.

Both coefficients follow the usual definitions with ties (tau-b, and Spearman's rho as the
Pearson correlation of average ranks), which are also what ``scipy.stats.kendalltau`` and
``scipy.stats.spearmanr`` compute by default. This module needs no torch and no scipy.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from model.candidate import CandidateError, candidate_id, check_candidate

logger = logging.getLogger(__name__)

SCORE_KEYS = ("candidate", "score")


class ScoresError(ValueError):
    """An unreadable or invalid proxy-scores JSONL file."""


def _as_finite_vector(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values; drop those pairs first")
    return array


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x_array = _as_finite_vector(x, "x")
    y_array = _as_finite_vector(y, "y")
    if x_array.shape != y_array.shape:
        raise ValueError(f"x and y must have the same length, got {x_array.size} and {y_array.size}")
    return x_array, y_array


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Return Kendall's tau-b of the pairs ``(x[i], y[i])``, or None when it is undefined.

    tau-b = (concordant - discordant) / sqrt((pairs - ties in x) * (pairs - ties in y)). It is
    undefined for fewer than two pairs or when x or y is constant. The pair matrix takes O(n^2)
    memory, which suits the tens to hundreds of evaluated candidates it is meant for.

    Raises:
        ValueError: the lengths differ or a value is not finite.
    """
    x_array, y_array = _paired(x, y)
    upper = np.triu_indices(x_array.size, k=1)
    x_signs = np.sign(x_array[:, None] - x_array[None, :])[upper]
    y_signs = np.sign(y_array[:, None] - y_array[None, :])[upper]

    untied_x = np.count_nonzero(x_signs)
    untied_y = np.count_nonzero(y_signs)
    if untied_x == 0 or untied_y == 0:
        return None
    return float(np.sum(x_signs * y_signs) / math.sqrt(untied_x * untied_y))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Return 1-based ranks of ``values``. Tied values share the mean of the ranks they span."""
    array = np.asarray(values, dtype=np.float64)
    order = np.argsort(array, kind="stable")
    sorted_values = array[order]
    group_starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_values) != 0) + 1))
    group_ends = np.concatenate((group_starts[1:], [array.size]))

    ranks = np.empty(array.size, dtype=np.float64)
    for start, end in zip(group_starts, group_ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Return Spearman's rho of the pairs, the Pearson correlation of their average ranks.

    Returns None when it is undefined: fewer than two pairs, or x or y constant.

    Raises:
        ValueError: the lengths differ or a value is not finite.
    """
    x_array, y_array = _paired(x, y)
    x_ranks = average_ranks(x_array)
    y_ranks = average_ranks(y_array)
    x_centred = x_ranks - x_ranks.mean()
    y_centred = y_ranks - y_ranks.mean()

    denominator = math.sqrt(float(np.sum(x_centred**2)) * float(np.sum(y_centred**2)))
    if denominator == 0.0:
        return None
    return float(np.sum(x_centred * y_centred) / denominator)


def load_scores(path: Union[str, os.PathLike]) -> dict[str, dict[str, Any]]:
    """Read a proxy-scores JSONL file into a map from :func:`candidate_id` to its record.

    Each non-blank line is an object with at least ``candidate`` (a candidate dict) and ``score``
    (a number); ``num_params``, ``flops`` and ``interval`` are kept when present. A candidate
    listed twice keeps its first record, with a warning.

    Raises:
        ScoresError: the file is missing or empty, or a line is invalid; the message names the
            line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ScoresError(
            f"proxy-scores file not found: {path}; write one with the search's --scores-output"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ScoresError(f"cannot read proxy-scores file {path}: {error}") from error

    records: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_score_line(line, f"{path}, line {number}")
        key = candidate_id(record["candidate"])
        if key in records:
            duplicates += 1
            continue
        records[key] = record

    if not records:
        raise ScoresError(f"proxy-scores file {path} contains no scored candidates")
    if duplicates:
        logger.warning("%d candidate(s) appear more than once in %s; kept the first score of each", duplicates, path)
    return records


def _parse_score_line(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ScoresError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(record, dict):
        raise ScoresError(f"{where}: expected a JSON object with keys {list(SCORE_KEYS)}, got {type(record).__name__}")
    missing = [key for key in SCORE_KEYS if key not in record]
    if missing:
        raise ScoresError(f"{where}: missing key(s) {missing}; each line needs {list(SCORE_KEYS)}")

    score = record["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise ScoresError(f"{where}: score must be a number, got {score!r}")
    try:
        # Only the layout is checked here, because evaluate.py checks evaluated candidates against the supernet.
        candidate = check_candidate(
            record["candidate"], embed_dim=2**31, depth=2**31, num_heads=2**31, mlp_ratio=math.inf
        )
    except CandidateError as error:
        raise ScoresError(f"{where}: {error}") from error
    return {**record, "candidate": candidate, "score": float(score)}


def join_scores(
    results: Sequence[Mapping[str, Any]], scores: Mapping[str, Mapping[str, Any]]
) -> list[float | None]:
    """Return the proxy score of each result's ``config``, or None for a candidate without one."""
    return [
        float(scores[key]["score"]) if (key := candidate_id(result["config"])) in scores else None
        for result in results
    ]


def proxy_correlation(
    results: Sequence[Mapping[str, Any]], proxy_scores: Sequence[float | None], metric: str = "acc1"
) -> dict[str, Any]:
    """Correlate proxy scores, and parameter counts as a baseline, with a measured metric.

    Candidates without a finite proxy score are left out of both correlations, so the two are
    computed over the same candidates.

    Args:
        results: evaluation records with ``metric`` and ``n_parameters``.
        proxy_scores: one proxy score or None per record.
        metric: the record key to rank by, ``acc1`` by default.

    Returns:
        ``metric``, ``evaluated``, ``matched``, ``kendall_tau``, ``spearman_rho`` and
        ``params_kendall_tau``, ``params_spearman_rho``; a coefficient is None when it is
        undefined (fewer than two matched candidates, or constant values).
    """
    if len(results) != len(proxy_scores):
        raise ValueError(f"got {len(results)} results but {len(proxy_scores)} proxy scores")

    matched = [
        (score, float(result[metric]), float(result["n_parameters"]))
        for result, score in zip(results, proxy_scores)
        if score is not None and math.isfinite(score)
    ]
    report: dict[str, Any] = {"metric": metric, "evaluated": len(results), "matched": len(matched)}
    if len(matched) < 2:
        logger.warning(
            "only %d of %d evaluated candidate(s) have a finite proxy score; a rank correlation needs at least 2",
            len(matched), len(results),
        )
        report.update(kendall_tau=None, spearman_rho=None, params_kendall_tau=None, params_spearman_rho=None)
        return report

    scores, measured, params = (list(column) for column in zip(*matched))
    report.update(
        kendall_tau=kendall_tau(scores, measured),
        spearman_rho=spearman_rho(scores, measured),
        params_kendall_tau=kendall_tau(params, measured),
        params_spearman_rho=spearman_rho(params, measured),
    )
    return report
