"""Progress lines for long loops: position, throughput and estimated time left, at most every few seconds."""

from __future__ import annotations

import datetime
import logging
import time


class ProgressLog:
    """Logger of a loop's progress at a fixed minimum interval.

    Each :meth:`update` call counts one step and its images. A line is logged when ``interval``
    seconds have passed since the previous line (or since the start), so short loops log nothing.

    Args:
        logger: where the lines go, at INFO.
        label: the start of each line, such as ``"eval 6.0"``.
        total: the number of steps, or None when unknown (then no time left is given).
        interval: minimum seconds between two lines.
    """

    def __init__(self, logger: logging.Logger, label: str, total: int | None, interval: float = 30.0) -> None:
        self.logger = logger
        self.label = label
        self.total = total
        self.interval = interval
        self.steps = 0
        self.images = 0
        self.start = time.perf_counter()
        self.last = self.start

    def update(self, images: int = 0) -> bool:
        """Count one step of ``images`` images, and log a line if the interval has passed.

        Returns:
            Whether a line was logged.
        """
        self.steps += 1
        self.images += images
        now = time.perf_counter()
        if now - self.last < self.interval:
            return False
        self.last = now
        elapsed = now - self.start
        position = f"[{self.steps}/{self.total}]" if self.total else f"[{self.steps}]"
        rate = f" images/s {self.images / elapsed:.1f}" if self.images else ""
        left = ""
        if self.total:
            remaining = elapsed / self.steps * max(self.total - self.steps, 0)
            left = f" eta {datetime.timedelta(seconds=int(remaining))}"
        self.logger.info("%s %s%s%s", self.label, position, rate, left)
        return True
