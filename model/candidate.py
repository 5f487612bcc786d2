"""Candidate dicts: validation against a supernet and canonical forms.

A candidate names one subnet of a supernet::

    {"layer_num": d, "embed_dim": [e] * d, "mlp_ratio": [r_1, ..., r_d], "num_heads": [h_1, ..., h_d]}

and may carry extra keys such as ``num_params`` or ``score``, which are kept as they are.
This module needs no torch, so configuration code can validate candidate files cheaply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

ARCHITECTURE_KEYS = ("layer_num", "embed_dim", "mlp_ratio", "num_heads")

# With change_qkv every head is 64 wide, whatever the embed dim of the layer.
HEAD_DIM = 64


class CandidateError(ValueError):
    """A candidate that does not describe a subnet of the given supernet."""


def _as_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise CandidateError(f"candidate field {field!r} must be a whole number, got {value!r}")
    return int(value)


def _as_ratio(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CandidateError(f"candidate field {field!r} must be a positive number, got {value!r}")
    return float(value)


def _as_list(value: Any, field: str, length: int) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise CandidateError(f"candidate field {field!r} must be a list with one value per layer, got {value!r}")
    if len(value) != length:
        raise CandidateError(
            f"candidate field {field!r} has {len(value)} values but layer_num is {length}; "
            f"give exactly one value per layer"
        )
    return list(value)


def check_candidate(
    candidate: Mapping[str, Any],
    *,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    change_qkv: bool = True,
) -> dict[str, Any]:
    """Validate ``candidate`` against the supernet's maxima and return a normalised copy.

    Args:
        candidate: the candidate dict.
        embed_dim: supernet embed dim.
        depth: supernet depth (number of blocks).
        num_heads: supernet num heads.
        mlp_ratio: supernet mlp ratio.
        change_qkv: whether q/k/v width is 64 per head (then ``64 * num_heads`` must fit the supernet
            embed dim) or equal to the embed dim (then the embed dim must divide by the num heads).

    Returns:
        A new dict with ints, floats and lists, and every extra key of ``candidate`` unchanged.

    Raises:
        CandidateError: naming the field, the value and the limit.
    """
    if not isinstance(candidate, Mapping):
        raise CandidateError(f"a candidate must be a JSON object with keys {list(ARCHITECTURE_KEYS)}, got {candidate!r}")
    missing = [key for key in ARCHITECTURE_KEYS if key not in candidate]
    if missing:
        raise CandidateError(f"candidate is missing key(s) {missing}; a candidate needs {list(ARCHITECTURE_KEYS)}")

    layer_num = _as_int(candidate["layer_num"], "layer_num")
    if not 1 <= layer_num <= depth:
        raise CandidateError(f"candidate layer_num={layer_num} is outside the supernet's depth range 1..{depth}")

    embed_dims = [_as_int(v, "embed_dim") for v in _as_list(candidate["embed_dim"], "embed_dim", layer_num)]
    mlp_ratios = [_as_ratio(v, "mlp_ratio") for v in _as_list(candidate["mlp_ratio"], "mlp_ratio", layer_num)]
    heads = [_as_int(v, "num_heads") for v in _as_list(candidate["num_heads"], "num_heads", layer_num)]

    if len(set(embed_dims)) != 1:
        raise CandidateError(f"candidate embed_dim must repeat one value for every layer, got {embed_dims}")
    embed = embed_dims[0]
    if not 1 <= embed <= embed_dim:
        raise CandidateError(f"candidate embed_dim={embed} is outside the supernet's range 1..{embed_dim}")

    for layer, (ratio, head_count) in enumerate(zip(mlp_ratios, heads)):
        if ratio > mlp_ratio:
            raise CandidateError(
                f"candidate mlp_ratio={ratio:g} at layer {layer} exceeds the supernet's mlp ratio {mlp_ratio:g}"
            )
        if int(embed * ratio) < 1:
            raise CandidateError(f"candidate mlp_ratio={ratio:g} at layer {layer} gives an empty hidden layer")
        if not 1 <= head_count <= num_heads:
            raise CandidateError(
                f"candidate num_heads={head_count} at layer {layer} is outside the supernet's range 1..{num_heads}"
            )
        if change_qkv and HEAD_DIM * head_count > embed_dim:
            raise CandidateError(
                f"candidate num_heads={head_count} at layer {layer} needs q/k/v width {HEAD_DIM * head_count}, "
                f"more than the supernet's embed dim {embed_dim}"
            )
        if not change_qkv and embed % head_count:
            raise CandidateError(
                f"candidate embed_dim={embed} does not divide by num_heads={head_count} at layer {layer}; "
                f"without change_qkv the head dim is embed_dim / num_heads"
            )

    normalised = dict(candidate)
    normalised.update(layer_num=layer_num, embed_dim=embed_dims, mlp_ratio=mlp_ratios, num_heads=heads)
    return normalised


def largest_candidate(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float) -> dict[str, Any]:
    """Return the candidate that uses every weight of the supernet."""
    return {
        "layer_num": depth,
        "embed_dim": [embed_dim] * depth,
        "mlp_ratio": [float(mlp_ratio)] * depth,
        "num_heads": [num_heads] * depth,
    }


def candidate_id(candidate: Mapping[str, Any]) -> str:
    """Return a canonical JSON string of the architecture keys, equal for equal subnets."""
    architecture = {
        "layer_num": int(candidate["layer_num"]),
        "embed_dim": [int(v) for v in candidate["embed_dim"]],
        "mlp_ratio": [float(v) for v in candidate["mlp_ratio"]],
        "num_heads": [int(v) for v in candidate["num_heads"]],
    }
    return json.dumps(architecture, sort_keys=True, separators=(",", ":"))
