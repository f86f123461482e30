"""In-process inference on a saved classifier directory; the BentoML service and the tests both use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tgm.model import TGM, load_config, load_model
from tgm.preprocess import PreprocessSpec, image_to_tokens


@torch.no_grad()
def predict_proba(model: TGM, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, n_classes) for token sequences (N, T)."""
    model.eval()
    out = []
    for i in range(0, len(tokens), batch_size):
        _, class_logits = model(torch.from_numpy(np.asarray(tokens[i : i + batch_size], dtype=np.int64)))
        out.append(torch.softmax(class_logits.float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.n_classes), dtype=np.float32)


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
        return [
            {
                "label": self.classes[int(p.argmax())],
                "probabilities": {c: round(float(v), 6) for c, v in zip(self.classes, p)},
            }
            for p in probs
        ]
