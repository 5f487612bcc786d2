"""Datasets and transforms for search, training and evaluation.

Data sets (``--data-set``):

- ``IMNET``: ImageNet layout ``DATA/train/<wnid>/*.JPEG`` and ``DATA/val/<wnid>/*.JPEG`` with 1000
  classes. Class index = position of the class folder in sorted order.
- ``FOLDER``: the same layout with any number of classes.
- ``EVO_IMNET``: ``IMNET`` for the search stage. Its training split is a deterministic subset of
  ``--subset-per-class`` images per class of ``train/`` (default 100).
- ``CIFAR10`` / ``CIFAR100``: torchvision's loaders; they download only with ``--download``.
- ``DIGITS`` (default): scikit-learn's digits as 32x32 PNG files in the ImageNet layout, built
  once into a cache folder (see ``lib.digits``). It needs no download.

Evaluation with ``--eval-crops 5`` or ``10`` yields one tensor of shape ``[crops, 3, H, W]`` per
image, so batches are ``[B, crops, 3, H, W]``. ``average_crop_logits`` averages a model's logits
over the crops.

Run ``python -m lib.datasets --build-digits`` to build the digits folder, or
``python -m lib.datasets --data-set FOLDER --data-path DATA`` to check a data folder.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import datasets as torchvision_datasets
from torchvision import transforms

from lib.argtypes import non_negative_float, non_negative_int, positive_int, probability
from lib.digits import DigitsError, default_cache_dir, digits_root, build_digits
from lib.fileio import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_SETS",
    "DataError",
    "ImageFolderDataset",
    "StackCrops",
    "add_data_args",
    "average_crop_logits",
    "build_dataset",
    "build_digits",
    "build_transform",
    "default_cache_dir",
    "digits_root",
]

DATA_SETS = ("IMNET", "FOLDER", "CIFAR10", "CIFAR100", "DIGITS", "EVO_IMNET")
FOLDER_DATA_SETS = ("IMNET", "FOLDER", "DIGITS", "EVO_IMNET")
IMAGENET_CLASSES = 1000
EVO_IMNET_IMAGES_PER_CLASS = 100
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_LAYOUT = "DATA/train/<class>/<image> and DATA/val/<class>/<image>, with --data-path DATA"
SUBSET_LIST_NAME = "train_subset.txt"


class DataError(ValueError):
    """A missing, empty, inconsistent or unreadable dataset, or invalid data options."""


# ---------------------------------------------------------------------------------------------
# Command-line options


def add_data_args(parser: argparse.ArgumentParser, training: bool = True) -> argparse.ArgumentParser:
    """Add the dataset, augmentation and loader options. The model options add ``--input-size``.

    With ``training=False`` (evaluate.py) the options of the training transform and subset are
    still accepted, so that a training command line can be reused, but the help leaves them out.
    """
    group = parser.add_argument_group("data")

    def training_help(text: str) -> str:
        return text if training else argparse.SUPPRESS

    group.add_argument("--data-set", default="DIGITS", choices=DATA_SETS,
                       help="dataset to use (default: DIGITS, built from scikit-learn, no download)")
    group.add_argument("--data-path", default=None,
                       help="dataset folder: for IMNET, EVO_IMNET and FOLDER the folder with train/ and val/; "
                            "for CIFAR the folder with the extracted batches; for DIGITS where the digits are "
                            "built (default: $PRENAS_CACHE/digits, else ~/.cache/prenas/digits)")
    group.add_argument("--download", action="store_true",
                       help="download CIFAR10/CIFAR100 into --data-path if missing (the only option that downloads)")
    group.add_argument("--color-jitter", type=non_negative_float, default=0.4,
                       help=training_help("color jitter strength; timm applies it only when --aa is none (default: 0.4)"))
    group.add_argument("--aa", default="rand-m9-mstd0.5-inc1",
                       help=training_help('timm auto-augment policy, for example rand-m9-mstd0.5-inc1, or "none" '
                                          "(default: rand-m9-mstd0.5-inc1)"))
    group.add_argument("--hflip", type=probability, default=0.5,
                       help=training_help("probability of a horizontal flip in training; 0 for data whose classes "
                                          "change under mirroring, such as digits (default: 0.5)"))
    group.add_argument("--crop-padding", type=non_negative_int, default=4,
                       help=training_help("padding in pixels of the random training crop of inputs of 32 pixels "
                                          "or less; 0 turns the crop off (default: 4)"))
    group.add_argument("--train-interpolation", default="bicubic", choices=("random", "bilinear", "bicubic"),
                       help=training_help("resize interpolation of the training crop (default: bicubic)"))
    group.add_argument("--reprob", type=probability, default=0.25,
                       help=training_help("random erasing probability (default: 0.25)"))
    group.add_argument("--remode", default="pixel", choices=("const", "rand", "pixel"),
                       help=training_help("random erasing fill mode (default: pixel)"))
    group.add_argument("--recount", type=positive_int, default=1,
                       help=training_help("number of random erasing boxes (default: 1)"))
    group.add_argument("--eval-crops", type=int, default=1, choices=(1, 5, 10),
                       help="evaluation crops per image: 1 center crop, 5 (FiveCrop) or 10 (TenCrop); "
                            "the logits are averaged over crops; needs --input-size above 32 (default: 1)")
    group.add_argument("--skip-corrupt", action="store_true",
                       help="skip unreadable images (counted in a warning) instead of failing on the first one")
    group.add_argument("--subset-per-class", type=positive_int, default=None, metavar="N",
                       help=training_help("train on a fixed subset of N images per class of train/ (folder "
                                          f"datasets only; EVO_IMNET defaults to {EVO_IMNET_IMAGES_PER_CLASS})"))
    group.add_argument("--num_workers", type=non_negative_int, default=min(10, os.cpu_count() or 1),
                       help="data loader worker processes (default: min(10, CPU count))")
    group.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=True,
                       help="pin loader memory for faster copies to the GPU (default: on)")
    return parser


# ---------------------------------------------------------------------------------------------
# Transforms


class StackCrops:
    """Apply ``transform`` to each crop of a FiveCrop/TenCrop tuple and stack the results on dim 0.

    Args:
        transform: per-crop transform from a PIL image to a tensor.
    """

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, crops):
        return torch.stack([self.transform(crop) for crop in crops])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def average_crop_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Return ``model(images)``; for multi-crop batches ``[B, crops, C, H, W]``, the mean logits over crops."""
    if images.dim() == 4:
        return model(images)
    if images.dim() != 5:
        raise ValueError(f"expected images of shape [B, C, H, W] or [B, crops, C, H, W], got {tuple(images.shape)}")

    batch, crops = images.shape[:2]
    logits = model(images.flatten(0, 1))
    return logits.view(batch, crops, -1).mean(dim=1)


def _auto_augment(policy: Optional[str]) -> Optional[str]:
    if policy is None or policy.strip().lower() in ("", "none"):
        return None
    return policy


def build_transform(is_train: bool, args: argparse.Namespace) -> Callable:
    """Build the training or evaluation transform for ``args.input_size`` (square) inputs.

    Training: timm's ImageNet training transform (random resized crop, ``--hflip``, ``--aa``,
    ``--color-jitter``, ``--reprob`` random erasing), except that inputs of 32 pixels or less get a
    random crop with ``--crop-padding`` pixels of padding (none with 0) in place of the random resized crop.

    Evaluation: inputs above 32 pixels are resized to ``int(input * 256 / 224)`` (bicubic) and
    center-cropped, or cut into 5 or 10 crops with ``--eval-crops``. Smaller inputs are used as they
    are, so their images must already have the input size. Then ToTensor and Normalize with the
    ImageNet mean and std.
    """
    input_size = int(args.input_size)
    if input_size < 1:
        raise DataError(f"--input-size must be a positive number of pixels, got {args.input_size}")

    if is_train:
        policy = _auto_augment(args.aa)
        try:
            primary, secondary, final = create_transform(
                input_size,
                is_training=True,
                color_jitter=args.color_jitter,
                auto_augment=policy,
                hflip=float(getattr(args, "hflip", 0.5)),
                interpolation=args.train_interpolation,
                re_prob=args.reprob,
                re_mode=args.remode,
                re_count=args.recount,
                separate=True,
            )
        except (AssertionError, KeyError, ValueError) as error:
            raise DataError(
                f"invalid augmentation options (--aa {args.aa!r}): {error}; "
                f"use a timm policy such as rand-m9-mstd0.5-inc1, or none"
            ) from error
        if input_size <= 32:
            padding = int(getattr(args, "crop_padding", 4))
            primary = [transforms.RandomCrop(input_size, padding=padding)] if padding > 0 else []
            hflip = float(getattr(args, "hflip", 0.5))
            if hflip > 0:
                primary.append(transforms.RandomHorizontalFlip(hflip))
        else:
            primary = list(primary.transforms)
        return transforms.Compose(primary + list(secondary.transforms) + list(final.transforms))

    eval_crops = int(getattr(args, "eval_crops", 1))
    if eval_crops not in (1, 5, 10):
        raise DataError(f"--eval-crops must be 1, 5 or 10, got {eval_crops}")
    if eval_crops > 1 and input_size <= 32:
        raise DataError(
            f"--eval-crops {eval_crops} needs --input-size above 32, got {input_size}; "
            f"inputs of 32 pixels or less are evaluated whole, so use --eval-crops 1"
        )

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    if input_size <= 32:
        return to_tensor

    steps = [transforms.Resize(int(input_size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC)]
    if eval_crops == 1:
        steps += [transforms.CenterCrop(input_size), to_tensor]
    else:
        crop_type = transforms.FiveCrop if eval_crops == 5 else transforms.TenCrop
        steps += [crop_type(input_size), StackCrops(to_tensor)]
    return transforms.Compose(steps)


# ---------------------------------------------------------------------------------------------
# Image folders


def _class_folders(split_root: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_root) if entry.is_dir() and not entry.name.startswith("."))


def _scan_image_folder(split_root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``(path, class index)`` pairs of ``split_root/<class>/**/<image>``, classes in sorted order."""
    if not split_root.is_dir():
        raise DataError(f"data folder not found: {split_root}; expected the layout {FOLDER_LAYOUT}")
    classes = _class_folders(split_root)
    if not classes:
        raise DataError(f"no class folders in {split_root}; expected the layout {FOLDER_LAYOUT}")

    samples = []
    for index, name in enumerate(classes):
        class_samples = []
        for folder, subfolders, files in os.walk(split_root / name, followlinks=True):
            subfolders.sort()
            class_samples += [
                (os.path.join(folder, file), index) for file in sorted(files) if file.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not class_samples:
            raise DataError(
                f"class folder {split_root / name} contains no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"add images or remove the folder"
            )
        samples += class_samples
    return classes, samples


def _subset_order(relative_path: str) -> str:
    # A hash of the path gives an order that looks random but depends on nothing except the file name,
    # so the same subset is chosen on every machine and in every process.
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/**/<image>``; class index = position of the class folder in sorted order.

    Args:
        root: split folder, such as ``DATA/train``.
        transform: applied to each RGB PIL image.
        skip_corrupt: when an image cannot be read, log a warning and return the next readable image
            instead of raising ``DataError``. The dataset length stays the same.
            NOTE: so in a validation set a skipped image is counted again as its neighbour.
        images_per_class: keep a fixed subset of this many images per class, chosen by a hash of each
            image's path relative to ``root``. Classes with fewer images keep all of them.
    """

    def __init__(self, root: Union[str, os.PathLike], transform: Optional[Callable] = None, *,
                 skip_corrupt: bool = False, images_per_class: Optional[int] = None):
        self.root = Path(root)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.classes, self.samples = _scan_image_folder(self.root)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.images_per_class = images_per_class
        if images_per_class is not None:
            self.samples = self._subset(images_per_class)
        self.targets = [target for _, target in self.samples]
        # Paths of unreadable images seen by this process (each DataLoader worker keeps its own set).
        self.skipped: set[str] = set()

    def _subset(self, images_per_class: int) -> list[tuple[str, int]]:
        if images_per_class < 1:
            raise DataError(f"--subset-per-class must be at least 1, got {images_per_class}")
        by_class = defaultdict(list)
        for path, target in self.samples:
            by_class[target].append((path, target))

        subset = []
        short_classes = 0
        for target in sorted(by_class):
            ranked = sorted(by_class[target], key=lambda sample: _subset_order(self.relative_path(sample[0])))
            short_classes += len(ranked) < images_per_class
            subset += sorted(ranked[:images_per_class])
        if short_classes:
            logger.warning("%d class(es) in %s have fewer than %d images; the subset keeps all of their images",
                           short_classes, self.root, images_per_class)
        return subset

    def relative_path(self, path: str) -> str:
        """Return ``path`` relative to ``root``, with forward slashes."""
        return Path(path).relative_to(self.root).as_posix()

    def file_list(self) -> list[str]:
        """Return one line ``<path relative to root> <class index>`` per image, in dataset order."""
        return [f"{self.relative_path(path)} {target}" for path, target in self.samples]

    def save_file_list(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``file_list()`` to ``path`` atomically and return the path."""
        text = f"# root: {self.root}\n" + "\n".join(self.file_list()) + "\n"
        return write_text_atomic(path, text)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Image.Image:
        with open(path, "rb") as file:
            image = Image.open(file)
            return image.convert("RGB")

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self._load(path)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                if not self.skip_corrupt:
                    raise DataError(
                        f"cannot read image {path}: {error}; replace or delete the file, "
                        f"or pass --skip-corrupt to skip unreadable images"
                    ) from error
                if path not in self.skipped:
                    self.skipped.add(path)
                    logger.warning("skipped unreadable image %s (%s); %d image(s) skipped so far in this process",
                                   path, error, len(self.skipped))
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise DataError(f"no image in {self.root} can be read; check the files or the --data-path")


# ---------------------------------------------------------------------------------------------
# Dataset factory


def _require_data_path(args: argparse.Namespace) -> Path:
    if not args.data_path:
        raise DataError(f"--data-set {args.data_set} needs --data-path; expected the layout {FOLDER_LAYOUT}")
    return Path(args.data_path).expanduser()


def _check_split_classes(data_root: Path) -> None:
    """Reject train/ and val/ folders whose class folders differ, because class indices would disagree."""
    train, val = data_root / "train", data_root / "val"
    if not (train.is_dir() and val.is_dir()):
        return
    train_classes, val_classes = _class_folders(train), _class_folders(val)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise DataError(
            f"{train} has {len(train_classes)} class folders and {val} has {len(val_classes)}; both need the same "
            f"class folders so that class indices agree (only in train/: {only_train}, only in val/: {only_val})"
        )


def _folder_root(args: argparse.Namespace) -> Path:
    if args.data_set != "DIGITS":
        return _require_data_path(args)
    try:
        if args.data_path:
            return build_digits(args.data_path)
        return digits_root()
    except DigitsError as error:
        raise DataError(str(error)) from error


def _build_folder_dataset(is_train: bool, args: argparse.Namespace, transform: Callable) -> tuple[Dataset, int]:
    data_root = _folder_root(args)
    if not data_root.is_dir():
        raise DataError(f"data folder not found: {data_root}; expected the layout {FOLDER_LAYOUT}")
    _check_split_classes(data_root)

    images_per_class = getattr(args, "subset_per_class", None)
    if args.data_set == "EVO_IMNET" and images_per_class is None:
        images_per_class = EVO_IMNET_IMAGES_PER_CLASS
    split = "train" if is_train else "val"
    dataset = ImageFolderDataset(
        data_root / split,
        transform,
        skip_corrupt=bool(getattr(args, "skip_corrupt", False)),
        images_per_class=images_per_class if is_train else None,
    )

    num_classes = len(dataset.classes)
    if args.data_set in ("IMNET", "EVO_IMNET") and num_classes != IMAGENET_CLASSES:
        raise DataError(
            f"{dataset.root} has {num_classes} class folders but ImageNet has {IMAGENET_CLASSES}; "
            f"use --data-set FOLDER for other class counts"
        )

    if is_train and images_per_class is not None:
        logger.info("training on a subset of %d image(s) per class: %d images from %s",
                    images_per_class, len(dataset), dataset.root)
        output_dir = getattr(args, "output_dir", None)
        if output_dir:
            list_path = dataset.save_file_list(Path(output_dir) / SUBSET_LIST_NAME)
            logger.info("wrote the subset's file list to %s", list_path)
    return dataset, num_classes


def _build_cifar(is_train: bool, args: argparse.Namespace, transform: Callable) -> tuple[Dataset, int]:
    if getattr(args, "subset_per_class", None) is not None:
        raise DataError(f"--subset-per-class works with the folder datasets {FOLDER_DATA_SETS}, not {args.data_set}")
    root = _require_data_path(args)
    cifar_type, num_classes = (torchvision_datasets.CIFAR10, 10) if args.data_set == "CIFAR10" else (torchvision_datasets.CIFAR100, 100)
    try:
        dataset = cifar_type(str(root), train=is_train, transform=transform, download=bool(args.download))
    except RuntimeError as error:
        raise DataError(
            f"{args.data_set} not found in {root}; pass --download to fetch it, or point --data-path "
            f"at the folder that contains {cifar_type.base_folder}/"
        ) from error
    return dataset, num_classes


def build_dataset(is_train: bool, args: argparse.Namespace) -> tuple[Dataset, int]:
    """Build the training (``is_train``) or validation dataset of ``args.data_set``.

    Returns:
        ``(dataset, num_classes)``.

    Raises:
        DataError: for a missing or empty folder, train/ and val/ classes that differ, a missing
            CIFAR download, or invalid options. The message names the path or value and the fix.
    """
    if args.data_set not in DATA_SETS:
        raise DataError(f"unknown --data-set {args.data_set!r}; choose one of {', '.join(DATA_SETS)}")
    transform = build_transform(is_train, args)
    if args.data_set in ("CIFAR10", "CIFAR100"):
        return _build_cifar(is_train, args, transform)
    return _build_folder_dataset(is_train, args, transform)


# ---------------------------------------------------------------------------------------------
# Command line: build the digits folder, or check a dataset


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib.datasets",
        description="Build the digits dataset, or load a dataset's train and val splits and print their sizes.",
    )
    parser.add_argument("--build-digits", action="store_true",
                        help="build the digits folder (at --data-path if given) and exit")
    parser.add_argument("--input-size", type=int, default=32, help="input size in pixels (default: 32)")
    add_data_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.build_digits:
            root = build_digits(args.data_path) if args.data_path else digits_root()
            print(f"digits dataset ready at {root}")
            return 0
        for is_train in (True, False):
            dataset, num_classes = build_dataset(is_train, args)
            split = "train" if is_train else "val"
            print(f"{args.data_set} {split}: {len(dataset)} images, {num_classes} classes")
    except (DataError, DigitsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
