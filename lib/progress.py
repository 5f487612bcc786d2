"""Progress lines for long loops: position, throughput, elapsed time and estimated time left."""

from __future__ import annotations

import datetime
import logging
import time


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def loop_length(iterable: object) -> int | None:
    """Return ``len(iterable)``, or None for an iterable without a length (such as a generator)."""
    return len(iterable) if hasattr(iterable, "__len__") else None


class ProgressLog:
    """Logger of a loop's progress at a fixed minimum interval.

    Each :meth:`update` call counts one step and its images. A line is logged when ``interval``
    seconds have passed since the previous line (or since the start), so short loops log nothing
    unless ``log_ends`` also logs the first and the last step.

    Args:
        logger: where the lines go, at INFO.
        label: the start of each line, such as ``"eval 6.0"``.
        total: the number of steps, or None when unknown (then no time left is given).
        interval: minimum seconds between two lines.
        log_ends: also log the first step and step ``total``, whatever the interval.
    """

    def __init__(
        self, logger: logging.Logger, label: str, total: int | None, interval: float = 30.0, log_ends: bool = False
    ) -> None:
        self.logger = logger
        self.label = label
        self.total = total
        self.interval = interval
        self.log_ends = log_ends
        self.steps = 0
        self.images = 0
        self.start = time.perf_counter()
        self.last = self.start

    def update(self, images: int = 0, detail: str = "") -> bool:
        """Count one step of ``images`` images, and log a line if the interval has passed.

        Args:
            images: images processed in this step; 0 leaves the rate out of the line.
            detail: text placed after the position, such as ``" (depth 12)"``.

        Returns:
            Whether a line was logged.
        """
        self.steps += 1
        self.images += images
        now = time.perf_counter()
        at_end = self.log_ends and (self.steps == 1 or self.steps == self.total)
        if not at_end and now - self.last < self.interval:
            return False
        self.last = now
        elapsed = now - self.start
        position = f"[{self.steps}/{self.total}]" if self.total else f"[{self.steps}]"
        rate = f" images/s {self.images / elapsed:.1f}" if self.images else ""
        left = ""
        if self.total:
            left = f" eta {_clock(elapsed / self.steps * max(self.total - self.steps, 0))}"
        self.logger.info("%s %s%s%s elapsed %s%s", self.label, position, detail, rate, _clock(elapsed), left)
        return True
