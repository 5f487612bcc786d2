import logging

import torch

from lib import progress as progress_module
from lib.engine import evaluate
from lib.progress import ProgressLog


class FakeClock:
    """A perf_counter stand-in that moves ``step`` seconds on every call."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_lines_only_after_interval(monkeypatch, caplog):
    monkeypatch.setattr(progress_module.time, "perf_counter", FakeClock(4.0))
    caplog.set_level(logging.INFO)
    log = ProgressLog(logging.getLogger("test"), "eval", total=10, interval=10.0)
    logged = [log.update(images=8) for _ in range(6)]
    # The clock reads 4 s at start and moves 4 s per update: lines at 12 s and 24 s after the start.
    assert logged == [False, False, True, False, False, True]
    assert len(caplog.records) == 2


def test_line_gives_position_rate_and_eta(monkeypatch, caplog):
    monkeypatch.setattr(progress_module.time, "perf_counter", FakeClock(5.0))
    caplog.set_level(logging.INFO)
    log = ProgressLog(logging.getLogger("test"), "proxy gradient", total=10, interval=1.0)
    log.update(images=20)
    message = caplog.records[-1].getMessage()
    # One step of 20 images in 5 s, 9 steps of 5 s left.
    assert message == "proxy gradient [1/10] images/s 4.0 elapsed 0:00:05 eta 0:00:45"


def test_unknown_total_has_no_eta(monkeypatch, caplog):
    monkeypatch.setattr(progress_module.time, "perf_counter", FakeClock(5.0))
    caplog.set_level(logging.INFO)
    log = ProgressLog(logging.getLogger("test"), "eval", total=None, interval=1.0)
    log.update()
    assert caplog.records[-1].getMessage() == "eval [1] elapsed 0:00:05"


def test_evaluate_logs_progress_on_slow_loops(monkeypatch, caplog):
    monkeypatch.setattr(progress_module.time, "perf_counter", FakeClock(40.0))
    caplog.set_level(logging.INFO, logger="lib.engine")
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(3)]
    evaluate(model, loader, torch.device("cpu"), label="eval 6.0")
    messages = [record.getMessage() for record in caplog.records if record.name == "lib.engine"]
    assert messages[0].startswith("eval 6.0 [1/3] images/s")
    assert len(messages) == 3


def test_log_ends_logs_first_and_last(monkeypatch, caplog):
    monkeypatch.setattr(progress_module.time, "perf_counter", FakeClock(1.0))
    caplog.set_level(logging.INFO)
    log = ProgressLog(logging.getLogger("test"), "groups", total=4, interval=100.0, log_ends=True)
    logged = [log.update(detail=f" (group {index})") for index in range(4)]
    assert logged == [True, False, False, True]
    assert caplog.records[0].getMessage() == "groups [1/4] (group 0) elapsed 0:00:01 eta 0:00:03"
