"""End-to-end tests of search.py and 01_zero_shot_search.sh on small search spaces, on CPU."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import search
from lib.checkpoint import save_checkpoint
from lib.choices import derive_preferred_space, write_preferred_space
from lib.config import PreferredSpace, SupernetConfig, load_interval_candidates, load_space
from lib.search import Choices, count_enumerated
from model.supernet import Supernet

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "experiments" / "supernet" / "supernet-demo.yaml"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "prenas-compat"
DEMO_SUPERNET = SupernetConfig(embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0)
DEMO_CHOICES = Choices(embed_dim=(96, 112, 128), depth=(3, 4), num_heads=(1, 2), mlp_ratio=(3.0, 3.5, 4.0))

# The demo space at 32x32 with a data-free gradient of 8 images: a search takes about a second.
DEMO_ARGS = [
    "--cfg", str(DEMO_CONFIG), "--input-size", "32", "--patch_size", "4", "--gp", "--change_qk",
    "--relative_position", "--device", "cpu", "--data-free", "--batch-size", "8", "--nb-classes", "10",
    "--min_param_limits", "0.3", "--param_limits", "0.9", "--param-interval", "0.1",
]


def environment(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_search(tmp_path, *extra, name="run", base=DEMO_ARGS):
    """Run search.py in this process and return the paths of its three outputs."""
    folder = tmp_path / name
    outputs = {
        "candidates": folder / "candidates.json",
        "scores": folder / "scores.jsonl",
        "choices": folder / "preferred.yaml",
    }
    code = search.main([
        *base,
        "--interval-cands-output", str(outputs["candidates"]),
        "--scores-output", str(outputs["scores"]),
        "--choices-output", str(outputs["choices"]),
        *map(str, extra),
    ])
    assert code == 0
    return outputs


def read_scores(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_supernet():
    return Supernet(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0,
                    gp=True, relative_position=True, change_qkv=True)


def test_outputs_load_and_agree(tmp_path, demo_supernet):
    outputs = run_search(tmp_path)

    candidates = load_interval_candidates(outputs["candidates"], DEMO_SUPERNET)
    scores = read_scores(outputs["scores"])
    space = load_space(outputs["choices"])

    assert list(candidates) == ["0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    assert len(scores) == count_enumerated(DEMO_CHOICES)
    assert isinstance(space, PreferredSpace)
    assert space.embed_dim == sorted({c["embed_dim"][0] for group in candidates.values() for c in group})
    for line in scores[::17]:
        assert line["num_params"] == demo_supernet.num_params(line["candidate"]) / 1e6
        assert line["flops"] == pytest.approx(demo_supernet.flops(line["candidate"]) / 1e9, rel=1e-12)
    for key, (best,) in candidates.items():
        members = [line for line in scores if line["interval"] == key]
        assert best["score"] == max(line["score"] for line in members)
        assert float(key) - 0.1 <= best["num_params"] < float(key)
    assert all(line["interval"] is None for line in scores if line["num_params"] < 0.3)


def test_same_seed_writes_identical_files(tmp_path):
    first = run_search(tmp_path, "--seed", "3", name="first")
    second = run_search(tmp_path, "--seed", "3", name="second")
    other = run_search(tmp_path, "--seed", "4", name="other")

    for kind in ("candidates", "scores", "choices"):
        assert first[kind].read_bytes() == second[kind].read_bytes(), kind
    assert first["scores"].read_bytes() != other["scores"].read_bytes()


def test_data_free_reads_no_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("PRENAS_CACHE", str(tmp_path / "cache"))
    run_search(tmp_path, "--data-set", "IMNET")
    assert not (tmp_path / "cache").exists()


def test_gradient_on_digits_data(tmp_path, caplog):
    with_data = [argument for argument in DEMO_ARGS if argument not in ("--data-free", "--nb-classes", "10")]
    outputs = run_search(tmp_path, "--data-set", "DIGITS", "--grad-batches", "2", "--aa", "none",
                         "--num_workers", "0", base=with_data)

    assert "mean over 2 batch(es)" in caplog.text
    assert load_interval_candidates(outputs["candidates"], DEMO_SUPERNET)


@pytest.mark.parametrize("mode", ["random", "evolution"])
def test_sampling_modes_write_valid_outputs(tmp_path, mode):
    outputs = run_search(tmp_path, "--search-mode", mode, "--population-num", "6", "--max-epochs", "2",
                         "--select-num", "3", "--mutation-num", "3", "--crossover-num", "3", "--reallocate")
    candidates = load_interval_candidates(outputs["candidates"], DEMO_SUPERNET)
    scores = read_scores(outputs["scores"])
    assert len({json.dumps(line["candidate"]) for line in scores}) == len(scores)
    assert set(candidates) <= {line["interval"] for line in scores}


def test_legacy_enumeration_skips_empty_middle_choice(tmp_path):
    outputs = run_search(tmp_path, "--legacy-enumeration")
    scores = read_scores(outputs["scores"])
    assert len(scores) == count_enumerated(DEMO_CHOICES, legacy=True)
    assert len(scores) < count_enumerated(DEMO_CHOICES)
    # With three mlp ratios, every candidate uses the middle ratio 3.5 in some layer.
    assert all(3.5 in line["candidate"]["mlp_ratio"] for line in scores)


def test_flops_constraint_bins_by_flops(tmp_path):
    outputs = run_search(tmp_path, "--constraint", "flops", "--min_param_limits", "0.02", "--param_limits", "0.06",
                         "--param-interval", "0.01")
    scores = read_scores(outputs["scores"])
    candidates = json.loads(outputs["candidates"].read_text())
    assert list(candidates) == ["0.03", "0.04", "0.05", "0.06"]
    for line in scores:
        if line["interval"] is not None:
            assert float(line["interval"]) - 0.01 <= line["flops"] < float(line["interval"])


def test_params_score_picks_largest_per_interval(tmp_path):
    outputs = run_search(tmp_path, "--score-method", "params", "--block-score-method-for-head", "deeper_is_better",
                         "--block-score-method-for-mlp", "deeper_is_better")
    scores = read_scores(outputs["scores"])
    for key, (best,) in json.loads(outputs["candidates"].read_text()).items():
        assert best["score"] == max(line["num_params"] for line in scores if line["interval"] == key)


def test_resume_scores_checkpoint_weights(tmp_path):
    common = ["--cfg", FIXTURE / "supernet.yaml", "--input-size", "32", "--patch_size", "8", "--change_qkv",
              "--relative_position", "--device", "cpu", "--data-free", "--batch-size", "4",
              "--min_param_limits", "0.3", "--param_limits", "1.3", "--param-interval", "0.5"]
    checkpoint = FIXTURE / "supernet.pth"
    fresh_output = tmp_path / "fresh.jsonl"
    resumed_output = tmp_path / "resumed.jsonl"

    fresh_arguments = [*common, "--nb-classes", "10", "--interval-cands-output", tmp_path / "fresh.json",
                       "--scores-output", fresh_output]
    resumed_arguments = [*common, "--resume", checkpoint, "--interval-cands-output", tmp_path / "resumed.json",
                         "--scores-output", resumed_output]
    assert search.main([str(argument) for argument in fresh_arguments]) == 0
    assert search.main([str(argument) for argument in resumed_arguments]) == 0

    fresh = [line["score"] for line in read_scores(fresh_output)]
    resumed = [line["score"] for line in read_scores(resumed_output)]
    assert len(fresh) == len(resumed)
    assert fresh != resumed
    assert load_interval_candidates(tmp_path / "resumed.json")


def test_resume_rejects_conflicting_class_count(tmp_path, caplog):
    code = search.main(["--cfg", str(FIXTURE / "supernet.yaml"), "--input-size", "32", "--patch_size", "8",
                        "--change_qkv", "--relative_position", "--device", "cpu", "--data-free",
                        "--resume", str(FIXTURE / "supernet.pth"), "--nb-classes", "1000",
                        "--interval-cands-output", str(tmp_path / "out.json")])
    assert code == 2
    assert "class counts disagree" in caplog.text
    assert "supernet.pth: 10" in caplog.text
    assert "make --nb-classes match the checkpoint or drop it" in caplog.text


def test_class_count_hint_without_nb_classes(tmp_path, caplog):
    model = Supernet(img_size=32, patch_size=4, num_classes=5, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0,
                     gp=True, relative_position=True, change_qkv=True)
    save_checkpoint({"model": model.state_dict()}, tmp_path / "five.pth")
    with_data = [argument for argument in DEMO_ARGS if argument not in ("--data-free", "--nb-classes", "10")]

    code = search.main([*with_data, "--data-set", "DIGITS", "--grad-batches", "1", "--aa", "none",
                        "--num_workers", "0", "--resume", str(tmp_path / "five.pth"),
                        "--interval-cands-output", str(tmp_path / "out.json")])

    assert code == 2
    assert "(the training set: 10, checkpoint" in caplog.text
    assert "resume from a checkpoint trained on this --data-set" in caplog.text
    assert "--nb-classes" not in caplog.text
    assert not (tmp_path / "out.json").exists()


def test_resume_reports_mismatched_checkpoint(tmp_path, caplog):
    model = Supernet(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_heads=1, mlp_ratio=2.0,
                     change_qkv=True, relative_position=True)
    save_checkpoint({"model": model.state_dict()}, tmp_path / "small.pth")
    code = search.main([*DEMO_ARGS, "--resume", str(tmp_path / "small.pth"),
                        "--interval-cands-output", str(tmp_path / "out.json")])
    assert code == 2
    assert "do not fit the supernet" in caplog.text


def test_rejects_preferred_space(tmp_path, caplog):
    candidate = {"layer_num": 3, "embed_dim": [96] * 3, "mlp_ratio": [3.0, 3.5, 4.0], "num_heads": [1, 2, 2]}
    preferred = tmp_path / "preferred.yaml"
    write_preferred_space(preferred, derive_preferred_space({"0.4": [candidate]}))
    arguments = [argument if argument != str(DEMO_CONFIG) else str(preferred) for argument in DEMO_ARGS]

    code = search.main([*arguments, "--interval-cands-output", str(tmp_path / "out.json")])

    assert code == 2
    assert "is a preferred space" in caplog.text
    assert "full search space" in caplog.text
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("arguments,message", [
    (["--param_limits", "0.2"], "no interval of width 0.1 M fits"),
    (["--min_param_limits", "2", "--param_limits", "3"], "no scored candidate falls into the intervals"),
    (["--grad-batches", "2"], "--grad-batches applies to the gradient on data"),
    (["--batch-size", "1", "--param-interval", "0"], "width must be positive"),
])
def test_invalid_settings_fail_with_message(tmp_path, caplog, arguments, message):
    code = search.main([*DEMO_ARGS, "--interval-cands-output", str(tmp_path / "out.json"), *arguments])
    assert code == 2
    assert message in caplog.text
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("outputs,message", [
    ({"--interval-cands-output": "out.json", "--scores-output": "out.json"},
     "--interval-cands-output and --scores-output both name"),
    ({"--interval-cands-output": "out.json", "--choices-output": "sub/../out.json"},
     "--interval-cands-output and --choices-output both name"),
    ({"--interval-cands-output": "c.json", "--output_dir": "logs", "--scores-output": "logs/run.log"},
     "--scores-output and the log file run.log in --output_dir both name"),
    ({"--interval-cands-output": "out.json", "--scores-output": "out.json/scores.jsonl"},
     "lies inside --interval-cands-output"),
])
def test_rejects_colliding_outputs(tmp_path, caplog, outputs, message):
    (tmp_path / "out.json").write_text("earlier run\n")
    arguments = [part for flag, name in outputs.items() for part in (flag, str(tmp_path / name))]

    code = search.main([*DEMO_ARGS, *arguments])

    assert code == 2
    assert message in caplog.text
    assert "data-free gradient" not in caplog.text
    assert (tmp_path / "out.json").read_text() == "earlier run\n"
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("flag,input_name", [("--choices-output", "space.yaml"), ("--scores-output", "supernet.pth")])
def test_rejects_output_over_input(tmp_path, caplog, flag, input_name):
    space = tmp_path / "space.yaml"
    space.write_bytes(DEMO_CONFIG.read_bytes())
    model = Supernet(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0,
                     gp=True, relative_position=True, change_qkv=True)
    save_checkpoint({"model": model.state_dict()}, tmp_path / "supernet.pth")
    checkpoint_bytes = (tmp_path / "supernet.pth").read_bytes()
    arguments = [argument if argument != str(DEMO_CONFIG) else str(space) for argument in DEMO_ARGS]

    code = search.main([*arguments, "--resume", str(tmp_path / "supernet.pth"),
                        "--interval-cands-output", str(tmp_path / "out.json"), flag, str(tmp_path / input_name)])

    assert code == 2
    flag_of_input = "--cfg" if input_name == "space.yaml" else "--resume"
    assert f"{flag} {tmp_path / input_name} is the {flag_of_input} input file" in caplog.text
    assert space.read_bytes() == DEMO_CONFIG.read_bytes()
    assert (tmp_path / "supernet.pth").read_bytes() == checkpoint_bytes
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("flag,name,problem", [
    ("--interval-cands-output", "afile/out.json", "afile is not a folder"),
    ("--interval-cands-output", "adir", "it is a folder, not a file"),
    ("--scores-output", "afile/sub/scores.jsonl", "afile is not a folder"),
    ("--scores-output", "adir", "it is a folder, not a file"),
    ("--choices-output", "afile/preferred.yaml", "afile is not a folder"),
    ("--choices-output", "adir", "it is a folder, not a file"),
    ("--output_dir", "afile", "it is not a folder"),
    ("--output_dir", "afile/logs", "afile is not a folder"),
])
def test_rejects_unwritable_output_before_search(tmp_path, caplog, flag, name, problem):
    (tmp_path / "afile").write_text("a file\n")
    (tmp_path / "adir").mkdir()
    outputs = {"--interval-cands-output": str(tmp_path / "out.json"), flag: str(tmp_path / name)}

    code = search.main([*DEMO_ARGS, *[part for pair in outputs.items() for part in pair]])

    assert code == 2
    assert f"{flag} {tmp_path / name} cannot" in caplog.text
    assert problem in caplog.text
    assert "choose another" in caplog.text
    assert "data-free gradient" not in caplog.text
    assert (tmp_path / "afile").read_text() == "a file\n"
    assert list((tmp_path / "adir").iterdir()) == []
    assert not (tmp_path / "out.json").exists()


def test_rejects_digits_data_path_under_file(tmp_path, caplog):
    (tmp_path / "afile").write_text("a file\n")
    with_data = [argument for argument in DEMO_ARGS if argument not in ("--data-free", "--nb-classes", "10")]

    code = search.main([*with_data, "--data-set", "DIGITS", "--data-path", str(tmp_path / "afile" / "digits"),
                        "--interval-cands-output", str(tmp_path / "out.json")])

    assert code == 2
    assert f"--data-path {tmp_path / 'afile' / 'digits'} cannot be created" in caplog.text
    assert "choose another --data-path" in caplog.text
    assert (tmp_path / "afile").read_text() == "a file\n"
    assert not (tmp_path / "out.json").exists()


def test_write_failure_is_one_line_error(tmp_path, caplog, monkeypatch):
    def full_disk(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(search, "write_text_atomic", full_disk)
    code = search.main([*DEMO_ARGS, "--interval-cands-output", str(tmp_path / "out.json"),
                        "--scores-output", str(tmp_path / "scores.jsonl")])

    assert code == 2
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert errors[0].exc_info is None
    assert f"cannot write --scores-output {tmp_path / 'scores.jsonl'}: No space left on device" in errors[0].message
    assert f"already wrote interval candidates to {tmp_path / 'out.json'}" in errors[0].message
    assert load_interval_candidates(tmp_path / "out.json", DEMO_SUPERNET)


def test_requires_change_qkv(tmp_path, caplog):
    arguments = [argument for argument in DEMO_ARGS if argument != "--change_qk"]
    assert search.main([*arguments, "--interval-cands-output", str(tmp_path / "out.json")]) == 2
    assert "pass --change_qkv" in caplog.text


def test_unknown_score_method_lists_choices(capsys):
    with pytest.raises(SystemExit):
        search.get_args_parser().parse_args([*DEMO_ARGS, "--score-method", "left_super_taylor7"])
    assert "left_super_taylor6" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """torchrun with two Gloo processes gives the scores of one process."""
    scores = {}
    for processes in (1, 2):
        output = tmp_path / f"scores-{processes}.jsonl"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(REPO_ROOT / "search.py"), *DEMO_ARGS, "--interval-cands-output",
                   str(tmp_path / f"candidates-{processes}.json"), "--scores-output", str(output)]
        result = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=REPO_ROOT,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        scores[processes] = read_scores(output)

    assert [line["candidate"] for line in scores[1]] == [line["candidate"] for line in scores[2]]
    np.testing.assert_allclose([line["score"] for line in scores[2]], [line["score"] for line in scores[1]],
                               rtol=1e-5)
    first = json.loads((tmp_path / "candidates-1.json").read_text())
    second = json.loads((tmp_path / "candidates-2.json").read_text())
    assert [[c["num_heads"] for c in group] for group in first.values()] == \
        [[c["num_heads"] for c in group] for group in second.values()]


@pytest.mark.slow
def test_shell_script_demo(tmp_path):
    """01_zero_shot_search.sh demo runs the digits gradient end to end and writes into OUTPUT_DIR."""
    output = tmp_path / "out"
    result = subprocess.run(["bash", str(REPO_ROOT / "01_zero_shot_search.sh"), "demo", "--grad-batches", "2",
                             "--batch-size", "16"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                            env=environment(OUTPUT_DIR=str(output), PYTHON=sys.executable))

    assert result.returncode == 0, result.stderr[-4000:]
    assert "search finished" in result.stderr
    assert "mean over 2 batch(es)" in result.stderr
    assert load_interval_candidates(output / "interval_cands.json", DEMO_SUPERNET)
    assert isinstance(load_space(output / "preferred_space.yaml"), PreferredSpace)
    assert len(read_scores(output / "scores.jsonl")) == count_enumerated(DEMO_CHOICES)
    assert (output / "run.log").exists()
    assert yaml.safe_load((output / "preferred_space.yaml").read_text())["SUPERNET"]["EMBED_DIM"] == 128


def test_shell_script_rejects_unknown_space(tmp_path):
    result = subprocess.run(["bash", str(REPO_ROOT / "01_zero_shot_search.sh"), "huge"], capture_output=True,
                            text=True, cwd=REPO_ROOT, env=environment(PYTHON=sys.executable))
    assert result.returncode == 2
    assert "choose tiny, small, base or demo" in result.stderr
