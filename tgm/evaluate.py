"""evaluate: score the classifier on the held-out test split and draw what the generative model learned."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tgm.errors import EmptySplit
from tgm.inference import predict_proba
from tgm.io import read_json, write_json
from tgm.model import TGM, load_model
from tgm.params import EvaluateParams
from tgm.prepare import load_split
from tgm.preprocess import PreprocessSpec, completion_tiles, pixel_features
from tgm.training.data import Split
from tgm.training.device import seed_everything
from tgm.training.objectives import LN2, Classify, Generative, evaluate_split
from tgm.typicality import ood_report

log = logging.getLogger(__name__)


def svm_reference(prepared_dir: Path, spec: PreprocessSpec) -> float:
    """Test accuracy of an RBF SVM on the same split and the same quantised pixels the transformer sees."""
    from sklearn.svm import SVC

    def features(split):
        tokens, labels = load_split(prepared_dir, split)
        return pixel_features(tokens, spec), labels

    (xa, ya), (xb, yb), (xt, yt) = features("train"), features("val"), features("test")
    svm = SVC(kernel="rbf").fit(np.concatenate([xa, xb]), np.concatenate([ya, yb]))
    return float((svm.predict(xt) == yt).mean())


def completion_grid(
    model: TGM,
    spec: PreprocessSpec,
    tokens: np.ndarray,
    labels: np.ndarray,
    *,
    classes: list[str],
    params: EvaluateParams,
    path: Path,
) -> None:
    """PNG grid: per row a test image, its top half, then samples that complete the bottom half."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One image per class first, so the grid shows variety rather than the first class only.
    picks, seen = [], set()
    for i, y in enumerate(labels):
        if y not in seen:
            picks.append(i)
            seen.add(y)
    picks = (picks + [i for i in range(len(labels)) if i not in picks])[: params.completion_images]
    keep = spec.seq_len // 2 // spec.image_size * spec.image_size  # whole rows: the top half
    n, k = len(picks), params.completion_samples
    prefix = torch.from_numpy(np.repeat(tokens[picks, :keep], k, axis=0))
    gen = torch.Generator().manual_seed(params.seed)
    model.eval()
    samples = model.complete(prefix, gen, temperature=params.temperature, top_k=params.top_k).numpy()

    fig, axes = plt.subplots(n, k + 2, figsize=(1.1 * (k + 2), 1.15 * n), squeeze=False)
    cmap = "gray" if spec.color_mode == "grey" else None
    for r, idx in enumerate(picks):
        shown = completion_tiles(tokens[idx], samples[r * k : (r + 1) * k], keep, spec)
        for c, img in enumerate(shown):
            ax = axes[r, c]
            ax.imshow(
                img.squeeze(-1) if img.shape[-1] == 1 else img, cmap=cmap, vmin=0, vmax=255, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(["original", "given"][c] if c < 2 else f"sample {c - 1}", fontsize=7)
        axes[r, 0].set_ylabel(classes[labels[idx]], fontsize=7)
    fig.suptitle("Completions by the pretrained model (bottom halves sampled)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(
    params: EvaluateParams,
    *,
    prepared_dir: str | Path,
    classifier_dir: str | Path,
    pretrained_dir: str | Path,
    metrics_path: str | Path,
    confusion_path: str | Path,
    completions_path: str | Path,
    typicality_path: str | Path,
) -> dict:
    from sklearn.metrics import f1_score, recall_score

    seed_everything(params.seed)
    prepared_dir = Path(prepared_dir)
    classes = read_json(prepared_dir / "meta.json")["classes"]
    spec = PreprocessSpec.load(prepared_dir)
    tokens, labels = load_split(prepared_dir, "test")
    if len(tokens) == 0:
        raise EmptySplit("evaluate: the test split is empty; raise prepare.test_fraction or add images")
    classifier = load_model(classifier_dir)
    pretrained = load_model(pretrained_dir)

    pred = predict_proba(classifier, tokens).argmax(1)
    recall = recall_score(labels, pred, labels=range(len(classes)), average=None, zero_division=0)
    metrics = {
        "accuracy": round(float((pred == labels).mean()), 6),
        "macro_f1": round(
            float(f1_score(labels, pred, labels=range(len(classes)), average="macro", zero_division=0)), 6
        ),
        "test_bpp": round(
            evaluate_split(pretrained, Split(tokens), Generative(), 256, torch.device("cpu"))["gen_loss"] / LN2, 6
        ),
        "classifier_test_bpp": round(
            evaluate_split(classifier, Split(tokens, labels), Classify(), 256, torch.device("cpu"))["bpp"], 6
        ),
        "per_class_recall": {c: round(float(r), 6) for c, r in zip(classes, recall)},
        "test_images": int(len(labels)),
    }
    if params.svm_reference:
        metrics["reference"] = {"svm_rbf_accuracy": round(svm_reference(prepared_dir, spec), 6)}
    val_tokens = load_split(prepared_dir, "val")[0]
    typicality, metrics["typicality"] = ood_report(
        classifier, spec, val_tokens, tokens, quantile=params.typicality_quantile, n=params.ood_images, seed=params.seed
    )
    typicality.save(typicality_path)

    Path(confusion_path).parent.mkdir(parents=True, exist_ok=True)
    actual, predicted = [classes[i] for i in labels], [classes[i] for i in pred]
    pd.DataFrame({"actual": actual, "predicted": predicted}).to_csv(confusion_path, index=False)
    completion_grid(pretrained, spec, tokens, labels, classes=classes, params=params, path=Path(completions_path))
    write_json(metrics_path, metrics)
    svm = f", RBF SVM {metrics['reference']['svm_rbf_accuracy']:.4f}" if params.svm_reference else ""
    log.info("evaluate: accuracy %.4f, macro-F1 %.4f%s", metrics["accuracy"], metrics["macro_f1"], svm)
    ood = ", ".join(f"{k} {v['auroc_typicality']:.3f}" for k, v in metrics["typicality"]["ood"].items())
    log.info("evaluate: typicality AUROC (bits per pixel): %s", ood)
    return metrics
