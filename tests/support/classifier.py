"""In-process classification of a saved classifier directory: what the service answers, without the service
(the service tests compare with it, the load benchmark takes it as its ceiling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tgm.inference import answer
from tgm.model import load_config, load_model
from tgm.preprocess import PreprocessSpec, image_to_tokens
from tgm.typicality import Typicality, classify_and_score


class Classifier:
    """A fine-tuned T-GM classifier together with the preprocessing it was trained with."""

    def __init__(self, directory: str | Path, typicality: str | Path | None = None):
        directory = Path(directory)
        self.model = load_model(directory).eval()
        self.spec = PreprocessSpec.load(directory)
        self.classes: list[str] = load_config(directory)["classes"]
        self.typicality = Typicality.load(typicality) if typicality else None

    def tokens(self, image: Image.Image) -> np.ndarray:
        return image_to_tokens(image, self.spec)

    def classify(self, images: list[Image.Image]) -> list[dict]:
        """Label, per-class probabilities, bits per pixel and (with a calibration) the typical verdict."""
        if not images:
            return []
        probs, bpp = classify_and_score(self.model, np.stack([self.tokens(im) for im in images]))
        return [
            {
                **answer(self.classes, p),
                "bits_per_pixel": round(float(b), 4),
                "typical": bool(self.typicality.typical(b)) if self.typicality else None,
            }
            for p, b in zip(probs, bpp)
        ]
