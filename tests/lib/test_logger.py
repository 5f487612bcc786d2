import json
import logging

from lib.logger import MetricsWriter, setup_logging


def test_metrics_writer_json_lines(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True)

    writer.write(0, {"train/loss": 1.5, "val/largest/acc1": 50.0})
    writer.write(1, {"train/loss": float("nan"), "val/largest/acc1": 60.0}, extra={"note": "x"})
    writer.close()

    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert lines[0] == {"epoch": 0, "train_loss": 1.5, "val_largest_acc1": 50.0}
    assert lines[1] == {"epoch": 1, "train_loss": None, "val_largest_acc1": 60.0, "note": "x"}
    assert any((tmp_path / "tb").iterdir())


def test_metrics_writer_disabled(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)

    writer.write(0, {"train/loss": 1.0})
    writer.close()

    assert not (tmp_path / "run").exists()


def test_setup_logging_levels(tmp_path):
    try:
        setup_logging(rank=1, output_dir=tmp_path)
        assert logging.getLogger().level == logging.WARNING
        assert not (tmp_path / "run.log").exists()

        setup_logging(rank=0, output_dir=tmp_path)
        logging.getLogger("lib.test").info("hello %d", 3)
        assert logging.getLogger().level == logging.INFO
        assert "hello 3" in (tmp_path / "run.log").read_text()
        # A second call replaces the handlers instead of adding more.
        handlers = len(logging.getLogger().handlers)
        setup_logging(rank=0, output_dir=tmp_path)
        assert len(logging.getLogger().handlers) == handlers
    finally:
        setup_logging(rank=0)


def test_drop_from_keeps_earlier_epochs(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for epoch in range(3):
        writer.write(epoch, {"train/loss": float(epoch)})
    with (tmp_path / "log.txt").open("a") as handle:
        handle.write('{"epoch": 3, "train_lo')  # a line cut short by a kill

    writer.drop_from(2)

    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
