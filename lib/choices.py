"""Derive the preferred space YAML from an interval-candidates JSON file.

The preferred space keeps, per embed dim, the depths of the candidates with that embed dim and,
per layer, the num heads and mlp ratios that any of them uses there. Its supernet is the smallest
that contains them all: max depth, max mlp ratio, max num heads, and an embed dim of 64 x max num
heads because heads are 64 wide.

Command line::

    python -m lib.choices interval_cands/tiny.json experiments/supernet/tiny.yaml [--force]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lib.config import ConfigError, load_interval_candidates
from lib.fileio import write_text_atomic

logger = logging.getLogger(__name__)

HEAD_DIM = 64


def derive_preferred_space(
    interval_candidates: Mapping[str, Sequence[Mapping[str, Any]]],
    top_per_interval: int | None = None,
) -> dict[str, Any]:
    """Return the preferred-space config (``SEARCH_SPACE`` and ``SUPERNET``) that the candidates span.

    Args:
        interval_candidates: interval key -> validated candidates, best first.
        top_per_interval: use only the first this many candidates of each interval; None uses all.

    Raises:
        ConfigError: there are no candidates, or the candidates' embed dim exceeds 64 x their max num heads.
    """
    if top_per_interval is not None and top_per_interval < 1:
        raise ConfigError(f"top_per_interval must be at least 1, got {top_per_interval}")

    depths: dict[int, set[int]] = {}
    heads: dict[int, dict[int, set[int]]] = {}
    ratios: dict[int, dict[int, set[float]]] = {}
    for candidates in interval_candidates.values():
        for candidate in list(candidates)[:top_per_interval]:
            embed = int(candidate["embed_dim"][0])
            depths.setdefault(embed, set()).add(int(candidate["layer_num"]))
            for layer, (ratio, head_count) in enumerate(zip(candidate["mlp_ratio"], candidate["num_heads"])):
                ratios.setdefault(embed, {}).setdefault(layer, set()).add(float(ratio))
                heads.setdefault(embed, {}).setdefault(layer, set()).add(int(head_count))
    if not depths:
        raise ConfigError("no candidates to derive a preferred space from; the interval-candidates file is empty")

    embed_dims = sorted(depths)
    max_heads = max(max(values) for layers in heads.values() for values in layers.values())
    supernet_embed = HEAD_DIM * max_heads
    if supernet_embed < max(embed_dims):
        raise ConfigError(
            f"the candidates use embed dim {max(embed_dims)} but at most {max_heads} heads, so the derived "
            f"supernet embed dim {HEAD_DIM} x {max_heads} = {supernet_embed} would be too small; "
            f"check the candidates' num heads"
        )

    def per_layer(values: dict[int, dict[int, set]], embed: int) -> list[list]:
        return [sorted(values[embed][layer]) for layer in sorted(values[embed])]

    return {
        "SEARCH_SPACE": {
            "DEPTH": {embed: sorted(depths[embed]) for embed in embed_dims},
            "EMBED_DIM": embed_dims,
            "MLP_RATIO": {embed: per_layer(ratios, embed) for embed in embed_dims},
            "NUM_HEADS": {embed: per_layer(heads, embed) for embed in embed_dims},
        },
        "SUPERNET": {
            "DEPTH": max(max(values) for values in depths.values()),
            "EMBED_DIM": supernet_embed,
            "MLP_RATIO": max(max(values) for layers in ratios.values() for values in layers.values()),
            "NUM_HEADS": max_heads,
        },
    }


def write_preferred_space(path: str | os.PathLike, config: Mapping[str, Any], force: bool = False) -> None:
    """Write a preferred-space config as YAML, atomically.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is False.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it or choose another path")
    text = yaml.safe_dump(dict(config), default_flow_style=False, sort_keys=True)

    write_text_atomic(path, text)
    logger.info("wrote the preferred space to %s", path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lib.choices",
        description="Derive the preferred-space YAML from an interval-candidates JSON file.",
    )
    parser.add_argument("candidates", help="interval-candidates JSON written by the zero-shot search")
    parser.add_argument("output", help="preferred-space YAML to write")
    parser.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    parser.add_argument(
        "--top-per-interval", type=int, default=None,
        help="use only the first N candidates of each interval (default: all)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    if output.exists() and not args.force:
        logger.error("%s already exists; pass --force to overwrite it or choose another path", output)
        return 1
    try:
        candidates = load_interval_candidates(args.candidates)
        config = derive_preferred_space(candidates, args.top_per_interval)
        write_preferred_space(output, config, force=args.force)
    except ConfigError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
