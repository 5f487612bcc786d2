"""One logging setup for every entry script.

Rank 0 logs at INFO to stderr and, when an output folder is given, to ``run.log`` in it.
Other ranks log warnings and errors only, prefixed with their rank.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path

from lib.fileio import write_text_atomic

logger = logging.getLogger(__name__)

LOG_FILE_NAME = "run.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

# Handlers installed by setup_logging, so that a second call replaces them instead of
# duplicating every line.
_installed_handlers: list[logging.Handler] = []


def setup_logging(rank: int = 0, output_dir: str | Path | None = None) -> None:
    """Configure the root logger for this process.

    Args:
        rank: global rank; rank 0 logs at INFO, the others at WARNING.
        output_dir: folder for ``run.log`` (rank 0 only); created if missing. None logs to
            stderr only.
    """
    root = logging.getLogger()
    for handler in _installed_handlers:
        root.removeHandler(handler)
        handler.close()
    _installed_handlers.clear()

    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(prefix + _FORMAT, datefmt=_DATE_FORMAT)

    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setFormatter(formatter)
    _installed_handlers.append(stream_handler)

    if output_dir is not None and rank == 0:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(folder / LOG_FILE_NAME, encoding="utf-8")
        file_handler.setFormatter(formatter)
        _installed_handlers.append(file_handler)

    for handler in _installed_handlers:
        root.addHandler(handler)
    root.setLevel(level)


class MetricsWriter:
    """Per-epoch metrics as JSON lines in ``log.txt`` and as TensorBoard scalars under ``tb/``.

    Only the process with ``enabled`` writes; the others ignore every call. Keys with a ``/``
    are TensorBoard tags (``val/largest/acc1``), and the JSON line uses them with ``_`` in
    place of ``/`` (``val_largest_acc1``).

    Args:
        output_dir: the run folder.
        enabled: True on rank 0.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.log_path = Path(output_dir) / "log.txt"
        self._tensorboard = None
        if not enabled:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(Path(output_dir) / "tb"))

    def drop_from(self, epoch: int) -> None:
        """Remove the lines of ``epoch`` and later epochs from ``log.txt``, and any unreadable line.

        A run that starts or resumes at ``epoch`` calls it first. Lines of epochs that it is
        about to run again came from a run stopped after writing them (or from an earlier run in
        the folder), and a line cut short by a kill cannot be read.
        """
        if not self.enabled or not self.log_path.exists():
            return
        earlier_lines = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] < epoch:
                earlier_lines.append(line + "\n")
        write_text_atomic(self.log_path, "".join(earlier_lines))

    def write(self, epoch: int, scalars: Mapping[str, float], extra: Mapping | None = None) -> None:
        """Append one JSON line for ``epoch`` and log the numeric ``scalars`` at step ``epoch``.

        Args:
            epoch: zero-based epoch.
            scalars: tag -> number.
            extra: more JSON fields that are not TensorBoard scalars (for example configs).
        """
        if not self.enabled:
            return
        record = {"epoch": epoch}
        record.update({tag.replace("/", "_"): _json_number(value) for tag, value in scalars.items()})
        if extra:
            record.update(extra)
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, epoch)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _json_number(value: float) -> float | int | None:
    """Return ``value``, with NaN and infinities as None because JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
