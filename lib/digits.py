"""The embedded DIGITS dataset: scikit-learn's handwritten digits as an ImageNet-layout folder.

``load_digits`` ships with scikit-learn, so this dataset needs no download. Its 1797 greyscale
8x8 images (values 0-16, classes 0-9) are scaled to 32x32 RGB PNG files::

    ROOT/train/<digit>/<index>.png     1501 images
    ROOT/val/<digit>/<index>.png        296 images
    ROOT/digits.json                    manifest, written last

``<index>`` is the image's position in ``load_digits``. The split is fixed: within each class, in
``load_digits`` order, every sixth image goes to ``val/``. The folder is built in a temporary sibling
folder and renamed into place, so ``ROOT`` either is complete or does not exist. A killed build can
leave a ``.digits-build-*`` folder beside ``ROOT``, which is safe to delete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
VALIDATION_EVERY = 6
# Raise when the way images are written changes, so that old caches are rebuilt instead of reused.
FORMAT_VERSION = 1
MANIFEST_NAME = "digits.json"


class DigitsError(ValueError):
    """A digits folder that exists but is not a complete build of this format."""


def default_cache_dir() -> Path:
    """Return the cache root: ``$PRENAS_CACHE`` if set, else ``~/.cache/prenas``."""
    configured = os.environ.get("PRENAS_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "prenas"


def _expected_manifest(train_count: int, val_count: int) -> dict:
    return {
        "source": "sklearn.datasets.load_digits",
        "format_version": FORMAT_VERSION,
        "image_size": IMAGE_SIZE,
        "classes": [str(digit) for digit in range(10)],
        "train_images": train_count,
        "val_images": val_count,
    }


def _read_manifest(root: Path) -> Optional[dict]:
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _digit_image(pixels: np.ndarray) -> Image.Image:
    """Scale an 8x8 image with values 0-16 to a 32x32 RGB image with values 0-255."""
    grey = np.rint(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")


def _write_digits(folder: Path) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen_per_class = [0] * 10
    counts = {"train": 0, "val": 0}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        split = "val" if seen_per_class[label] % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
        seen_per_class[label] += 1

        class_folder = folder / split / str(label)
        class_folder.mkdir(parents=True, exist_ok=True)
        _digit_image(pixels).save(class_folder / f"{index:04d}.png", format="PNG")
        counts[split] += 1

    manifest = _expected_manifest(counts["train"], counts["val"])
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_existing(root: Path) -> bool:
    """Return True if ``root`` contains a complete build, False if it does not exist."""
    if not root.exists():
        return False
    manifest = _read_manifest(root)
    if manifest is None or manifest.get("format_version") != FORMAT_VERSION:
        raise DigitsError(
            f"{root} exists but is not a complete digits build of format version {FORMAT_VERSION} "
            f"(no valid {MANIFEST_NAME}); delete it so it can be rebuilt, or choose another folder"
        )
    return True


def build_digits(root: Union[str, os.PathLike]) -> Path:
    """Build the digits folder at ``root`` unless a complete build is already there; return ``root``."""
    root = Path(root).expanduser()
    if _check_existing(root):
        return root

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-build-", dir=root.parent))
    logger.info("building the digits dataset in %s", root)
    try:
        manifest = _write_digits(staging)
        try:
            os.rename(staging, root)
        except OSError:
            # Another process finished the same build first; its folder is complete, so use it.
            if not _check_existing(root):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return root
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info("built the digits dataset: %d train and %d val images in %s",
                manifest["train_images"], manifest["val_images"], root)
    return root


def digits_root(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Return ``CACHE/digits``, building it first if missing; CACHE defaults to ``default_cache_dir()``."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return build_digits(cache / "digits")
