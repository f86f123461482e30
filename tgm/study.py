"""study: does generative pretraining pay off when labels are scarce? (iGPT's label-efficiency question)

The protocol, enforced here and written down in the README:

- Labelled subsets. For each share of the training labels in study.fractions (or each count in
  study.per_class) and each of study.subsets seeds, a stratified subset L of the training split:
  round(fraction x class size) images per class (or that count), at least two
  (one to fit, one to select; k with k folds). The other training images stay unlabelled pixels. No arm ever
  sees a label outside L; validation labels are not used at all; test images are scored once per arm and subset.
- One rule of model selection for every arm. L is split, stratified and seeded, into fit and selection
  parts: one holdout (study.folds = 1: study.holdout of each class, at least one image) or k-fold
  (study.folds = k). Each candidate in an arm's grid is fitted on each fit part and scored by accuracy on
  its selection part. The best mean (ties: the first in the grid, which lists the most regularised settings
  first) is fitted again on the whole of L, and only that model meets the test split. For the neural arms a
  candidate is a learning rate plus a number of epochs: one run of about study.steps optimizer steps per fit
  part, scored after every epoch (accuracy, ties broken by the lower selection loss), then a refit on L for
  the chosen number of epochs.
- Arms. finetune: the pretrained T-GM fine-tuned with the finetune.* recipe (joint loss, shift augmentation,
  finetune.cls_grid head) at each rate in study.finetune_lrs, study.steps steps. scratch: the same
  architecture and recipe from a random initialisation, with its own rates (study.scratch_lrs) and its own,
  larger budget (study.scratch_steps): a transformer trained from nothing needs more steps to fit even a
  small subset, and its training accuracy is reported to show whether it did. probe: logistic
  regression on the pretrained model's grid-pooled features of each layer and of all layers concatenated,
  over study.probe_C. labelled_only (study.labelled_only_steps > 0): the same architecture pretrained on L's
  pixels alone (labels unused) for that many steps, then fine-tuned like the finetune arm -- what the
  unlabelled images are worth. tgm: whichever of finetune and probe scored better on the selection part (ties: the
  probe, the cheaper one) -- what a user with only L would deploy. Pixel baselines on the same quantised
  pixels: logistic regression (C), an RBF SVM (C x gamma) and kNN (k).
- With study.unlabelled, both neural arms also take the next-pixel loss on the unlabelled training images
  and the unlabelled pools at every step (iGPT's joint loss extended to the unlabelled pool). The pretrained
  model saw those pixels in pretraining anyway; no arm sees their labels.

metrics/study.json holds mean, spread (population standard deviation) and range per arm and share, and the
neural arms' final training accuracy on L (did they fit it?); plots/label_efficiency.csv holds every run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tgm.errors import EmptySplit
from tgm.io import write_json
from tgm.params import FinetuneParams, StudyParams

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
NEURAL = ("finetune", "scratch", "labelled_only")
PIXEL = ("logreg", "svm_rbf", "knn")
ARMS = ("tgm", "finetune", "probe", "scratch", "labelled_only", *PIXEL)


def label_subset(
    labels: np.ndarray, fraction: float | None, seed: int, min_per_class: int = 1, per_class: int | None = None
) -> np.ndarray:
    """Indices of a stratified share of the images: round(fraction x class size) per class (or per_class), at
    least min_per_class (or the whole class when it is smaller)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        wanted = per_class if per_class is not None else round(fraction * len(members))
        k = min(len(members), max(min_per_class, wanted))
        picks.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picks))


def selection_split(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into `labels`) of the fit part and the selection part: per class, round(holdout x size)
    images, at least one, are held out for selection; a class of one image is only fitted."""
    rng = np.random.default_rng(seed)
    fit, select = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(holdout * len(members))))
        select.append(members[:k])
        fit.append(members[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(select))


def selection_folds(labels: np.ndarray, folds: int, holdout: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (fit, selection) position pairs that every arm scores its candidates on: one stratified holdout
    (folds=1), or stratified k-fold over the subset (k = folds, at most the smallest class's size)."""
    if folds == 1:
        return [selection_split(labels, holdout, seed)]
    from sklearn.model_selection import StratifiedKFold

    k = min(folds, int(np.unique(labels, return_counts=True)[1].min()))
    if k < 2:  # a class of one image cannot be in two folds
        return [selection_split(labels, holdout, seed)]
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(fit, select) for fit, select in splitter.split(np.zeros(len(labels)), labels)]


def select_and_refit(candidates: list[dict], make, splits: list[dict], everything: tuple):
    """The selection rule for a scikit-learn arm: fit each candidate on each fit part, keep the best mean
    accuracy over the selection parts (ties: the first), refit it on everything. `splits` holds dicts with
    "fit" and "select" (x, y) pairs. Returns (model, its settings, its mean selection accuracy)."""
    best, best_score = None, -1.0
    for settings in candidates:
        score = float(np.mean([make(**settings).fit(*s["fit"]).score(*s["select"]) for s in splits]))
        if score > best_score:
            best, best_score = settings, score
    return make(**best).fit(*everything), best, best_score


def pixel_candidates(n_fit: int, params: StudyParams) -> dict[str, list[dict]]:
    return {
        "logreg": [{"C": c} for c in params.logreg_C],
        "svm_rbf": [{"C": c, "gamma_scale": g} for c in params.svm_C for g in params.svm_gamma_scale],
        "knn": [{"k": k} for k in params.knn_k if k <= n_fit] or [{"k": 1}],
    }


def pixel_model(arm: str, **settings):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if arm == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=settings["C"], max_iter=3000))
    if arm == "knn":
        return KNeighborsClassifier(n_neighbors=settings["k"])
    return ScaledRBF(settings["C"], settings["gamma_scale"])


class ScaledRBF:
    """An RBF SVM whose gamma is a multiple of scikit-learn's 'scale' (1 / (features x variance)) of the data
    it is fitted on, so that one grid suits any image size and palette."""

    def __init__(self, C: float, gamma_scale: float):
        self.C, self.gamma_scale = C, gamma_scale

    def fit(self, x, y):
        from sklearn.svm import SVC

        gamma = self.gamma_scale / (x.shape[1] * max(float(x.var()), 1e-12))
        self.svc = SVC(C=self.C, gamma=gamma).fit(x, y)
        return self

    def score(self, x, y) -> float:
        return self.svc.score(x, y)


class LayerProbe:
    """Logistic regression on one layer's features, or on layers 1.. concatenated ("all"), of an array
    (layers, N, D) whose layer 0 is the embedding."""

    def __init__(self, C: float, layer: int | str):
        self.C, self.layer = C, layer

    def _pick(self, features: np.ndarray) -> np.ndarray:
        if self.layer == "all":
            return features[1:].transpose(1, 0, 2).reshape(features.shape[1], -1)
        return features[self.layer]

    def fit(self, features, y):
        self.model = pixel_model("logreg", C=self.C).fit(self._pick(features), y)
        return self

    def score(self, features, y) -> float:
        return self.model.score(self._pick(features), y)


def train_neural(model, x, y, params: FinetuneParams, *, epochs: int, unlabelled, selection, device):
    """Fine-tune `model` in place for `epochs` epochs; with a selection set, return its per-epoch history."""
    from tgm.training.data import Split
    from tgm.training.loop import fit
    from tgm.training.objectives import Classify

    # The study sets its own budget (study.steps): none of finetune's stopping rules apply to its fits.
    budget = params.model_copy(
        update={"epochs": epochs, "patience": epochs + 1, "checkpoint_every": 0, "max_steps": None}
    )
    history, _ = quiet(
        lambda: fit(
            model.to(device),
            Split(x, y),
            None if selection is None else Split(*selection),
            budget,
            Classify(params.lambda_gen),
            device,
            restore_best=False,
            pool=unlabelled,
        )
    )
    return history


def quiet(run):
    """`run()` with the loop's per-epoch lines off: the study makes dozens of short runs, logged one line each."""
    train_log = logging.getLogger("tgm.training.loop")
    level = train_log.level
    train_log.setLevel(logging.WARNING)
    try:
        return run()
    finally:
        train_log.setLevel(level)


def neural_arm(make_model, lrs, data: dict, params: FinetuneParams, *, steps: int, unlabelled, device) -> dict:
    """The selection rule for a neural arm: for each learning rate, on each fit part, one run of about `steps`
    steps scored on its selection part after every epoch; the (lr, epochs) with the best mean selection
    accuracy (ties: lower mean selection loss, then fewer epochs, then the first lr) is trained again on all
    of the subset."""
    from tgm.inference import predict_proba
    from tgm.training.device import seed_everything

    n_fit = np.mean([len(s["fit"][1]) for s in data["splits"]])
    epochs = max(1, math.ceil(steps / math.ceil(n_fit / params.batch_size)))
    best = None
    for lr in lrs:
        runs = []
        for split in data["splits"]:
            seed_everything(params.seed)
            runs.append(
                train_neural(
                    make_model(),
                    *split["fit"],
                    params.model_copy(update={"lr": lr}),
                    epochs=epochs,
                    unlabelled=unlabelled,
                    selection=split["select"],
                    device=device,
                )
            )
        for e in range(epochs):
            acc = float(np.mean([h[e]["val_accuracy"] for h in runs]))
            loss = float(np.mean([h[e]["val_cls_loss"] for h in runs]))
            if best is None or (-acc, loss, e + 1) < best[0]:
                best = ((-acc, loss, e + 1), lr, e + 1, acc)
    _, lr, chosen_epochs, select_acc = best
    seed_everything(params.seed)
    model = make_model()
    x_all, y_all = data["all"]
    recipe = params.model_copy(update={"lr": lr})
    train_neural(
        model, x_all, y_all, recipe, epochs=chosen_epochs, unlabelled=unlabelled, selection=None, device=device
    )
    model = model.cpu()

    def accuracy(x, y):
        return float((predict_proba(model, x).argmax(1) == y).mean())

    return {
        "test": accuracy(*data["test"]),
        "train": accuracy(x_all, y_all),
        "select": select_acc,
        "choice": f"lr={lr:g} epochs={chosen_epochs}",
    }


def sklearn_arm(candidates, make, data: dict) -> dict:
    model, settings, select_acc = select_and_refit(candidates, make, data["splits"], data["all"])
    return {
        "test": float(model.score(*data["test"])),
        "select": select_acc,
        "choice": " ".join(f"{k}={v}" for k, v in settings.items()),
    }


@dataclass
class StudyInputs:
    """What every subset of the study draws from: the splits, the features of every training and test image
    (computed once; each arm indexes its subset) and how to build the two neural arms' models."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    pool: np.ndarray | None  # the unlabelled pools' images (prepare's pool_tokens.npy), if any
    features: dict[str, np.ndarray]  # pooled T-GM features per layer, for the probe
    pixels: dict[str, np.ndarray]  # raw pixel features, for the pixel baselines
    n_classes: int
    grid: int
    pretrained_dir: Path
    device: torch.device

    @classmethod
    def load(cls, prepared_dir, pretrained_dir, finetune_params: FinetuneParams) -> StudyInputs:
        from tgm.model import load_model
        from tgm.prepare import check_prepared, load_pool, load_split
        from tgm.preprocess import PreprocessSpec, pixel_features
        from tgm.probe import pooled_features
        from tgm.training.device import resolve_device

        n_classes = len(check_prepared(prepared_dir)["classes"])
        spec = PreprocessSpec.load(prepared_dir)
        train, test = load_split(prepared_dir, "train"), load_split(prepared_dir, "test")
        if min(len(train[0]), len(test[0])) == 0:
            raise EmptySplit("study: the train or test split is empty")
        device = resolve_device(finetune_params.device)
        grid = finetune_params.cls_grid
        encoder = load_model(pretrained_dir)
        features = {"train": pooled_features(encoder, train[0], grid), "test": pooled_features(encoder, test[0], grid)}
        pixels = {"train": pixel_features(train[0], spec), "test": pixel_features(test[0], spec)}
        pool = load_pool(prepared_dir)
        return cls(train, test, pool, features, pixels, n_classes, grid, Path(pretrained_dir), device)

    def pretrained_model(self):
        from tgm.model import load_model

        return load_model(self.pretrained_dir, n_classes=self.n_classes, strict=False, cls_grid=self.grid)

    def scratch_model(self):
        from tgm.model import TGM, load_model

        cfg = load_model(self.pretrained_dir).cfg
        return TGM(dataclasses.replace(cfg, n_classes=self.n_classes, cls_grid=self.grid))

    def pretrained_on(self, tokens: np.ndarray, params: StudyParams, recipe: FinetuneParams):
        """A maker of copies of the architecture pretrained, next-pixel only, on `tokens` alone (a labelled
        subset's pixels, labels unused) for study.labelled_only_steps steps, each with a fresh class head."""
        from tgm.model import TGM
        from tgm.training.data import Split
        from tgm.training.device import seed_everything
        from tgm.training.loop import fit
        from tgm.training.objectives import Generative

        seed_everything(params.seed)
        base = self.scratch_model()
        base.cfg.n_classes, base.cls_head = 0, None
        steps = params.labelled_only_steps
        epochs = math.ceil(steps / math.ceil(len(tokens) / recipe.batch_size))
        budget = recipe.model_copy(
            update={"lr": params.labelled_only_lr, "epochs": epochs, "max_steps": steps, "checkpoint_every": 0,
                    "patience": epochs + 1}
        )  # fmt: skip
        quiet(lambda: fit(base.to(self.device), Split(tokens, np.zeros(len(tokens), np.int64)), None, budget,
                          Generative(), self.device, restore_best=False))  # fmt: skip
        weights = {k: v.cpu() for k, v in base.state_dict().items()}

        def make():
            model = TGM(dataclasses.replace(base.cfg, n_classes=self.n_classes, cls_grid=self.grid))
            model.load_state_dict(weights, strict=False)
            return model

        return make


def subset_views(inputs: StudyInputs, idx: np.ndarray, folds: list[dict], source, test_x, pick=None) -> dict:
    """The subset's folds, the whole subset and the test split, from one view of the images."""
    labels = inputs.train[1]

    def view(i):
        return (pick(source, i) if pick else source[i], labels[i])

    return {
        "splits": [{k: view(i) for k, i in f.items()} for f in folds],
        "all": view(idx),
        "test": (test_x, inputs.test[1]),
    }


def neural_results(inputs: StudyInputs, params: StudyParams, recipe: FinetuneParams, idx, folds, named: str) -> dict:
    """The neural arms on one subset (`idx`, its `folds`): fine-tune, scratch and, when switched on, the arm
    pretrained on the subset alone."""
    train = inputs.train
    unlabelled = None
    if params.unlabelled:  # the training images outside the subset, and the pools
        unlabelled = np.delete(train[0], idx, axis=0)
        if inputs.pool is not None:
            unlabelled = np.concatenate([unlabelled, inputs.pool])
    neural = [
        ("finetune", inputs.pretrained_model, params.finetune_lrs, params.steps),
        ("scratch", inputs.scratch_model, params.scratch_lrs, params.scratch_steps),
    ]
    if params.labelled_only_steps:
        t0 = time.perf_counter()
        own = inputs.pretrained_on(train[0][idx], params, recipe)
        log.info("study: labelled_only pretraining on %d images: %.1fs", len(idx), time.perf_counter() - t0)
        neural.append(("labelled_only", own, params.finetune_lrs, params.steps))
    results = {}
    for arm, make, lrs, steps in neural:
        t0 = time.perf_counter()
        views = subset_views(inputs, idx, folds, train[0], inputs.test[0])
        results[arm] = neural_arm(make, lrs, views, recipe, steps=steps, unlabelled=unlabelled, device=inputs.device)
        log.info("study: %s, %s: %.1fs", arm, named, time.perf_counter() - t0)
    return results


def run_subset(inputs: StudyInputs, params: StudyParams, finetune_params: FinetuneParams, share, subset) -> list:
    """Every arm on one labelled subset, each selecting inside it; one table row per arm. `share`: a fraction of
    the training labels, or ("per_class", n)."""
    train = inputs.train
    seed = params.seed + subset
    per_class = share[1] if isinstance(share, tuple) else None
    fraction = None if per_class else share
    idx = label_subset(train[1], fraction, seed, min_per_class=max(2, params.folds), per_class=per_class)
    folds = [
        {"fit": idx[f], "select": idx[s]} for f, s in selection_folds(train[1][idx], params.folds, params.holdout, seed)
    ]
    named = f"{per_class} per class" if per_class else f"{fraction:g} of the labels"
    results = neural_results(inputs, params, finetune_params, idx, folds, f"{named}, subset {subset}")
    features = inputs.features
    layers = list(range(1, features["train"].shape[0])) + ["all"]
    results["probe"] = sklearn_arm(
        [{"C": c, "layer": layer} for layer in layers for c in params.probe_C],
        LayerProbe,
        subset_views(inputs, idx, folds, features["train"], features["test"], pick=lambda x, i: x[:, i]),
    )
    pixel_views = subset_views(inputs, idx, folds, inputs.pixels["train"], inputs.pixels["test"])
    for arm, candidates in pixel_candidates(min(len(f["fit"]) for f in folds), params).items():
        results[arm] = sklearn_arm(candidates, lambda _arm=arm, **s: pixel_model(_arm, **s), pixel_views)
    # What a user holding only L would deploy: the T-GM variant that did better on the selection part.
    picked = "finetune" if results["finetune"]["select"] > results["probe"]["select"] else "probe"
    results["tgm"] = {**results[picked], "choice": picked}
    log.info(
        "study: %s (%d images), subset %d: %s",
        named,
        len(idx),
        subset,
        "  ".join(f"{a} {results[a]['test']:.4f}" for a in ARMS if a in results),
    )
    return [
        {
            **({"per_class": per_class} if per_class else {"fraction": fraction}),
            "labelled": len(idx),
            "subset": subset,
            "arm": arm,
            "test_accuracy": round(r["test"], 6),
            "select_accuracy": round(r["select"], 6),
            "train_accuracy": round(r["train"], 6) if "train" in r else None,
            "choice": r["choice"],
        }
        for arm, r in results.items()
    ]


def study(
    params: StudyParams,
    *,
    finetune: FinetuneParams,
    prepared_dir: str | Path,
    pretrained_dir: str | Path,
    metrics_path: str | Path,
    table_path: str | Path,
    plot_path: str | Path,
) -> dict:
    finetune_params = finetune
    inputs = StudyInputs.load(prepared_dir, pretrained_dir, finetune_params)
    runs = [
        row
        for share in shares(params)
        for subset in range(params.subsets)
        for row in run_subset(inputs, params, finetune_params, share, subset)
    ]
    table = pd.DataFrame(runs)
    Path(table_path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(table_path, index=False)
    metrics = summarise(table)
    draw(table, Path(plot_path), params)
    write_json(metrics_path, metrics)
    return metrics


def shares(params: StudyParams) -> list:
    """The label budgets the study compares: ("per_class", n) for each study.per_class, else the fractions."""
    if params.per_class:
        return [("per_class", n) for n in sorted(set(params.per_class))]
    return sorted(set(params.fractions))


def summarise(table: pd.DataFrame) -> dict:
    """Per share of the labels: each arm's mean, spread and range of test accuracy over the subsets, the
    neural arms' mean training accuracy, how often T-GM's pick was the fine-tune, and the headline gaps."""
    metrics: dict = {}
    by = "per_class" if "per_class" in table else "fraction"
    for share, rows in table.groupby(by, sort=True):
        key = f"{share}_per_class" if by == "per_class" else f"{share * 100:g}pct"
        entry = {"labelled": int(rows["labelled"].mean()), "subsets": int(rows["subset"].nunique())}
        for arm in [a for a in ARMS if a in set(rows["arm"])]:
            acc = rows.loc[rows["arm"] == arm, "test_accuracy"]
            entry[arm] = {
                "mean": round(float(acc.mean()), 6),
                "std": round(float(acc.std(ddof=0)), 6),
                "min": round(float(acc.min()), 6),
                "max": round(float(acc.max()), 6),
            }
            if arm in NEURAL:
                train_acc = rows.loc[rows["arm"] == arm, "train_accuracy"]
                entry[arm]["train_accuracy"] = round(float(train_acc.mean()), 6)
        entry["tgm"]["finetune_picked"] = int((rows.loc[rows["arm"] == "tgm", "choice"] == "finetune").sum())
        entry["tgm_minus_svm"] = round(entry["tgm"]["mean"] - entry["svm_rbf"]["mean"], 6)
        entry["pretraining_gain"] = round(entry["finetune"]["mean"] - entry["scratch"]["mean"], 6)
        if "labelled_only" in entry:  # what pretraining on the unlabelled images adds to pretraining on L alone
            entry["unlabelled_gain"] = round(entry["tgm"]["mean"] - entry["labelled_only"]["mean"], 6)
        metrics[key] = entry
    return metrics


def protocol_line(params: StudyParams) -> str:
    rule = (
        f"a held-out {params.holdout:g} of its subset"
        if params.folds == 1
        else f"{params.folds}-fold cross-validation inside its subset"
    )
    return (
        f"{params.subsets} label subsets per share; every arm selects its settings by {rule}, then refits "
        "on all of it; test split untouched by selection"
        + ("; neural arms also see the unlabelled pixels' next-pixel loss" if params.unlabelled else "")
    )


def draw(table: pd.DataFrame, path: Path, params: StudyParams) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {
        "tgm": "o-",
        "finetune": ".:",
        "probe": "x:",
        "scratch": "s-",
        "labelled_only": "p:",
        "logreg": "^--",
        "svm_rbf": "v--",
        "knn": "d--",
    }
    for arm, style in styles.items():
        if arm not in set(table["arm"]):
            continue
        stats = table[table["arm"] == arm].groupby("labelled")["test_accuracy"].agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(
            stats.index,
            stats["mean"],
            yerr=stats["std"],
            fmt=style,
            label=arm,
            markersize=4,
            capsize=3,
            linewidth=1.6 if arm == "tgm" else 1.0,
        )
    ax.set_xscale("log")
    counts = sorted(table["labelled"].unique())
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test accuracy (mean +/- std over subsets)")
    fig.suptitle("Label efficiency: T-GM vs from scratch vs pixel baselines", fontsize=9)
    ax.set_title(protocol_line(params), fontsize=6.5, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
