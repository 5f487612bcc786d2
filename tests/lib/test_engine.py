import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lib.distributed import ShardSampler, cleanup, init_distributed
from lib.engine import NonFiniteLossError, NonFiniteTracker, evaluate, train_one_epoch
from lib.sampling import FixedSampler, PreferredSampler, SandwichSampler
from model.supernet import Supernet

NUM_CLASSES = 7


def make_supernet():
    torch.manual_seed(0)
    return Supernet(
        img_size=16, patch_size=8, num_classes=NUM_CLASSES, embed_dim=128, depth=2, num_heads=2,
        mlp_ratio=2.0, relative_position=True, change_qkv=True, gp=True, drop_path_rate=0.0,
    )


def small_candidate(heads=1, ratio=1.0, depth=1, embed=64):
    return {"layer_num": depth, "embed_dim": [embed] * depth, "mlp_ratio": [ratio] * depth, "num_heads": [heads] * depth}


CANDIDATES = [small_candidate(), small_candidate(heads=2, depth=2, embed=96), small_candidate(heads=2, ratio=2.0, depth=2, embed=128)]


def make_data(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 16, 16, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
    return images, targets


class CropModel(nn.Module):
    """Linear classifier whose logits depend on the crop, to test crop averaging."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(3 * 16 * 16, NUM_CLASSES)

    def forward(self, images):
        return self.linear(images.flatten(1))


def brute_force_metrics(model, images, targets):
    with torch.no_grad():
        logits = model.eval()(images)
    ranked = logits.argsort(dim=1, descending=True)
    acc1 = (ranked[:, 0] == targets).sum().item() * 100 / len(targets)
    acc5 = (ranked[:, :5] == targets[:, None]).any(dim=1).sum().item() * 100 / len(targets)
    loss = nn.functional.cross_entropy(logits, targets).item()
    return acc1, acc5, loss


def test_evaluate_matches_brute_force():
    model = make_supernet()
    model.set_subnet(CANDIDATES[1])
    images, targets = make_data(37)
    loader = DataLoader(TensorDataset(images, targets), batch_size=8)

    stats = evaluate(model, loader, torch.device("cpu"), expected_count=37)
    acc1, acc5, loss = brute_force_metrics(model, images, targets)

    assert stats["count"] == 37
    assert stats["acc1"] == pytest.approx(acc1, abs=1e-9)
    assert stats["acc5"] == pytest.approx(acc5, abs=1e-9)
    assert stats["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0 < stats["acc5"] < 100


def test_evaluate_averages_crops():
    model = CropModel()
    images, targets = make_data(10)
    crops = torch.stack([images, images.flip(-1), images * 0.5], dim=1)
    loader = DataLoader(TensorDataset(crops, targets), batch_size=4)

    stats = evaluate(model, loader, torch.device("cpu"))

    with torch.no_grad():
        mean_logits = torch.stack([model(crops[:, index]) for index in range(3)]).mean(dim=0)
    expected_acc1 = (mean_logits.argmax(dim=1) == targets).sum().item() * 100 / len(targets)
    expected_loss = nn.functional.cross_entropy(mean_logits, targets).item()
    assert stats["count"] == 10
    assert stats["acc1"] == pytest.approx(expected_acc1)
    assert stats["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_evaluate_count_check():
    model = CropModel()
    loader = DataLoader(TensorDataset(*make_data(10)), batch_size=4)

    with pytest.raises(RuntimeError, match="evaluated 10 images but the validation set has 11"):
        evaluate(model, loader, torch.device("cpu"), expected_count=11)


def test_shard_sampler_covers_once():
    shards = [list(ShardSampler(11, rank, 3)) for rank in range(3)]

    assert sorted(index for shard in shards for index in shard) == list(range(11))
    assert [len(ShardSampler(11, rank, 3)) for rank in range(3)] == [4, 4, 3]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_evaluate(rank, world_size, port, padded, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    model = make_supernet()
    model.set_subnet(CANDIDATES[1])
    dataset = TensorDataset(*make_data(37))
    if padded:
        sampler = DistributedSampler(dataset, shuffle=False)
    else:
        sampler = ShardSampler(len(dataset))
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    try:
        results[context.rank] = evaluate(model, loader, context.device, expected_count=None if padded else 37)
    finally:
        cleanup()


def run_two_processes(padded):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_evaluate, args=(2, _free_port(), padded, results), nprocs=2, join=True)
    return dict(results)


def test_distributed_evaluate_odd_size_exact():
    model = make_supernet()
    model.set_subnet(CANDIDATES[1])
    loader = DataLoader(TensorDataset(*make_data(37)), batch_size=8)
    single = evaluate(model, loader, torch.device("cpu"))

    results = run_two_processes(padded=False)
    padded = run_two_processes(padded=True)

    assert results[0] == results[1]
    assert results[0]["count"] == 37
    assert results[0]["acc1"] == pytest.approx(single["acc1"], abs=1e-9)
    assert results[0]["acc5"] == pytest.approx(single["acc5"], abs=1e-9)
    assert results[0]["loss"] == pytest.approx(single["loss"], rel=1e-6)
    # A padding sampler counts one image twice, which the count check exists to catch.
    assert padded[0]["count"] == 38


def make_loader(count=16, batch_size=4, images=None, targets=None):
    if images is None:
        images, targets = make_data(count)
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size, shuffle=False)


def test_train_sets_sampled_candidates():
    model = make_supernet()
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(module.subnet))
    sampler = PreferredSampler(CANDIDATES, seed=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    train_one_epoch(
        model, model, nn.CrossEntropyLoss(), make_loader(), optimizer, torch.device("cpu"), 2, sampler,
        nonfinite=NonFiniteTracker(), print_freq=0,
    )

    expected = [sampler.sample(2, step)[0] for step in range(4)]
    assert [_architecture(s) for s in seen] == [_architecture(c) for c in expected]


def test_sandwich_step_accumulates_mean_loss():
    model = make_supernet()
    reference = copy.deepcopy(model)
    sampler = SandwichSampler(PreferredSampler(CANDIDATES, seed=0), middle_count=1)
    images, targets = make_data(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    train_one_epoch(
        model, model, nn.CrossEntropyLoss(), make_loader(images=images, targets=targets), optimizer,
        torch.device("cpu"), 0, sampler, nonfinite=NonFiniteTracker(), print_freq=0,
    )

    candidates = sampler.sample(0, 0)
    reference.train()
    total = 0
    for candidate in candidates:
        reference.set_subnet(candidate)
        total = total + nn.functional.cross_entropy(reference(images), targets)
    (total / len(candidates)).backward()
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.grad is not None:
                parameter -= 0.1 * parameter.grad
    for (name, trained), expected in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(trained, expected, atol=1e-6), name


@pytest.mark.parametrize("use_scaler", [False, True])
def test_clip_grad_in_both_paths(use_scaler):
    model = make_supernet()
    before = [parameter.detach().clone() for parameter in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    # A scaler on float32 must still clip after unscaling.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if use_scaler else None

    train_one_epoch(
        model, model, nn.CrossEntropyLoss(), make_loader(count=4), optimizer, torch.device("cpu"), 0,
        FixedSampler(CANDIDATES[2]), nonfinite=NonFiniteTracker(), grad_scaler=scaler, clip_grad=1e-3,
        print_freq=0,
    )

    update_norm = torch.linalg.vector_norm(
        torch.cat([(after.detach() - start).flatten() for after, start in zip(model.parameters(), before)])
    )
    assert update_norm.item() == pytest.approx(1e-3, rel=1e-3)


def test_nonfinite_step_is_skipped():
    model = make_supernet()
    images, targets = make_data(8)
    images[4:] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NonFiniteTracker(max_consecutive=3)
    snapshots = []

    class Snapshot(list):
        def __iter__(self):
            for batch in list.__iter__(self):
                snapshots.append([p.detach().clone() for p in model.parameters()])
                yield batch

    batches = Snapshot(make_loader(images=images, targets=targets))
    stats = train_one_epoch(
        model, model, nn.CrossEntropyLoss(), batches, optimizer, torch.device("cpu"), 0,
        FixedSampler(CANDIDATES[2]), nonfinite=tracker, print_freq=0,
    )

    assert stats["skipped_steps"] == 1
    assert tracker.consecutive == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for after, start in zip(model.parameters(), snapshots[1]):
        assert torch.equal(after.detach(), start)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))


def test_nonfinite_aborts_after_limit():
    model = make_supernet()
    images, targets = make_data(12)
    images[:] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train_one_epoch(
            model, model, nn.CrossEntropyLoss(), make_loader(images=images, targets=targets), optimizer,
            torch.device("cpu"), 0, FixedSampler(CANDIDATES[0]), nonfinite=NonFiniteTracker(max_consecutive=3),
            print_freq=0,
        )


def test_train_returns_mean_loss():
    model = make_supernet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    images, targets = make_data(8)

    stats = train_one_epoch(
        model, model, nn.CrossEntropyLoss(), make_loader(images=images, targets=targets), optimizer,
        torch.device("cpu"), 0, FixedSampler(CANDIDATES[2]), nonfinite=NonFiniteTracker(), print_freq=1,
    )

    model.set_subnet(CANDIDATES[2])
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(images[i:i + 4]), targets[i:i + 4]).item() for i in (0, 4)]
    assert stats["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert stats["skipped_steps"] == 0
    assert stats["images_per_second"] > 0


def _architecture(candidate):
    return {key: candidate[key] for key in ("layer_num", "embed_dim", "mlp_ratio", "num_heads")}


def test_progress_line_estimates_whole_run(monkeypatch, caplog):
    import lib.engine as engine

    clock = iter(float(second) for second in range(0, 1000, 10))
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    caplog.set_level("INFO", logger="lib.engine")
    model = make_supernet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    train_one_epoch(
        model, model, nn.CrossEntropyLoss(), make_loader(), optimizer, torch.device("cpu"), 1,
        FixedSampler(CANDIDATES[0]), nonfinite=NonFiniteTracker(), print_freq=1, total_epochs=4,
    )

    first = next(record.getMessage() for record in caplog.records if record.name == "lib.engine")
    # Epoch 1 of 4, first of 4 steps after 10 s: 3 steps left in this epoch, 2 epochs of 4 steps after it.
    assert first.startswith("epoch 1/4 [1/4]")
    assert first.endswith("eta 0:00:30 (run 0:01:50)")
