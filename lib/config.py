"""Search-space YAML files and interval-candidates JSON files: loading, validation, saving.

Two YAML layouts share the upper-case keys of the PreNAS and AutoFormer configs::

    SUPERNET:       {EMBED_DIM: 256, DEPTH: 14, NUM_HEADS: 4, MLP_RATIO: 4.0}
    SEARCH_SPACE:   # full search space: plain lists
      {EMBED_DIM: [192, 216, 240], DEPTH: [12, 13, 14], NUM_HEADS: [3, 4], MLP_RATIO: [3.5, 4.0]}
    RETRAIN:        # optional, one fixed subnet
      {DEPTH: 12, EMBED_DIM: 192, NUM_HEADS: [3, ...], MLP_RATIO: [4.0, ...]}

A preferred space is derived from an interval-candidates file. It keeps ``EMBED_DIM`` a list and
turns the other keys into maps keyed by embed dim, for example ``DEPTH: {192: [12], 240: [12, 14]}``.
``NUM_HEADS`` and ``MLP_RATIO`` map each embed dim to per-layer lists of allowed values, such as
``NUM_HEADS: {192: [[4], [4], [3, 4], ...]}``, with one entry per layer of the largest depth listed
for that embed dim.

Heads are 64 wide (the ``change_qkv`` layout that PreNAS always uses), so ``h`` heads need a
q/k/v width of ``64 * h``, which must fit the supernet's embed dim.

This module needs no torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from lib.fileio import write_text_atomic
from model.candidate import CandidateError, check_candidate

logger = logging.getLogger(__name__)

HEAD_DIM = 64
SPACE_KEYS = ("EMBED_DIM", "DEPTH", "NUM_HEADS", "MLP_RATIO")
TOP_LEVEL_KEYS = ("SUPERNET", "SEARCH_SPACE", "RETRAIN")
# Interval bounds are in millions of parameters; six decimals resolve a single parameter.
INTERVAL_KEY_DECIMALS = 6


class ConfigError(ValueError):
    """An invalid or unreadable search-space YAML or interval-candidates JSON file.

    ``problems`` lists every problem found, one message each.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


@dataclass(frozen=True)
class SupernetConfig:
    """Largest sizes of the supernet; every subnet uses leading slices of these.

    Args:
        embed_dim: supernet embed dim.
        depth: number of blocks.
        num_heads: maximum num heads of a block.
        mlp_ratio: maximum mlp ratio of a block.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float

    def check_candidate(self, candidate: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a candidate against these maxima and return its normalised copy."""
        return check_candidate(
            candidate,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
        )


@dataclass(frozen=True)
class SearchSpace:
    """Full search space: every layer of a subnet picks freely from the same lists.

    Args:
        supernet: the supernet the space lives in.
        embed_dim: embed dim choices (one per subnet).
        depth: depth choices.
        num_heads: num heads choices (per layer).
        mlp_ratio: mlp ratio choices (per layer).
        retrain: the ``RETRAIN`` subnet as a candidate dict, or None.
    """

    supernet: SupernetConfig
    embed_dim: list[int]
    depth: list[int]
    num_heads: list[int]
    mlp_ratio: list[float]
    retrain: dict | None = None


@dataclass(frozen=True)
class PreferredSpace:
    """Preferred space: choices per embed dim, and per layer for num heads and mlp ratio.

    Args:
        supernet: the supernet the space lives in.
        embed_dim: embed dim choices.
        depth: embed dim -> depth choices.
        num_heads: embed dim -> one list of allowed num heads per layer, as many layers as the
            largest depth for that embed dim.
        mlp_ratio: embed dim -> one list of allowed mlp ratios per layer, as for ``num_heads``.
        retrain: the ``RETRAIN`` subnet as a candidate dict, or None.
    """

    supernet: SupernetConfig
    embed_dim: list[int]
    depth: dict[int, list[int]]
    num_heads: dict[int, list[list[int]]]
    mlp_ratio: dict[int, list[list[float]]]
    retrain: dict | None = None


# ---------------------------------------------------------------------------------------------
# YAML reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML loader that rejects a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable key: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file not found: {path}; pass an existing search-space YAML "
            f"such as experiments/supernet/supernet-T.yaml"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from error

    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in {path}{where}: {error.problem or error.context}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML in {path}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Value checks. Each appends a message to ``problems`` and returns None when the value is invalid.


def _whole_number(value: Any, key: str, problems: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{key} must be a whole number, got {value!r}")
        return None
    if isinstance(value, float) and not value.is_integer():
        problems.append(f"{key} must be a whole number, got {value!r}")
        return None
    if value < 1:
        problems.append(f"{key} must be at least 1, got {value!r}")
        return None
    return int(value)


def _ratio(value: Any, key: str, problems: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append(f"{key} must be a number, got {value!r}")
        return None
    if value <= 0:
        problems.append(f"{key} must be positive, got {value!r}")
        return None
    return float(value)


def _value_list(value: Any, key: str, parse, problems: list[str]) -> list | None:
    """Parse a non-empty list of distinct numbers; returns None if the list or any item is invalid."""
    if not isinstance(value, list):
        problems.append(f"{key} must be a list of numbers, got {value!r}")
        return None
    if not value:
        problems.append(f"{key} is an empty list; give at least one choice")
        return None

    count_before = len(problems)
    parsed = [parse(item, f"{key}[{index}]", problems) for index, item in enumerate(value)]
    if len(problems) > count_before:
        return None

    duplicates = sorted({item for item in parsed if parsed.count(item) > 1})
    if duplicates:
        problems.append(f"{key} lists {duplicates} more than once; give each choice once")
        return None
    return parsed


def _check_keys(section: Any, name: str, allowed: tuple[str, ...], required: tuple[str, ...],
                problems: list[str]) -> bool:
    if not isinstance(section, Mapping):
        problems.append(f"{name} must be a mapping with keys {list(allowed)}, got {section!r}")
        return False
    for key in section:
        if key not in allowed:
            problems.append(f"unknown key {key!r} in {name}; expected {list(allowed)}")
    for key in required:
        if key not in section:
            problems.append(f"{name} is missing key {key!r}")
    return True


def _check_choices(kind: str, choices: list | None, key: str, supernet: SupernetConfig | None,
                   problems: list[str]) -> None:
    """Report every choice of ``kind`` (a SPACE_KEYS name) that is larger than the supernet's.

    ``key`` names where the choices came from, for example ``SEARCH_SPACE.NUM_HEADS[192][3]``.
    A valid supernet has ``64 * NUM_HEADS <= EMBED_DIM``, so a num heads choice within
    ``SUPERNET.NUM_HEADS`` also fits the q/k/v width.
    """
    if supernet is None or choices is None:
        return
    limit = {"EMBED_DIM": supernet.embed_dim, "DEPTH": supernet.depth, "NUM_HEADS": supernet.num_heads,
             "MLP_RATIO": supernet.mlp_ratio}[kind]
    for choice in choices:
        if choice > limit:
            problems.append(
                f"{key} choice {choice:g} is above SUPERNET.{kind} {limit:g}; remove it or enlarge the supernet"
            )


# ---------------------------------------------------------------------------------------------
# Sections


def _parse_supernet(section: Any, problems: list[str]) -> SupernetConfig | None:
    if not _check_keys(section, "SUPERNET", SPACE_KEYS, SPACE_KEYS, problems):
        return None
    if any(key not in section for key in SPACE_KEYS):
        return None

    count_before = len(problems)
    embed_dim = _whole_number(section["EMBED_DIM"], "SUPERNET.EMBED_DIM", problems)
    depth = _whole_number(section["DEPTH"], "SUPERNET.DEPTH", problems)
    num_heads = _whole_number(section["NUM_HEADS"], "SUPERNET.NUM_HEADS", problems)
    mlp_ratio = _ratio(section["MLP_RATIO"], "SUPERNET.MLP_RATIO", problems)
    if len(problems) > count_before:
        return None

    if num_heads * HEAD_DIM > embed_dim:
        problems.append(
            f"SUPERNET.NUM_HEADS {num_heads} needs q/k/v width {num_heads * HEAD_DIM} ({HEAD_DIM} per head), "
            f"above SUPERNET.EMBED_DIM {embed_dim}; set EMBED_DIM to at least {num_heads * HEAD_DIM}"
        )
        return None
    return SupernetConfig(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)


def _parse_full_space(section: Mapping, supernet: SupernetConfig | None, problems: list[str]) -> dict | None:
    count_before = len(problems)
    embed_dims = _value_list(section["EMBED_DIM"], "SEARCH_SPACE.EMBED_DIM", _whole_number, problems)
    depths = _value_list(section["DEPTH"], "SEARCH_SPACE.DEPTH", _whole_number, problems)
    heads = _value_list(section["NUM_HEADS"], "SEARCH_SPACE.NUM_HEADS", _whole_number, problems)
    ratios = _value_list(section["MLP_RATIO"], "SEARCH_SPACE.MLP_RATIO", _ratio, problems)
    for kind, choices in zip(SPACE_KEYS, (embed_dims, depths, heads, ratios)):
        _check_choices(kind, choices, f"SEARCH_SPACE.{kind}", supernet, problems)
    if len(problems) > count_before:
        return None
    return dict(embed_dim=embed_dims, depth=depths, num_heads=heads, mlp_ratio=ratios)


def _parse_per_layer_map(value: Any, key: str, embed_dims: list[int], depths: dict[int, list[int]], parse,
                         problems: list[str]) -> dict | None:
    """Parse ``{embed: [[choices of layer 0], [choices of layer 1], ...]}``."""
    if not isinstance(value, Mapping):
        problems.append(f"{key} must map each embed dim to a list of per-layer choice lists, got {value!r}")
        return None
    if not _same_embed_keys(value, key, embed_dims, problems):
        return None

    count_before = len(problems)
    result = {}
    for embed in embed_dims:
        layers = value[embed]
        layers_key = f"{key}[{embed}]"
        if not isinstance(layers, list) or not layers:
            problems.append(f"{layers_key} must be a non-empty list with one choice list per layer, got {layers!r}")
            continue
        if embed in depths and len(layers) != max(depths[embed]):
            problems.append(
                f"{layers_key} has {len(layers)} per-layer lists but the largest DEPTH for embed dim {embed} "
                f"is {max(depths[embed])}; give one list per layer"
            )
            continue
        result[embed] = [
            _value_list(choices, f"{layers_key}[{layer}]", parse, problems) for layer, choices in enumerate(layers)
        ]
    if len(problems) > count_before:
        return None
    return result


def _same_embed_keys(value: Mapping, key: str, embed_dims: list[int], problems: list[str]) -> bool:
    count_before = len(problems)
    for embed in value:
        if embed not in embed_dims:
            problems.append(f"{key} has an entry for embed dim {embed!r}, which is not in SEARCH_SPACE.EMBED_DIM {embed_dims}")
    for embed in embed_dims:
        if embed not in value:
            problems.append(f"{key} has no entry for embed dim {embed} listed in SEARCH_SPACE.EMBED_DIM")
    return len(problems) == count_before


def _parse_preferred_space(section: Mapping, supernet: SupernetConfig | None, problems: list[str]) -> dict | None:
    count_before = len(problems)
    embed_dims = _value_list(section["EMBED_DIM"], "SEARCH_SPACE.EMBED_DIM", _whole_number, problems)
    if embed_dims is None:
        return None
    _check_choices("EMBED_DIM", embed_dims, "SEARCH_SPACE.EMBED_DIM", supernet, problems)

    depth_map = section["DEPTH"]
    depths = {}
    if not isinstance(depth_map, Mapping):
        problems.append(f"SEARCH_SPACE.DEPTH must map each embed dim to a list of depths, got {depth_map!r}")
    elif _same_embed_keys(depth_map, "SEARCH_SPACE.DEPTH", embed_dims, problems):
        for embed in embed_dims:
            parsed = _value_list(depth_map[embed], f"SEARCH_SPACE.DEPTH[{embed}]", _whole_number, problems)
            if parsed is not None:
                _check_choices("DEPTH", parsed, f"SEARCH_SPACE.DEPTH[{embed}]", supernet, problems)
                depths[embed] = parsed

    heads = _parse_per_layer_map(section["NUM_HEADS"], "SEARCH_SPACE.NUM_HEADS", embed_dims, depths,
                                 _whole_number, problems)
    ratios = _parse_per_layer_map(section["MLP_RATIO"], "SEARCH_SPACE.MLP_RATIO", embed_dims, depths,
                                  _ratio, problems)
    for kind, per_layer_map in (("NUM_HEADS", heads), ("MLP_RATIO", ratios)):
        for embed, layers in (per_layer_map or {}).items():
            for layer, choices in enumerate(layers):
                _check_choices(kind, choices, f"SEARCH_SPACE.{kind}[{embed}][{layer}]", supernet, problems)

    if len(problems) > count_before:
        return None
    return dict(embed_dim=embed_dims, depth=depths, num_heads=heads, mlp_ratio=ratios)


def _parse_retrain(section: Any, supernet: SupernetConfig | None, problems: list[str]) -> dict | None:
    if not _check_keys(section, "RETRAIN", SPACE_KEYS, SPACE_KEYS, problems):
        return None
    if any(key not in section for key in SPACE_KEYS) or supernet is None:
        return None

    # RETRAIN gives one embed dim and a depth; a candidate repeats the embed dim per layer.
    depth = section["DEPTH"]
    embed_dims = [section["EMBED_DIM"]] * depth if isinstance(depth, int) and depth > 0 else [section["EMBED_DIM"]]
    candidate = {
        "layer_num": depth,
        "embed_dim": embed_dims,
        "mlp_ratio": section["MLP_RATIO"],
        "num_heads": section["NUM_HEADS"],
    }
    try:
        return supernet.check_candidate(candidate)
    except CandidateError as error:
        problems.append(f"RETRAIN: {error}")
        return None


def _is_preferred_layout(section: Mapping) -> bool:
    return any(isinstance(section.get(key), Mapping) for key in ("DEPTH", "NUM_HEADS", "MLP_RATIO"))


def _parse_space(data: Any, path: Path) -> SearchSpace | PreferredSpace:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path} must contain a YAML mapping with keys SUPERNET and SEARCH_SPACE (and optionally RETRAIN), "
            f"got {type(data).__name__}"
        )

    problems: list[str] = []
    _check_keys(data, "the top level", TOP_LEVEL_KEYS, ("SUPERNET", "SEARCH_SPACE"), problems)
    supernet = _parse_supernet(data["SUPERNET"], problems) if "SUPERNET" in data else None

    space = None
    preferred = False
    section = data.get("SEARCH_SPACE")
    if section is not None and _check_keys(section, "SEARCH_SPACE", SPACE_KEYS, SPACE_KEYS, problems):
        if all(key in section for key in SPACE_KEYS):
            preferred = _is_preferred_layout(section)
            parse = _parse_preferred_space if preferred else _parse_full_space
            space = parse(section, supernet, problems)
    elif "SEARCH_SPACE" in data and section is None:
        problems.append("SEARCH_SPACE is empty; give EMBED_DIM, DEPTH, NUM_HEADS and MLP_RATIO")

    retrain = _parse_retrain(data["RETRAIN"], supernet, problems) if "RETRAIN" in data else None

    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"invalid search-space config {path} ({len(problems)} problem(s)):\n{listing}", problems)

    space_type = PreferredSpace if preferred else SearchSpace
    return space_type(supernet=supernet, retrain=retrain, **space)


def load_space(path: Union[str, os.PathLike]) -> SearchSpace | PreferredSpace:
    """Load and validate a full search space or a preferred space from a YAML file.

    Raises:
        ConfigError: listing every problem found, each naming the key and the value.
    """
    path = Path(path)
    return _parse_space(_read_yaml(path), path)


def load_search_space(path: Union[str, os.PathLike]) -> SearchSpace:
    """Load a full search space (plain lists), rejecting a preferred space."""
    space = load_space(path)
    if isinstance(space, PreferredSpace):
        raise ConfigError(
            f"{path} is a preferred space (choices mapped per embed dim) but a full search space with plain "
            f"lists is needed here, such as experiments/supernet/supernet-T.yaml"
        )
    return space


# ---------------------------------------------------------------------------------------------
# Interval-candidates JSON: {"<interval upper bound in M params>": [candidate, ...], ...}


def format_interval_key(bound: Union[float, int, str]) -> str:
    """Format an interval's upper bound (millions of parameters) as a clean decimal such as "6.0" or "0.3"."""
    try:
        value = float(bound)
    except (TypeError, ValueError):
        raise ConfigError(f"interval key {bound!r} is not a number; use the interval's upper bound in M, e.g. \"6.0\"") from None
    rounded = round(value, INTERVAL_KEY_DECIMALS) if math.isfinite(value) else value
    if not math.isfinite(rounded) or rounded <= 0:
        raise ConfigError(f"interval key {bound!r} must be a positive number of millions of parameters")
    return repr(rounded)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ConfigError(f"duplicate key {key!r} in JSON object; give each interval once")
        result[key] = value
    return result


def load_interval_candidates(path: Union[str, os.PathLike],
                             supernet: SupernetConfig | None = None) -> dict[str, list[dict]]:
    """Load an interval-candidates JSON file and validate every candidate.

    Args:
        path: the JSON file.
        supernet: when given, each candidate must be a subnet of it; otherwise only the candidate
            layout is checked.

    Returns:
        Interval key (clean decimal, e.g. "6.0") -> normalised candidates, sorted by interval bound.

    Raises:
        ConfigError: naming the file, the interval key and the candidate index.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"interval-candidates file not found: {path}; run the zero-shot search to write one") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read interval-candidates file {path}: {error}") from error

    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise ConfigError(f"invalid JSON in {path} at line {error.lineno}, column {error.colno}: {error.msg}") from error
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a JSON object mapping interval keys to candidate lists, got {type(data).__name__}")
    if not data:
        raise ConfigError(f"{path} contains no intervals; it needs at least one interval with one candidate")

    if supernet is not None:
        limits = dict(embed_dim=supernet.embed_dim, depth=supernet.depth, num_heads=supernet.num_heads,
                      mlp_ratio=supernet.mlp_ratio)
    else:
        limits = dict(embed_dim=sys.maxsize, depth=sys.maxsize, num_heads=sys.maxsize, mlp_ratio=math.inf)

    intervals: dict[float, tuple[str, list[dict]]] = {}
    for key, candidates in data.items():
        try:
            clean_key = format_interval_key(key)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        if float(clean_key) in intervals:
            raise ConfigError(f"{path}: interval keys {intervals[float(clean_key)][0]!r} and {key!r} are the same bound")
        if not isinstance(candidates, list) or not candidates:
            raise ConfigError(f"{path}: interval {key!r} must contain a non-empty list of candidates, got {candidates!r}")

        checked = []
        for index, candidate in enumerate(candidates):
            try:
                checked.append(check_candidate(candidate, **limits))
            except CandidateError as error:
                raise ConfigError(f"{path}: interval {key!r}, candidate {index}: {error}") from error
        intervals[float(clean_key)] = (clean_key, checked)

    return {clean_key: checked for _, (clean_key, checked) in sorted(intervals.items())}


def _json_value(value: Any) -> Any:
    """Convert numpy and torch scalars or arrays, which ``json`` cannot write, to Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} to JSON")


def save_interval_candidates(path: Union[str, os.PathLike], mapping: Mapping[Any, list[Mapping]]) -> None:
    """Write an interval-candidates JSON file atomically, one candidate per line.

    Keys may be numbers or strings; they are written as clean decimals ("6.0", "0.3") in increasing order.
    Candidates are written as given, extra keys such as ``num_params`` and ``score`` included.
    """
    path = Path(path)
    entries: dict[float, tuple[str, list]] = {}
    for key, candidates in mapping.items():
        clean_key = format_interval_key(key)
        if float(clean_key) in entries:
            raise ConfigError(f"interval keys {entries[float(clean_key)][0]!r} and {key!r} format to the same bound")
        entries[float(clean_key)] = (clean_key, list(candidates))

    lines = ["{"]
    ordered = [entries[bound] for bound in sorted(entries)]
    for position, (clean_key, candidates) in enumerate(ordered):
        lines.append(f"  {json.dumps(clean_key)}: [")
        for index, candidate in enumerate(candidates):
            comma = "," if index < len(candidates) - 1 else ""
            lines.append("    " + json.dumps(candidate, default=_json_value) + comma)
        lines.append("  ]" + ("," if position < len(ordered) - 1 else ""))
    lines.append("}")

    write_text_atomic(path, "\n".join(lines) + "\n")
    logger.info("wrote %d interval(s) of candidates to %s", len(ordered), path)
