"""Shared test set-up: import paths and CPU thread limits."""

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Cap torch at two threads so that test runs started side by side do not oversubscribe the CPU.
torch.set_num_threads(min(2, torch.get_num_threads()))
