"""validate: split the raw manifest into accepted images and a quarantine list, one reason per file.

Every input ends up in exactly one of the two lists. The stage fails only when the data as a whole is
unusable: too large a share rejected, or a class with too few images left.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from tgm import schemas
from tgm.images import InvalidImage, open_image
from tgm.io import write_json
from tgm.params import ValidateParams

log = logging.getLogger(__name__)

# Reasons are machine-readable codes; the message column says the same for a person.
REASONS = {
    "unlabelled": "file is not inside a class folder, so it has no label",
    "empty_file": "file is empty (0 bytes), or a link that was not followed",
    "too_large": "image has more pixels than the decompression-bomb limit",
    "not_an_image": "file is not an image format Pillow can read",
    "corrupt_image": "image header reads but the pixel data does not decode (truncated or damaged)",
    "too_small": "image is smaller than validate.min_side pixels on a side",
}


class DataUnusableError(RuntimeError):
    """The data as a whole cannot be trained on; the message says why."""


def check_image(path: Path, label: str, params: ValidateParams) -> tuple[str, str] | None:
    """None when the file is a usable labelled image, else (reason, message)."""
    if not label:
        return "unlabelled", REASONS["unlabelled"]
    try:
        size = open_image(path).size
    except InvalidImage as exc:
        return exc.reason, str(exc)
    if min(size) < params.min_side:
        return "too_small", f"image is {size[0]}x{size[1]}, below validate.min_side={params.min_side}"
    return None


def validate(params: ValidateParams, raw_dir: str | Path = "data/raw", out_dir: str | Path = "data/validated",
             report_path: str | Path = "reports/validation.json") -> dict:
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    manifest = pd.read_csv(raw_dir / "manifest.csv", keep_default_na=False, dtype={"label": str})
    manifest = schemas.check(schemas.Manifest, manifest, "data/raw/manifest.csv")

    verdicts = [check_image(raw_dir / row.path, row.label, params) for row in manifest.itertuples()]
    rejected_mask = [v is not None for v in verdicts]
    accepted = manifest[[not r for r in rejected_mask]].reset_index(drop=True)
    quarantine = manifest.loc[rejected_mask, ["path", "label", "sha256"]].reset_index(drop=True)
    quarantine["reason"] = [v[0] for v in verdicts if v is not None]
    quarantine["message"] = [v[1] for v in verdicts if v is not None]
    assert len(accepted) + len(quarantine) == len(manifest)  # every input accounted for

    per_class = accepted["label"].value_counts().sort_index()
    reasons = Counter(quarantine["reason"])
    summary = {
        "inputs": len(manifest),
        "accepted": len(accepted),
        "rejected": len(quarantine),
        "reject_fraction": round(len(quarantine) / max(len(manifest), 1), 6),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "classes": int(per_class.size),
        "images_per_class": {k: int(v) for k, v in per_class.items()},
    }
    problems = []
    if len(manifest) == 0:
        problems.append("the source contains no files")
    if summary["reject_fraction"] > params.max_reject_fraction:
        worst = ", ".join(f"{r}: {n}" for r, n in reasons.most_common(3))
        problems.append(f"{summary['rejected']} of {summary['inputs']} files rejected "
                        f"({summary['reject_fraction']:.1%} > validate.max_reject_fraction="
                        f"{params.max_reject_fraction:.1%}); most common reasons: {worst}")
    small = {k: int(v) for k, v in per_class.items() if v < params.min_images_per_class}
    if small:
        problems.append(f"classes below validate.min_images_per_class={params.min_images_per_class}: "
                        + ", ".join(f"{k} ({v})" for k, v in small.items()))
    if 0 < per_class.size < 2:
        problems.append(f"only one class ({per_class.index[0]!r}) was found; a classifier needs at least two "
                        "class folders")
    summary["passed"] = not problems
    summary["problems"] = problems

    out_dir.mkdir(parents=True, exist_ok=True)
    accepted.to_csv(out_dir / "manifest.csv", index=False)
    quarantine.to_csv(out_dir / "quarantine.csv", index=False)
    write_json(report_path, summary)
    for row in quarantine.itertuples():
        log.info("quarantined %s: %s", row.path, row.message)
    if problems:
        raise DataUnusableError("validation failed:\n  " + "\n  ".join(problems)
                                + f"\nSee {out_dir / 'quarantine.csv'} for each rejected file.")
    schemas.check(schemas.AcceptedManifest, accepted, "accepted manifest")
    log.info("validate: %d accepted, %d quarantined, %d classes", len(accepted), len(quarantine), per_class.size)
    return summary
