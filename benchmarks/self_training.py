"""Self-training over the unlabelled images: what it adds to the study's probe, and to its RBF SVM on pixels.

A lever for few labels (issue 27): fit an arm on its labelled subset L, label the unlabelled training images
with it, refit on L plus the most confident of them, and repeat with more. Both arms get the same rounds, the
same unlabelled images and the same selection rule as the study (tgm/study.py): each arm's own settings are
chosen on the selection part of L first, then the number of rounds is chosen on that same part (ties: fewer),
and only the refit on all of L meets the test split. The pixel SVM gets the treatment too, so that any gain is
the features' and not self-training's alone.

    python benchmarks/self_training.py --project /path/to/a/fashion/run [--per-class 10 100] [--subsets 3]

`--project` is a project folder whose data/prepared and models/pretrained exist (the Fashion-MNIST profile's,
after `dvc repro pretrain`); its params.yaml supplies the study's seeds, holdout and grids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_study_inputs, probe_candidates, study_subsets  # noqa: E402
from tgm.study import LayerProbe, StudyInputs, pixel_candidates, pixel_model, select_and_refit  # noqa: E402


class Flat:
    """An arm on 2-D inputs (images x features) that can rank unlabelled images by confidence per class."""

    def __init__(self, model):
        self.model = model

    def fit(self, x, y):
        self.model.fit(x, y)
        return self

    def score(self, x, y) -> float:
        return float((self.predict(x) == y).mean())

    def confidence(self, x) -> np.ndarray:
        if hasattr(self.model, "svc"):  # the SVM: its one-vs-rest shaped margins rank like probabilities
            return self.model.svc.decision_function(x)
        return self.model.predict_proba(x)

    def predict(self, x) -> np.ndarray:
        return self.confidence(x).argmax(1)


def most_confident(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the n images predicted as that class with the highest score: (positions, their labels)."""
    predicted = scores.argmax(1)
    picks, labels = [], []
    for c in range(scores.shape[1]):
        members = np.flatnonzero(predicted == c)
        top = members[np.argsort(-scores[members, c], kind="stable")[:n]]
        picks.append(top)
        labels.append(np.full(len(top), c))
    return np.concatenate(picks), np.concatenate(labels)


def rounds(make, x, y, pool, schedule):
    """The models of each round: round 0 fitted on (x, y); round r on (x, y) plus schedule[r] images per class
    of `pool`, labelled by round r - 1's model."""
    model = make().fit(x, y)
    yield model
    for n in schedule[1:]:
        i, labels = most_confident(model.confidence(pool), n)
        model = make().fit(np.concatenate([x, pool[i]]), np.concatenate([y, labels]))
        yield model


def arm(make, views: dict, pool: np.ndarray, schedule: list[int]) -> dict:
    """Choose the number of rounds on the selection part(s), then run that many on all of L and score the test."""
    per_round = [[m.score(*s["select"]) for m in rounds(make, *s["fit"], pool, schedule)] for s in views["splits"]]
    mean = np.mean(per_round, axis=0)
    chosen = int(np.argmax(mean))  # the first best: fewest pseudo-labels among ties
    tests = [m.score(*views["test"]) for m in rounds(make, *views["all"], pool, schedule[: chosen + 1])]
    return {"test": tests[-1], "test_round0": tests[0], "select": float(mean[chosen]), "rounds": chosen}


def splits_of(x, labels, folds):
    return [{k: (x[i], labels[i]) for k, i in f.items()} for f in folds]


def probe_setup(inputs: StudyInputs, labels, idx, folds, sp):
    """The study's probe on this subset: its candidates (each layer or all concatenated, times probe_C) through
    its selection rule. Returns the chosen layer's features of the training and test images, a maker of the
    arm on them and the choice."""
    train, test = inputs.features["train"], inputs.features["test"]
    _, settings, _ = select_and_refit(
        probe_candidates(train, sp),
        LayerProbe,
        [{k: (train[:, i], labels[i]) for k, i in f.items()} for f in folds],
        (train[:, idx], labels[idx]),
    )
    chosen = LayerProbe(**settings)
    return (
        chosen._pick(train),
        chosen._pick(test),
        lambda: Flat(pixel_model("logreg", C=settings["C"])),
        settings,
    )


def svm_setup(inputs: StudyInputs, labels, idx, folds, sp):
    """The study's RBF SVM on the quantised pixels, C and gamma chosen on the selection part."""
    x = inputs.pixels["train"]
    _, settings, _ = select_and_refit(
        pixel_candidates(0, sp)["svm_rbf"],
        lambda **s: Flat(pixel_model("svm_rbf", **s)),
        splits_of(x, labels, folds),
        (x[idx], labels[idx]),
    )
    return x, inputs.pixels["test"], lambda: Flat(pixel_model("svm_rbf", **settings)), settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--per-class", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--subsets", type=int, default=3)
    ap.add_argument("--schedule", type=int, nargs="+", default=[0, 30, 100, 300],
                    help="pseudo-labelled images per class in each round (round 0: none)")  # fmt: skip
    ap.add_argument("--pool", type=int, default=20000, help="unlabelled images sampled to pseudo-label from")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    t0 = time.perf_counter()
    params, inputs = load_study_inputs(args.project)
    sp = params.study
    labels = inputs.train[1]
    results = []
    for per_class, subset, seed, idx, folds in study_subsets(labels, sp, args.per_class, args.subsets):
        rest = np.setdiff1d(np.arange(labels.size), idx)  # L's images are never pseudo-labelled
        size = min(args.pool, rest.size)
        pool = np.sort(np.random.default_rng(seed).choice(rest, size=size, replace=False))
        row = {"per_class": per_class, "subset": subset}
        for name, setup in (("probe", probe_setup), ("svm_rbf", svm_setup)):
            t1 = time.perf_counter()
            x, test_x, make, choice = setup(inputs, labels, idx, folds, sp)
            views = {
                "splits": splits_of(x, labels, folds),
                "all": (x[idx], labels[idx]),
                "test": (test_x, inputs.test[1]),
            }
            r = arm(make, views, x[pool], args.schedule)
            row[name] = {**r, "choice": choice, "seconds": round(time.perf_counter() - t1, 1)}
            print(f"{per_class} per class, subset {subset}, {name}: test {r['test_round0']:.4f} -> "
                  f"{r['test']:.4f} after {r['rounds']} rounds (selection {r['select']:.4f}; {choice}; "
                  f"{row[name]['seconds']:.0f}s)", flush=True)  # fmt: skip
        results.append(row)
    print("\nmean +/- std over subsets, test accuracy; self-training chose its rounds on the selection part")
    print(f"schedule {args.schedule} images per class, pseudo-labelled from {args.pool} unlabelled training images")
    print("| labels per class | probe | probe + self-training | RBF SVM | RBF SVM + self-training |")
    print("|---|---|---|---|---|")
    for per_class in args.per_class:
        rows = [r for r in results if r["per_class"] == per_class]

        def fmt(name, key, _rows=rows):
            v = np.array([r[name][key] for r in _rows])
            return f"{v.mean():.3f} +/- {v.std():.3f}"

        print(f"| {per_class} | {fmt('probe', 'test_round0')} | {fmt('probe', 'test')} | "
              f"{fmt('svm_rbf', 'test_round0')} | {fmt('svm_rbf', 'test')} |")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
