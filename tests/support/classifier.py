"""In-process classification of a saved classifier directory: what the service answers, without the service
(the service tests compare with it, the load benchmark takes it as its ceiling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tgm.inference import answer, predict_proba
from tgm.model import load_config, load_model
from tgm.preprocess import PreprocessSpec, image_to_tokens


class Classifier:
    """A fine-tuned T-GM classifier together with the preprocessing it was trained with."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.model = load_model(directory).eval()
        self.spec = PreprocessSpec.load(directory)
        self.classes: list[str] = load_config(directory)["classes"]

    def tokens(self, image: Image.Image) -> np.ndarray:
        return image_to_tokens(image, self.spec)

    def classify(self, images: list[Image.Image]) -> list[dict]:
        """Label and per-class probabilities for each image."""
        if not images:
            return []
        probs = predict_proba(self.model, np.stack([self.tokens(im) for im in images]))
        return [answer(self.classes, p) for p in probs]
