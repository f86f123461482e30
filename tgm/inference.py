"""Inference helpers shared by the stages and the BentoML service: batched class probabilities and the
answer an image gets."""

from __future__ import annotations

import numpy as np
import torch

from tgm.model import TGM


def forward_batches(model: TGM, tokens: np.ndarray, batch_size: int = 256):
    """(input, pixel logits, class probabilities) for each batch of token sequences (N, T), in eval mode; call
    under torch.no_grad()."""
    model.eval()
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(np.asarray(tokens[i : i + batch_size], dtype=np.int64))
        logits, class_logits = model(x)
        yield x, logits, None if class_logits is None else torch.softmax(class_logits.float(), dim=-1).numpy()


@torch.no_grad()
def predict_proba(model: TGM, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, n_classes) for token sequences (N, T)."""
    out = [probs for _, _, probs in forward_batches(model, tokens, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.cfg.n_classes), dtype=np.float32)


def answer(classes: list[str], probs: np.ndarray, model: str | None = None) -> dict:
    """The label (and the model's tag, when given) and every class's probability, to 6 decimals, for one
    image's class probabilities."""
    out = {"label": classes[int(probs.argmax())]}
    if model is not None:
        out["model"] = model
    out["probabilities"] = {c: round(float(p), 6) for c, p in zip(classes, probs)}
    return out
