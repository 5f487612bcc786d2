"""Search spaces and random block scores shared by the search and evolution tests."""

import numpy as np

from lib.search import Choices

DEMO = Choices(embed_dim=(96, 112, 128), depth=(3, 4), num_heads=(1, 2), mlp_ratio=(3.0, 3.5, 4.0))


def random_block_scores(choices: Choices, seed: int):
    """Return random head and mlp block scores for every (embed dim, choice above the smallest)."""
    rng = np.random.default_rng(seed)
    depth = max(choices.depth)
    heads = {(e, h): rng.random(depth) for e in choices.embed_dim for h in choices.num_heads[1:]}
    mlp = {(e, r): rng.random(depth) for e in choices.embed_dim for r in choices.mlp_ratio[1:]}
    return heads, mlp
