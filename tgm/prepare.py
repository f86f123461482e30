"""prepare: accepted images -> palette + token arrays per split (train / val / test) + meta.json, and the
unlabelled pools' tokens (pool_tokens.npy) for pretraining.

Splits are stratified by class and drawn with `prepare.seed`; the accepted manifest holds each picture once
(same sha256) and near-duplicates share a split, so no picture can sit in both training and test. A source
with its own splits keeps them, and the validation or test split it lacks is drawn from its training images.
Then no test or validation picture may be trained on through a copy: a training or validation image, or a
pooled one, whose sha256 or perceptual hash equals a test (or validation) image's is set aside, named in
set_aside.csv with the image it copies. With base.path, the images are tokenised with the base's palette.
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
from tgm.errors import BaseMismatch
from tgm.io import atomic_dir, ingested_files, read_ingested, read_json, write_json, write_table
from tgm.parallel import map_in_order
from tgm.params import BaseParams, PrepareParams
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
    """path, label, sha256 (and ahash, group) of every accepted labelled image, with its split: the user's
    own where the source has splits, a split it lacks drawn from its training images; else all drawn here."""
    # The accepted manifest holds each picture once (validate quarantines copies; the contract enforces it).
    cols = ["path", "label", "sha256"] + (["ahash"] if "ahash" in manifest else [])
    table = manifest[cols].reset_index(drop=True)
    given = manifest["split"].reset_index(drop=True) if "split" in manifest else pd.Series("", index=table.index)
    # A near-duplicate group spans labels only in odd data; grouping per label keeps stratification exact.
    group = None
    if "ahash" in table:
        table["group"] = table["label"] + ":" + table["ahash"]
        group = "group"
    if (given == "").all():
        table["split"] = stratified_split(table, params.val_fraction, params.test_fraction, params.seed, group)
        return table
    split = given.where(given != "", "train")
    train = split == "train"
    if group:  # the user's splits part near-duplicates; copies across them are prepare's to set aside
        table["group"] = split + ":" + table["group"]
    val_fraction = 0.0 if (split == "val").any() else params.val_fraction
    test_fraction = 0.0 if (split == "test").any() else params.test_fraction
    if val_fraction or test_fraction:
        split[train] = stratified_split(table[train], val_fraction, test_fraction, params.seed, group)
    table["split"] = split
    return table


SET_ASIDE_COLUMNS = ["path", "pool", "split", "reason", "matches"]
# A near copy: the same perceptual hash and, at the prepared size, a mean absolute difference of at most this
# many grey levels (of 255) from the held-out image. The hash alone also pairs different garments of the same
# cut; re-encoded, resized or lightly retouched copies stay well under this (docs/own-data.md).
NEAR_COPY_TOLERANCE = 5.0


def copies_of_held_out(rows: pd.DataFrame, pixels: np.ndarray) -> pd.DataFrame:
    """The rows (path, split, pool, sha256, ahash; pixels[i] is row i's image) that copy a picture of a
    held-out split: the same sha256 as a test image, or a near copy of one (NEAR_COPY_TOLERANCE), else the
    same of a validation image. A validation image is checked against test only, a test image never; a
    pooled image (split "") also against the training images, by sha256 (the picture is there already).
    One row each, SET_ASIDE_COLUMNS, the first match in that order naming the reason and the image copied."""
    rank = {"test": 0, "val": 1, "train": 2, "": 3}
    later = rows["split"].map(rank)
    hits: dict[int, tuple[str, str]] = {}
    for split in ("test", "val", "train"):
        held = rows[rows["split"] == split]
        candidates = rows[(later > rank[split]) & ~rows.index.isin(list(hits))]
        exact = dict(zip(held["sha256"], held["path"]))
        for i, match in candidates["sha256"].map(exact).dropna().items():
            hits.setdefault(i, (f"copy_of_{split}_image", match))
        if split == "train" or "ahash" not in rows:
            continue
        by_hash = held.groupby("ahash").groups
        for i, key in candidates["ahash"].items():
            if i in hits or key not in by_hash:
                continue
            for j in by_hash[key]:
                if np.abs(pixels[i].astype(np.float32) - pixels[j]).mean() <= NEAR_COPY_TOLERANCE:
                    hits[i] = (f"near_copy_of_{split}_image", rows.at[j, "path"])
                    break
    aside = rows.loc[sorted(hits), ["path", "pool", "split"]]
    aside["reason"] = [hits[i][0] for i in aside.index]
    aside["matches"] = [hits[i][1] for i in aside.index]
    return aside[SET_ASIDE_COLUMNS].sort_values("path").reset_index(drop=True)


def spec_of_base(base_dir: str | Path, params: PrepareParams) -> PreprocessSpec:
    """The base's preprocessing, refused unless the prepare params can tokenise the new task with it."""
    base = PreprocessSpec.load(base_dir)
    for key, mine, theirs in (
        ("image_size", params.image_size, base.image_size),
        ("palette_size", params.palette_size, base.palette_size),
        ("color_mode", params.color_mode, base.color_mode),
    ):
        if mine != theirs and not (key == "color_mode" and mine == "auto"):
            raise BaseMismatch(
                f"base {base_dir} was pretrained with {key} {theirs}, prepare.{key} is {mine}: set it to {theirs} "
                "or leave base.path null"
            )
    return base


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


def write_prepared(
    out_dir, table: pd.DataFrame, tokens, labels, spec: PreprocessSpec, *, classes: list, pool, source: str
) -> dict:
    """The token arrays per split, the palette, splits.csv.gz and meta.json, all or nothing; and, when there
    are any, the pool's table and tokens and the images set aside. `pool`: (pooled table, its tokens, the
    set-aside table)."""
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
            "source": source,
        }
        pooled, pool_tokens, aside = pool
        if len(pooled) or (aside["pool"] != "").any():
            np.save(tmp / POOL_TOKENS, pool_tokens.astype(token_dtype))
            write_table(pooled, tmp / "pool.csv.gz")
            meta["pool_images"] = len(pooled)
            meta["pools"] = {
                name: {"images": int((pooled["pool"] == name).sum()), "set_aside": int((aside["pool"] == name).sum())}
                for name in sorted((set(pooled["pool"]) | set(aside["pool"])) - {""})
            }
        if len(aside):
            aside.to_csv(tmp / SET_ASIDE, index=False)
            meta["set_aside"] = {r: int(n) for r, n in aside["reason"].value_counts().sort_index().items()}
        write_json(tmp / "meta.json", meta)
    return meta


POOL_TOKENS = "pool_tokens.npy"
SET_ASIDE = "set_aside.csv"


def prepare(
    params: PrepareParams,
    validated_dir: str | Path,
    raw_dir: str | Path,
    out_dir: str | Path,
    *,
    base: BaseParams | None = None,
) -> dict:
    manifest = pd.read_csv(Path(validated_dir) / "manifest.csv.gz", keep_default_na=False, dtype={"label": str})
    manifest = schemas.check(schemas.AcceptedManifest, manifest, "accepted manifest")
    table = split_table(manifest[manifest["pool"] == ""], params)
    pool_cols = ["path", "pool", "sha256"] + (["ahash"] if "ahash" in manifest else [])
    pooled = manifest.loc[manifest["pool"] != "", pool_cols].reset_index(drop=True)
    base_spec = spec_of_base(base.path, params) if base is not None and base.path else None
    if base_spec is not None:
        params = params.model_copy(update={"color_mode": base_spec.color_mode})
    rows = pd.concat([table.assign(pool=""), pooled.assign(split="")], ignore_index=True)
    by_path = manifest.set_index("path")
    pixels, color_mode = read_pixels(ingested_files(raw_dir, by_path.loc[rows["path"]].reset_index()), params)
    aside = copies_of_held_out(rows, pixels)
    keep = ~rows["path"].isin(aside["path"]).to_numpy()
    in_table = np.arange(len(rows)) < len(table)
    table = schemas.check(schemas.SplitTable, table[keep[in_table]].reset_index(drop=True), "split table")
    pooled = pooled[keep[~in_table]].reset_index(drop=True)
    pixels = np.concatenate([pixels[in_table & keep], pixels[~in_table & keep]])
    classes = class_order(table["label"])
    is_train = np.concatenate([(table["split"] == "train").to_numpy(), np.ones(len(pooled), bool)])
    spec = base_spec or fit_spec(pixels, is_train, color_mode, params)
    # Same two steps as preprocess.image_to_tokens, batched: the service uses that function on each image.
    tokens = quantize_to_palette(pixels.reshape(-1, pixels.shape[-1]), spec.palette).reshape(len(pixels), -1)
    labels = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    pool = (pooled.drop(columns=["ahash"], errors="ignore"), tokens[len(table) :], aside)
    source = (
        read_json(Path(raw_dir) / "source.json").get("source", "") if (Path(raw_dir) / "source.json").exists() else ""
    )
    meta = write_prepared(out_dir, table, tokens[: len(table)], labels, spec, classes=classes, pool=pool, source=source)
    size = f"{params.image_size}x{params.image_size}"
    log.info("prepare: %s, %s palette of %d, splits %s", size, color_mode, spec.palette_size, meta["split_sizes"])
    if "pool_images" in meta:
        log.info("prepare: %d pooled images for pretraining", meta["pool_images"])
    if len(aside):
        log.info("prepare: %d images set aside as copies of held-out ones: %s", len(aside), meta["set_aside"])
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
    pool = stream_pool(prepared_dir)
    if pool is not None:
        ranges = [(int(b.min()), int(b.max())) for b in pool.blocks() if b.size]
        if pool.shape[1] != seq_len or len(pool) != meta.get("pool_images"):
            problems.append(
                f"pool: tokens have shape {pool.shape}, meta.json says {meta.get('pool_images')} x {seq_len}"
            )
        if min(r[0] for r in ranges) < 0 or max(r[1] for r in ranges) >= palette:
            problems.append(f"pool: token values outside the palette 0..{palette - 1}")
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


def stream_pool(prepared_dir: str | Path) -> TokenFile | None:
    """The unlabelled pools' tokens read from disk as needed; None when the data has no pool (or an empty one)."""
    path = Path(prepared_dir) / POOL_TOKENS
    pool = TokenFile(path) if path.exists() else None
    return pool if pool is not None and len(pool) else None


def load_pool(prepared_dir: str | Path) -> np.ndarray | None:
    """The unlabelled pools' tokens (as int64) in memory, or None."""
    pool = stream_pool(prepared_dir)
    return None if pool is None else np.concatenate([b.astype(np.int64) for b in pool.blocks()])
