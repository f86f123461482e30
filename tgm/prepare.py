"""prepare: accepted images -> palette + token arrays per split (train / val / test) + meta.json.

Splits are stratified by class and drawn with `prepare.seed`; the accepted manifest holds each picture once
(same sha256) and near-duplicates share a split, so no picture can sit in both training and test.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tgm import schemas
from tgm.io import atomic_dir, ingested_files, read_ingested, read_json, write_json, write_table
from tgm.parallel import map_in_order
from tgm.params import PrepareParams
from tgm.preprocess import PreprocessSpec, fit_palette, image_pixels, quantize_to_palette
from tgm.tokens import TokenFile

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def class_order(labels) -> list[str]:
    """Class names in natural order, so "2" comes before "10"."""

    def key(s: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]

    return sorted(set(labels), key=key)


def stratified_split(
    df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int, group: str | None = None
) -> pd.Series:
    """Assign each row to train/val/test, per class, with at least one training image per class.

    Rows sharing a `group` value (near-duplicates: the same picture re-encoded or retouched) always land in
    the same split, so a copy of a test image can never be trained on.
    """
    rng = np.random.default_rng(seed)
    keys = df[group] if group else pd.Series(df.index.astype(str), index=df.index)
    split = pd.Series("train", index=df.index)
    for _, rows in sorted(df.groupby("label").groups.items()):
        units = sorted(set(keys[rows]))
        rng.shuffle(units)
        n = len(units)
        n_test = min(int(round(n * test_fraction)), n - 1)
        n_val = min(int(round(n * val_fraction)), n - 1 - n_test)
        assign = {u: "test" for u in units[:n_test]} | {u: "val" for u in units[n_test : n_test + n_val]}
        split[rows] = [assign.get(k, "train") for k in keys[rows]]
    return split


def looks_grey(image: Image.Image) -> bool:
    if image.mode in GREY_MODES:
        return True
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def split_table(manifest: pd.DataFrame, params: PrepareParams) -> pd.DataFrame:
    """path, label, sha256 (and group) of every accepted image, with its split."""
    # The accepted manifest holds each picture once (validate quarantines copies; the contract enforces it).
    cols = ["path", "label", "sha256"] + (["ahash"] if "ahash" in manifest else [])
    table = manifest[cols].reset_index(drop=True)
    # A near-duplicate group spans labels only in odd data; grouping per label keeps stratification exact.
    group = None
    if "ahash" in table:
        table["group"] = table["label"] + ":" + table["ahash"]
        group = "group"
    table["split"] = stratified_split(table, params.val_fraction, params.test_fraction, params.seed, group)
    return schemas.check(schemas.SplitTable, table, "split table")


def image_facts(file: tuple[Path, str], image_size: int, color_mode: str) -> tuple[bool, dict[str, np.ndarray]]:
    """Whether the image (path, sha256) looks grey, and its resized pixels in `color_mode` (both modes when it
    is "auto")."""
    with Image.open(io.BytesIO(read_ingested(*file))) as im:
        im.load()
        modes = ("grey", "rgb") if color_mode == "auto" else (color_mode,)
        return looks_grey(im), {m: image_pixels(im, image_size, m) for m in modes}


def read_pixels(files: list[tuple[Path, str]], params: PrepareParams) -> tuple[np.ndarray, str]:
    """Every image (path, sha256) resized, as (N, T, C) pixels, and the colour mode (`auto` decided from the
    images)."""
    facts = map_in_order(
        functools.partial(image_facts, image_size=params.image_size, color_mode=params.color_mode), files
    )
    color_mode = params.color_mode
    if color_mode == "auto":
        color_mode = "grey" if all(grey for grey, _ in facts) else "rgb"
    return np.stack([pixels[color_mode] for _, pixels in facts]), color_mode


def fit_spec(pixels: np.ndarray, is_train: np.ndarray, color_mode: str, params: PrepareParams) -> PreprocessSpec:
    """The palette, fitted on (a seeded sample of) the training pixels only."""
    train_pixels = pixels[is_train].reshape(-1, pixels.shape[-1])
    if len(train_pixels) > params.kmeans_sample_pixels:
        pick = np.random.default_rng(params.seed).choice(len(train_pixels), params.kmeans_sample_pixels, replace=False)
        train_pixels = train_pixels[np.sort(pick)]
    return PreprocessSpec(
        params.image_size, color_mode, fit_palette(train_pixels, color_mode, params.palette_size, params.seed)
    )


def write_prepared(out_dir, table: pd.DataFrame, tokens, labels, spec: PreprocessSpec, classes: list) -> dict:
    """The token arrays per split, the palette, splits.csv.gz and meta.json, all or nothing."""
    token_dtype = np.uint8 if spec.palette_size <= 256 else np.uint16
    counts = {}
    with atomic_dir(out_dir) as tmp:
        spec.save(tmp)
        for split in SPLITS:
            mask = (table["split"] == split).to_numpy()
            np.save(tmp / f"{split}_tokens.npy", tokens[mask].astype(token_dtype))
            np.save(tmp / f"{split}_labels.npy", labels[mask].astype(np.int64))
            counts[split] = int(mask.sum())
        write_table(table, tmp / "splits.csv.gz")
        meta = {
            "classes": classes,
            "image_size": spec.image_size,
            "color_mode": spec.color_mode,
            "palette_size": spec.palette_size,
            "seq_len": spec.seq_len,
            "split_sizes": counts,
            "images": len(table),
        }
        write_json(tmp / "meta.json", meta)
    return meta


def prepare(
    params: PrepareParams,
    validated_dir: str | Path = "data/validated",
    raw_dir: str | Path = "data/raw",
    out_dir: str | Path = "data/prepared",
) -> dict:
    manifest = pd.read_csv(Path(validated_dir) / "manifest.csv.gz", keep_default_na=False, dtype={"label": str})
    manifest = schemas.check(schemas.AcceptedManifest, manifest, "accepted manifest")
    table = split_table(manifest, params)
    classes = class_order(table["label"])
    pixels, color_mode = read_pixels(ingested_files(raw_dir, manifest), params)
    spec = fit_spec(pixels, (table["split"] == "train").to_numpy(), color_mode, params)
    # Same two steps as preprocess.image_to_tokens, batched: the service uses that function on each image.
    tokens = quantize_to_palette(pixels.reshape(-1, pixels.shape[-1]), spec.palette).reshape(len(table), -1)
    labels = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    meta = write_prepared(out_dir, table, tokens, labels, spec, classes)
    size = f"{params.image_size}x{params.image_size}"
    log.info("prepare: %s, %s palette of %d, splits %s", size, color_mode, spec.palette_size, meta["split_sizes"])
    return meta


def check_prepared(prepared_dir: str | Path) -> dict:
    """Refuse prepared arrays that training would silently mis-learn from; returns meta.json.

    Checks: token values inside the palette, one sequence of seq_len per image, labels inside the class
    range, split sizes as meta.json says, and every class present in every split.
    """
    prepared_dir = Path(prepared_dir)
    meta = read_json(prepared_dir / "meta.json")
    n_classes, palette, seq_len = len(meta["classes"]), meta["palette_size"], meta["seq_len"]
    problems = []
    if len(np.load(prepared_dir / "palette.npy")) != palette:
        problems.append(f"palette.npy does not hold {palette} colours")
    for split in SPLITS:
        try:
            tokens = TokenFile(prepared_dir / f"{split}_tokens.npy")  # scanned in blocks: memory stays bounded
        except ValueError as exc:
            problems.append(f"{split}: {exc}")
            continue
        labels = np.load(prepared_dir / f"{split}_labels.npy")
        if tokens.shape[1] != seq_len:
            problems.append(f"{split}: tokens have shape {tokens.shape}, expected (N, {seq_len})")
        if len(tokens) != len(labels) or len(tokens) != meta["split_sizes"][split]:
            problems.append(
                f"{split}: {len(tokens)} sequences, {len(labels)} labels, meta.json says {meta['split_sizes'][split]}"
            )
        ranges = [(int(b.min()), int(b.max())) for b in tokens.blocks() if b.size]
        low, high = min((r[0] for r in ranges), default=0), max((r[1] for r in ranges), default=0)
        if low < 0 or high >= palette:
            problems.append(f"{split}: token values {low}..{high} outside the palette 0..{palette - 1}")
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            problems.append(f"{split}: labels {labels.min()}..{labels.max()} outside 0..{n_classes - 1}")
        missing = sorted(set(range(n_classes)) - set(labels.tolist()))
        if missing:
            problems.append(
                f"{split}: no images of class(es) {', '.join(meta['classes'][i] for i in missing)} "
                "(add images or change prepare.val_fraction / prepare.test_fraction)"
            )
    if problems:
        raise schemas.DataContractError(f"{prepared_dir} is not fit for training:\n  " + "\n  ".join(problems))
    return meta


def load_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's tokens (as int64) and labels, in memory. Training streams its tokens instead: stream_split."""
    prepared_dir = Path(prepared_dir)
    return (
        np.load(prepared_dir / f"{split}_tokens.npy").astype(np.int64),
        np.load(prepared_dir / f"{split}_labels.npy"),
    )


def stream_split(prepared_dir: str | Path, split: str) -> tuple[TokenFile, np.ndarray]:
    """A split's tokens read from disk as needed, and its labels in memory."""
    prepared_dir = Path(prepared_dir)
    return TokenFile(prepared_dir / f"{split}_tokens.npy"), np.load(prepared_dir / f"{split}_labels.npy")
