"""Stage 1: fetch the raw dataset and verify every byte against pinned sha256 checksums.

Writes `raw_dir/manifest.json`, whose content changes exactly when the raw data changes.
"""

import hashlib
import json
import logging
import os
import secrets
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.client import HTTPException, IncompleteRead
from pathlib import Path
from urllib.error import HTTPError, URLError

log = logging.getLogger(__name__)

MIRROR_ENV = "DLPIPE_DATA_MIRROR"
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

ATTEMPTS = 4  # downloads tried per file before giving up
BACKOFF_S = 1.0  # wait before retry k is BACKOFF_S * 2**(k-1): 1 s, 2 s, 4 s
TIMEOUT_S = 30.0  # per socket operation, not per file
CHUNK_BYTES = 1 << 20
RETRY_HTTP_STATUS = {408, 429, 500, 502, 503, 504}
DOWNLOAD_FIX = (
    "the server sent other bytes (a proxy, a captive portal or a changed upstream): try again or "
    f"set {MIRROR_ENV}; if upstream changed on purpose, update data.files in conf/data/"
)


class DataError(Exception):
    """Raw data is missing, malformed or not what the config pins; the message says the fix."""


class ChecksumError(DataError):
    pass


class DownloadError(DataError):
    pass


def collect(data: Mapping, raw_dir: Path) -> dict:
    """Fetch/verify the dataset described by the `data` config section; returns the manifest."""
    fmt = data.get("format")
    if fmt not in COLLECTORS:
        raise ValueError(f"data.format={fmt!r} is not supported; use one of {sorted(COLLECTORS)}")
    raw_dir = Path(raw_dir)
    t0 = time.perf_counter()
    manifest = {"name": data["name"], "format": fmt, **COLLECTORS[fmt](data, raw_dir)}
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(raw_dir / MANIFEST, [json.dumps(manifest, indent=2, sort_keys=True).encode()])
    log.info(
        "collected %s: %d files in %.2fs -> %s",
        data["name"],
        len(manifest["files"]),
        time.perf_counter() - t0,
        raw_dir / MANIFEST,
    )
    return manifest


def load_manifest(raw_dir: Path) -> dict:
    path = Path(raw_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: run the collect stage first (dvc repro collect)")
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def write_atomic(
    path: Path, chunks: Iterable[bytes], verify: Callable[[str], None] | None = None
) -> str:
    """Write `chunks` to `path` via a temp file in the same folder and return their sha256.

    `verify(sha256)` may raise to reject the content. On any error, KeyboardInterrupt included,
    the temp file is removed, so `path` is either absent, untouched or complete.
    """
    # Not tempfile.mkstemp: its 0600 mode would survive the rename; "xb" honours the umask.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    digest = hashlib.sha256()
    try:
        with open(tmp, "xb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
        if verify is not None:
            verify(digest.hexdigest())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


# --- format "idx": a fixed list of files, each pinned by sha256 ------------------------------


def _collect_idx(data: Mapping, raw_dir: Path) -> dict:
    files = data.get("files")
    if not isinstance(files, Mapping) or not files:
        raise ValueError(f"data.files={files!r} must map each file name to its sha256")
    mirror = _mirror(data["mirror_dir"])
    raw_dir.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, expected in files.items():
        expected = str(expected).lower()
        if len(expected) != 64 or not set(expected) <= set("0123456789abcdef"):
            raise ValueError(f"data.files.{name}={expected!r} is not a sha256 (64 hex digits)")
        hashes[name] = expected
        dest = raw_dir / name
        for stale in raw_dir.glob(f".{name}.*.part"):  # left behind by a killed run
            stale.unlink()
        if dest.is_file():
            actual = sha256_file(dest)
            if actual == expected:
                log.info("skipped %s: present, sha256 ok", name)
                continue
            log.warning(
                "%s is present with sha256 %s, not %s: fetching again", name, actual, expected
            )
        t0 = time.perf_counter()
        source = _fetch(data, name, expected, dest, mirror)
        log.info(
            "fetched %s (%.1f MB) from %s in %.2fs",
            name,
            dest.stat().st_size / 1e6,
            source,
            time.perf_counter() - t0,
        )
    return {"files": hashes}


def _mirror(mirror_dir: str) -> Path | None:
    """$DLPIPE_DATA_MIRROR/<mirror_dir>, or None when the variable is unset."""
    root = os.environ.get(MIRROR_ENV)
    if not root:
        return None
    mirror = Path(root) / mirror_dir
    if not mirror.is_dir():
        raise DataError(
            f"{MIRROR_ENV}={root} has no {mirror_dir}/ folder: lay it out like shared/datasets "
            f"(a sub-folder per dataset) or unset {MIRROR_ENV}"
        )
    return mirror


def _fetch(data: Mapping, name: str, expected: str, dest: Path, mirror: Path | None) -> str:
    """Copy `name` from the mirror if there is one, else download it; returns the source."""
    url = data["url"] + name
    if mirror is None:
        _download(url, dest, _checker(name, expected, url, DOWNLOAD_FIX), data["mirror_dir"])
        return url
    source = mirror / name
    if not source.is_file():
        raise DataError(
            f"{source} not found: copy {url} there, or unset {MIRROR_ENV} to download it"
        )
    fix = f"the mirror copy is not the published file: replace {source} with {url}"
    write_atomic(dest, _file_chunks(source), _checker(name, expected, str(source), fix))
    return str(source)


def _download(url: str, dest: Path, verify: Callable[[str], None], mirror_dir: str) -> None:
    # Plain http upstreams are fine: every byte is checked against the pinned sha256.
    error: Exception | None = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            write_atomic(dest, _http_chunks(url), verify)
            return
        except HTTPError as e:
            e.close()
            if e.code not in RETRY_HTTP_STATUS:
                raise DownloadError(
                    f"{url} answered HTTP {e.code} {e.reason}: check data.url and data.files, "
                    f"or set {MIRROR_ENV}=<dir> to use a local copy"
                ) from e
            error = e
        except (URLError, TimeoutError, ConnectionError, HTTPException) as e:
            error = e
        if attempt < ATTEMPTS:
            delay = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("download of %s failed (%s); retrying in %.1fs", url, error, delay)
            time.sleep(delay)
    raise DownloadError(
        f"could not download {url} after {ATTEMPTS} attempts ({error}). If this machine is "
        f"offline, set {MIRROR_ENV}=<dir> where <dir> is laid out like shared/datasets, i.e. "
        f"<dir>/{mirror_dir}/{dest.name}"
    ) from error


def _checker(name: str, expected: str, source: str, fix: str) -> Callable[[str], None]:
    def verify(actual: str) -> None:
        if actual != expected:
            raise ChecksumError(
                f"{name} from {source} has sha256 {actual}, expected {expected}; "
                f"nothing was written. Fix: {fix}"
            )

    return verify


def _http_chunks(url: str) -> Iterator[bytes]:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        while chunk := response.read(CHUNK_BYTES):
            yield chunk
        # read(n) returns b"" on a dropped connection; make that a (retried) transfer error
        # rather than a checksum mismatch.
        missing = getattr(response, "length", None)  # None for file:// and unsized replies
        if missing:
            raise IncompleteRead(b"", missing)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


# --- format "image_folder": <path>/<class>/*.png|jpg, hashed in place, never copied ---------


def image_root(data: Mapping) -> Path:
    """The validated `data.path` of an image_folder dataset."""
    path = data.get("path")
    if path in (None, "", "???"):
        raise ValueError(
            "data.path is required for data=image_folder: pass data.path=/path/to/images"
        )
    root = Path(path)
    if not root.is_dir():
        raise DataError(
            f"data.path={path!r} is not a folder: point it at a folder with one sub-folder "
            "of PNG/JPEG images per class"
        )
    return root


def _collect_image_folder(data: Mapping, raw_dir: Path) -> dict:
    root = image_root(data)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(
            f"data.path={str(root)!r} has {len(class_dirs)} class folder(s); a classifier needs at "
            "least 2: put each class's images in its own sub-folder, e.g. cats/*.png dogs/*.png"
        )
    hashes, ignored = {}, 0
    for class_dir in class_dirs:
        found = 0
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
                continue
            hashes[path.relative_to(root).as_posix()] = sha256_file(path)
            found += 1
        if found == 0:
            raise DataError(
                f"class folder {class_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images: "
                "add images or remove the folder"
            )
    if ignored:
        log.warning("ignored %d files under %s that are not %s", ignored, root, IMAGE_SUFFIXES)
    classes = [d.name for d in class_dirs]
    log.info("found %d images in %d classes under %s", len(hashes), len(classes), root)
    return {"classes": classes, "files": hashes}


COLLECTORS: dict[str, Callable[[Mapping, Path], dict]] = {
    "idx": _collect_idx,
    "image_folder": _collect_image_folder,
}
