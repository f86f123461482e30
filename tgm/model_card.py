"""The model card: one markdown page a person reads before using a packaged model.

Written by `package` from what the pipeline measured (never typed by hand): reports/model_card.md, a copy inside
the BentoML model (served at GET /model_card), and a Prefect artifact of the run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from tgm.io import read_json

FILE = "model_card.md"
CARD_PARAMS = ("ingest", "prepare", "base", "model", "pretrain", "finetune", "gate")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def _confusions(confusion_csv: str | Path, top: int = 3) -> list[tuple[str, str, int, int]]:
    """The most frequent mistakes on the test split: (actual, predicted, count, images of that class)."""
    import pandas as pd  # here, not at the top: the service imports this module for FILE alone

    df = pd.read_csv(confusion_csv, dtype=str)
    totals = Counter(df["actual"])
    wrong = Counter(zip(df["actual"], df["predicted"]))
    pairs = [(a, p, n, totals[a]) for (a, p), n in wrong.items() if a != p]
    return sorted(pairs, key=lambda x: (-x[2], x[0], x[1]))[:top]


def _intended_use(meta: dict, task: dict, model: str) -> list[str]:
    colour = "grey-level" if meta["color_mode"] == "grey" else "colour"
    return [
        "## Intended use",
        "",
        f"Classifies {colour} images into one of {len(meta['classes'])} classes: "
        + ", ".join(f"`{c}`" for c in meta["classes"])
        + f". Task `{task['id']}` (data source `{task['source']}`).",
        "",
        f"`{model}` is a GPT-style transformer pretrained to predict the next pixel of these images, then "
        "fine-tuned as a classifier (average-pooled features, class loss plus next-pixel loss). Use it for "
        "images like its training images. It is not meant for other kinds of image: each answer says whether the "
        "image is typical of the training data (`typical`), and `TGM_REFUSE_ATYPICAL=1` refuses the rest.",
    ]


def _training_data(meta: dict, validation: dict | None, data_hash: str) -> list[str]:
    sizes = meta["split_sizes"]
    lines = [
        "## Training data",
        "",
        f"- {meta['images']} images after validation: {sizes['train']} train, {sizes['val']} validation, "
        f"{sizes['test']} test (stratified; no image in two splits).",
        f"- Prepared data hash (DVC): `{data_hash}`.",
    ]
    if "pool_images" in meta:
        pools = ", ".join(
            f"`{name}` {p['images']} ({p['set_aside']} set aside)" for name, p in sorted(meta["pools"].items())
        )
        lines.append(f"- Unlabelled images for pretraining (labels never used): {meta['pool_images']}: {pools}.")
    if meta.get("set_aside"):
        why = ", ".join(f"{k}: {v}" for k, v in sorted(meta["set_aside"].items()))
        lines.append(f"- Set aside as copies of validation or test images, never trained on: {why}.")
    if validation:
        reasons = validation.get("rejected_by_reason") or {}
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "none"
        lines += [
            f"- Validation: {validation['inputs']} files in, {validation['accepted']} accepted, "
            f"{validation['rejected']} quarantined ({why}); {validation.get('near_duplicate_groups', 0)} "
            "near-duplicate groups; warnings: " + ("; ".join(validation.get("warnings") or []) or "none") + ".",
        ]
        for name, counts in sorted((validation.get("pools") or {}).items()):
            lines.append(
                f"- Pool `{name}`: {counts['inputs']} files in, {counts['accepted']} accepted, "
                f"{counts['rejected']} quarantined."
            )
    return lines


def pretraining_lines(pretrained: dict | None) -> list[str]:
    """Where the pretrained weights come from: the images they saw and the base they continued from."""
    if not pretrained:
        return []
    data = pretrained["data"]
    lines = [
        f"- Pretrained ({pretrained['epochs']} epochs) on {data['images']} images of `{data['source']}` "
        f"({data['labelled_training_images']} labelled training images, {data['pool_images']} unlabelled; "
        f"tokens sha256 `{data['tokens_sha256'][:16]}`)."
    ]
    base = pretrained.get("base")
    while base:
        earlier = base.get("provenance") or {}
        seen = earlier.get("data", {})
        lines.append(
            f"- Continued from the base `{base['path']}` (weights sha256 `{base['weights_sha256'][:16]}`), "
            + (f"pretrained on {seen['images']} images of `{seen['source']}`." if seen else "of unknown origin.")
        )
        base = earlier.get("base")
    return lines


def _metrics(metrics: dict) -> list[str]:
    svm = metrics.get("reference", {}).get("svm_rbf_accuracy")
    recall = metrics.get("per_class_recall", {})
    worst = sorted(recall.items(), key=lambda kv: kv[1])[:3]
    return [
        "## Metrics (test split)",
        "",
        "| metric | this model | RBF SVM on the same pixels |",
        "|---|---|---|",
        f"| accuracy | {_pct(metrics['accuracy'])} | {_pct(svm)} |",
        f"| macro-F1 | {_pct(metrics['macro_f1'])} | |",
        f"| bits per pixel (pretrained model) | {metrics.get('test_bpp', float('nan')):.3f} | |",
        "",
        f"{metrics.get('test_images', '?')} test images. Lowest recall: "
        + ", ".join(f"`{c}` {_pct(r)}" for c, r in worst)
        + ".",
    ]


def _label_efficiency(study: dict | None) -> list[str]:
    lines = ["## With few labels (label-efficiency study)", ""]
    if not study:
        return lines + ["No study was run for this model."]
    lines += [
        "Mean test accuracy over labelled subsets of the training split, every arm choosing its settings inside "
        "its own subset:",
        "",
        "| labels | T-GM | RBF SVM | logistic regression | kNN | from scratch |",
        "|---|---|---|---|---|---|",
    ]
    for share, row in study.items():
        if not isinstance(row, dict) or "tgm" not in row:
            continue
        arms = [row.get(a, {}).get("mean") for a in ("tgm", "svm_rbf", "logreg", "knn", "scratch")]
        lines.append(f"| {share} ({row['labelled']} images) | " + " | ".join(_pct(a) for a in arms) + " |")
    return lines


def _limits(meta: dict, metrics: dict, confusion_csv: str | Path) -> list[str]:
    typ = metrics.get("typicality", {})
    lines = [
        "## Limits and known failure modes",
        "",
        f"- Every input is resized to {meta['image_size']}x{meta['image_size']} pixels and quantised to "
        f"{meta['palette_size']} {'grey levels' if meta['color_mode'] == 'grey' else 'colours'}: detail finer "
        "than that is invisible to the model.",
    ]
    if typ:
        lines.append(
            f"- Typical images: at most {typ['threshold_bpp']:.3f} bits per pixel (the validation split's "
            f"{_pct(typ['quantile'])} quantile); {_pct(typ.get('test_atypical_share'))} of test images are above it."
        )
        for kind, o in sorted((typ.get("ood") or {}).items()):
            lines.append(
                f"- Unlike the training data, `{kind}`: {_pct(o['flagged_share'])} flagged atypical "
                f"(AUROC {o['auroc_typicality']:.3f}; from the classifier's confidence alone "
                f"{o['auroc_max_softmax']:.3f})."
            )
    if Path(confusion_csv).exists():
        for actual, predicted, n, total in _confusions(confusion_csv):
            lines.append(f"- `{actual}` read as `{predicted}`: {n} of {total} test images.")
    return lines


def hub_metadata(model: str, task: dict, meta: dict, metrics: dict) -> str:
    """The YAML block a Hugging Face model card starts with: what the model does and how it scored."""
    results = [
        {"type": "accuracy", "value": metrics["accuracy"], "name": "Test accuracy"},
        {"type": "f1", "value": metrics["macro_f1"], "name": "Test macro-F1", "args": {"average": "macro"}},
    ]
    block = {
        "library_name": "t-gm",
        "pipeline_tag": "image-classification",
        "tags": ["t-gm", "image-gpt", "generative-pretraining", f"{meta['color_mode']}-images"],
        "datasets": [task["source"]],
        "metrics": ["accuracy", "f1"],
        "model-index": [
            {
                "name": model,
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": task["source"], "type": task["source"], "split": "test"},
                        "metrics": results,
                    }
                ],
            }
        ],
    }
    return "---\n" + yaml.safe_dump(block, sort_keys=False) + "---"


def model_card(
    model: str,
    task: dict,
    params: dict,
    git_commit: str,
    data_hash: str,
    gate: dict,
    *,
    prepared_dir: str | Path = "data/prepared",
    metrics_path: str | Path = "metrics/evaluate.json",
    study_path: str | Path = "metrics/study.json",
    validation_path: str | Path = "reports/validation.json",
    confusion_csv: str | Path = "plots/confusion.csv",
) -> str:
    """The card's markdown. The study and validation reports are optional (a pipeline may skip them)."""
    meta = read_json(Path(prepared_dir) / "meta.json")
    metrics = read_json(metrics_path)
    study = read_json(study_path) if Path(study_path).exists() else None
    validation = read_json(validation_path) if Path(validation_path).exists() else None
    champion = gate.get("champion")
    compared = (
        f"compared with champion `{champion['model']}` (accuracy {_pct(champion.get('accuracy'))})"
        if champion
        else "no champion of this task to compare with"
    )
    shown = {group: params[group] for group in CARD_PARAMS if group in params}
    sections = [
        [hub_metadata(model, task, meta, metrics)],
        [f"# Model card: `{model}`"],
        _intended_use(meta, task, model),
        _training_data(meta, validation, data_hash),
        _metrics(metrics),
        _label_efficiency(study),
        _limits(meta, metrics, confusion_csv),
        [
            "## Provenance",
            "",
            f"- Git commit: `{git_commit}`; prepared data: `{data_hash}`.",
            *pretraining_lines(gate.get("pretrained")),
            f"- Gate: {'passed' if gate.get('passed') else 'failed'}, {compared}.",
        ],
        ["## Parameters", "", "```yaml", yaml.safe_dump(shown, sort_keys=False).rstrip(), "```"],
    ]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"
