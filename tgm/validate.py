"""validate: judge every ingested file, accept it or quarantine it with one reason, and report.

Each file is decoded in full (guarded by tgm.images), inspected (size after EXIF orientation, mode, channels,
frames, pixel statistics, a perceptual hash), and the Great Expectations suites in tgm.expectations decide.
The files of unlabelled pools go through the same guards, but not the label rules; an exact copy inside the
pools is kept once. Every input ends up in exactly one of accepted / quarantined. The stage fails only when
the data as a whole is unusable: too large a share of the labelled source or of a pool rejected, a class below
its minimum, or fewer than two classes.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ImageOps

from tgm import schemas
from tgm.errors import UserError
from tgm.images import InvalidImage, open_image
from tgm.io import ingested_files, read_ingested, read_json, write_json, write_table
from tgm.parallel import map_in_order
from tgm.params import ValidateParams
from tgm.preprocess import resize_square, to_color_mode

log = logging.getLogger(__name__)

SYSTEM_FILES = {"thumbs.db", "desktop.ini", ".ds_store"}

# A sentence per reason, for people; the reason code is for programs.
MESSAGES = {
    "unlabelled": "file is not inside a class folder, so it has no label",
    "unknown_label": "label is not one of the classes",
    "system_file": "hidden or operating-system file (name starts with '.', Thumbs.db, desktop.ini)",
    "not_a_regular_file": "a symbolic link or special file; links are not followed, so nothing outside the folder "
    "is read",
    "format_not_allowed": "image format is not in validate.allowed_formats",
    "mode_not_supported": "pixel mode has no conversion rule to grey or RGB",
    "too_small": "image is smaller than validate.min_side on its shortest side",
    "bad_aspect_ratio": "longest side / shortest side exceeds validate.max_aspect",
    "conflicting_labels": "the same image (sha256) is filed under more than one label; every copy is set aside",
    "duplicate": "exact copy of another image in the same class; the first copy is kept",
}


class DataUnusableError(UserError):
    """The data as a whole cannot be trained on; the message says why."""


def average_hash(grey: np.ndarray) -> str:
    """16x16 average hash: equal for an image and its re-encoded or slightly retouched copies."""
    from PIL import Image

    small = np.asarray(resize_square(Image.fromarray(grey), 16), dtype=np.float32)
    return np.packbits(small > small.mean()).tobytes().hex()


def inspect_file(file: tuple[Path | None, str], max_pixels: int) -> dict:
    """Decode one listed file (path, sha256) and describe it; undecodable files get decodable=False and the
    reason. A link or special file (path None) is not opened."""
    path, sha256 = file
    if path is None:
        return {
            "decodable": False,
            "decode_error": "not_a_regular_file",
            "decode_message": MESSAGES["not_a_regular_file"],
        }
    try:
        img = open_image(path, max_pixels=max_pixels, data=read_ingested(path, sha256))
    except InvalidImage as exc:
        return {"decodable": False, "decode_error": exc.reason, "decode_message": str(exc)}
    frames, fmt = img.info.get("n_frames", 1), img.format or ""
    img = ImageOps.exif_transpose(img)  # sizes as the picture is meant to be seen
    grey = np.asarray(to_color_mode(img, "grey"))
    return {
        "decodable": True,
        "decode_error": None,
        "decode_message": None,
        "format": fmt,
        "width": img.width,
        "height": img.height,
        "mode": img.mode,
        "channels": len(img.getbands()),
        "n_frames": frames,
        "pixel_mean": round(float(grey.mean()), 3),
        "pixel_std": round(float(grey.std()), 3),
        "ahash": average_hash(grey),
    }


def inspect_manifest(manifest: pd.DataFrame, raw_dir: Path, params: ValidateParams) -> pd.DataFrame:
    inspect = functools.partial(inspect_file, max_pixels=params.max_pixels)
    rows = map_in_order(inspect, ingested_files(raw_dir, manifest))
    info = pd.DataFrame(rows, index=manifest.index)
    df = manifest.drop(columns=["format", "width", "height", "mode"]).join(info)
    df["label"] = df["label"].replace("", None)
    pooled = df["pool"] != ""
    name = df["path"].str.rsplit("/", n=1).str[-1]
    df["is_hidden"] = (
        name.str.startswith(".") | name.str.lower().isin(SYSTEM_FILES) | df["path"].str.contains("/.", regex=False)
    )
    df["min_side"] = df[["width", "height"]].min(axis=1)
    df["aspect"] = df[["width", "height"]].max(axis=1) / df["min_side"].where(df["min_side"] > 0)
    # Conflicts and duplicates are judged among decodable, labelled, ordinary files only ...
    usable = df["decodable"] & df["label"].notna() & ~df["is_hidden"] & ~pooled
    labels_per_hash = df[usable].groupby("sha256")["label"].nunique()
    df["label_conflict"] = usable & df["sha256"].isin(labels_per_hash[labels_per_hash > 1].index)
    first = df[usable & ~df["label_conflict"]].groupby(["sha256", "label"])["path"].transform("first")
    # ... and, for the pools, among all their decodable ordinary files (a copy in two pools is kept once).
    first = pd.concat(
        [first, df[df["decodable"] & ~df["is_hidden"] & pooled].groupby("sha256")["path"].transform("first")]
    )
    df["duplicate_of"] = None
    dup = first[first != df.loc[first.index, "path"]]
    df.loc[dup.index, "duplicate_of"] = dup
    return df


@dataclass
class Verdicts:
    """Every inspected file's fate: accepted, or quarantined with one reason; plus the non-rejecting flags."""

    inspected: pd.DataFrame  # every file, with its measurements
    reasons: pd.Series  # per file: the quarantine reason, or NaN for accepted
    accepted: pd.DataFrame
    quarantine: pd.DataFrame  # path, label, sha256, reason, message
    flags: dict[str, list[str]]  # flag rule -> paths (reported, not rejected)
    classes: list[str]


def judge_files(df: pd.DataFrame, suites, classes: list[str], params: ValidateParams) -> tuple[Verdicts, list]:
    """Run the row suites and give each file one reason: the first rejecting expectation, in the order
    tgm.expectations lists them. Returns the verdicts and the suites' summaries."""
    decode_error = dict(zip(df["path"], df["decode_error"]))
    by_path: dict[str, str] = {}
    flags: dict[str, list[str]] = {}
    row_summaries = []
    pooled = df["pool"] != ""
    for rows, pool in ((df[~pooled], False), (df[pooled], True)):
        if pool and rows.empty:
            continue
        failed, summaries = suites.check_rows(rows, pool=pool)
        row_summaries += summaries
        for rule in suites.pool_rules if pool else suites.rules:
            if rule.severity == "flag":
                flags.setdefault(rule.reason, []).extend(failed[rule.reason])
                continue
            for path in failed[rule.reason]:
                by_path.setdefault(path, decode_error[path] if rule.reason == "undecodable" else rule.reason)
    reasons = df["path"].map(by_path)
    quarantined = df[reasons.notna()]
    quarantine = pd.DataFrame(
        {
            "path": quarantined["path"],
            "label": quarantined["label"].fillna(""),
            "sha256": quarantined["sha256"],
            "reason": reasons[reasons.notna()],
            "message": [_message(reasons[i], df.loc[i], params) for i in quarantined.index],
        }
    ).reset_index(drop=True)
    accepted = df[reasons.isna()].reset_index(drop=True)
    return Verdicts(df, reasons, accepted, quarantine, flags, classes), row_summaries


def summarise(v: Verdicts, inputs: int, source: dict, params: ValidateParams) -> tuple[dict, dict]:
    """The metrics of reports/validation.json (with its problems and warnings) and the lists for details.json."""
    per_class = v.accepted["label"].value_counts().reindex(v.classes, fill_value=0)
    counts = Counter(v.quarantine["reason"])
    near_constant = sorted(set(v.flags.get("near_constant", [])) & set(v.accepted["path"]))
    details = {
        "flagged_near_constant": near_constant,
        "animated_first_frame_used": v.accepted.loc[v.accepted["n_frames"] > 1, "path"].tolist(),
        "near_duplicate_groups": v.accepted[v.accepted.duplicated("ahash", keep=False)]
        .groupby("ahash")["path"]
        .apply(list)
        .tolist(),
        "empty_class_folders": source.get("empty_class_folders", []),
    }
    summary = {
        "inputs": inputs,
        "accepted": len(v.accepted),
        "rejected": len(v.quarantine),
        "reject_fraction": round(len(v.quarantine) / max(inputs, 1), 6),
        "rejected_by_reason": dict(sorted(counts.items())),
        "classes": len(v.classes),
        "images_per_class": {k: int(n) for k, n in per_class.items()},
        "flagged_near_constant": len(near_constant),
        "animated_first_frame_used": len(details["animated_first_frame_used"]),
        "near_duplicate_groups": len(details["near_duplicate_groups"]),
        "empty_class_folders": len(details["empty_class_folders"]),
    }
    labelled = v.accepted["pool"] == ""
    if (v.accepted.loc[labelled, "split"] != "").any():  # the user's own splits, kept as they are
        summary["images_per_split"] = {
            s: int(n) for s, n in v.accepted.loc[labelled, "split"].value_counts().sort_index().items()
        }
    parts = part_counts(v)
    if len(parts) > 1:
        summary["labelled"] = parts.pop("")
        summary["pools"] = parts
    problems, warnings = _problems(summary, per_class, v.classes, params, part_counts(v))
    if source.get("empty_class_folders"):
        warnings.append("empty class folders ignored: " + ", ".join(source["empty_class_folders"]))
    summary.update(passed=not problems, problems=problems, warnings=warnings)
    return summary, details


def part_counts(v: Verdicts) -> dict[str, dict]:
    """Files in, accepted and rejected (with reasons) of the labelled source ("") and of each pool."""
    parts = {}
    pools = sorted(set(v.inspected["pool"]) - {""})
    for part in ["", *pools]:
        rejected = v.quarantine.loc[v.inspected.loc[v.reasons.notna(), "pool"].to_numpy() == part]
        inputs = int((v.inspected["pool"] == part).sum())
        parts[part] = {
            "inputs": inputs,
            "accepted": int((v.accepted["pool"] == part).sum()),
            "rejected": len(rejected),
            "reject_fraction": round(len(rejected) / max(inputs, 1), 6),
            "rejected_by_reason": dict(sorted(Counter(rejected["reason"]).items())),
        }
    return parts


def _problems(summary: dict, per_class: pd.Series, classes: list[str], params: ValidateParams, parts: dict):
    """What makes the data as a whole unusable (problems) or worth a look (warnings)."""
    problems, warnings = [], []
    if parts[""]["inputs"] == 0:
        problems.append("the source contains no files")
    for part, counts in parts.items():
        if counts["reject_fraction"] > params.max_reject_fraction:
            worst = ", ".join(f"{r}: {n}" for r, n in Counter(counts["rejected_by_reason"]).most_common(3))
            problems.append(
                f"{counts['rejected']} of {counts['inputs']} files"
                + (f" of the unlabelled pool {part}" if part else "")
                + f" rejected ({counts['reject_fraction']:.1%} > validate.max_reject_fraction="
                f"{params.max_reject_fraction:.1%}); most common reasons: {worst}"
            )
    small = {k: int(v) for k, v in per_class.items() if v < params.min_images_per_class}
    if small:
        problems.append(
            f"classes below validate.min_images_per_class={params.min_images_per_class}: "
            + ", ".join(f"{k} ({v})" for k, v in small.items())
        )
    if len(classes) == 1:
        problems.append(f"only one class ({classes[0]!r}) was found; a classifier needs at least two class folders")
    if len(classes) >= 2 and per_class.min() > 0 and per_class.max() / per_class.min() > params.max_class_imbalance:
        warnings.append(
            f"classes are imbalanced: {per_class.idxmax()} has {per_class.max()} images, "
            f"{per_class.idxmin()} {per_class.min()} (> validate.max_class_imbalance)"
        )
    return problems, warnings


def write_outputs(v: Verdicts, out_dir: Path, details: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(v.inspected.assign(verdict=v.reasons.fillna("accepted")), out_dir / "inspected.csv.gz")
    write_table(v.accepted, out_dir / "manifest.csv.gz")
    v.quarantine.to_csv(out_dir / "quarantine.csv", index=False)
    write_json(out_dir / "details.json", details)


def validate(
    params: ValidateParams,
    raw_dir: str | Path,
    out_dir: str | Path,
    report_path: str | Path,
    docs_dir: str | Path | None,
) -> dict:
    from tgm.expectations import Suites

    t0 = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    manifest = pd.read_csv(raw_dir / "manifest.csv.gz", keep_default_na=False, dtype={"label": str})
    manifest = schemas.check(schemas.Manifest, manifest, f"{raw_dir / 'manifest.csv.gz'}")
    source = read_json(raw_dir / "source.json") if (raw_dir / "source.json").exists() else {}
    df = inspect_manifest(manifest, raw_dir, params)

    # Class set: labels with at least one decodable, ordinary image (an unusable label is no class).
    classes = sorted(df.loc[df["decodable"] & ~df["is_hidden"] & (df["entry"] == "file"), "label"].dropna().unique())
    if docs_dir is not None:
        docs_dir = Path(docs_dir)
        shutil.rmtree(docs_dir, ignore_errors=True)
    suites = Suites(params, classes, docs_dir)
    verdicts, row_summaries = judge_files(df, suites, classes, params)
    assert len(verdicts.accepted) + len(verdicts.quarantine) == len(manifest)  # every input accounted for
    # The class-level suite judges what will actually be trained on.
    class_summaries = suites.check_classes(_class_table(verdicts.accepted))
    summary, details = summarise(verdicts, len(manifest), source, params)
    details = {"expectations": row_summaries + class_summaries, **details, "data_docs": suites.docs_index}
    write_outputs(verdicts, out_dir, details)
    write_json(report_path, summary)
    elapsed = time.perf_counter() - t0
    log.info(
        "validate: %d files in %.1fs (%.0f files/s): %d accepted, %d quarantined %s",
        len(manifest),
        elapsed,
        len(manifest) / max(elapsed, 1e-9),
        summary["accepted"],
        summary["rejected"],
        summary["rejected_by_reason"],
    )
    for w in summary["warnings"]:
        log.warning("validate: %s", w)
    if summary["problems"]:
        raise DataUnusableError(
            "validation failed:\n  "
            + "\n  ".join(summary["problems"])
            + f"\nSee {out_dir / 'quarantine.csv'} for each rejected file."
        )
    schemas.check(schemas.AcceptedManifest, verdicts.accepted.fillna({"label": ""}), "accepted manifest")
    return summary


def _class_table(accepted: pd.DataFrame) -> pd.DataFrame:
    counts = accepted["label"].dropna().value_counts()
    table = pd.DataFrame({"label": counts.index.astype(str), "images": counts.to_numpy()})
    table["imbalance"] = table["images"].max() / table["images"] if len(table) else []
    return table


def _message(reason: str, row: pd.Series, params: ValidateParams) -> str:
    if row["decode_message"] and reason == row["decode_error"]:
        return row["decode_message"]
    if reason == "too_small":
        return f"image is {row['width']:.0f}x{row['height']:.0f}, below validate.min_side={params.min_side}"
    if reason == "bad_aspect_ratio":
        return (
            f"image is {row['width']:.0f}x{row['height']:.0f} (aspect {row['aspect']:.1f} > "
            f"validate.max_aspect={params.max_aspect})"
        )
    if reason == "duplicate":
        return f"{MESSAGES['duplicate']}: {row['duplicate_of']}"
    if reason == "format_not_allowed":
        return f"{row['format']} is not in validate.allowed_formats"
    if reason == "mode_not_supported":
        return f"pixel mode {row['mode']} has no conversion rule to grey or RGB"
    return MESSAGES.get(reason, reason)
