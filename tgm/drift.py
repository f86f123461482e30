"""drift: score a folder of new images against the training distribution, with the model's own typicality.

Every file in the folder is accounted for: decoded through the same guards as validate and turned into tokens
with the classifier's preprocessing, or listed as unreadable with its reason. Each readable image gets its bits
per pixel from the classifier (tgm.typicality) and a verdict against the threshold `evaluate` calibrated. The
folder drifts when more than drift.max_atypical_share of its images are atypical, or when a two-sample
Kolmogorov-Smirnov test rejects that its bits per pixel come from validation's at drift.min_p_value. A Great
Expectations suite over the scores gives the verdict in Data Docs; the report and the per-image scores are
written either way, and a drift raises DriftDetected (`tgm drift` exits non-zero, the Prefect flow fails).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tgm.errors import SourceMissing, UserError
from tgm.images import InvalidImage, open_image
from tgm.io import write_json, write_text
from tgm.params import DriftParams
from tgm.preprocess import PreprocessSpec, image_to_tokens
from tgm.typicality import Typicality, classify_and_score

log = logging.getLogger(__name__)


class DriftDetected(UserError):
    """The incoming images are not like the training images; the message gives the share and the test."""


def read_folder(folder: Path, spec: PreprocessSpec, max_pixels: int) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per file (path, readable, reason) and the tokens of the readable ones, in path order."""
    if not folder.is_dir():
        raise SourceMissing(f"drift.folder: {folder} does not exist or is not a directory")
    rows, tokens = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            tokens.append(image_to_tokens(open_image(path, max_pixels=max_pixels), spec))
            rows.append({"path": str(path.relative_to(folder)), "readable": True, "reason": ""})
        except InvalidImage as exc:
            rows.append({"path": str(path.relative_to(folder)), "readable": False, "reason": exc.reason})
    empty = np.zeros((0, spec.seq_len), np.int64)
    return pd.DataFrame(rows, columns=["path", "readable", "reason"]), np.stack(tokens) if tokens else empty


def score_suite(params: DriftParams, typ: Typicality) -> list:
    """The expectations the scores must meet; the atypical share is GX's `mostly`."""
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectColumnValuesToNotBeNull(column="bits_per_pixel"),
        E.ExpectColumnValuesToBeBetween(
            column="bits_per_pixel", max_value=typ.threshold, mostly=1 - params.max_atypical_share
        ),
    ]


def judge(params: DriftParams, typ: Typicality, bpp: np.ndarray) -> dict:
    """The drift report's numbers and its problems (none: no drift)."""
    from scipy.stats import ks_2samp

    flagged = ~typ.typical(bpp)
    atypical = float(flagged.mean())
    ks = ks_2samp(bpp, np.asarray(typ.reference))
    report = {
        "scored": int(len(bpp)),
        "atypical": int(flagged.sum()),
        "atypical_share": round(atypical, 6),
        "threshold_bpp": typ.threshold,
        "median_bpp": round(float(np.median(bpp)), 6),
        "validation_median_bpp": typ.median,
        # The two distributions side by side: bits per pixel at these quantiles, new images and validation.
        "quantiles": {
            f"p{q}": [round(float(np.percentile(bpp, q)), 4), round(float(np.percentile(typ.reference, q)), 4)]
            for q in (10, 25, 50, 75, 90, 99)
        },
        "ks_statistic": round(float(ks.statistic), 6),
        "ks_p_value": float(f"{ks.pvalue:.6g}"),
    }
    problems = []
    if atypical > params.max_atypical_share:
        problems.append(
            f"{atypical:.1%} of the images are atypical (over {typ.threshold:.3f} bits per pixel), "
            f"above drift.max_atypical_share={params.max_atypical_share:.1%}"
        )
    if ks.pvalue < params.min_p_value:
        problems.append(
            f"their bits per pixel are not distributed like validation's: Kolmogorov-Smirnov statistic "
            f"{ks.statistic:.3f}, p = {ks.pvalue:.2g} < drift.min_p_value={params.min_p_value:g}"
        )
    return {**report, "passed": not problems, "problems": problems}


def drift(
    params: DriftParams,
    *,
    max_pixels: int,
    classifier_dir: str | Path,
    typicality_path: str | Path,
    report_path: str | Path,
    scores_path: str | Path,
    docs_dir: str | Path | None,
) -> dict:
    from tgm.expectations import GXRunner
    from tgm.model import load_config, load_model

    t0 = time.perf_counter()
    spec, typ = PreprocessSpec.load(classifier_dir), Typicality.load(typicality_path)
    files, tokens = read_folder(Path(params.folder), spec, max_pixels)
    if len(tokens) < params.min_images:
        raise UserError(f"drift: {len(tokens)} readable images in {params.folder}, fewer than drift.min_images")
    probs, bpp = classify_and_score(load_model(classifier_dir), tokens)
    classes = load_config(classifier_dir)["classes"]
    scores = files[files["readable"]].assign(
        bits_per_pixel=np.round(bpp, 6), typical=typ.typical(bpp), predicted=[classes[i] for i in probs.argmax(1)]
    )
    report = {"folder": str(params.folder), "files": len(files), **judge(params, typ, bpp)}
    report["unreadable"] = files.loc[~files["readable"], "reason"].value_counts().to_dict()
    results = GXRunner(Path(docs_dir) if docs_dir else None).run(
        "drift_scores", scores, score_suite(params, typ), "path"
    )
    report["expectations"] = [{"expectation": r.expectation_config.type, "success": bool(r.success)} for r in results]
    write_text(scores_path, pd.concat([scores, files[~files["readable"]]]).to_csv(index=False))
    write_json(report_path, report)
    log.info(
        "drift: %d files in %.1fs: %d scored, %.1f%% atypical, KS %.3f (p %.2g)",
        len(files),
        time.perf_counter() - t0,
        report["scored"],
        100 * report["atypical_share"],
        report["ks_statistic"],
        report["ks_p_value"],
    )
    if report["problems"]:
        raise DriftDetected(f"drift in {params.folder}: " + "; ".join(report["problems"]))
    return report
