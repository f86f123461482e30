"""The pipeline's stages, each written once: the function `tgm <stage>` runs, the params it takes, and the files
it reads and writes. The command line runs every stage from this table (`run`); tests/test_stages.py checks
dvc.yaml's cmd, deps, params and outs against it, and each stage's code deps against what its module imports.

A stage's function takes its first params group positionally and any other group (or single key) by keyword,
named after it; its paths by keyword, named as below. What this table and a stage's module say is all that
decides a stage's outputs: the `tgm` command line (tgm/cli.py: arguments, help, version) is no code dep of any.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    run: str  # "module:function"
    params: tuple[str, ...] = ()  # params.yaml groups ("ingest") or single keys ("ingest.source") it takes
    reads: dict[str, str] = field(default_factory=dict)  # keyword -> a file or folder it reads (a DVC dep)
    writes: dict[str, str] = field(default_factory=dict)  # keyword -> what it writes (DVC outs, or a folder of them)
    watches: tuple[str, ...] = ()  # DVC deps read without a keyword: folders named by params, files read by default
    untracked: dict[str, str] = field(default_factory=dict)  # keyword -> a path DVC must not track (see its note)
    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # keys of a group it takes but sets itself
    dvc: bool = True  # a stage of dvc.yaml (drift runs on new data, outside the graph)
    always: bool = False  # DVC's always_changed: it also reads what DVC cannot see (git tags)


PREPARED, PRETRAINED, CLASSIFIER = "data/prepared", "models/pretrained", "models/classifier"
# study fits each candidate for its own budget with its own learning rates, and takes study.unlabelled.
STUDY_SETS = ("epochs", "lr", "patience", "checkpoint_every", "max_steps", "unlabelled")

STAGES: dict[str, Stage] = {
    "ingest": Stage(
        "tgm.ingest:ingest",
        ("ingest",),
        writes={"out_dir": "data/raw"},
        watches=("data/sources",),  # your folders: ingest.source, ingest.unlabelled
    ),
    "validate": Stage(
        "tgm.validate:validate",
        ("validate",),
        reads={"raw_dir": "data/raw"},
        writes={
            "out_dir": "data/validated",
            "report_path": "reports/validation.json",
            "docs_dir": "reports/validation_docs",
        },
    ),
    "prepare": Stage(
        "tgm.prepare:prepare",
        ("prepare", "base"),
        reads={"raw_dir": "data/raw", "validated_dir": "data/validated"},
        writes={"out_dir": PREPARED},
        watches=("bases",),  # base.path: a pretrained model from another project
    ),
    "pretrain": Stage(
        "tgm.training.stages:pretrain",
        ("pretrain", "model", "base"),
        reads={"prepared_dir": PREPARED},
        writes={
            "out_dir": PRETRAINED,
            "metrics_path": "metrics/pretrain.json",
            "curve_path": "plots/pretrain_curve.csv",
            "live_dir": "dvclive/pretrain",
        },
        watches=("bases",),
        untracked={"checkpoint_dir": "checkpoints/pretrain"},  # a crashed run's state; removed when it ends
    ),
    "finetune": Stage(
        "tgm.training.stages:finetune",
        ("finetune",),
        reads={"prepared_dir": PREPARED, "pretrained_dir": PRETRAINED},
        writes={
            "out_dir": CLASSIFIER,
            "metrics_path": "metrics/finetune.json",
            "curve_path": "plots/finetune_curve.csv",
            "live_dir": "dvclive/finetune",
        },
        untracked={"checkpoint_dir": "checkpoints/finetune"},
    ),
    "probe": Stage(
        "tgm.probe:probe",
        ("probe",),
        reads={"prepared_dir": PREPARED, "pretrained_dir": PRETRAINED},
        writes={"metrics_path": "metrics/probe.json", "plot_path": "plots/probe.csv"},
    ),
    "study": Stage(
        "tgm.study:study",
        ("study", "finetune"),
        reads={"prepared_dir": PREPARED, "pretrained_dir": PRETRAINED},
        writes={
            "metrics_path": "metrics/study.json",
            "table_path": "plots/label_efficiency.csv",
            "plot_path": "plots/label_efficiency.png",
        },
        sets={"finetune": STUDY_SETS},
    ),
    "evaluate": Stage(
        "tgm.evaluate:evaluate",
        ("evaluate",),
        reads={"prepared_dir": PREPARED, "pretrained_dir": PRETRAINED, "classifier_dir": CLASSIFIER},
        writes={
            "metrics_path": "metrics/evaluate.json",
            "confusion_path": "plots/confusion.csv",
            "completions_path": "plots/completions.png",
            "typicality_path": "reports/typicality.json",
        },
    ),
    "gate": Stage(
        "tgm.gate:gate",
        ("gate", "ingest.source"),
        reads={"metrics_path": "metrics/evaluate.json", "classifier_dir": CLASSIFIER},
        writes={"report_path": "reports/gate.json"},
        # The task's champion is a git tag (GTO), which `git fetch --tags` or a promotion changes without any
        # file DVC tracks changing: the gate runs every time, and what follows reruns when its verdict changes.
        always=True,
    ),
    "package": Stage(
        "tgm.package:package",
        ("package", "ingest", "prepare", "base", "model", "pretrain", "finetune", "gate"),
        reads={
            "classifier_dir": CLASSIFIER,
            "gate_report": "reports/gate.json",
            "typicality_path": "reports/typicality.json",
        },
        writes={
            "out_dir": "models/packaged",
            "report_path": "reports/package.json",
            "card_path": "reports/model_card.md",
        },
        # What the model card says, and what the Bento packs.
        watches=(
            "bentofile.yaml",
            "constraints.txt",
            PREPARED,
            "metrics/evaluate.json",
            "metrics/study.json",
            "reports/validation.json",
            "plots/confusion.csv",
        ),
    ),
    "promote": Stage(
        "tgm.registry:promote",
        reads={"package_report": "reports/package.json", "gate_report": "reports/gate.json"},
        writes={"report_path": "reports/promotion.json"},
        # What the promotion commit holds, and GTO's tags point at.
        watches=("models/packaged", "metrics/evaluate.json"),
    ),
    "drift": Stage(
        "tgm.drift:drift",
        ("drift", "validate.max_pixels"),
        reads={"classifier_dir": CLASSIFIER, "typicality_path": "reports/typicality.json"},
        writes={
            "report_path": "reports/drift.json",
            "scores_path": "reports/drift_scores.csv",
            "docs_dir": "reports/drift_docs",
        },
        dvc=False,
    ),
}


def arguments(stage: Stage, params) -> tuple[list, dict]:
    """The positional and keyword arguments of `stage`'s function: its params (first group positionally, the
    others by name) and its paths."""
    values = []
    for spec in stage.params:
        group, _, key = spec.partition(".")
        values.append((key or group, getattr(getattr(params, group), key) if key else getattr(params, group)))
    kwargs = {name: value for name, value in values[1:]}
    return [values[0][1]] if values else [], {**kwargs, **stage.reads, **stage.writes, **stage.untracked}


def run(name: str, params_path: str = "params.yaml", overrides: dict | None = None, **changes):
    """Run stage `name` with params.yaml's params (`overrides`: dotted keys set for this run, checked like the
    file), its paths as the table says or as `changes` says."""
    from tgm.params import load_params, override

    stage = STAGES[name]
    module, function = stage.run.split(":")
    params = override(load_params(params_path), overrides or {})
    args, kwargs = arguments(stage, params)
    return getattr(importlib.import_module(module), function)(*args, **{**kwargs, **changes})
