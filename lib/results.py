"""Evaluation results: ``results.json``, the printed table and the Pareto plot.

``results.json`` is a JSON list with one object per evaluated candidate, in evaluation order::

    {"interval": "6.0", "config": {candidate}, "acc1": 77.1, "acc5": 93.4, "loss": 0.98,
     "n_parameters": 5994760, "flops": 1.384, "macs": 1365000000, "images": 50000,
     "proxy_score": 1234.5}

``acc1`` and ``acc5`` are percentages, ``loss`` the mean cross-entropy per image,
``n_parameters`` a count, ``flops`` the PreNAS complexity count in G (1e9) and ``macs`` the exact
multiply-accumulate count per image. ``interval`` is None for candidates that do not come from an
interval-candidates file, and ``proxy_score`` is present only when proxy scores were joined.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from lib.fileio import write_text_atomic
from model.candidate import ARCHITECTURE_KEYS

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("config", "acc1", "acc5", "loss", "n_parameters", "flops", "macs")


class ResultsError(ValueError):
    """An unreadable or invalid ``results.json`` file."""


def make_result(
    candidate: Mapping[str, Any],
    metrics: Mapping[str, float],
    *,
    n_parameters: int,
    flops: float,
    macs: int,
    interval: str | None = None,
) -> dict[str, Any]:
    """Build one ``results.json`` record.

    Args:
        candidate: the evaluated candidate; only its architecture keys are kept.
        metrics: ``acc1``, ``acc5``, ``loss`` and ``count`` as returned by ``lib.engine.evaluate``.
        n_parameters: parameter count of the subnet.
        flops: complexity count in raw units; stored in G (divided by 1e9).
        macs: exact multiply-accumulates per image.
        interval: interval key of the candidate, or None.
    """
    return {
        "interval": interval,
        "config": {key: candidate[key] for key in ARCHITECTURE_KEYS},
        "acc1": float(metrics["acc1"]),
        "acc5": float(metrics["acc5"]),
        "loss": float(metrics["loss"]),
        "n_parameters": int(n_parameters),
        "flops": float(flops) / 1e9,
        "macs": int(macs),
        "images": int(metrics["count"]),
    }


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities, which JSON cannot represent, by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(path: Union[str, os.PathLike], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (a temporary file, then a rename), with NaN as null."""
    return write_text_atomic(path, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def save_results(path: Union[str, os.PathLike], results: Sequence[Mapping[str, Any]]) -> Path:
    """Write the records as ``results.json``."""
    return write_json(path, [dict(result) for result in results])


def load_results(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """Read a ``results.json`` file, checking that every record has the required keys.

    Raises:
        ResultsError: the file is missing, is not JSON, or a record lacks a key of
            ``REQUIRED_KEYS``; the message names the record index.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"results file not found: {path}; run evaluate.py to write one") from None
    except json.JSONDecodeError as error:
        raise ResultsError(f"invalid JSON in {path} at line {error.lineno}: {error.msg}") from error
    if not isinstance(data, list):
        raise ResultsError(f"{path} must contain a JSON list of result records, got {type(data).__name__}")

    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise ResultsError(f"{path}: record {index} must be a JSON object, got {type(record).__name__}")
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise ResultsError(f"{path}: record {index} is missing key(s) {missing}")
    return data


def result_label(result: Mapping[str, Any], index: int) -> str:
    """Return the interval key of a record, or ``#index`` when it has none."""
    interval = result.get("interval")
    return str(interval) if interval is not None else f"#{index}"


def _format_optional(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Sequence[Mapping[str, Any]], correlation: Mapping[str, Any] | None = None) -> str:
    """Format the records as a text table, with the rank correlations below it when given."""
    show_scores = any("proxy_score" in result for result in results)
    header = ["interval", "depth", "embed", "params (M)", "FLOPs (G)", "MACs (G)", "top-1 (%)", "top-5 (%)", "loss"]
    if show_scores:
        header.append("proxy score")

    rows = []
    for index, result in enumerate(results):
        config = result["config"]
        row = [
            result_label(result, index),
            str(config["layer_num"]),
            str(config["embed_dim"][0]),
            f"{result['n_parameters'] / 1e6:.3f}",
            f"{result['flops']:.3f}",
            f"{result['macs'] / 1e9:.3f}",
            f"{result['acc1']:.2f}",
            f"{result['acc5']:.2f}",
            f"{result['loss']:.4f}",
        ]
        if show_scores:
            row.append(_format_optional(result.get("proxy_score"), ".6g"))
        rows.append(row)

    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
    if correlation is not None:
        lines.append("")
        lines.append(format_correlation(correlation))
    return "\n".join(lines)


def format_correlation(correlation: Mapping[str, Any]) -> str:
    """Format a ``lib.correlation.proxy_correlation`` report as two lines."""
    metric = correlation["metric"]
    matched = f"{correlation['matched']} of {correlation['evaluated']} candidates"
    proxy = (
        f"proxy score vs {metric} ({matched}): Kendall tau {_format_optional(correlation['kendall_tau'], '.4f')}, "
        f"Spearman rho {_format_optional(correlation['spearman_rho'], '.4f')}"
    )
    params = (
        f"params vs {metric} (same candidates): Kendall tau {_format_optional(correlation['params_kendall_tau'], '.4f')}, "
        f"Spearman rho {_format_optional(correlation['params_spearman_rho'], '.4f')}"
    )
    return proxy + "\n" + params


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Return the indices of the points that no other point beats, in order of increasing cost.

    A point is beaten when another one costs no more and is at least as accurate, and is strictly
    better in one of the two.
    """
    order = sorted(range(len(costs)), key=lambda index: (costs[index], -accuracies[index]))
    front = []
    best = -math.inf
    for index in order:
        if accuracies[index] > best:
            front.append(index)
            best = accuracies[index]
    return front


def plot_pareto(results: Sequence[Mapping[str, Any]], path: Union[str, os.PathLike]) -> Path:
    """Plot top-1 accuracy against params (M) and against FLOPs (G), each point labelled, to a PNG.

    The Pareto front of each panel is drawn as a line. Uses matplotlib's Agg canvas directly, so
    no display and no global backend setting is needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    accuracies = [float(result["acc1"]) for result in results]
    labels = [result_label(result, index) for index, result in enumerate(results)]
    panels = [
        ("params (M)", [result["n_parameters"] / 1e6 for result in results]),
        ("FLOPs (G)", [float(result["flops"]) for result in results]),
    ]

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (name, costs) in zip(figure.subplots(1, 2), panels):
        axes.scatter(costs, accuracies, color="tab:blue", zorder=3)
        front = pareto_front(costs, accuracies)
        axes.plot([costs[i] for i in front], [accuracies[i] for i in front], color="tab:orange",
                  label="Pareto front", zorder=2)
        for cost, accuracy, label in zip(costs, accuracies, labels):
            axes.annotate(label, (cost, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.set_xlabel(name)
        axes.set_ylabel("top-1 accuracy (%)")
        axes.set_title(f"top-1 vs {name}")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right")
    figure.savefig(path, dpi=120)
    return path
