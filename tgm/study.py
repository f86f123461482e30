"""study: does generative pretraining pay off when labels are scarce? (iGPT's label-efficiency question)

For each share of the training labels in study.fractions (a stratified, seeded subset, at least one image
per class), the same fine-tuning recipe (finetune.* params) runs twice with the same budget of
study.steps optimizer steps: (a) from the pretrained model, (b) from a randomly initialised model of the
same architecture. Neither arm looks at validation labels: both keep their last weights, so the comparison
holds what a user with that few labels could actually do. Next to them, on the same subsets and the same
quantised pixels: logistic regression, an RBF SVM and k-nearest neighbours. Everything is scored on the
full test split.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from tgm.inference import predict_proba
from tgm.io import write_json
from tgm.model import TGM, load_model
from tgm.params import FinetuneParams, StudyParams

log = logging.getLogger(__name__)
ARMS = ("pretrained", "scratch", "logreg", "svm_rbf", "knn")


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified share of the images: round(fraction x class size), at least one per class."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, round(fraction * len(members)))
        picks.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picks))


def pixel_baselines(x_train, y_train, x_test, y_test, knn_k: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    models = {"logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
              "svm_rbf": SVC(kernel="rbf"),
              "knn": KNeighborsClassifier(n_neighbors=min(knn_k, len(y_train)))}
    return {name: round(float(m.fit(x_train, y_train).score(x_test, y_test)), 6) for name, m in models.items()}


def finetune_arm(model: TGM, train: tuple[np.ndarray, np.ndarray], params: FinetuneParams, steps: int,
                 test: tuple[np.ndarray, np.ndarray], device) -> tuple[float, int]:
    from tgm.train import fit

    steps_per_epoch = math.ceil(len(train[0]) / params.batch_size)
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    budget = dataclasses.replace(params, epochs=epochs, patience=epochs + 1, checkpoint_every=0)
    fit(model.to(device), train, None, budget, "classify", device, lambda_gen=params.lambda_gen,
        restore_best=False)
    pred = predict_proba(model.cpu(), test[0]).argmax(1)
    return round(float((pred == test[1]).mean()), 6), epochs * steps_per_epoch


def study(params: StudyParams, finetune_params: FinetuneParams, prepared_dir: str | Path = "data/prepared",
          pretrained_dir: str | Path = "models/pretrained", metrics_path: str | Path = "metrics/study.json",
          table_path: str | Path = "plots/label_efficiency.csv",
          plot_path: str | Path = "plots/label_efficiency.png") -> dict:
    from tgm.model import TGMConfig
    from tgm.prepare import check_prepared, load_split
    from tgm.preprocess import PreprocessSpec, pixel_features
    from tgm.train import resolve_device, seed_everything

    classes = check_prepared(prepared_dir)["classes"]
    spec = PreprocessSpec.load(prepared_dir)
    train, test = load_split(prepared_dir, "train"), load_split(prepared_dir, "test")
    device = resolve_device(finetune_params.device)
    pixels = {"train": pixel_features(train[0], spec), "test": pixel_features(test[0], spec)}
    rows = []
    for fraction in sorted(set(params.fractions)):
        idx = label_subset(train[1], fraction, params.seed)
        subset = (train[0][idx], train[1][idx])
        row = {"fraction": fraction, "labelled": len(idx)}

        seed_everything(finetune_params.seed)
        pretrained = load_model(pretrained_dir, n_classes=len(classes), strict=False)
        row["pretrained"], row["steps"] = finetune_arm(pretrained, subset, finetune_params, params.steps, test,
                                                       device)
        seed_everything(finetune_params.seed)
        scratch = TGM(TGMConfig(**{**dataclasses.asdict(pretrained.cfg), "n_classes": len(classes)}))
        row["scratch"], _ = finetune_arm(scratch, subset, dataclasses.replace(finetune_params,
                                                                              lr=params.scratch_lr),
                                         params.steps, test, device)
        row.update(pixel_baselines(pixels["train"][idx], subset[1], pixels["test"], test[1], params.knn_k))
        log.info("study: %g of the labels (%d images, %d steps): %s", fraction, len(idx), row["steps"],
                 "  ".join(f"{a} {row[a]:.4f}" for a in ARMS))
        rows.append(row)

    table = pd.DataFrame(rows)[["fraction", "labelled", "steps", *ARMS]]
    Path(table_path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(table_path, index=False)
    draw(table, Path(plot_path))
    metrics = {f"{r['fraction'] * 100:g}pct": {k: r[k] for k in ("labelled", *ARMS)} for r in rows}
    metrics["pretraining_gain"] = {f"{r['fraction'] * 100:g}pct": round(r["pretrained"] - r["scratch"], 6)
                                   for r in rows}
    write_json(metrics_path, metrics)
    return metrics


def draw(table: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {"pretrained": "o-", "scratch": "s-", "logreg": "^--", "svm_rbf": "v--", "knn": "d--"}
    for arm, style in styles.items():
        ax.plot(table["labelled"], table[arm], style, label=arm, markersize=4)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test accuracy")
    ax.set_title("Label efficiency: T-GM pretrained vs from scratch vs pixel baselines", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
