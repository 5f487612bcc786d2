"""Start-up and error handling shared by search.py and evaluate.py."""

from __future__ import annotations

import logging
from collections.abc import Callable

from lib import distributed
from lib.allocator import keep_freed_memory


def run_entry_point(body: Callable[[], object], errors: tuple[type[Exception], ...], logger: logging.Logger) -> int:
    """Run ``body`` as a script's main work and return the exit status.

    Raises the malloc thresholds first (see :mod:`lib.allocator`). An error of one of the
    ``errors`` types is logged to the script's ``logger`` as one line and gives status 2. Logging
    falls back to a basic set-up when the error came before the script set up its own. The
    process group, if one was started, is destroyed on every exit path, errors included.
    """
    keep_freed_memory()
    try:
        body()
    except errors as error:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO)
        logger.error("%s", error)
        return 2
    finally:
        distributed.cleanup()
    return 0
