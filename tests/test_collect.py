"""Stage 1 on real data: the local mirror, real HTTP from a 127.0.0.1 server, and failure modes."""

import contextlib
import hashlib
import json
import logging
import shutil
import signal
import socket
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import dlpipe.collect
from dlpipe.collect import ChecksumError, DownloadError, collect
from dlpipe.data import MIRROR_ENV, DataError

LABELS = "train-labels-idx1-ubyte.gz"  # 29 kB: the cheapest real file to move around


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dlpipe.collect, "BACKOFF_S", 0.01)
    monkeypatch.delenv(MIRROR_ENV, raising=False)


class _Handler(SimpleHTTPRequestHandler):
    fail_first = 0  # answer this many requests with 503 before serving
    mode = "ok"  # "truncate": hang up mid-body; "interrupt": Ctrl-C the client mid-body
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if len(self.requests) <= self.fail_first:
            self.send_error(503)
            return
        if self.mode == "ok":
            super().do_GET()
            return
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if self.mode == "interrupt":
            # A real SIGINT, as Ctrl-C sends: it interrupts the client's blocking read at once
            # (`_thread.interrupt_main` would wait for that read to finish, which made this racy).
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(1.0)
            with contextlib.suppress(ConnectionError):  # the client may have hung up by now
                self.wfile.write(body[len(body) // 2 :])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve():
    """serve(folder, fail_first=0, mode="ok") -> (base url, list of request paths)."""
    servers = []

    def start(folder: Path, fail_first: int = 0, mode: str = "ok") -> tuple[str, list[str]]:
        attrs = {"fail_first": fail_first, "mode": mode, "requests": []}
        handler = type("Handler", (_Handler,), attrs)
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/", handler.requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _labels_only(data: dict, **overrides) -> dict:
    return {**data, "files": {LABELS: data["files"][LABELS]}, **overrides}


def _corrupt_copy(mirror: Path, tmp_path: Path) -> Path:
    """A mirror-shaped folder whose labels file has one flipped byte."""
    folder = tmp_path / "bad_mirror" / "fashion-mnist"
    folder.mkdir(parents=True)
    blob = bytearray((mirror / "fashion-mnist" / LABELS).read_bytes())
    blob[100] ^= 0xFF
    (folder / LABELS).write_bytes(bytes(blob))
    return folder


def test_collect_from_mirror_then_skip(mirror, tmp_path, monkeypatch, data_config, caplog):
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    data = data_config("fashion_mnist")
    raw = tmp_path / "raw"
    manifest = collect(data, raw)

    assert manifest == {"name": "fashion_mnist", "format": "idx", "files": data["files"]}
    assert json.loads((raw / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in raw.iterdir()) == sorted([*data["files"], "manifest.json"])
    for name, sha in data["files"].items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == sha

    mtimes = {p.name: p.stat().st_mtime_ns for p in raw.iterdir() if p.suffix == ".gz"}
    with caplog.at_level(logging.INFO, logger="dlpipe.collect"):
        assert collect(data, raw) == manifest
    assert caplog.text.count("skipped") == 4
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in raw.iterdir() if p.suffix == ".gz"}


def test_a_corrupt_local_file_is_fetched_again(mirror, tmp_path, monkeypatch, data_config):
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    data = _labels_only(data_config("fashion_mnist"))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / LABELS).write_bytes(b"half a download")
    collect(data, raw)
    assert (raw / LABELS).read_bytes() == (mirror / "fashion-mnist" / LABELS).read_bytes()


def test_download_over_http(mirror, tmp_path, serve, data_config):
    url, requests = serve(mirror / "fashion-mnist")
    data = data_config("fashion_mnist", url=url)
    manifest = collect(data, tmp_path / "raw")
    assert manifest["files"] == data["files"]
    assert sorted(requests) == sorted(f"/{name}" for name in data["files"])
    assert not list((tmp_path / "raw").glob(".*.part"))


def test_download_retries_a_transient_503(mirror, tmp_path, serve, data_config, caplog):
    url, requests = serve(mirror / "fashion-mnist", fail_first=1)
    with caplog.at_level(logging.WARNING, logger="dlpipe.collect"):
        collect(_labels_only(data_config("fashion_mnist"), url=url), tmp_path / "raw")
    assert requests == [f"/{LABELS}", f"/{LABELS}"]
    assert "503" in caplog.text
    assert (tmp_path / "raw" / LABELS).read_bytes() == (
        mirror / "fashion-mnist" / LABELS
    ).read_bytes()


def test_download_gives_up_after_repeated_5xx(mirror, tmp_path, serve, data_config):
    url, requests = serve(mirror / "fashion-mnist", fail_first=99)
    with pytest.raises(DownloadError, match=MIRROR_ENV):
        collect(_labels_only(data_config("fashion_mnist"), url=url), tmp_path / "raw")
    assert len(requests) == dlpipe.collect.ATTEMPTS
    assert list((tmp_path / "raw").iterdir()) == []


def test_404_is_not_retried(mirror, tmp_path, serve, data_config):
    url, requests = serve(mirror / "fashion-mnist")
    data = data_config("fashion_mnist", url=url, files={"missing.gz": "0" * 64})
    with pytest.raises(DownloadError, match="HTTP 404"):
        collect(data, tmp_path / "raw")
    assert requests == ["/missing.gz"]


def test_corrupt_download_is_rejected_and_leaves_nothing(mirror, tmp_path, serve, data_config):
    url, _ = serve(_corrupt_copy(mirror, tmp_path))
    data = _labels_only(data_config("fashion_mnist"), url=url)
    raw = tmp_path / "raw"
    with pytest.raises(ChecksumError) as err:
        collect(data, raw)
    message = str(err.value)
    assert LABELS in message and url in message and data["files"][LABELS] in message
    assert "update data.files" in message
    assert list(raw.iterdir()) == []


@pytest.mark.parametrize("mode", ["truncate", "interrupt"])
def test_a_broken_transfer_leaves_nothing(mirror, tmp_path, serve, data_config, mode):
    url, requests = serve(mirror / "fashion-mnist", mode=mode)
    raw = tmp_path / "raw"
    expected = DownloadError if mode == "truncate" else KeyboardInterrupt
    # Ctrl-C as in a terminal: a parent that started us in the background may have SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(expected):
            collect(_labels_only(data_config("fashion_mnist"), url=url), raw)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(requests) == (dlpipe.collect.ATTEMPTS if mode == "truncate" else 1)
    assert list(raw.iterdir()) == []


def test_offline_without_mirror_says_how_to_fix(tmp_path, data_config):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = _labels_only(data_config("fashion_mnist"), url=f"http://127.0.0.1:{port}/")
    with pytest.raises(DownloadError) as err:
        collect(data, tmp_path / "raw")
    assert f"{MIRROR_ENV}=<dir>" in str(err.value)
    assert f"fashion-mnist/{LABELS}" in str(err.value)
    assert list((tmp_path / "raw").iterdir()) == []


def test_corrupt_mirror_is_rejected(mirror, tmp_path, monkeypatch, data_config):
    bad = _corrupt_copy(mirror, tmp_path)
    monkeypatch.setenv(MIRROR_ENV, str(bad.parent))
    raw = tmp_path / "raw"
    with pytest.raises(ChecksumError, match="replace .* with http"):
        collect(_labels_only(data_config("fashion_mnist")), raw)
    assert list(raw.iterdir()) == []


def test_mirror_without_the_dataset_folder(tmp_path, monkeypatch, data_config):
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    with pytest.raises(DataError, match="no fashion-mnist/ folder"):
        collect(data_config("fashion_mnist"), tmp_path / "raw")


def test_unknown_format_lists_the_supported_ones(tmp_path, data_config):
    with pytest.raises(ValueError, match=r"data.format='csv'.*'idx', 'image_folder'"):
        collect(data_config("fashion_mnist", format="csv"), tmp_path / "raw")


def test_image_folder_manifest_tracks_the_images(image_dir, tmp_path, data_config):
    raw = tmp_path / "raw"
    manifest = collect(data_config("image_folder", path=str(image_dir)), raw)
    assert manifest["classes"] == ["cat", "dog", "frog"]
    assert len(manifest["files"]) == 30
    assert "dog/001.png" in manifest["files"] and "cat/003.jpg" in manifest["files"]
    assert [p.name for p in raw.iterdir()] == ["manifest.json"]  # images stay where they are

    (image_dir / "dog" / "001.png").write_bytes((image_dir / "cat" / "001.png").read_bytes())
    changed = collect(data_config("image_folder", path=str(image_dir)), raw)
    diff = {k for k in manifest["files"] if manifest["files"][k] != changed["files"][k]}
    assert diff == {"dog/001.png"}


def test_image_folder_bad_layouts(image_dir, tmp_path, data_config):
    def run(path):
        collect(data_config("image_folder", path=str(path)), tmp_path / "raw")

    with pytest.raises(ValueError, match="data.path is required"):
        collect(data_config("image_folder"), tmp_path / "raw")  # path: ??? as in the yaml
    with pytest.raises(DataError, match="is not a folder"):
        run(tmp_path / "nowhere")
    with pytest.raises(DataError, match="at least 2"):
        run(image_dir / "cat")  # images but no class folders
    for name in ("dog", "frog"):
        shutil.rmtree(image_dir / name)
    (image_dir / "dog").mkdir()
    (image_dir / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"dog holds no .* images: add images or remove"):
        run(image_dir)
    assert not (tmp_path / "raw").exists()  # a rejected folder leaves no output behind
