"""Prefect flows that only compose the tasks: segment a volume, nightly inbox, train."""

from __future__ import annotations

import logging

CORE_LOGGERS = ("unet_core", "tasks", "flows")


def core_logs_to_prefect() -> None:
    """Send segflow's own loggers to the Prefect run logs (what PREFECT_LOGGING_EXTRA_LOGGERS
    does, applied at run time so import order does not matter)."""
    extra = logging.getLogger("prefect.extra")
    for name in CORE_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level in (logging.NOTSET,) or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        for handler in extra.handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
