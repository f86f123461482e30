"""Small file helpers that never leave a half-written output behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tgm.errors import SourceChanged

# mkstemp and mkdtemp create owner-only files and folders; an output should get the modes any other file gets.
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", durable: bool = False) -> Iterator[IO]:
    """Yield a file open on a temporary sibling that replaces `path` only if the block finishes: a crash or a
    kill before the rename leaves the previous `path` intact. `durable` also flushes it to disk first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~_UMASK)
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The per-file tables (one row per image: paths, sha256, measurements) are gzipped: uncompressed they take a
# few hundred bytes per image, as much as a small image itself. mtime 0: the same table gives the same bytes.
TABLE_COMPRESSION = {"method": "gzip", "compresslevel": 6, "mtime": 0}


def write_table(df, path: str | Path) -> None:
    """A per-file table as gzipped CSV (`*.csv.gz`; pandas.read_csv and zcat read it as it is)."""
    df.to_csv(path, index=False, compression=TABLE_COMPRESSION)


def ingested_files(raw_dir: str | Path, manifest) -> list[tuple[Path | None, str]]:
    """(where, sha256) of each manifest row, what read_ingested takes: where is the user's file itself (folder
    sources are read in place, never copied), or the file ingest wrote under `raw_dir` (built-in sources); None
    for links and special files, which are listed but never opened."""
    raw_dir = Path(raw_dir)
    return [
        (None if entry != "file" else raw_dir / path if source.startswith("builtin:") else Path(source), sha256)
        for path, entry, source, sha256 in zip(
            manifest["path"], manifest["entry"], manifest["source"], manifest["sha256"]
        )
    ]


def read_ingested(path: Path, sha256: str) -> bytes:
    """The bytes of a file ingest listed, refused unless they are the bytes it hashed: a stage never trains on
    a file that changed behind DVC's back."""
    rerun = "run `dvc repro` again (or `dvc repro -f ingest` for a folder outside data/sources/) to re-ingest"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SourceChanged(f"{path} was listed by ingest but no longer exists: {rerun}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SourceChanged(f"{path} changed after ingest (its sha256 differs from data/raw/manifest.csv.gz): {rerun}")
    return data
