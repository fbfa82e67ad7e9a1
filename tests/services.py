"""Real servers for the tests that need one, on 127.0.0.1 only, each stopped by its own PID.

`postgres_server()` runs Debian's PostgreSQL (`apt-get install postgresql`) from a fresh data
directory and yields a SQLAlchemy URL; `new_database(url, name)` gives each test its
own database on it. `.ci/run` installs the package and sets DLPIPE_REQUIRE_SERVICES=1, which turns
"not installed" from a skip into a failure.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REQUIRE_SERVICES = "DLPIPE_REQUIRE_SERVICES"  # =1 (CI): a missing server binary fails the test
NOT_INSTALLED = "is not installed"  # in every such skip's reason (conftest counts them)


def missing(what: str, fix: str) -> None:
    """Skip (or, under DLPIPE_REQUIRE_SERVICES=1, fail) a test whose server is not installed."""
    message = f"{what} {NOT_INSTALLED}: {fix}"
    if os.environ.get(REQUIRE_SERVICES) == "1":
        pytest.fail(f"{message} ({REQUIRE_SERVICES}=1 says every service test must run)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:`port`.

    Raises RuntimeError when `proc` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def stop(pid: int, timeout_s: float = 30, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to `pid`, then SIGKILL if it is still there after `timeout_s`."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))  # Debian keeps them here
    return Path(versions[-1]).parent if versions else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server from a fresh data directory, listening on 127.0.0.1 only (trust
    authentication, loopback), stopped by its postmaster PID and removed on exit.

    Yields `postgresql+psycopg://dlpipe@127.0.0.1:<port>/dlpipe`. PostgreSQL refuses to run as
    root, so as root the server runs as the `postgres` user the Debian package creates (in a
    directory of its own: pytest's temp dirs are private to the user running pytest)."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        missing("PostgreSQL", "apt-get install postgresql (Debian/Ubuntu)")
    if importlib.util.find_spec("psycopg") is None:
        missing("The PostgreSQL driver psycopg", 'pip install -e ".[postgres]"')
    root = Path(tempfile.mkdtemp(prefix="dlpipe-postgres-"))
    as_user: list[str] = []
    data, sockets = root / "pgdata", root / "pgsock"
    sockets.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        owner = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "dlpipe", "--auth=trust",
         "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    log = (root / "postgres.log").open("w")
    server = subprocess.Popen(
        [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-k", str(sockets), "-c", "fsync=off"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port, 60, server)
        base = f"postgresql+psycopg://dlpipe@127.0.0.1:{port}"
        new_database(base + "/postgres", "dlpipe")
        yield f"{base}/dlpipe"
    finally:
        # The postmaster's own PID (runuser may sit between us and it) from its pid file.
        pid_file = data / "postmaster.pid"
        if pid_file.exists():
            # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients to disconnect.
            stop(int(pid_file.read_text().split()[0]), sig=signal.SIGINT)
        if server.poll() is None:  # our own child: wait() reaps it (a zombie still answers kill 0)
            server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def new_database(url: str, name: str) -> str:
    """Create database `name` on the server of `url` (any database URL of it); returns its URL."""
    import psycopg

    base, _ = url.rsplit("/", 1)
    plain = base.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[tuple[str, int]]:
    """`mlflow server` on 127.0.0.1 with `backend_uri` as its backend store and the artifacts
    proxied through it into `artifacts` (clients need no shared file system). Yields
    (`http://127.0.0.1:<port>`, server PID); stopped by that PID on exit (idempotent, so a test
    may stop it early to take the server away)."""
    import sys

    from dlpipe.tracking import server_down

    port = free_port()
    # Without its job runner (seven huey worker processes for GenAI scoring and trace
    # archival, which dlpipe never uses): it starts faster and leaves nothing behind.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, 180, server)
        # The port opens before the app has started: wait for its /health to answer too.
        deadline = time.monotonic() + 120
        while server_down(uri, timeout_s=10) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        yield uri, server.pid
    finally:
        # Its own session: the uvicorn worker goes with the server's process group.
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
