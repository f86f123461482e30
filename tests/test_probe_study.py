"""The probe and the label-efficiency study: what they measure, on the real pipeline's digits run."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_PARAMS
from tgm.study import ARMS, label_subset


def test_label_subset_is_stratified_seeded_and_keeps_every_class():
    labels = np.repeat(np.arange(4), [50, 30, 10, 2])
    sub = label_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[sub]).tolist() == [5, 3, 1, 1]  # round(10%), but never fewer than one
    assert np.array_equal(sub, label_subset(labels, 0.1, seed=0))
    assert not np.array_equal(sub, label_subset(labels, 0.1, seed=1))
    assert len(label_subset(labels, 1.0, seed=0)) == len(labels)


@pytest.mark.slow
def test_probe_reports_every_layer_and_picks_the_best_on_validation(digits_project):
    metrics = json.loads((digits_project / "metrics/probe.json").read_text())
    layers = TINY_PARAMS["model"]["n_layer"]
    assert sorted(metrics["by_layer"]) == [f"layer{i}" for i in range(layers + 1)]
    best_val = max(v["val"] for v in metrics["by_layer"].values())
    assert metrics["val_accuracy"] == best_val
    assert metrics["by_layer"][f"layer{metrics['best_layer']}"]["test"] == metrics["test_accuracy"]
    table = pd.read_csv(digits_project / "plots/probe.csv")
    assert list(table["layer"]) == list(range(layers + 1))
    # Ten digit classes: chance is 0.1; pretrained features must carry class information.
    assert metrics["test_accuracy"] > 0.5


@pytest.mark.slow
def test_study_has_every_arm_for_every_fraction(digits_project):
    metrics = json.loads((digits_project / "metrics/study.json").read_text())
    fractions = TINY_PARAMS["study"]["fractions"]
    keys = [f"{f * 100:g}pct" for f in fractions]
    assert sorted(k for k in metrics if k.endswith("pct")) == sorted(keys)
    for key in keys:
        assert set(metrics[key]) == {"labelled", *ARMS}
        assert all(0.0 <= metrics[key][a] <= 1.0 for a in ARMS)
        assert metrics["pretraining_gain"][key] == pytest.approx(metrics[key]["pretrained"] - metrics[key]["scratch"])
    table = pd.read_csv(digits_project / "plots/label_efficiency.csv")
    assert list(table["fraction"]) == sorted(fractions)
    assert table["labelled"].is_monotonic_increasing
    assert (digits_project / "plots/label_efficiency.png").stat().st_size > 1000
