"""What the stages print: library loggers turned down while they do work whose notes are not
about the user's run (an exporter's graph passes, a probe's start-up lines)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quieted(names: tuple[str, ...], level: int = logging.WARNING) -> Iterator[None]:
    """Within the block, the loggers `names` (and their children) drop records below `level`;
    their own levels come back afterwards, also when the block raises."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [one.level for one in loggers]
    for one in loggers:
        one.setLevel(level)
    try:
        yield
    finally:
        for one, before in zip(loggers, levels, strict=True):
            one.setLevel(before)
