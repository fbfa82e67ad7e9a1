"""Errors the project raises on purpose, their message naming the problem and the fix, and how a
stage script reports them: one line on stderr and exit status 1, no traceback (an unexpected
error keeps its traceback; DLPIPE_TRACEBACK=1 shows it for these too)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

TRACEBACK_ENV = "DLPIPE_TRACEBACK"


class UserError(Exception):
    """Base of the errors a user fixes (bad config, bad data, a diverging setting, an
    unreachable store); the message says what to change. Subclasses: `ConfigError` (here),
    `dlpipe.data.DataError`, `dlpipe.callbacks.DivergedError`, `dlpipe.tracking`'s
    `TrackingServerError` and `StoreMovedError`, `dlpipe.tune.NoCompletedTrialError`."""


class ConfigError(UserError, ValueError):
    """The composed config asks for something that cannot run (a wrong type or range, a
    setting that contradicts the files it needs); the message names the key and the fix."""


@contextmanager
def reported(stage: str) -> Iterator[None]:
    """`with reported("train"): train(cfg)` inside a stage's `@hydra.main` function: a
    `UserError` ends the process with `<stage>: <ErrorName>: <message>` on stderr and exit
    status 1, instead of Hydra's "Error executing job" and a traceback of our own frames."""
    try:
        yield
    except UserError as err:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"{stage}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
