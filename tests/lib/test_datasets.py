"""Tests for the dataset builders, the digits cache and the transforms."""

import argparse
import hashlib
import logging
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

import lib.datasets as datasets
import lib.digits as digits
from lib.datasets import (
    DataError,
    ImageFolderDataset,
    add_data_args,
    average_crop_logits,
    build_dataset,
    build_transform,
)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def parse_args(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--output_dir", default=None)
    add_data_args(parser)
    return parser.parse_args(list(argv))


def random_image(size=(32, 32), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def manual_to_tensor_normalize(image):
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(((pixels - MEAN) / STD).transpose(2, 0, 1).copy())


def make_folder(root, counts, split="train", size=(32, 32)):
    """Write ``counts[class]`` random PNG images per class under ``root/split/<class>/``."""
    seed = 0
    for name, count in counts.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            random_image(size, seed).save(folder / f"img{index:03d}.png")
            seed += 1
    return root


def file_hashes(root):
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return digits.build_digits(tmp_path_factory.mktemp("cache") / "digits")


# ---------------------------------------------------------------------------------------------
# Digits


def test_digits_build_is_reproducible(digits_folder, tmp_path):
    second = digits.build_digits(tmp_path / "digits")

    first_hashes = file_hashes(digits_folder)
    assert len(first_hashes) == 1797 + 1
    assert file_hashes(second) == first_hashes


def test_digits_class_counts(digits_folder):
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target, minlength=10)
    for digit in range(10):
        train_count = len(list((digits_folder / "train" / str(digit)).glob("*.png")))
        val_count = len(list((digits_folder / "val" / str(digit)).glob("*.png")))
        assert train_count + val_count == per_class[digit]
        assert val_count == per_class[digit] // 6


def test_digits_split_sizes(digits_folder):
    train = ImageFolderDataset(digits_folder / "train")
    val = ImageFolderDataset(digits_folder / "val")

    assert len(train) == 1501
    assert len(val) == 296
    assert train.classes == [str(digit) for digit in range(10)]
    assert set(train.file_list()).isdisjoint(val.file_list())


def test_digits_image_format(digits_folder):
    from sklearn.datasets import load_digits

    image = Image.open(digits_folder / "train" / "3" / "0003.png")
    assert image.mode == "RGB"
    assert image.size == (32, 32)

    # The 8x8 source scaled up: the brightest source pixel stays near the top of the range.
    source = load_digits().images[3]
    assert np.asarray(image).max() >= 0.8 * 255 * source.max() / 16


def test_digits_reused_not_rebuilt(digits_folder, monkeypatch):
    def fail(_folder):
        raise AssertionError("the digits folder was rebuilt")

    monkeypatch.setattr(digits, "_write_digits", fail)
    assert digits.build_digits(digits_folder) == digits_folder


def test_digits_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def write_half(folder):
        (folder / "train" / "0").mkdir(parents=True)
        (folder / "train" / "0" / "0000.png").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "_write_digits", write_half)
    with pytest.raises(KeyboardInterrupt):
        digits.build_digits(tmp_path / "digits")

    assert list(tmp_path.iterdir()) == []


def test_digits_rejects_foreign_folder(tmp_path):
    (tmp_path / "digits" / "train").mkdir(parents=True)

    with pytest.raises(digits.DigitsError, match="not a complete digits build"):
        digits.build_digits(tmp_path / "digits")


def test_digits_cache_from_environment(digits_folder, monkeypatch):
    monkeypatch.setenv("PRENAS_CACHE", str(digits_folder.parent))

    assert digits.default_cache_dir() == digits_folder.parent
    dataset, num_classes = build_dataset(False, parse_args())
    assert num_classes == 10
    assert dataset.root == digits_folder / "val"


def test_digits_data_path_option(digits_folder):
    dataset, num_classes = build_dataset(True, parse_args("--data-path", str(digits_folder)))

    assert num_classes == 10
    assert len(dataset) == 1501


def test_build_digits_command(tmp_path, capsys):
    assert datasets.main(["--build-digits", "--data-path", str(tmp_path / "digits")]) == 0

    assert (tmp_path / "digits" / "digits.json").is_file()
    assert "digits dataset ready" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Transforms


def test_eval_transform_small_is_to_tensor_normalize():
    image = random_image((32, 32), seed=3)
    transform = build_transform(False, parse_args("--input-size", "32"))

    assert torch.allclose(transform(image), manual_to_tensor_normalize(image), atol=1e-6)


def test_eval_transform_resizes_and_crops():
    image = random_image((300, 200), seed=4)
    transform = build_transform(False, parse_args("--input-size", "64"))

    resize = int(64 * 256 / 224)  # 73: shorter side 200 -> 73, longer side 300 -> 109
    resized = image.resize((int(resize * 300 / 200), resize), Image.Resampling.BICUBIC)
    left = int(round((resized.width - 64) / 2.0))
    top = int(round((resized.height - 64) / 2.0))
    expected = manual_to_tensor_normalize(resized.crop((left, top, left + 64, top + 64)))

    output = transform(image)
    assert output.shape == (3, 64, 64)
    assert torch.allclose(output, expected, atol=1e-5)


@pytest.mark.parametrize("crops", [5, 10])
def test_eval_multi_crop_shape(crops):
    image = random_image((80, 80), seed=5)
    transform = build_transform(False, parse_args("--input-size", "64", "--eval-crops", str(crops)))

    output = transform(image)
    assert output.shape == (crops, 3, 64, 64)

    resized = image.resize((73, 73), Image.Resampling.BICUBIC)
    assert torch.allclose(output[0], manual_to_tensor_normalize(resized.crop((0, 0, 64, 64))), atol=1e-5)


def test_eval_crops_need_large_input():
    with pytest.raises(DataError, match="--eval-crops 5 needs --input-size above 32"):
        build_transform(False, parse_args("--input-size", "32", "--eval-crops", "5"))


def test_average_crop_logits():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 7))
    images = torch.randn(2, 5, 3, 4, 4)

    expected = torch.stack([torch.stack([model(crop[None])[0] for crop in sample]).mean(0) for sample in images])
    assert torch.allclose(average_crop_logits(model, images), expected, atol=1e-6)
    assert torch.equal(average_crop_logits(model, images[:, 0]), model(images[:, 0]))


def test_train_transform_small_is_padded_crop():
    image = random_image((32, 32), seed=6)
    args = parse_args("--input-size", "32", "--aa", "none", "--color-jitter", "0", "--reprob", "0")
    transform = build_transform(True, args)

    # Brute force: each output must equal a 32x32 window of the image padded by 4 zero pixels,
    # possibly flipped, and different draws must pick different windows.
    padded = np.zeros((40, 40, 3), dtype=np.uint8)
    padded[4:36, 4:36] = np.asarray(image)
    windows = {}
    for top in range(9):
        for left in range(9):
            window = Image.fromarray(padded[top:top + 32, left:left + 32])
            windows[(top, left, False)] = manual_to_tensor_normalize(window)
            windows[(top, left, True)] = manual_to_tensor_normalize(window.transpose(Image.Transpose.FLIP_LEFT_RIGHT))

    torch.manual_seed(1)
    found = set()
    for _ in range(12):
        output = transform(image)
        assert output.shape == (3, 32, 32)
        matches = [key for key, expected in windows.items() if torch.allclose(output, expected, atol=1e-5)]
        assert matches, "output is not a window of the padded image"
        found.update(matches)
    assert len({(top, left) for top, left, _ in found}) > 3
    assert {flipped for _, _, flipped in found} == {False, True}


def test_train_transform_hflip_zero_never_flips():
    # An asymmetric image: its mirror image differs from every unflipped window.
    image = random_image((32, 32), seed=8)
    args = parse_args("--input-size", "32", "--aa", "none", "--color-jitter", "0", "--reprob", "0", "--hflip", "0")
    transform = build_transform(True, args)
    names = [type(step).__name__ for step in transform.transforms]
    assert "RandomHorizontalFlip" not in names

    padded = np.zeros((40, 40, 3), dtype=np.uint8)
    padded[4:36, 4:36] = np.asarray(image)
    unflipped = [
        manual_to_tensor_normalize(Image.fromarray(padded[top:top + 32, left:left + 32]))
        for top in range(9)
        for left in range(9)
    ]
    torch.manual_seed(2)
    for _ in range(12):
        output = transform(image)
        assert any(torch.allclose(output, window, atol=1e-5) for window in unflipped)


def test_train_transform_large_hflip_option():
    for probability in (0.0, 0.3):
        transform = build_transform(True, parse_args("--input-size", "64", "--hflip", str(probability)))
        flips = [step for step in transform.transforms if type(step).__name__ == "RandomHorizontalFlip"]
        if probability == 0.0:
            assert flips == []
        else:
            assert flips[0].p == probability


def test_train_transform_crop_padding_zero_is_identity_crop():
    image = random_image((32, 32), seed=9)
    args = parse_args("--input-size", "32", "--aa", "none", "--color-jitter", "0", "--reprob", "0",
                      "--hflip", "0", "--crop-padding", "0")
    transform = build_transform(True, args)
    names = [type(step).__name__ for step in transform.transforms]
    assert "RandomCrop" not in names
    assert torch.allclose(transform(image), manual_to_tensor_normalize(image), atol=1e-6)


def test_train_transform_large_uses_resized_crop():
    transform = build_transform(True, parse_args("--input-size", "64"))
    names = [type(step).__name__ for step in transform.transforms]

    assert names[0] == "RandomResizedCropAndInterpolation"
    assert "RandAugment" in names
    assert "RandomErasing" in names
    assert transform(random_image((90, 70))).shape == (3, 64, 64)


def test_train_transform_small_keeps_augment_flags():
    transform = build_transform(True, parse_args("--input-size", "32", "--reprob", "0.5", "--recount", "2"))
    names = [type(step).__name__ for step in transform.transforms]

    assert names[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert "RandAugment" in names
    erasing = transform.transforms[-1]
    assert type(erasing).__name__ == "RandomErasing"
    assert erasing.probability == 0.5
    assert erasing.max_count == 2


def test_invalid_auto_augment():
    with pytest.raises(DataError, match="--aa 'bogus'"):
        build_transform(True, parse_args("--aa", "bogus"))


def test_invalid_reprob_option():
    with pytest.raises(SystemExit):
        parse_args("--reprob", "1.5")


# ---------------------------------------------------------------------------------------------
# Folder datasets


def test_folder_class_count_and_order(tmp_path):
    make_folder(tmp_path, {"cat": 2, "ant": 3, "bee": 1}, "train")
    make_folder(tmp_path, {"cat": 1, "ant": 1, "bee": 1}, "val")

    dataset, num_classes = build_dataset(True, parse_args("--data-set", "FOLDER", "--data-path", str(tmp_path)))
    assert num_classes == 3
    assert dataset.classes == ["ant", "bee", "cat"]
    assert dataset.targets == [0, 0, 0, 1, 2, 2]

    image, target = dataset[5]
    assert target == 2
    assert image.shape == (3, 32, 32)


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "imagenet"

    with pytest.raises(DataError) as caught:
        build_dataset(True, parse_args("--data-set", "FOLDER", "--data-path", str(missing)))
    assert str(missing) in str(caught.value)
    assert "DATA/train/<class>/<image>" in str(caught.value)


def test_missing_data_path_option():
    with pytest.raises(DataError, match="needs --data-path"):
        build_dataset(True, parse_args("--data-set", "IMNET"))


def test_empty_data_folder(tmp_path):
    (tmp_path / "train").mkdir()

    with pytest.raises(DataError) as caught:
        build_dataset(True, parse_args("--data-set", "FOLDER", "--data-path", str(tmp_path)))
    assert "no class folders" in str(caught.value)
    assert str(tmp_path / "train") in str(caught.value)


def test_class_folder_without_images(tmp_path):
    make_folder(tmp_path, {"a": 1}, "train")
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")

    with pytest.raises(DataError, match=r"class folder .*b contains no images"):
        ImageFolderDataset(tmp_path / "train")


def test_split_class_mismatch(tmp_path):
    make_folder(tmp_path, {"a": 1, "b": 1}, "train")
    make_folder(tmp_path, {"a": 1, "c": 1}, "val")

    with pytest.raises(DataError, match=r"only in train/: \['b'\], only in val/: \['c'\]"):
        build_dataset(False, parse_args("--data-set", "FOLDER", "--data-path", str(tmp_path)))


def test_imagenet_needs_1000_classes(tmp_path):
    make_folder(tmp_path, {"n01": 1, "n02": 1}, "train")

    with pytest.raises(DataError, match="has 2 class folders but ImageNet has 1000; use --data-set FOLDER"):
        build_dataset(True, parse_args("--data-set", "IMNET", "--data-path", str(tmp_path)))


def test_corrupt_image_names_path(tmp_path):
    make_folder(tmp_path, {"a": 2}, "train")
    corrupt = tmp_path / "train" / "a" / "img000.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset = ImageFolderDataset(tmp_path / "train")

    with pytest.raises(DataError) as caught:
        dataset[0]
    assert str(corrupt) in str(caught.value)
    assert "--skip-corrupt" in str(caught.value)


def test_truncated_image_names_path(tmp_path):
    make_folder(tmp_path, {"a": 1}, "train", size=(64, 64))
    truncated = tmp_path / "train" / "a" / "img000.png"
    truncated.write_bytes(truncated.read_bytes()[:200])

    with pytest.raises(DataError, match=str(truncated)):
        ImageFolderDataset(tmp_path / "train")[0]


def test_skip_corrupt_counts(tmp_path, caplog):
    make_folder(tmp_path, {"a": 3, "b": 2}, "train")
    make_folder(tmp_path, {"a": 1, "b": 1}, "val")
    for name in ("a/img000.png", "a/img001.png"):
        (tmp_path / "train" / name).write_bytes(b"garbage")
    args = parse_args("--data-set", "FOLDER", "--data-path", str(tmp_path), "--skip-corrupt")
    dataset, _ = build_dataset(True, args)

    with caplog.at_level(logging.WARNING, logger="lib.datasets"):
        items = [dataset[index] for index in range(len(dataset))]

    assert len(items) == len(dataset) == 5
    assert [target for _, target in items] == [0, 0, 0, 1, 1]
    assert dataset.skipped == {str(tmp_path / "train" / name) for name in ("a/img000.png", "a/img001.png")}
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "2 image(s) skipped" in warnings[-1]


def test_dataset_pickles_for_workers(digits_folder):
    dataset, _ = build_dataset(False, parse_args("--data-path", str(digits_folder)))
    copy = pickle.loads(pickle.dumps(dataset))

    assert torch.equal(copy[7][0], dataset[7][0])
    train, _ = build_dataset(True, parse_args("--data-path", str(digits_folder)))
    assert pickle.loads(pickle.dumps(train))[0][0].shape == (3, 32, 32)


def test_dataset_in_worker_process(digits_folder):
    dataset, _ = build_dataset(False, parse_args("--data-path", str(digits_folder)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=1)

    images, targets = next(iter(loader))
    assert images.shape == (8, 3, 32, 32)
    assert torch.equal(images[3], dataset[3][0])
    assert targets.tolist() == dataset.targets[:8]


# ---------------------------------------------------------------------------------------------
# Subsets


def test_subset_is_deterministic(tmp_path):
    make_folder(tmp_path, {"a": 12, "b": 7, "c": 9}, "train")
    first = ImageFolderDataset(tmp_path / "train", images_per_class=5)
    second = ImageFolderDataset(tmp_path / "train", images_per_class=5)

    assert first.file_list() == second.file_list()
    assert np.bincount(first.targets).tolist() == [5, 5, 5]


def test_subset_ignores_other_classes(tmp_path):
    make_folder(tmp_path, {"a": 12, "b": 7}, "train")
    before = ImageFolderDataset(tmp_path / "train", images_per_class=4).file_list()
    make_folder(tmp_path, {"c": 3}, "train")
    after = ImageFolderDataset(tmp_path / "train", images_per_class=4).file_list()

    assert [line for line in after if line.startswith(("a/", "b/"))] == before


def test_subset_is_not_first_files(tmp_path):
    make_folder(tmp_path, {"a": 40}, "train")
    subset = ImageFolderDataset(tmp_path / "train", images_per_class=5).file_list()

    assert subset != [f"a/img{index:03d}.png 0" for index in range(5)]


def test_subset_short_class_keeps_all(tmp_path, caplog):
    make_folder(tmp_path, {"a": 2, "b": 6}, "train")

    with caplog.at_level(logging.WARNING, logger="lib.datasets"):
        dataset = ImageFolderDataset(tmp_path / "train", images_per_class=4)
    assert np.bincount(dataset.targets).tolist() == [2, 4]
    assert "fewer than 4 images" in caplog.text


def test_subset_file_list_written(tmp_path):
    make_folder(tmp_path / "data", {"a": 6, "b": 6}, "train")
    output_dir = tmp_path / "output"
    args = parse_args("--data-set", "FOLDER", "--data-path", str(tmp_path / "data"), "--subset-per-class", "3",
                      "--output_dir", str(output_dir))

    dataset, _ = build_dataset(True, args)
    lines = (output_dir / "train_subset.txt").read_text().splitlines()
    assert lines[0] == f"# root: {tmp_path / 'data' / 'train'}"
    assert lines[1:] == dataset.file_list()
    assert len(dataset) == 6
    assert all((tmp_path / "data" / "train" / line.split()[0]).is_file() for line in lines[1:])


def test_subset_only_on_train_split(tmp_path):
    make_folder(tmp_path, {"a": 6}, "train")
    make_folder(tmp_path, {"a": 6}, "val")
    args = parse_args("--data-set", "FOLDER", "--data-path", str(tmp_path), "--subset-per-class", "2")

    assert len(build_dataset(True, args)[0]) == 2
    assert len(build_dataset(False, args)[0]) == 6


def test_evo_imnet_default_subset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "IMAGENET_CLASSES", 2)
    monkeypatch.setattr(datasets, "EVO_IMNET_IMAGES_PER_CLASS", 3)
    make_folder(tmp_path, {"n01": 5, "n02": 4}, "train")

    dataset, num_classes = build_dataset(True, parse_args("--data-set", "EVO_IMNET", "--data-path", str(tmp_path)))
    assert num_classes == 2
    assert np.bincount(dataset.targets).tolist() == [3, 3]


# ---------------------------------------------------------------------------------------------
# CIFAR


def test_cifar_missing_needs_download(tmp_path):
    with pytest.raises(DataError) as caught:
        build_dataset(True, parse_args("--data-set", "CIFAR10", "--data-path", str(tmp_path)))
    assert "--download" in str(caught.value)
    assert "cifar-10-batches-py" in str(caught.value)


def test_cifar_rejects_subset(tmp_path):
    with pytest.raises(DataError, match="--subset-per-class works with the folder datasets"):
        build_dataset(True, parse_args("--data-set", "CIFAR100", "--data-path", str(tmp_path),
                                       "--subset-per-class", "5"))


def test_recipe_randaugment_never_crashes():
    # The training recipe's policy at magnitude 10 requests posterize with 0 bits; some Pillow
    # releases reject that, so every operation of the policy is applied many times here.
    args = parse_args("--input-size", "32", "--aa", "rand-n3-m10-mstd0.5-inc1", "--reprob", "0")
    transform = build_transform(True, args)
    torch.manual_seed(0)
    random.seed(0)
    for seed in range(300):
        output = transform(random_image(seed=seed))
        assert output.shape == (3, 32, 32)
