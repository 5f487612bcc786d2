"""evaluate.py: reference logits, outputs, exact distributed evaluation and input errors."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset

from lib.config import load_space
from lib.correlation import kendall_tau, spearman_rho
from lib.datasets import build_dataset
from lib.results import load_results
from model.subnet import load_subnet
from model.supernet import Supernet

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "prenas-compat"
SCRIPT = REPO_ROOT / "evaluate.py"

# A module name that no installed package uses, so that the repository's script is the one imported.
_spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
evaluate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_script)

REFERENCE = torch.load(FIXTURE / "reference.pt", weights_only=True)
VALIDATION_IMAGES = 23  # odd, so that two processes get shards of different sizes
NUM_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run these small models on one thread, which is faster than two when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fixture_flags(*extra: str) -> list[str]:
    """Flags of the fixture's supernet: 32x32 input, patch 8, class token (no --gp)."""
    return [
        "--cfg", str(FIXTURE / "supernet.yaml"),
        "--resume", str(FIXTURE / "supernet.pth"),
        "--input-size", "32", "--patch_size", "8",
        "--change_qkv", "--relative_position",
        "--device", "cpu", "--num_workers", "0",
        *extra,
    ]


def write_image_folder(root: Path, classes: int, images: int, seed: int = 0) -> Path:
    """Write ``images`` random 32x32 PNG files into ``root/val/<class>/``, classes in turn."""
    rng = np.random.default_rng(seed)
    for index in range(images):
        folder = root / "val" / f"class_{index % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), NUM_CLASSES, VALIDATION_IMAGES)


def interval_file(path: Path, mapping: dict) -> Path:
    path.write_text(json.dumps(mapping), encoding="utf-8")
    return path


@pytest.fixture()
def candfile(tmp_path) -> Path:
    """The fixture's four configs under three intervals, listed out of numeric order."""
    configs = REFERENCE["configs"]
    return interval_file(tmp_path / "cands.json", {"1.0": [configs[0]], "0.5": [configs[2]], "2.0": [configs[1], configs[3]]})


def file_order_configs() -> list[tuple[str, dict]]:
    configs = REFERENCE["configs"]
    return [("1.0", configs[0]), ("0.5", configs[2]), ("2.0", configs[1]), ("2.0", configs[3])]


def run_main(argv: list[str]) -> int:
    return evaluate_script.main(argv)


def test_supernet_logits_match_reference():
    args = evaluate_script.get_args_parser().parse_args(fixture_flags())
    model = evaluate_script.load_supernet(args, load_space(args.cfg).supernet)
    assert model.num_classes == NUM_CLASSES

    for config, expected, n_parameters in zip(REFERENCE["configs"], REFERENCE["logits"], REFERENCE["n_parameters"]):
        model.set_subnet(config)
        with torch.no_grad():
            logits = model(REFERENCE["images"])
        assert (logits - expected).abs().max().item() < 1e-4
        assert model.num_params(config) == n_parameters


def test_evaluate_candidate_metrics_match_reference():
    args = evaluate_script.get_args_parser().parse_args(fixture_flags())
    model = evaluate_script.load_supernet(args, load_space(args.cfg).supernet)
    images = REFERENCE["images"]
    targets = torch.arange(images.shape[0]) % NUM_CLASSES
    loader = torch.utils.data.DataLoader(TensorDataset(images, targets), batch_size=3)

    for config, reference_logits in zip(REFERENCE["configs"], REFERENCE["logits"]):
        metrics = evaluate_script.evaluate_candidate(model, config, loader, torch.device("cpu"), expected_count=8)
        expected_top1 = 100.0 * (reference_logits.argmax(dim=1) == targets).float().mean().item()
        expected_top5 = 100.0 * (reference_logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean().item()
        assert metrics["count"] == 8
        assert metrics["acc1"] == pytest.approx(expected_top1)
        assert metrics["acc5"] == pytest.approx(expected_top5)
        assert metrics["loss"] == pytest.approx(F.cross_entropy(reference_logits, targets).item(), abs=1e-5)


def brute_force_metrics(model: Supernet, dataset, candidate: dict) -> tuple[float, float, float]:
    model.set_subnet(candidate)
    logits, targets = [], []
    with torch.no_grad():
        for index in range(len(dataset)):
            image, target = dataset[index]
            logits.append(model(image[None])[0])
            targets.append(target)
    logits = torch.stack(logits)
    targets = torch.tensor(targets)
    top1 = 100.0 * (logits.argmax(dim=1) == targets).float().mean().item()
    top5 = 100.0 * (logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean().item()
    return top1, top5, F.cross_entropy(logits, targets).item()


def test_outputs_round_trip(tmp_path, data_root, candfile):
    output_dir = tmp_path / "eval"
    export_dir = tmp_path / "subnets"
    scores_path = tmp_path / "scores.jsonl"
    score_of = {0: 5.0, 1: 1.0, 2: 3.0}  # candidate 3 has no proxy score
    scores_path.write_text("".join(
        json.dumps({"candidate": file_order_configs()[index][1], "num_params": 0.0, "flops": 0.0,
                    "score": score, "interval": None}) + "\n"
        for index, score in score_of.items()
    ))
    status = run_main(fixture_flags(
        "--data-set", "FOLDER", "--data-path", str(data_root), "--candfile", str(candfile), "--batch-size", "4",
        "--output_dir", str(output_dir), "--export-dir", str(export_dir), "--scores", str(scores_path),
    ))
    assert status == 0

    results = load_results(output_dir / "results.json")
    args = evaluate_script.get_args_parser().parse_args(fixture_flags("--data-set", "FOLDER", "--data-path", str(data_root)))
    model = evaluate_script.load_supernet(args, load_space(args.cfg).supernet)
    dataset, _ = build_dataset(False, args)
    assert len(results) == 4
    for index, (result, (interval, config)) in enumerate(zip(results, file_order_configs())):
        assert result["interval"] == interval
        assert result["config"] == model.check_candidate(config)
        assert result["n_parameters"] == model.num_params(config)
        assert result["flops"] == pytest.approx(model.flops(config) / 1e9)
        assert result["macs"] == model.macs(config)
        assert result["images"] == VALIDATION_IMAGES
        assert result["proxy_score"] == score_of.get(index)
        top1, top5, loss = brute_force_metrics(model, dataset, config)
        assert result["acc1"] == pytest.approx(top1)
        assert result["acc5"] == pytest.approx(top5)
        assert result["loss"] == pytest.approx(loss, abs=1e-5)

    correlation = json.loads((output_dir / "proxy_correlation.json").read_text())
    matched_acc1 = [results[index]["acc1"] for index in score_of]
    matched_params = [results[index]["n_parameters"] for index in score_of]
    assert correlation["matched"] == 3
    assert correlation["kendall_tau"] == kendall_tau(list(score_of.values()), matched_acc1)
    assert correlation["spearman_rho"] == spearman_rho(list(score_of.values()), matched_acc1)
    assert correlation["params_kendall_tau"] == kendall_tau(matched_params, matched_acc1)
    for result in results:
        assert result["proxy_kendall_tau"] == correlation["kendall_tau"]
        assert result["proxy_spearman_rho"] == correlation["spearman_rho"]
    assert (output_dir / "pareto.png").stat().st_size > 0

    exported = sorted(path.name for path in export_dir.iterdir())
    assert exported == ["00_interval-1.0", "01_interval-0.5", "02_interval-2.0", "03_interval-2.0"]
    subnet = load_subnet(export_dir / "03_interval-2.0")
    model.set_subnet(file_order_configs()[3][1])
    with torch.no_grad():
        assert torch.allclose(subnet(REFERENCE["images"]), model(REFERENCE["images"]), atol=1e-5)


def test_subnet_option_and_modes(tmp_path, data_root):
    config = REFERENCE["configs"][1]
    flags = fixture_flags("--data-set", "FOLDER", "--data-path", str(data_root))
    assert run_main(flags + ["--subnet", json.dumps(config), "--output_dir", str(tmp_path / "subnet")]) == 0
    assert [result["config"]["embed_dim"][0] for result in load_results(tmp_path / "subnet" / "results.json")] == [160]

    # A file with a list of candidates; inline JSON longer than a file name works too.
    subnet_file = tmp_path / "subnets.json"
    subnet_file.write_text(json.dumps(REFERENCE["configs"][:2]))
    assert run_main(flags + ["--subnet", str(subnet_file), "--output_dir", str(tmp_path / "file")]) == 0
    assert len(load_results(tmp_path / "file" / "results.json")) == 2
    padded = json.dumps(config, indent=40)
    assert len(padded) > 300
    assert run_main(flags + ["--subnet", padded, "--output_dir", str(tmp_path / "long")]) == 0

    # --eval, --dist-eval and --amp (on the CPU) are accepted for the reference's command lines.
    compatibility = ["--eval", "--dist-eval", "--amp"]
    assert run_main(flags + compatibility + ["--mode", "super", "--output_dir", str(tmp_path / "super")]) == 0
    largest = load_results(tmp_path / "super" / "results.json")
    assert len(largest) == 1
    assert largest[0]["config"]["layer_num"] == 3
    assert largest[0]["config"]["embed_dim"] == [192] * 3

    retrain_config = tmp_path / "retrain.yaml"
    retrain_config.write_text(
        (FIXTURE / "supernet.yaml").read_text()
        + "RETRAIN:\n  DEPTH: 2\n  EMBED_DIM: 128\n  NUM_HEADS: [3, 2]\n  MLP_RATIO: [3.0, 4.0]\n"
    )
    assert run_main(flags + ["--cfg", str(retrain_config), "--output_dir", str(tmp_path / "retrain")]) == 0
    retrain = load_results(tmp_path / "retrain" / "results.json")
    assert retrain[0]["n_parameters"] == REFERENCE["n_parameters"][0]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, data_root, candfile):
    flags = fixture_flags("--data-set", "FOLDER", "--data-path", str(data_root), "--candfile", str(candfile),
                          "--batch-size", "4")
    assert run_main(flags + ["--output_dir", str(tmp_path / "single")]) == 0

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               *flags, "--output_dir", str(tmp_path / "double")]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]

    single = load_results(tmp_path / "single" / "results.json")
    double = load_results(tmp_path / "double" / "results.json")
    assert len(double) == len(single)
    for one, two in zip(single, double):
        assert two["images"] == VALIDATION_IMAGES
        assert two["acc1"] == one["acc1"]
        assert two["acc5"] == one["acc5"]
        assert math.isclose(two["loss"], one["loss"], rel_tol=1e-6)
        assert two["config"] == one["config"]


# ---------------------------------------------------------------------------------------------
# Bad input: each is reported before any candidate is evaluated.


@pytest.fixture()
def no_evaluation(monkeypatch):
    """Fail the test if evaluate.py starts evaluating a candidate."""
    calls = []
    monkeypatch.setattr(evaluate_script, "evaluate_candidate", lambda *args, **kwargs: calls.append(args))
    yield calls
    assert calls == []


def expect_error(flags: list[str], output_dir: Path, caplog) -> str:
    status = run_main(flags + ["--output_dir", str(output_dir)])
    assert status == 2
    assert not (output_dir / "results.json").exists()
    return caplog.text


def test_missing_checkpoint(tmp_path, data_root, candfile, caplog, no_evaluation):
    flags = fixture_flags("--data-path", str(data_root), "--data-set", "FOLDER", "--candfile", str(candfile),
                          "--resume", str(tmp_path / "absent.pth"))
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert f"checkpoint {tmp_path / 'absent.pth'} not found" in text


def test_checkpoint_of_another_architecture(tmp_path, data_root, candfile, caplog, no_evaluation):
    other = Supernet(img_size=32, patch_size=8, num_classes=NUM_CLASSES, embed_dim=128, depth=2, num_heads=2,
                     mlp_ratio=4.0, relative_position=True, change_qkv=True)
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    flags = fixture_flags("--data-path", str(data_root), "--data-set", "FOLDER", "--candfile", str(candfile),
                          "--resume", str(path))
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert "2 blocks, embed dim 128" in text
    assert "depth 3, embed dim 192" in text
    assert "missing from the checkpoint" in text
    assert "blocks.2.attn.qkv.weight" in text
    assert "cls_token: checkpoint (1, 1, 128), model (1, 1, 192)" in text


def test_checkpoint_trained_with_gp(tmp_path, data_root, candfile, caplog, no_evaluation):
    checkpoint = torch.load(FIXTURE / "supernet.pth", weights_only=True)
    path = tmp_path / "with_args.pth"
    torch.save({**checkpoint, "args": {"gp": True, "change_qkv": True, "relative_position": True}}, path)
    flags = fixture_flags("--data-path", str(data_root), "--data-set", "FOLDER", "--candfile", str(candfile),
                          "--resume", str(path))
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert f"checkpoint {path} was trained with other supernet flags" in text
    assert "--gp in the checkpoint, no --gp here" in text


def test_config_supernet_differs_from_checkpoint(tmp_path, data_root, caplog, no_evaluation):
    deeper = tmp_path / "deeper.yaml"
    deeper.write_text((FIXTURE / "supernet.yaml").read_text().replace("DEPTH: 3", "DEPTH: 4"))
    flags = fixture_flags("--data-path", str(data_root), "--data-set", "FOLDER", "--mode", "super",
                          "--cfg", str(deeper))
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert "3 blocks" in text
    assert "depth 4" in text
    assert "the checkpoint has 3 blocks and the model 4" in text


def test_input_size_differs_from_checkpoint(tmp_path, data_root, caplog, no_evaluation):
    flags = fixture_flags("--data-path", str(data_root), "--data-set", "FOLDER", "--mode", "super",
                          "--patch_size", "4")
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert "pos_embed of 17 tokens" in text
    assert "(65 tokens)" in text


def test_candidate_outside_supernet(tmp_path, data_root, caplog, no_evaluation):
    too_deep = {"layer_num": 4, "embed_dim": [128] * 4, "mlp_ratio": [4.0] * 4, "num_heads": [2] * 4}
    path = interval_file(tmp_path / "cands.json", {"1.0": [REFERENCE["configs"][0]], "2.0": [too_deep]})
    flags = fixture_flags("--data-path", str(data_root), "--data-set", "FOLDER", "--candfile", str(path))
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert "interval '2.0', candidate 0" in text
    assert "layer_num=4" in text


def test_subnet_option_errors(tmp_path, data_root, candfile, caplog, no_evaluation):
    flags = fixture_flags("--data-path", str(data_root), "--data-set", "FOLDER")
    assert "is not valid JSON" in expect_error(flags + ["--subnet", "{layer_num"], tmp_path / "a", caplog)
    wide = {"layer_num": 1, "embed_dim": [256], "mlp_ratio": [4.0], "num_heads": [3]}
    assert "embed_dim=256" in expect_error(flags + ["--subnet", json.dumps(wide)], tmp_path / "b", caplog)
    both = flags + ["--subnet", json.dumps(REFERENCE["configs"][0]), "--candfile", str(candfile)]
    assert "either --candfile or --subnet" in expect_error(both, tmp_path / "c", caplog)
    assert "no RETRAIN section" in expect_error(flags, tmp_path / "d", caplog)
    missing = flags + ["--subnet", str(tmp_path / "absent.json")]
    assert f"--subnet file {tmp_path / 'absent.json'} cannot be read" in expect_error(missing, tmp_path / "e", caplog)
    assert "empty list" in expect_error(flags + ["--subnet", "[]"], tmp_path / "f", caplog)


def test_empty_validation_folder(tmp_path, candfile, caplog, no_evaluation):
    (tmp_path / "empty" / "val").mkdir(parents=True)
    flags = fixture_flags("--data-path", str(tmp_path / "empty"), "--data-set", "FOLDER", "--candfile", str(candfile))
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert f"no class folders in {tmp_path / 'empty' / 'val'}" in text


def test_dataset_with_more_classes_than_head(tmp_path, candfile, caplog, no_evaluation):
    root = write_image_folder(tmp_path / "data12", classes=12, images=12)
    flags = fixture_flags("--data-path", str(root), "--data-set", "FOLDER", "--candfile", str(candfile))
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert "has 12 classes" in text
    assert "has 10" in text


def test_missing_config_and_resume_flags(tmp_path, data_root, caplog, no_evaluation):
    flags = ["--data-path", str(data_root), "--data-set", "FOLDER", "--device", "cpu", "--mode", "super"]
    assert "--cfg is required" in expect_error(flags, tmp_path / "a", caplog)
    with_cfg = flags + ["--cfg", str(FIXTURE / "supernet.yaml")]
    assert "--resume is required" in expect_error(with_cfg, tmp_path / "b", caplog)


def test_candidate_rejected_without_change_qkv(tmp_path, data_root, candfile, caplog, no_evaluation):
    flags = [flag for flag in fixture_flags() if flag != "--change_qkv"]
    flags += ["--data-path", str(data_root), "--data-set", "FOLDER", "--candfile", str(candfile)]
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert "candidate 0 (interval 1.0) does not fit the supernet" in text
    assert "--change_qkv" in text


def test_help_leaves_out_training_options():
    parser = evaluate_script.get_args_parser()
    help_text = parser.format_help()
    parsed = parser.parse_args(["--aa", "none", "--reprob", "0", "--subset-per-class", "2"])

    for flag in ("--aa", "--reprob", "--hflip", "--color-jitter", "--subset-per-class"):
        assert flag not in help_text
    assert "--eval-crops" in help_text
    assert parsed.aa == "none"


def folder_snapshot(root: Path) -> dict[str, bytes | None]:
    """Return every path under ``root`` with its bytes (None for a folder)."""
    return {str(path.relative_to(root)): None if path.is_dir() else path.read_bytes() for path in root.rglob("*")}


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--output_dir", "{tmp}/file.txt/eval",
         "--output_dir {tmp}/file.txt/eval cannot be used: {tmp}/file.txt is not a folder"),
        ("--output_dir", "", "--output_dir is empty"),
        ("--export-dir", "{tmp}/old/results.json", "--export-dir {tmp}/old/results.json cannot be used: it is not a folder"),
        ("--export-dir", "{tmp}/file.txt/subnets",
         "--export-dir {tmp}/file.txt/subnets cannot be used: {tmp}/file.txt is not a folder"),
        ("--export-dir", "", "--export-dir is empty"),
    ],
    ids=["output-under-file", "output-empty", "export-is-file", "export-under-file", "export-empty"],
)
def test_bad_output_folder_rejected_before_loading(tmp_path, monkeypatch, caplog, no_evaluation, flag, value, message):
    (tmp_path / "file.txt").write_text("a file\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text("[]\n")
    before = folder_snapshot(tmp_path)

    def not_reached(*args, **kwargs):
        raise AssertionError("evaluate.py loaded data or the supernet before checking its output folders")

    monkeypatch.setattr(evaluate_script, "build_dataset", not_reached)
    monkeypatch.setattr(evaluate_script, "load_supernet", not_reached)
    flags = fixture_flags("--data-set", "FOLDER", "--data-path", str(tmp_path / "data"),
                          "--subnet", json.dumps(REFERENCE["configs"][0]), "--output_dir", str(tmp_path / "eval"))
    status = run_main(flags + [flag, value.format(tmp=tmp_path)])

    assert status == 2
    assert message.format(tmp=tmp_path) in caplog.text
    assert folder_snapshot(tmp_path) == before


def test_file_in_place_of_export_folder(tmp_path, monkeypatch, caplog, no_evaluation):
    (tmp_path / "subnets").mkdir()
    (tmp_path / "subnets" / "00").write_text("a file where the export of candidate 0 goes\n")
    monkeypatch.setattr(evaluate_script, "build_dataset", lambda *args: pytest.fail("data loaded"))
    flags = fixture_flags("--data-set", "FOLDER", "--data-path", str(tmp_path / "data"),
                          "--subnet", json.dumps(REFERENCE["configs"][0]), "--export-dir", str(tmp_path / "subnets"))
    text = expect_error(flags, tmp_path / "eval", caplog)
    assert f"--export-dir {tmp_path / 'subnets' / '00'} cannot be used: it is not a folder" in text
    assert (tmp_path / "subnets" / "00").read_text() == "a file where the export of candidate 0 goes\n"


def test_outputs_belong_to_the_last_finished_run(tmp_path, data_root, monkeypatch):
    output_dir = tmp_path / "eval"
    first, second = (json.dumps(config) for config in REFERENCE["configs"][:2])
    scores_path = tmp_path / "scores.jsonl"
    scores_path.write_text(json.dumps({"candidate": REFERENCE["configs"][0], "num_params": 0.0, "flops": 0.0,
                                       "score": 1.0, "interval": None}) + "\n")
    flags = fixture_flags("--data-set", "FOLDER", "--data-path", str(data_root), "--output_dir", str(output_dir))
    assert run_main(flags + ["--subnet", first, "--scores", str(scores_path)]) == 0
    assert (output_dir / "proxy_correlation.json").is_file()
    names = ("args.json", "results.json", "proxy_correlation.json")
    outputs = {name: (output_dir / name).read_bytes() for name in names}

    # A run that fails half-way leaves the outputs of the previous run as they were.
    def fail(*args, **kwargs):
        raise evaluate_script.EvaluationError("evaluation stopped")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_script, "evaluate_candidate", fail)
        assert run_main(flags + ["--subnet", second]) == 2
    for name, content in outputs.items():
        assert (output_dir / name).read_bytes() == content

    # A finished run without --scores removes the correlation of the earlier run.
    assert run_main(flags + ["--subnet", second]) == 0
    assert not (output_dir / "proxy_correlation.json").exists()
    args = json.loads((output_dir / "args.json").read_text())
    assert args["subnet"] == second
    assert args["scores"] is None
    assert load_results(output_dir / "results.json")[0]["config"] == REFERENCE["configs"][1]


def test_nan_weights_warned(tmp_path, data_root, caplog):
    checkpoint = torch.load(FIXTURE / "supernet.pth", weights_only=True)
    checkpoint["model"]["head.bias"] = torch.full_like(checkpoint["model"]["head.bias"], float("nan"))
    path = tmp_path / "nan.pth"
    torch.save(checkpoint, path)
    flags = fixture_flags("--data-set", "FOLDER", "--data-path", str(data_root), "--resume", str(path),
                          "--subnet", json.dumps(REFERENCE["configs"][0]), "--output_dir", str(tmp_path / "eval"))

    assert run_main(flags) == 0
    assert f"[1/1] subnet: the loss is nan, so the weights of {path} may contain NaN or Inf values" in caplog.text
