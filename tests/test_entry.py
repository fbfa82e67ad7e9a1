"""A finished stage leaves without the interpreter's teardown but loses nothing on the way."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_finish_runs_what_a_normal_exit_runs(tmp_path):
    script = textwrap.dedent(
        f"""
        import atexit, logging, threading, time
        from pathlib import Path
        from dlpipe.entry import finish

        out = Path({str(tmp_path)!r})
        logging.basicConfig(filename=out / "stage.log", level=logging.INFO)
        logging.getLogger("stage").info("logged before finish")
        atexit.register(lambda: (out / "atexit.txt").write_text("ran"))

        def late_writer():
            time.sleep(0.5)
            (out / "thread.txt").write_text("joined")

        threading.Thread(target=late_writer).start()
        print("to stdout", end="")  # no newline: left in the buffer
        finish()
        (out / "after.txt").write_text("finish returned")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "to stdout"
    assert "logged before finish" in (tmp_path / "stage.log").read_text()
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "joined"
    assert not (tmp_path / "after.txt").exists()


def test_a_failed_stage_still_exits_with_its_status(tmp_path):
    """The pipelines call finish() only after main() returned: an error keeps its exit status."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "train.py"),
            f"paths.processed={tmp_path / 'none'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "run the preprocess stage first" in done.stderr
