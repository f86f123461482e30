"""The study's pretrained fine-tune arm under other budgets: more steps, and the semi-supervised loss over the pool.

Two of issue 27's levers for few labels, measured without re-running the whole study: the fine-tune arm of
tgm/study.py, on the study's own subsets, selection parts and selection rule (learning rate and epochs chosen on
the selection part, then refitted on all of the subset), given
  - a longer budget (`study.steps`): the rule may then stop anywhere up to it, so more steps can only cost time
    unless the selection part misleads it;
  - the next-pixel loss on the unlabelled training images in every batch (`study.unlabelled`), twice the cost.
The study's probe is fitted on each subset as well, so that `tgm` (the variant a user holding only the labels
would deploy: the fine-tune or the probe, whichever did better on the selection part) can be read per variant.

    python benchmarks/finetune_arm.py --project /path/to/a/fashion/run --variants 150 450 150+pool

`--project` is a project folder whose data/prepared and models/pretrained exist (the Fashion-MNIST profile's,
after `dvc repro pretrain`); its params.yaml supplies the seeds, holdout, grids and the fine-tune recipe. A
variant is a step budget, with `+pool` for the semi-supervised loss.
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
from tgm.study import LayerProbe, neural_arm, sklearn_arm, subset_views  # noqa: E402


def parse_variant(text: str) -> tuple[int, bool]:
    steps, _, pool = text.partition("+")
    if not steps.isdigit() or int(steps) < 1 or pool not in ("", "pool"):
        raise argparse.ArgumentTypeError(f"{text!r}: a variant is a step budget, optionally +pool (e.g. 450+pool)")
    return int(steps), pool == "pool"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--per-class", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--subsets", type=int, default=3)
    ap.add_argument("--variants", type=parse_variant, nargs="+", default=[parse_variant(v) for v in ("150", "450")])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    t0 = time.perf_counter()
    params, inputs = load_study_inputs(args.project)
    sp, recipe = params.study, params.finetune
    train, labels = inputs.train
    features = inputs.features
    results = []
    for per_class, subset, _, idx, folds in study_subsets(labels, sp, args.per_class, args.subsets):
        probe = sklearn_arm(
            probe_candidates(features["train"], sp),
            LayerProbe,
            subset_views(inputs, idx, folds, features["train"], features["test"], pick=lambda x, i: x[:, i]),
        )
        row = {"per_class": per_class, "subset": subset, "probe": probe, "variants": {}}
        print(f"{per_class} per class, subset {subset}, probe: test {probe['test']:.4f} "
              f"(selection {probe['select']:.4f}; {probe['choice']})", flush=True)  # fmt: skip
        unlabelled = None
        if any(pool for _, pool in args.variants):  # as the study takes it: the training images outside L
            unlabelled = np.delete(train, idx, axis=0)
            if inputs.pool is not None:
                unlabelled = np.concatenate([unlabelled, inputs.pool])
        for steps, pool in args.variants:
            t1 = time.perf_counter()
            r = neural_arm(
                inputs.pretrained_model,
                sp.finetune_lrs,
                subset_views(inputs, idx, folds, train, inputs.test[0]),
                recipe,
                steps=steps,
                unlabelled=unlabelled if pool else None,
                device=inputs.device,
            )
            r["tgm"] = r["test"] if r["select"] > probe["select"] else probe["test"]
            r["seconds"] = round(time.perf_counter() - t1, 1)
            name = f"{steps}{'+pool' if pool else ''}"
            row["variants"][name] = r
            print(f"{per_class} per class, subset {subset}, fine-tune {name}: test {r['test']:.4f} "
                  f"(train {r['train']:.3f}, selection {r['select']:.4f}; {r['choice']}; tgm {r['tgm']:.4f}; "
                  f"{r['seconds']:.0f}s)", flush=True)  # fmt: skip
        results.append(row)
        if args.out:  # after every subset: a long run stopped part-way keeps what it measured
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                            "runs": results}, indent=1))  # fmt: skip

    names = [f"{s}{'+pool' if p else ''}" for s, p in args.variants]
    print("\nmean +/- std over subsets, test accuracy; train: accuracy on the whole subset after the refit")
    print("| labels per class | probe | " + " | ".join(f"fine-tune {n} (train) | tgm {n}" for n in names) + " |")
    print("|---|---|" + "---|---|" * len(names))
    for per_class in args.per_class:
        rows = [r for r in results if r["per_class"] == per_class]

        def fmt(values) -> str:
            v = np.array(values)
            return f"{v.mean():.3f} +/- {v.std():.3f}"

        cells = [fmt([r["probe"]["test"] for r in rows])]
        for n in names:
            cells.append(f"{fmt([r['variants'][n]['test'] for r in rows])} "
                         f"({np.mean([r['variants'][n]['train'] for r in rows]):.2f})")  # fmt: skip
            cells.append(fmt([r["variants"][n]["tgm"] for r in rows]))
        print(f"| {per_class} | " + " | ".join(cells) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
