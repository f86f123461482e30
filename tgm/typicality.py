"""How typical an image is of the training data, from the classifier's own next-pixel head.

The fine-tuned classifier keeps its generative head (it trains on class + lambda_gen * next-pixel loss), so the
forward pass that classifies an image also gives the bits per pixel the model assigns to it: an image the model
finds hard to predict, pixel by pixel, is unlike what it was trained on. An image is atypical when its bits per
pixel exceed the `quantile` of the validation split's (so about 1 - quantile of in-distribution images are
flagged). The test is one-sided: a lower bound would also flag the simplest in-distribution images (a plain
"1"), and the sets we check against are all harder to predict, not easier (the scores per set are in
metrics/evaluate.json).

The calibration (the threshold, plus the validation values themselves for drift tests) is fitted by `evaluate`
on the validation split and travels with the packaged model as typicality.json.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tgm.inference import forward_batches
from tgm.io import read_json, write_json
from tgm.model import TGM
from tgm.preprocess import PreprocessSpec, image_to_tokens, quantize_to_palette

FILE = "typicality.json"
LN2 = math.log(2.0)


@torch.no_grad()
def classify_and_score(model: TGM, tokens: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, n_classes) and bits per pixel (N,) of token sequences (N, T), one forward pass
    per batch."""
    probs, bpp = [], []
    for x, logits, batch_probs in forward_batches(model, tokens, batch_size):
        nats = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none").mean(dim=1)
        bpp.append((nats / LN2).numpy())
        if batch_probs is not None:
            probs.append(batch_probs)
    n_classes = model.cfg.n_classes or 0
    return (
        np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32),
        np.concatenate(bpp) if bpp else np.zeros(0, np.float32),
    )


@dataclass(frozen=True)
class Typicality:
    """The bits per pixel above which an image counts as atypical, fitted on the validation split."""

    threshold: float
    quantile: float  # the share of validation images at or below the threshold
    median: float
    reference: tuple[float, ...]  # every validation image's bits per pixel, for two-sample drift tests

    @classmethod
    def fit(cls, val_bpp: np.ndarray, quantile: float) -> Typicality:
        threshold, median = np.quantile(val_bpp, [quantile, 0.5])
        return cls(
            round(float(threshold), 6), quantile, round(float(median), 6), tuple(round(float(v), 6) for v in val_bpp)
        )

    def typical(self, bpp: np.ndarray) -> np.ndarray:
        return np.asarray(bpp) <= self.threshold

    def describe(self) -> dict:
        """What /metadata and the reports show: the threshold, without the reference sample."""
        return {"threshold_bpp": self.threshold, "quantile": self.quantile, "median_bpp": self.median}

    def save(self, path: str | Path) -> None:
        write_json(path, {**asdict(self), "reference": list(self.reference)})

    @classmethod
    def load(cls, path: str | Path) -> Typicality:
        raw = read_json(path)
        return cls(raw["threshold"], raw["quantile"], raw["median"], tuple(raw["reference"]))


def ood_sets(spec: PreprocessSpec, test_tokens: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    """Out-of-distribution token sets built from what ships offline, `n` images each (seeded):
    uniform noise, the test images with their colours inverted, scikit-learn's 8x8 digits upscaled, and crops of
    scikit-learn's two sample photographs."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(test_tokens), min(n, len(test_tokens)), replace=False)
    inverted = 255 - spec.palette[test_tokens[pick]].reshape(-1, spec.palette.shape[1])
    digits = load_digits().images  # 0..16, ink high: white on black, as MNIST
    digit_images = [Image.fromarray((d * 255 / 16).astype(np.uint8)) for d in digits[rng.choice(len(digits), n)]]
    photos = load_sample_images().images
    crops = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(32, min(photo.shape[:2])))
        y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crops.append(Image.fromarray(photo[y : y + side, x : x + side]))
    return {
        "uniform_noise": rng.integers(0, spec.palette_size, (n, spec.seq_len)),
        "inverted_test": quantize_to_palette(inverted, spec.palette).reshape(len(pick), -1),
        "digits_8x8_upscaled": np.stack([image_to_tokens(im, spec) for im in digit_images]),
        "photo_crops": np.stack([image_to_tokens(im, spec) for im in crops]),
    }


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling `out` from `in` by the score (higher: more out-of-distribution)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return round(float(roc_auc_score(y, np.r_[in_scores, out_scores])), 6)


def ood_report(model: TGM, spec: PreprocessSpec, val_tokens, test_tokens, *, quantile: float, n: int, seed: int):
    """The calibration fitted on validation, and per out-of-distribution set: AUROC of bits per pixel and of the
    max-softmax baseline against the test split, and the share of the set the threshold flags."""
    _, val_bpp = classify_and_score(model, val_tokens)
    typ = Typicality.fit(val_bpp, quantile)
    test_probs, test_bpp = classify_and_score(model, test_tokens)
    report = {
        **typ.describe(),
        "val_images": int(len(val_bpp)),
        "test_atypical_share": round(float(1 - typ.typical(test_bpp).mean()), 6),
        "ood": {},
    }
    for name, tokens in ood_sets(spec, test_tokens, n, seed).items():
        probs, bpp = classify_and_score(model, tokens)
        report["ood"][name] = {
            "images": int(len(tokens)),
            "auroc_typicality": auroc(test_bpp, bpp),
            "auroc_max_softmax": auroc(-test_probs.max(1), -probs.max(1)),
            "flagged_share": round(float(1 - typ.typical(bpp).mean()), 6),
            "mean_bpp": round(float(bpp.mean()), 6),
        }
    return typ, report
