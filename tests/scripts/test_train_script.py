"""End-to-end tests of train.py on a small subset of the digits dataset, on CPU."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lib.checkpoint import CheckpointError, load_checkpoint_file

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "experiments" / "supernet" / "supernet-demo.yaml"

# Three candidates of the demo space (supernet embed 128, depth 4, 2 heads, mlp ratio 4).
CANDIDATES = {
    "0.4": [{"layer_num": 3, "embed_dim": [96] * 3, "mlp_ratio": [3.0, 3.0, 3.5], "num_heads": [1, 1, 2]}],
    "0.6": [{"layer_num": 4, "embed_dim": [112] * 4, "mlp_ratio": [3.5, 4.0, 3.5, 4.0], "num_heads": [2, 1, 2, 2]}],
    "0.9": [{"layer_num": 4, "embed_dim": [128] * 4, "mlp_ratio": [4.0] * 4, "num_heads": [2] * 4}],
}

COMMON_ARGS = [
    "--cfg", str(DEMO_CONFIG), "--input-size", "32", "--patch_size", "4", "--gp", "--change_qkv",
    "--relative_position", "--device", "cpu", "--num_workers", "0", "--aa", "none", "--print-freq", "2",
    "--no-tensorboard",
]


def environment():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def write_candidates(folder, mapping=CANDIDATES):
    path = Path(folder) / "candidates.json"
    path.write_text(json.dumps(mapping))
    return path


def run_train(arguments, *, check=True):
    command = [sys.executable, str(REPO_ROOT / "train.py"), *COMMON_ARGS, *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=REPO_ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def read_log(folder):
    return [json.loads(line) for line in (Path(folder) / "log.txt").read_text().splitlines()]


# Runs train.py under torchrun and saves each rank's final weights and the subnets it trained.
RANK_SPY = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import train

    models = []
    create = train.create_supernet

    def create_and_watch(*args, **kwargs):
        model = create(*args, **kwargs)
        trained = []
        model.register_forward_pre_hook(lambda module, inputs: trained.append(module.subnet) if module.training else None)
        models.append((model, trained))
        return model

    train.create_supernet = create_and_watch
    args = train.get_args_parser().parse_args(sys.argv[1:])
    code = train.main(args)
    rank = os.environ["RANK"]
    model, trained = models[0]
    torch.save(model.state_dict(), os.path.join(args.output_dir, f"weights-rank{rank}.pt"))
    with open(os.path.join(args.output_dir, f"subnets-rank{rank}.json"), "w") as handle:
        json.dump(trained, handle)
    sys.exit(code)
    """
)


@pytest.mark.slow
def test_two_processes_same_weights(tmp_path):
    spy = tmp_path / "spy.py"
    spy.write_text(RANK_SPY)
    output = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(spy),
        *COMMON_ARGS, "--candfile", str(write_candidates(tmp_path)), "--group-by-dim", "--epochs", "1",
        "--batch-size", "16", "--subset-per-class", "20", "--output_dir", str(output),
    ]

    result = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=REPO_ROOT, timeout=600)

    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = load_checkpoint_file(output / "checkpoint.pth")
    assert checkpoint["epoch"] == 0
    assert len(checkpoint["rng_states"]) == 2
    rank0 = torch.load(output / "weights-rank0.pt", weights_only=True)
    rank1 = torch.load(output / "weights-rank1.pt", weights_only=True)
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
        assert torch.equal(value, checkpoint["model"][key]), key
    subnets0 = json.loads((output / "subnets-rank0.json").read_text())
    subnets1 = json.loads((output / "subnets-rank1.json").read_text())
    # 200 images, 100 per process with repeated augmentation, batches of 16: 6 steps.
    assert len(subnets0) == 6
    assert subnets0 == subnets1
    allowed = [members[0] for members in CANDIDATES.values()]
    for subnet in subnets0:
        assert {key: subnet[key] for key in allowed[0]} in allowed
    log = read_log(output)
    assert [entry["epoch"] for entry in log] == [0]
    assert {"val_smallest_acc1", "val_smallest_acc5", "val_largest_acc1", "val_largest_acc5"} <= set(log[0])


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    candidates = write_candidates(tmp_path)
    arguments = [
        "--candfile", candidates, "--epochs", "3", "--batch-size", "16", "--subset-per-class", "8",
        "--deterministic", "--drop-path", "0.1", "--sandwich", "1", "--sched-on-updates", "--warmup-epochs", "1",
        "--lr", "4e-3", "--save-freq", "1",
    ]
    uninterrupted = tmp_path / "uninterrupted"
    resumed = tmp_path / "resumed"

    run_train([*arguments, "--output_dir", uninterrupted])
    run_train([*arguments, "--output_dir", resumed, "--resume", uninterrupted / "checkpoint-1.pth"])

    expected = load_checkpoint_file(uninterrupted / "checkpoint.pth")
    actual = load_checkpoint_file(resumed / "checkpoint.pth")
    assert expected["epoch"] == actual["epoch"] == 2
    for key, value in expected["model"].items():
        assert torch.equal(value, actual["model"][key]), key
    for key, value in expected["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], actual["optimizer"]["state"][key]["exp_avg"])
    assert expected["lr_scheduler"] == actual["lr_scheduler"]
    first_epoch = load_checkpoint_file(uninterrupted / "checkpoint-1.pth")["model"]
    assert any(not torch.equal(first_epoch[key], value) for key, value in expected["model"].items())
    expected_log = [(entry["epoch"], entry["train_loss"], entry["val_largest_loss"]) for entry in read_log(uninterrupted)]
    actual_log = [(entry["epoch"], entry["train_loss"], entry["val_largest_loss"]) for entry in read_log(resumed)]
    assert actual_log == expected_log[1:]


@pytest.mark.slow
def test_truncated_checkpoint_reported(tmp_path):
    output = tmp_path / "run"
    run_train([
        "--candfile", write_candidates(tmp_path), "--epochs", "1", "--batch-size", "16",
        "--subset-per-class", "4", "--save-freq", "1", "--output_dir", output, "--mixup", "0", "--cutmix", "0",
    ])
    latest = output / "checkpoint.pth"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 3])

    result = run_train(
        ["--candfile", write_candidates(tmp_path), "--epochs", "2", "--batch-size", "16", "--subset-per-class", "4",
         "--output_dir", output, "--auto-resume"],
        check=False,
    )

    assert result.returncode == 2
    assert f"checkpoint {latest} is corrupt or truncated" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(CheckpointError):
        load_checkpoint_file(latest)
    assert load_checkpoint_file(output / "checkpoint-1.pth")["epoch"] == 0


def test_new_run_keeps_earlier_checkpoint(tmp_path):
    output = tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"
    settings = ["--candfile", write_candidates(tmp_path), "--epochs", "1", "--batch-size", "16",
                "--subset-per-class", "4", "--mixup", "0", "--cutmix", "0"]
    arguments = [*settings, "--output_dir", output]
    run_train(arguments)
    run_train([*settings, "--output_dir", elsewhere])
    latest = output / "checkpoint.pth"
    data = latest.read_bytes()
    config = (output / "config.yaml").read_bytes()

    result = run_train(arguments, check=False)
    from_elsewhere = run_train([*arguments, "--resume", elsewhere / "checkpoint.pth"], check=False)

    assert result.returncode == 2
    assert f"{latest} exists from an earlier run; pass --auto-resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert from_elsewhere.returncode == 2
    assert f"{latest} exists from an earlier run" in from_elsewhere.stderr
    assert latest.read_bytes() == data
    assert (output / "config.yaml").read_bytes() == config


def test_resume_keeps_best_and_warns(tmp_path):
    output = tmp_path / "run"
    arguments = ["--candfile", write_candidates(tmp_path), "--batch-size", "16", "--subset-per-class", "4",
                 "--output_dir", output, "--mixup", "0", "--cutmix", "0"]
    run_train([*arguments, "--epochs", "1"])
    latest = output / "checkpoint.pth"
    checkpoint = load_checkpoint_file(latest)
    assert set(checkpoint["best_acc1"]) == {"smallest", "largest"}
    # A best top-1 that a few steps of training cannot reach, so only a restored value shows it.
    checkpoint["best_acc1"] = {"smallest": 99.5, "largest": 99.25}
    torch.save(checkpoint, latest)

    result = run_train([*arguments, "--epochs", "2", "--auto-resume", "--lr", "1e-3"])

    assert "belongs to a run of 1 epoch(s) and this run has --epochs 2" in result.stderr
    assert "was written with other settings (lr 0.0005 then, 0.001 now)" in result.stderr
    assert "(best acc1 99.25)" in result.stderr
    assert load_checkpoint_file(latest)["best_acc1"] == {"smallest": 99.5, "largest": 99.25}


def test_candidate_not_fitting_rejected(tmp_path):
    oversized = dict(CANDIDATES)
    oversized["0.6"] = [
        CANDIDATES["0.6"][0],
        {"layer_num": 4, "embed_dim": [192] * 4, "mlp_ratio": [4.0] * 4, "num_heads": [2] * 4},
    ]
    output = tmp_path / "run"

    result = run_train(
        ["--candfile", write_candidates(tmp_path, oversized), "--epochs", "1", "--output_dir", output],
        check=False,
    )

    assert result.returncode == 2
    assert "interval '0.6', candidate 1" in result.stderr
    assert "192" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (output / "log.txt").exists()
    assert not (output / "checkpoint.pth").exists()


def test_candidate_too_deep_rejected(tmp_path):
    deep = {"0.9": [{"layer_num": 5, "embed_dim": [128] * 5, "mlp_ratio": [4.0] * 5, "num_heads": [2] * 5}]}

    result = run_train(
        ["--candfile", write_candidates(tmp_path, deep), "--epochs", "1", "--output_dir", tmp_path / "run"],
        check=False,
    )

    assert result.returncode == 2
    assert "interval '0.9', candidate 0" in result.stderr
    assert "layer_num" in result.stderr


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--batch-size", "15"], "--batch-size must be even"),
        (["--sandwich", "-1"], "--sandwich must be 0"),
        (["--mode", "retrain"], "RETRAIN"),
        (["--mode", "retrain", "--subnet", "{not json"], "--subnet is not valid JSON"),
        (["--group-by-dim"], "need --candfile"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--amp-dtype", "float16"], "float16 autocast is not supported for CPU"),
        (["--resume", "missing.pth"], "missing.pth not found"),
        (["--cutmix-minmax", "0.5"], "--cutmix-minmax takes two box ratios MIN MAX"),
        (["--opt-betas", "0.9", "0.99", "0.999", "0.9"], "--opt-betas takes two or three values in [0, 1)"),
        (["--opt-betas", "0.9", "1.5"], "--opt-betas takes two or three values in [0, 1)"),
        (["--resume", "."], "--resume . is a directory; pass the file inside it"),
        (["--eval", "--auto-resume"], "--eval --auto-resume found no"),
    ],
)
def test_invalid_arguments_rejected(tmp_path, caplog, arguments, message):
    import train

    parsed = train.get_args_parser().parse_args(
        [*COMMON_ARGS, "--subset-per-class", "2", "--output_dir", str(tmp_path / "run"), "--epochs", "1", *arguments]
    )

    code = train.main(parsed)

    assert code == 2
    assert message in caplog.text


@pytest.mark.slow
def test_retrain_and_uniform_modes(tmp_path):
    subnet = CANDIDATES["0.6"][0]
    retrain = tmp_path / "retrain"
    uniform = tmp_path / "uniform"

    run_train([
        "--mode", "retrain", "--subnet", json.dumps(subnet), "--epochs", "1", "--batch-size", "16",
        "--subset-per-class", "4", "--output_dir", retrain, "--model-ema",
    ])
    run_train([
        "--epochs", "1", "--batch-size", "16", "--subset-per-class", "4", "--output_dir", uniform,
        "--sandwich", "1", "--no-sandwich-top",
    ])

    retrain_log = read_log(retrain)
    assert "val_subnet_acc1" in retrain_log[0]
    assert load_checkpoint_file(retrain / "checkpoint.pth")["model_ema"] is not None
    uniform_log = read_log(uniform)
    # The smallest and the largest subnet of the demo space.
    assert uniform_log[0]["val_smallest_params"] < uniform_log[0]["val_largest_params"]
    config = (uniform / "config.yaml").read_text()
    assert "sandwich: 1" in config
    assert "scaled_lr" in config


def test_demo_script_dry_run(tmp_path):
    env = environment()
    env.update(DRY_RUN="1", NPROC="2", MASTER_PORT="29777")

    result = subprocess.run(
        ["bash", str(REPO_ROOT / "02_one_shot_training.sh"), "tiny", "--epochs", "7"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    command = result.stdout
    for expected in (
        "--nproc_per_node 2", "--master_port 29777", "--epochs 500", "--warmup-epochs 20", "--batch-size 128",
        "--min-lr 1e-7", "--group-by-dim", "--group-by-depth", "--mixup-mode elem",
        "--aa rand-n3-m10-mstd0.5-inc1", "--recount 2", "--gp", "--change_qk", "--relative_position",
        "--mode super", "experiments/supernet/tiny.yaml", "interval_cands/tiny.json", "--epochs 7",
    ):
        assert expected in command


def test_demo_script_unknown_space():
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "02_one_shot_training.sh"), "huge"],
        capture_output=True, text=True, env=environment(), cwd=REPO_ROOT, timeout=60,
    )

    assert result.returncode == 2
    assert "tiny, small, base or demo" in result.stderr


@pytest.mark.slow
def test_finetune_other_input_size(tmp_path):
    source = tmp_path / "source"
    target = tmp_path / "target"
    candidates = write_candidates(tmp_path)
    run_train([
        "--candfile", candidates, "--epochs", "1", "--batch-size", "16", "--subset-per-class", "4",
        "--output_dir", source, "--mixup", "0", "--cutmix", "0",
    ])

    result = run_train([
        "--candfile", candidates, "--epochs", "1", "--batch-size", "16", "--subset-per-class", "4",
        "--output_dir", target, "--mixup", "0", "--cutmix", "0", "--input-size", "48",
        "--finetune", source / "checkpoint.pth",
    ])

    assert "interpolated pos_embed from a 8x8 to a 12x12 patch grid" in result.stderr
    source_weights = load_checkpoint_file(source / "checkpoint.pth")["model"]
    target_weights = load_checkpoint_file(target / "checkpoint.pth")["model"]
    assert target_weights["pos_embed"].shape == (1, 145, 128)
    assert source_weights["pos_embed"].shape == (1, 65, 128)


@pytest.mark.slow
def test_eval_only_writes_results(tmp_path):
    output = tmp_path / "run"
    candidates = write_candidates(tmp_path)
    run_train([
        "--candfile", candidates, "--epochs", "1", "--batch-size", "16", "--subset-per-class", "4",
        "--output_dir", output, "--mixup", "0", "--cutmix", "0",
    ])

    run_train([
        "--candfile", candidates, "--mode", "retrain", "--eval", "--resume", output / "checkpoint.pth",
        "--output_dir", tmp_path / "eval",
    ])

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    log = read_log(output)[0]
    assert len(results) == 3
    assert [entry["count"] for entry in results] == [296, 296, 296]
    assert results[0]["acc1"] == log["val_smallest_acc1"]
    assert results[-1]["acc1"] == log["val_largest_acc1"]
    assert results[0]["n_parameters"] < results[-1]["n_parameters"]


def test_nonfinite_loss_aborts(tmp_path, caplog):
    import train

    output = tmp_path / "run"
    parsed = train.get_args_parser().parse_args([
        *COMMON_ARGS, "--candfile", str(write_candidates(tmp_path)), "--epochs", "1", "--batch-size", "8",
        "--subset-per-class", "4", "--output_dir", str(output), "--lr", "1e36", "--max-nonfinite", "2",
        "--mixup", "0", "--cutmix", "0", "--warmup-epochs", "0",
    ])

    code = train.main(parsed)

    assert code == 1
    assert "non-finite for 2 consecutive steps" in caplog.text
    assert "--no-amp" in caplog.text
    assert str(output / "checkpoint.pth") in caplog.text


def test_interrupt_names_resume_command(tmp_path, caplog, monkeypatch):
    import train

    output = tmp_path / "run"
    parsed = train.get_args_parser().parse_args([*COMMON_ARGS, "--output_dir", str(output), "--epochs", "1"])

    def interrupted_run(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted_run)
    without_checkpoint = train.main(parsed)
    (output / "checkpoint.pth").write_bytes(b"")
    with_checkpoint = train.main(parsed)

    assert without_checkpoint == 130
    assert with_checkpoint == 130
    assert "training interrupted; to continue it, restart the run, because no checkpoint was written yet" in caplog.text
    assert f"resume with --resume {output / 'checkpoint.pth'}" in caplog.text


@pytest.mark.parametrize(
    "arguments",
    [["--clip-grad", "-1"], ["--clip-grad", "0"], ["--smoothing", "1.5"], ["--drop", "2"], ["--drop-path", "5"],
     ["--patch_size", "0"], ["--mixup", "-1"], ["--model-ema-decay", "2"]],
)
def test_out_of_range_flags_rejected(arguments, capsys):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.get_args_parser().parse_args([*COMMON_ARGS, *arguments])

    assert exit_info.value.code == 2
    assert f"argument {arguments[0]}" in capsys.readouterr().err


def test_resume_and_finetune_together_rejected(tmp_path, caplog):
    import train

    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"")
    parsed = train.get_args_parser().parse_args(
        [*COMMON_ARGS, "--output_dir", str(tmp_path / "run"), "--resume", str(checkpoint), "--finetune", str(checkpoint)]
    )

    assert train.main(parsed) == 2
    assert "pass one of them" in caplog.text


@pytest.mark.parametrize("kind", ["empty", "under_a_file"])
def test_unusable_output_dir_rejected(tmp_path, caplog, monkeypatch, kind):
    import train

    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output_dir = "" if kind == "empty" else str(blocker / "run")
    parsed = train.get_args_parser().parse_args([*COMMON_ARGS, "--output_dir", output_dir, "--epochs", "1"])

    assert train.main(parsed) == 2
    expected = "--output_dir is empty" if kind == "empty" else f"--output_dir {output_dir} cannot be used: {blocker} is not a folder"
    assert expected in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]


def test_finetune_used_when_auto_resume_finds_nothing(tmp_path, caplog, monkeypatch):
    import train

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    loaded = []

    def record_and_stop(model, path):
        loaded.append(path)
        raise train.UsageError("stopped after loading the fine-tuning weights")

    monkeypatch.setattr(train, "load_finetune_weights", record_and_stop)
    parsed = train.get_args_parser().parse_args(
        [*COMMON_ARGS, "--output_dir", str(tmp_path / "run"), "--finetune", str(weights), "--auto-resume",
         "--subset-per-class", "2", "--epochs", "1"]
    )

    assert train.main(parsed) == 2
    assert loaded == [str(weights)]
