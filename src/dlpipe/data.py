"""The data contract: what the collect and preprocess stages hand the stages after them.

- raw data (`data/raw/<name>/`): files pinned by sha256 and a `manifest.json` that changes
  exactly when they do (`load_manifest`, `checked_manifest`, `read_verified`, `raw_sha256`);
- processed data (`data/processed/<name>/`): `{split}_{key}.npy` arrays and, written last, a
  `meta.json` whose presence means every array beside it is complete (`save_arrays`,
  `write_meta`, `load_array`, `load_split`, `load_meta`);
- the one atomic writer (`write_atomic`, `write_json`), the split helpers and the one set of
  validators for `data.limit` and `data.*_fraction`.

Nothing here imports a stage; the stages, the formats, the tasks and the pyfuncs import this.
"""

import hashlib
import io
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.errors import UserError

log = logging.getLogger(__name__)

MIRROR_ENV = "DLPIPE_DATA_MIRROR"  # a local folder laid out like shared/datasets/
MANIFEST = "manifest.json"
META = "meta.json"
SPLITS = ("train", "val", "test")
CHUNK_BYTES = 1 << 20


class DataError(UserError):
    """Raw data is missing, malformed or not what the config pins; the message says the fix."""


def load_manifest(raw_dir: Path) -> dict:
    path = Path(raw_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: run the collect stage first (dvc repro collect)")
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in file_chunks(path):
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


def members_digest(folder: Path) -> str:
    """sha256 of a folder of extracted members: over sorted "name<TAB>sha256" lines, so it
    is the same however the archive that held them was packed."""
    lines = sorted(f"{p.name}\t{sha256_file(p)}\n" for p in Path(folder).iterdir() if p.is_file())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def file_chunks(path: Path) -> Iterator[bytes]:
    """The bytes of `path` in CHUNK_BYTES pieces, never all in memory."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


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


def checked_manifest(data: Mapping, raw_dir: Path) -> dict:
    """The collect stage's manifest of `raw_dir`, checked to be of the configured dataset."""
    manifest = load_manifest(raw_dir)
    if (manifest["name"], manifest["format"]) != (data["name"], data.get("format")):
        raise DataError(
            f"{raw_dir} holds {manifest['name']!r} ({manifest['format']}), not {data['name']!r} "
            f"({data.get('format')}): re-run the collect stage with the same data config"
        )
    return manifest


def save_arrays(out_dir: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Write each array as `out_dir/<name>.npy` (atomically); returns {file name: sha256}."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return {
        f"{name}.npy": _save_npy(Path(out_dir) / f"{name}.npy", array)
        for name, array in arrays.items()
    }


def write_meta(
    out_dir: Path,
    fields: Mapping[str, Any],
    data: Mapping,
    raw_dir: Path,
    manifest: Mapping,
    seed: int,
    sha256: Mapping[str, str],
) -> dict[str, Any]:
    """Write and return a processed dataset's meta.json: the format's own `fields` (shapes,
    classes, statistics...) plus what every one carries: `name`, `format`, the split `seed`,
    the raw files' and the arrays' sha256 (tracking tags pin each run to them). It goes last:
    its presence means every array beside it is complete."""
    meta = {
        "name": data["name"],
        "format": data["format"],
        **fields,
        "seed": seed,
        "raw_sha256": raw_sha256(raw_dir, manifest),
        "sha256": dict(sha256),
    }
    write_atomic(Path(out_dir) / META, [json.dumps(meta, indent=2).encode()])
    return meta


def load_array(processed_dir: Path, name: str) -> np.ndarray:
    path = Path(processed_dir) / f"{name}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    return np.load(path)


def load_split(processed_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one split written by `preprocess`: for images x is uint8 (N, H, W) or
    (N, H, W, C) and y int64 (N,); other formats store their own dtypes and shapes."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
    return load_array(processed_dir, f"{split}_x"), load_array(processed_dir, f"{split}_y")


def load_meta(processed_dir: Path) -> dict:
    path = Path(processed_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    return json.loads(path.read_text())


def stratified_split(
    y: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled indices (taken, rest), `n` taken with each class's share of `y` kept.

    Per-class counts use largest remainders, so they add up to exactly `n`.
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n / len(y)
    take = np.floor(quota).astype(np.int64)
    # Ties go to the lower class index (stable sort), so the split is deterministic.
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    taken, rest = [], []
    for c, k in zip(classes, take, strict=True):
        idx = rng.permutation(np.flatnonzero(y == c))
        taken.append(idx[:k])
        rest.append(idx[k:])
    # Shuffled rather than class-sorted, so any prefix of a split is a fair sample.
    return rng.permutation(np.concatenate(taken)), rng.permutation(np.concatenate(rest))


def sample_rows(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of a seeded sample of `limit` of `n` rows (order kept), or None when
    `limit` is None or leaves every row (then `rng` is not drawn from)."""
    if limit is None or limit >= n:
        return None
    return np.sort(rng.permutation(n)[:limit])


def fraction_count(data: Mapping, key: str, n: int) -> int:
    """round(data[key] * n), checked to leave at least one sample on each side."""
    k = round(data[key] * n)
    if not 0 < k < n:
        raise ValueError(
            f"data.{key}={data[key]} of {n} samples gives {k}, leaving one side empty: "
            f"change data.{key} or use more data"
        )
    return k


def _save_npy(path: Path, array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return write_atomic(path, [buf.getbuffer()])


def raw_sha256(raw_dir: Path, manifest: Mapping) -> dict[str, str]:
    # An image folder may hold thousands of files, and each entry becomes a tracking tag, so
    # it is summarized by the manifest, which changes exactly when an image does.
    if manifest["format"] == "image_folder":
        return {MANIFEST: sha256_file(raw_dir / MANIFEST)}
    return dict(manifest["files"])


def read_verified(path: Path, expected: str) -> bytes:
    """The bytes of a raw file, checked against the manifest so a stale collect can't slip by."""
    if not path.is_file():
        raise DataError(f"{path} is missing: re-run the collect stage")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != expected:
        raise DataError(f"{path} changed since it was collected: re-run the collect stage")
    return blob


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Atomic JSON write (sorted keys), so a killed stage never leaves a half-written output
    for DVC to cache; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, [(json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()])


# --- validators: one rule per kind of setting, one message shape ----------------------------


def check_fraction(data: Mapping, key: str, below: float = 1.0) -> float:
    """data[key] as a fraction in (0, `below`); ValueError naming the key and an example."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < below:
        raise ValueError(
            f"data.{key}={value!r} must be a fraction in (0, {below:g}), e.g. data.{key}=0.1"
        )
    return float(value)


def check_limit(data: Mapping, smallest: int, unit: str = "samples", why: str = "") -> int | None:
    """data.limit as None (no cap) or an integer >= `smallest` (`why` says what needs that
    many); ValueError naming the key, the bound and an example."""
    limit = data.get("limit")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or limit < smallest
    ):
        raise ValueError(
            f"data.limit={limit!r} must be null (no cap) or a number of {unit} >= {smallest}"
            f"{f' ({why})' if why else ''}, e.g. data.limit={max(smallest, 2000)}"
        )
    return limit


def source_of(data: Mapping, path: Path) -> str:
    """How to name a raw file to its owner: their own `data.path`, not our copy under data/raw."""
    own = data.get("path")
    if own in (None, "", "???"):
        return str(path)
    if isinstance(own, str | os.PathLike):
        return str(own)
    # several own files (an aligned corpus' two sides): the one this copy was made from
    return next((str(one) for one in own if Path(one).name == Path(path).name), str(path))


def decode_text(blob: bytes, encoding: str, source: str) -> str:
    """`blob` decoded as `encoding` (data.encoding). DataError naming the line, the byte and
    the fix for bytes of another encoding; ValueError for an encoding Python does not know."""
    try:
        return blob.decode(encoding)
    except LookupError as e:
        raise ValueError(
            f"data.encoding={encoding!r} is not an encoding Python knows: use e.g. utf-8, "
            "latin-1, cp1252 or utf-16"
        ) from e
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{source}: line {line} holds byte {blob[e.start : e.start + 1]!r}, which is not "
            f"valid {encoding}: set data.encoding to the file's encoding (e.g. "
            "data.encoding=latin-1 or cp1252 for a Western European spreadsheet export), or "
            "save the file as UTF-8"
        ) from e


def check_unique_members(names: Iterable[str], archive: Path | str) -> None:
    """DataError naming the members of a zip/tar `archive` that share a name (which one is
    meant would be a guess): the fix is to repack it with unique names."""
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    twice = sorted(n for n, count in seen.items() if count > 1)
    if twice:
        raise DataError(
            f"{archive} holds more than one member named {twice[:5]}: which one is meant is "
            "ambiguous; repack the archive with unique member names"
        )


def check_class_coverage(
    labels: Mapping[str, np.ndarray], classes: Sequence[str], fix: str
) -> None:
    """Every class must have training samples (DataError: a model can't learn it), and should
    reach validation and test (a warning naming the classes: their metrics there are left out
    of macro averages). `labels` maps split -> int class ids; `fix` says how to get more."""
    for split, ids in labels.items():
        absent = [c for i, c in enumerate(classes) if not (ids == i).any()]
        if not absent:
            continue
        if split == "train":
            raise DataError(
                f"class(es) {absent} have no samples in the training split, so a model can't "
                f"learn them: {fix}"
            )
        log.warning(
            "class(es) %s have no samples in the %s split: their %s metrics are undefined and "
            "left out of macro averages (%s)",
            absent,
            split,
            split,
            fix,
        )
