"""What the `pipelines/*.py` entry points share after their stage has run."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def finish() -> NoReturn:
    """End a stage process whose work is done, without the interpreter's teardown.

    Joins the non-daemon threads and runs the atexit handlers, as a normal exit does (MLflow's,
    `logging.shutdown`'s final flush, multiprocessing's joining of its children), flushes
    stdout and stderr, then leaves with `os._exit(0)`: what it skips is freeing every object of
    every imported module one by one, 1-3 s for a process that imported torch, Lightning and
    MLflow, on every stage of every `dvc repro` (docs/benchmarks.md, "Smoke pipeline").

    Only for a `pipelines/*.py` script, after its `main()` returned: a failed stage exits
    through SystemExit (Hydra's, or `errors.reported`'s exit status 1) before this is reached,
    and code that imports the stages (tests, benchmarks) never calls it. Files are closed by the
    `with` blocks that wrote them; a buffer left open and unreferenced would not be flushed."""
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers a normal exit runs, in the same order (LIFO)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
