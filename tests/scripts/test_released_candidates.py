"""The released candidate files and their preferred spaces, which 03_evaluation.sh evaluates."""

from pathlib import Path

import pytest
import yaml

from lib.choices import derive_preferred_space
from lib.config import load_interval_candidates, load_space
from model.supernet import Supernet

REPO_ROOT = Path(__file__).resolve().parents[2]
# Width of the parameter intervals of each space, in millions.
INTERVAL_WIDTHS = {"tiny": 1.0, "small": 5.0, "base": 12.0}
# The supernet of each full search space, which the preferred space's supernet must fit in.
FULL_SPACES = {"tiny": "supernet-T.yaml", "small": "supernet-S.yaml", "base": "supernet-B.yaml"}
MODEL_ZOO = {"tiny": ("6.0", 5.99476), "small": ("23.0", 22.989928), "base": ("54.0", 53.876104)}


@pytest.fixture(scope="module")
def counting_supernet() -> Supernet:
    """A supernet at ImageNet settings, large enough for every released candidate.

    Parameter counts depend on the candidate, the class count and the patch grid, not on the
    supernet's maxima, so one supernet counts the candidates of all three spaces.
    """
    return Supernet(img_size=224, patch_size=16, num_classes=1000, embed_dim=640, depth=14, num_heads=10,
                    mlp_ratio=4.0, gp=True, relative_position=True, change_qkv=True)


@pytest.mark.parametrize("space", sorted(INTERVAL_WIDTHS))
def test_candidates_fit_preferred_space(space):
    preferred = load_space(REPO_ROOT / "experiments" / "supernet" / f"{space}.yaml")
    full = load_space(REPO_ROOT / "experiments" / "supernet" / FULL_SPACES[space])
    candidates = load_interval_candidates(REPO_ROOT / "interval_cands" / f"{space}.json", preferred.supernet)
    assert candidates
    assert preferred.supernet.embed_dim == full.supernet.embed_dim
    assert preferred.supernet.num_heads == full.supernet.num_heads
    assert preferred.supernet.depth <= full.supernet.depth


@pytest.mark.parametrize("space", sorted(INTERVAL_WIDTHS))
def test_preferred_space_is_derived(space):
    candidates = load_interval_candidates(REPO_ROOT / "interval_cands" / f"{space}.json")
    written = yaml.safe_load((REPO_ROOT / "experiments" / "supernet" / f"{space}.yaml").read_text())
    assert written == derive_preferred_space(candidates)


@pytest.mark.parametrize("space", sorted(INTERVAL_WIDTHS))
def test_num_params_match_supernet_count(space, counting_supernet):
    width = INTERVAL_WIDTHS[space]
    for key, candidates in load_interval_candidates(REPO_ROOT / "interval_cands" / f"{space}.json").items():
        assert len(candidates) == 1
        counted = counting_supernet.num_params(candidates[0])
        assert counted == round(candidates[0]["num_params"] * 1e6)
        assert float(key) - width < counted / 1e6 <= float(key)


@pytest.mark.parametrize("space", sorted(MODEL_ZOO))
def test_model_zoo_candidate_present(space):
    key, num_params = MODEL_ZOO[space]
    candidates = load_interval_candidates(REPO_ROOT / "interval_cands" / f"{space}.json")
    assert candidates[key][0]["num_params"] == num_params
