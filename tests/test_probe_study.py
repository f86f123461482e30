"""The probe and the label-efficiency study: what they measure, and the protocol they are held to."""

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, TINY_PARAMS, params_of

from tgm.study import ARMS, NEURAL, label_subset, select_and_refit, selection_split, study


def test_label_subset_is_stratified_seeded_and_keeps_every_class():
    labels = np.repeat(np.arange(4), [50, 30, 10, 2])
    sub = label_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[sub]).tolist() == [5, 3, 1, 1]  # round(10%), but never fewer than one
    assert np.array_equal(sub, label_subset(labels, 0.1, seed=0))
    assert not np.array_equal(sub, label_subset(labels, 0.1, seed=1))
    assert len(label_subset(labels, 1.0, seed=0)) == len(labels)
    # The study asks for two per class, one to fit and one to select; a class of one gives what it has.
    labels = np.repeat(np.arange(3), [40, 20, 1])
    assert np.bincount(labels[label_subset(labels, 0.01, 0, min_per_class=2)]).tolist() == [2, 2, 1]


def test_selection_split_holds_out_part_of_every_class_and_loses_nothing():
    labels = np.repeat(np.arange(4), [8, 4, 2, 1])
    fit, select = selection_split(labels, 0.25, seed=3)
    assert sorted(np.concatenate([fit, select]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[select], minlength=4).tolist() == [2, 1, 1, 0]  # a lone image is only fitted
    assert np.bincount(labels[fit], minlength=4).tolist() == [6, 3, 1, 1]
    assert np.array_equal(select, selection_split(labels, 0.25, seed=3)[1])


class Recorder:
    """A scikit-learn-like model whose selection score is its setting, recording what it was fitted on."""

    fits: list = []

    def __init__(self, score):
        self.setting = score

    def fit(self, x, y):
        Recorder.fits.append((self.setting, len(x)))
        return self

    def score(self, x, y):
        return self.setting


def test_selection_keeps_the_best_candidate_first_on_ties_and_refits_it_on_the_whole_subset():
    Recorder.fits = []
    x, y = np.zeros((10, 2)), np.zeros(10)
    model, settings, score = select_and_refit(
        [{"score": 0.5}, {"score": 0.9}, {"score": 0.9}, {"score": 0.1}],
        Recorder,
        [{"fit": (x[:7], y[:7]), "select": (x[7:], y[7:])}],
        (x, y),
    )
    assert settings == {"score": 0.9} and score == 0.9 and model.setting == 0.9
    # Four candidates fitted on the fit part (7 images), the winner once more on all 10.
    assert Recorder.fits == [(0.5, 7), (0.9, 7), (0.9, 7), (0.1, 7), (0.9, 10)]


STUDY = dict(
    fractions=(0.05,),
    subsets=1,
    steps=4,
    scratch_steps=4,
    finetune_lrs=(0.005,),
    scratch_lrs=(0.005,),
    probe_C=(0.1,),
    logreg_C=(0.1, 1.0),
    svm_C=(1.0,),
    svm_gamma_scale=(1.0,),
    knn_k=(1, 3),
)


@pytest.mark.slow
def test_study_never_reads_a_label_outside_its_subset(built_project, tmp_path, monkeypatch):
    """Scrambling every label the protocol must not see (train labels outside the subsets, all validation
    labels) leaves every number of the study unchanged."""
    params = params_of("study", **STUDY)
    finetune = params_of("finetune", **{**TINY_PARAMS["finetune"], "checkpoint_every": 0})
    prepared = tmp_path / "prepared"
    shutil.copytree(built_project / "data/prepared", prepared)
    labels = np.load(prepared / "train_labels.npy")
    # Drawing a stratified subset needs every label (the simulation of "a user labelled these"); the arms
    # must not. So both runs draw their subsets from the true labels, and only the arms see the scrambled ones.
    monkeypatch.setattr("tgm.study.label_subset", lambda _, *args, **kw: label_subset(labels, *args, **kw))

    def run(tag):
        return study(
            params,
            finetune=finetune,
            prepared_dir=prepared,
            pretrained_dir=built_project / "models/pretrained",
            metrics_path=tmp_path / f"{tag}.json",
            table_path=tmp_path / f"{tag}.csv",
            plot_path=tmp_path / f"{tag}.png",
        )

    first = run("a")
    seen = np.concatenate(
        [
            label_subset(labels, f, params.seed + s, min_per_class=2)
            for f in params.fractions
            for s in range(params.subsets)
        ]
    )
    hidden = np.setdiff1d(np.arange(len(labels)), seen)
    rng = np.random.default_rng(0)
    scrambled = labels.copy()
    scrambled[hidden] = rng.permutation(labels[hidden])  # class counts kept, so the prepared data still checks
    assert (scrambled != labels).mean() > 0.5
    np.save(prepared / "train_labels.npy", scrambled)
    val = np.load(prepared / "val_labels.npy")
    np.save(prepared / "val_labels.npy", rng.permutation(val))
    assert run("b") == first
    table = pd.read_csv(tmp_path / "a.csv")
    assert set(table["arm"]) == set(ARMS) - {"labelled_only"}  # study.labelled_only_steps is 0
    assert table.loc[table["arm"].isin(NEURAL), "train_accuracy"].notna().all()


@pytest.mark.slow
def test_a_study_by_labels_per_class_with_the_arm_pretrained_on_its_subset_alone(built_project, tmp_path):
    params = params_of("study", **{**STUDY, "per_class": (3,), "labelled_only_steps": 6})
    finetune = params_of("finetune", **{**TINY_PARAMS["finetune"], "checkpoint_every": 0})
    metrics = study(
        params,
        finetune=finetune,
        prepared_dir=built_project / "data/prepared",
        pretrained_dir=built_project / "models/pretrained",
        metrics_path=tmp_path / "m.json",
        table_path=tmp_path / "t.csv",
        plot_path=tmp_path / "p.png",
    )
    table = pd.read_csv(tmp_path / "t.csv")
    assert set(table["arm"]) == set(ARMS) and (table["labelled"] == 30).all() and (table["per_class"] == 3).all()
    entry = metrics["3_per_class"]
    assert entry["labelled"] == 30
    assert entry["unlabelled_gain"] == pytest.approx(entry["tgm"]["mean"] - entry["labelled_only"]["mean"], abs=1e-6)
    assert entry["labelled_only"]["train_accuracy"] is not None


@pytest.mark.slow
def test_probe_reports_every_layer_and_picks_the_best_on_validation(built_project):
    metrics = json.loads((built_project / "metrics/probe.json").read_text())
    layers = TINY_PARAMS["model"]["n_layer"]
    assert sorted(metrics["by_layer"]) == [f"layer{i}" for i in range(layers + 1)]
    best_val = max(v["val"] for v in metrics["by_layer"].values())
    assert metrics["val_accuracy"] == best_val
    assert metrics["by_layer"][f"layer{metrics['best_layer']}"]["test"] == metrics["test_accuracy"]
    table = pd.read_csv(built_project / "plots/probe.csv")
    assert list(table["layer"]) == list(range(layers + 1))
    # Ten digit classes: chance is 0.1; pretrained features must carry class information.
    assert metrics["test_accuracy"] > 0.5


@pytest.mark.slow
def test_study_summarises_every_arm_over_its_subsets(built_project):
    metrics = json.loads((built_project / "metrics/study.json").read_text())
    table = pd.read_csv(built_project / "plots/label_efficiency.csv")
    fractions, subsets = TINY_PARAMS["study"]["fractions"], TINY_PARAMS["study"]["subsets"]
    arms = [a for a in ARMS if a != "labelled_only"]  # off by default (study.labelled_only_steps: 0)
    assert len(table) == len(fractions) * subsets * len(arms)
    assert sorted(metrics) == sorted(f"{f * 100:g}pct" for f in fractions)
    for fraction, rows in table.groupby("fraction"):
        entry = metrics[f"{fraction * 100:g}pct"]
        assert entry["subsets"] == subsets
        for arm in arms:
            acc = rows.loc[rows["arm"] == arm, "test_accuracy"]
            assert entry[arm]["mean"] == pytest.approx(acc.mean(), abs=1e-6)
            assert entry[arm]["std"] == pytest.approx(acc.std(ddof=0), abs=1e-6)
        # T-GM's answer is, run by run, the fine-tune or the probe, whichever did better on selection.
        for _subset, run in rows.groupby("subset"):
            by_arm = run.set_index("arm")
            picked = by_arm.loc["tgm", "choice"]
            other = "probe" if picked == "finetune" else "finetune"
            assert by_arm.loc["tgm", "test_accuracy"] == by_arm.loc[picked, "test_accuracy"]
            assert by_arm.loc[picked, "select_accuracy"] >= by_arm.loc[other, "select_accuracy"]
        by_arm = rows.groupby("arm")["test_accuracy"].mean()
        assert entry["tgm_minus_svm"] == pytest.approx(by_arm["tgm"] - by_arm["svm_rbf"], abs=1e-6)
    assert (built_project / "plots/label_efficiency.png").stat().st_size > 1000


def test_the_study_trains_its_own_budget_whatever_finetune_max_steps_says():
    """finetune.max_steps is not a dependency of the study stage, so it must not cut the study's fits short."""
    import torch

    from tgm.model import TGM, TGMConfig
    from tgm.study import train_neural

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, (48, 16)), rng.integers(0, 2, 48)
    model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2))
    params = params_of("finetune", batch_size=16, max_steps=1)
    history = train_neural(
        model, x, y, params, epochs=3, unlabelled=None, selection=(x[:8], y[:8]), device=torch.device("cpu")
    )
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_the_self_training_benchmark_labels_the_most_confident_per_class_and_picks_its_rounds_on_selection():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from self_training import Flat, arm, most_confident, rounds
    from sklearn.datasets import load_digits

    from tgm.study import pixel_model

    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.45, 0.55]])
    picks, labels = most_confident(scores, 2)
    assert picks.tolist() == [0, 3, 2, 4] and labels.tolist() == [0, 0, 1, 1]  # row 1 is class 0's third

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), 4, replace=False) for c in range(10)]))
    fit, select = selection_split(y[idx], 0.5, 0)
    rest = np.setdiff1d(np.arange(len(y)), idx)
    pool, test = x[rest[500:]], (x[rest[:500]], y[rest[:500]])
    views = {"splits": [{"fit": (x[idx[fit]], y[idx[fit]]), "select": (x[idx[select]], y[idx[select]])}],
             "all": (x[idx], y[idx]), "test": test}  # fmt: skip

    def make():
        return Flat(pixel_model("logreg", C=1.0))

    plain = arm(make, views, pool, [0])
    assert plain["rounds"] == 0 and plain["test"] == make().fit(x[idx], y[idx]).score(*test)
    schedule = [0, 10, 40]
    trained = arm(make, views, pool, schedule)
    on_selection = [
        m.score(*views["splits"][0]["select"]) for m in rounds(make, *views["splits"][0]["fit"], pool, schedule)
    ]
    assert trained["rounds"] == on_selection.index(max(on_selection))  # the first best round, chosen without the test
    refits = [m.score(*test) for m in rounds(make, x[idx], y[idx], pool, schedule)]
    assert trained["test"] == refits[trained["rounds"]] and trained["test_round0"] == plain["test"]
