"""Stage 1: fetch the raw dataset and verify every byte against pinned sha256 checksums.

Writes `raw_dir/manifest.json`, whose content changes exactly when the raw data changes.

Downloaded datasets list their files in `data.files`, each either `name: <sha256>` (fetched from
`data.url + name`, or `<mirror>/<mirror_dir>/name`) or a mapping:

    name:
      sha256: ...          # of the stored file; for `members`, of the member list (members_digest)
      url: https://...     # upstream, when not data.url + name
      member: a/b.tsv      # the upstream is a zip/tar archive: store this member of it
      members: "*/recordings/*.wav"   # ...or every member matching this glob, into folder `name`
      mirror: b.tsv.gz     # the file's name in the mirror (a .gz there is decompressed)
      mirror_member: x/b.csv   # the mirror holds an archive: store this member of it
"""

import fnmatch
import gzip
import json
import logging
import os
import secrets
import shutil
import tarfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from http.client import HTTPException, IncompleteRead
from pathlib import Path
from urllib.error import HTTPError, URLError

from dlpipe.data import (
    CHUNK_BYTES,
    MANIFEST,
    MIRROR_ENV,
    DataError,
    check_unique_members,
    file_chunks,
    image_root,
    members_digest,
    sha256_file,
    write_atomic,
)
from dlpipe.formats import FORMATS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_CLASS_IMAGES = 5  # fewer and a class may miss a split (warned; preprocess checks the splits)

ATTEMPTS = 4  # downloads tried per file before giving up
BACKOFF_S = 1.0  # wait before retry k is BACKOFF_S * 2**(k-1): 1 s, 2 s, 4 s
TIMEOUT_S = 30.0  # per socket operation, not per file
RETRY_HTTP_STATUS = {408, 429, 500, 502, 503, 504}
DOWNLOAD_FIX = (
    "the server sent other bytes (a proxy, a captive portal or a changed upstream): try again or "
    f"set {MIRROR_ENV}; if upstream changed on purpose, update data.files in conf/data/"
)


class ChecksumError(DataError):
    pass


class DownloadError(DataError):
    pass


def collect(data: Mapping, raw_dir: Path) -> dict:
    """Fetch/verify the dataset described by the `data` config section; returns the manifest.

    `data.format=image_folder` hashes a folder of images in place; `data.path` (a user's own
    file, e.g. a CSV) is hashed and copied; otherwise `data.files` are downloaded."""
    fmt = data.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r} is not supported; use one of {list(FORMATS)}")
    raw_dir = Path(raw_dir)
    t0 = time.perf_counter()
    if fmt == "image_folder":
        collector = _collect_image_folder
    elif data.get("path") not in (None, "", "???") or "files" not in data:
        collector = _collect_local_file
    else:
        collector = _collect_files
    manifest = {"name": data["name"], "format": fmt, **collector(data, raw_dir)}
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


# --- downloaded files, each pinned by sha256 -------------------------------------------------


def _file_spec(data: Mapping, name: str, entry: object) -> dict:
    spec = dict(entry) if isinstance(entry, Mapping) else {"sha256": entry}
    expected = str(spec.get("sha256", "")).lower()
    if len(expected) != 64 or not set(expected) <= set("0123456789abcdef"):
        raise ValueError(f"data.files.{name}: sha256 {expected!r} is not 64 hex digits")
    unknown = set(spec) - {"sha256", "url", "member", "members", "mirror", "mirror_member"}
    if unknown:
        raise ValueError(f"data.files.{name} has unknown keys {sorted(unknown)}")
    return {
        "sha256": expected,
        "url": spec.get("url") or data["url"] + name,
        "member": spec.get("member"),
        "members": spec.get("members"),
        "mirror": spec.get("mirror") or name,
        "mirror_member": spec.get("mirror_member"),
    }


def _collect_files(data: Mapping, raw_dir: Path) -> dict:
    files = data.get("files")
    if not isinstance(files, Mapping) or not files:
        raise ValueError(f"data.files={files!r} must map each file name to its sha256")
    specs = {name: _file_spec(data, name, entry) for name, entry in files.items()}
    mirror = _mirror(data["mirror_dir"])
    raw_dir.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, spec in specs.items():
        expected = hashes[name] = spec["sha256"]
        dest = raw_dir / name
        for stale in raw_dir.glob(f".{name}.*.part"):  # left behind by a killed run
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        if dest.exists():
            actual = members_digest(dest) if dest.is_dir() else sha256_file(dest)
            if actual == expected:
                log.info("skipped %s: present, sha256 ok", name)
                continue
            log.warning(
                "%s is present with sha256 %s, not %s: fetching again", name, actual, expected
            )
        t0 = time.perf_counter()
        source = _fetch(data, name, spec, dest, mirror)
        log.info("fetched %s from %s in %.2fs", name, source, time.perf_counter() - t0)
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


def _fetch(data: Mapping, name: str, spec: Mapping, dest: Path, mirror: Path | None) -> str:
    """Copy `name` from the mirror if there is one, else download it; returns the source."""
    url, expected = spec["url"], spec["sha256"]
    if mirror is None:
        verify = _checker(name, expected, url, DOWNLOAD_FIX)
        if spec["member"] is None and spec["members"] is None:
            _download(url, dest, verify, data["mirror_dir"], spec["mirror"])
            return url
        archive = dest.with_name(f".{name}.{secrets.token_hex(4)}.part.archive")
        try:
            _download(url, archive, None, data["mirror_dir"], spec["mirror"])
            _extract(archive, spec, dest, verify)
        finally:
            archive.unlink(missing_ok=True)
        return url
    source = mirror / spec["mirror"]
    if not source.exists():
        raise DataError(
            f"{source} not found: copy {url} there, or unset {MIRROR_ENV} to download it"
        )
    fix = f"the mirror copy is not the published file: replace {source} with {url}"
    verify = _checker(name, expected, str(source), fix)
    if spec["members"] is not None:
        _extract(source, spec, dest, verify)
    elif spec["mirror_member"] is not None:
        _extract(source, {"member": spec["mirror_member"], "members": None}, dest, verify)
    elif source.suffix == ".gz" and not name.endswith(".gz"):
        write_atomic(dest, _gunzip_chunks(source), verify)
    else:
        write_atomic(dest, file_chunks(source), verify)
    return str(source)


def _extract(archive: Path, spec: Mapping, dest: Path, verify: Callable[[str], None]) -> None:
    """Store `spec["member"]` of a zip/tar `archive` as the file `dest`, or every member
    matching `spec["members"]` as files (by base name) of the folder `dest`; all or nothing."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                files = [m for m in z.infolist() if not m.is_dir()]
                check_unique_members((m.filename for m in files), archive)
                members = {m.filename: m for m in files}
                _extract_from(members, lambda m: z.open(m), spec, dest, verify, archive)
        else:
            with tarfile.open(archive) as t:
                files = [m for m in t.getmembers() if m.isfile()]
                check_unique_members((m.name for m in files), archive)
                members = {m.name: m for m in files}
                _extract_from(members, t.extractfile, spec, dest, verify, archive)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(
            f"{archive} is not a readable zip/tar archive ({e}): delete it and fetch again"
        ) from e


def _extract_from(members, open_member, spec, dest: Path, verify, archive: Path) -> None:
    if spec["member"] is not None:
        if spec["member"] not in members:
            raise DataError(f"{archive} has no member {spec['member']!r}: check data.files")
        with open_member(members[spec["member"]]) as f:
            write_atomic(dest, iter(lambda: f.read(CHUNK_BYTES), b""), verify)
        return
    matched = sorted(n for n in members if fnmatch.fnmatch(n, spec["members"]))
    if not matched:
        raise DataError(f"{archive} has no members matching {spec['members']!r}")
    check_unique_members((Path(n).name for n in matched), archive)  # stored by base name
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    try:
        tmp.mkdir()
        for name in matched:
            with open_member(members[name]) as f, open(tmp / Path(name).name, "xb") as out:
                shutil.copyfileobj(f, out, CHUNK_BYTES)
        verify(members_digest(tmp))
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _gunzip_chunks(path: Path) -> Iterator[bytes]:
    with gzip.open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def _download(
    url: str,
    dest: Path,
    verify: Callable[[str], None] | None,
    mirror_dir: str,
    mirror_name: str,
) -> None:
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
        f"<dir>/{mirror_dir}/{mirror_name}"
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


# --- format "image_folder": <path>/<class>/*.png|jpg, hashed in place, never copied ---------


def _collect_image_folder(data: Mapping, raw_dir: Path) -> dict:
    root = image_root(data)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(
            f"data.path={str(root)!r} has {len(class_dirs)} class folder(s); a classifier needs at "
            "least 2: put each class's images in its own sub-folder, e.g. cats/*.png dogs/*.png"
        )
    hashes, ignored = {}, 0
    real_root = root.resolve()
    for class_dir in class_dirs:
        found = 0
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if not path.resolve().is_relative_to(real_root):
                # A link out of data.path would read (and hash, and train on) files the user
                # never put there, and DVC would not see them change.
                raise DataError(
                    f"{path} links to {path.resolve()}, outside data.path={str(root)!r}: copy "
                    "the file into the folder, or point data.path at the folder that holds it"
                )
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
        if found < MIN_CLASS_IMAGES:
            log.warning(
                "class %r has %d image(s): too few to reach the training, validation and test "
                "splits; add images (at least %d) or expect that class to be left out of some",
                class_dir.name,
                found,
                MIN_CLASS_IMAGES,
            )
    if ignored:
        log.warning("ignored %d files under %s that are not %s", ignored, root, IMAGE_SUFFIXES)
    classes = [d.name for d in class_dirs]
    log.info("found %d images in %d classes under %s", len(hashes), len(classes), root)
    return {"classes": classes, "files": hashes}


# --- a user's own file (data.path), e.g. a CSV: hashed, and copied so DVC tracks it ----------


def _collect_local_file(data: Mapping, raw_dir: Path) -> dict:
    """Copy the user's `data.path` (one file, or a list of files such as the two sides of an
    aligned parallel corpus) into `raw_dir`; the manifest pins each copy's sha256 by file name."""
    path = data.get("path")
    if path in (None, "", "???"):
        raise ValueError(
            f"data.path is required for data={data['name']}: pass data.path=/path/to/file"
        )
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    names = [Path(p).name for p in paths]
    if len(set(names)) < len(names):
        raise DataError(
            f"data.path={[str(p) for p in paths]} names two files called the same: the copies "
            "under data/raw are named by file name; rename one (e.g. corpus.de, corpus.en)"
        )
    for one in paths:
        if not Path(one).is_file():
            raise DataError(f"data.path={str(one)!r} is not a file: point it at your data file")
    raw_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for source in map(Path, paths):
        files[source.name] = write_atomic(raw_dir / source.name, file_chunks(source))
        log.info("copied %s (sha256 %s)", source, files[source.name])
    return {"files": files}
