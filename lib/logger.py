"""One logging setup for every entry script.

Rank 0 logs at INFO to stderr and, when an output folder is given, to ``run.log`` in it.
Other ranks log warnings and errors only, prefixed with their rank.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

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
