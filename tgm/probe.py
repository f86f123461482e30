"""probe: how much class information each layer of the pretrained model holds, without any fine-tuning.

iGPT's linear probe: average-pool a layer's features over the sequence, fit a logistic regression on the
training split, choose the layer on the validation split, report test accuracy. Layer 0 is the embedding
(token + position), so the table also shows what the transformer layers add. iGPT found the middle layers
best for its large models; `plots/probe.csv` shows where the peak is on your data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tgm.errors import EmptySplit
from tgm.io import write_json
from tgm.model import TGM, grid_pool, load_model
from tgm.params import ProbeParams

log = logging.getLogger(__name__)


@torch.no_grad()
def pooled_features(model: TGM, tokens: np.ndarray, grid: int = 1, batch_size: int = 256) -> np.ndarray:
    """(n_layer + 1, N, grid * grid * C): per layer, each image's features averaged over its positions (grid 1)
    or over each cell of a grid x grid partition of the image (see model.grid_pool)."""
    model.eval()
    out = []
    for i in range(0, len(tokens), batch_size):
        x = model.shift_right(torch.from_numpy(tokens[i : i + batch_size].astype(np.int64)))
        _, layers = model.hidden(x, all_layers=True)
        out.append(torch.stack([grid_pool(h, grid) for h in layers]).float().numpy())
    return np.concatenate(out, axis=1)


def probe_accuracies(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], params: ProbeParams) -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = []
    for layer in range(features["train"].shape[0]):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=params.C, max_iter=params.max_iter))
        clf.fit(features["train"][layer], labels["train"])
        rows.append(
            {
                "layer": layer,
                **{
                    f"{split}_accuracy": round(float(clf.score(features[split][layer], labels[split])), 6)
                    for split in ("train", "val", "test")
                },
            }
        )
    return rows


def probe(
    params: ProbeParams,
    prepared_dir: str | Path,
    pretrained_dir: str | Path,
    metrics_path: str | Path,
    plot_path: str | Path,
) -> dict:
    from tgm.prepare import check_prepared, load_split

    check_prepared(prepared_dir)
    model = load_model(pretrained_dir)
    splits = {s: load_split(prepared_dir, s) for s in ("train", "val", "test")}
    if min(len(t) for t, _ in splits.values()) == 0:
        raise EmptySplit("probe: a split is empty; the probe needs train, val and test images")
    features = {s: pooled_features(model, t) for s, (t, _) in splits.items()}
    rows = probe_accuracies(features, {s: y for s, (_, y) in splits.items()}, params)
    # Ties go to the shallower layer: the cheaper feature extractor.
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["layer"]))
    metrics = {
        "best_layer": best["layer"],
        "val_accuracy": best["val_accuracy"],
        "test_accuracy": best["test_accuracy"],
        "by_layer": {f"layer{r['layer']}": {"val": r["val_accuracy"], "test": r["test_accuracy"]} for r in rows},
    }
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(plot_path, index=False)
    write_json(metrics_path, metrics)
    for r in rows:
        log.info(
            "probe: layer %d  train %.4f  val %.4f  test %.4f",
            r["layer"],
            r["train_accuracy"],
            r["val_accuracy"],
            r["test_accuracy"],
        )
    log.info("probe: best layer %d (validation), test accuracy %.4f", best["layer"], best["test_accuracy"])
    return metrics
