"""gate: decide whether the evaluated classifier may be packaged, and so become the served champion.

Two kinds of check: absolute floors (gate.min_accuracy, gate.min_macro_f1), and no regression against the
champion - the model the newest Bento serves, whose metrics `tgm package` stored in its BentoML metadata - by
more than gate.max_regression. Only a model that passes is packaged, so only it can become the next champion.

The report is written whether the gate passes or not; a failure raises GateFailed, so `tgm gate` exits
non-zero and DVC does not run `package`.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from pathlib import Path

import yaml

from tgm.errors import UserError
from tgm.io import read_json, write_json
from tgm.params import GateParams

log = logging.getLogger(__name__)

COMPARED = ("accuracy", "macro_f1")


class GateFailed(UserError):
    """At least one gate check failed; the message names each one with its value."""


@dataclass(frozen=True)
class Champion:
    model: str  # BentoML model tag
    bento: str | None  # the Bento serving it (None when only a model was packaged)
    metrics: dict


@dataclass(frozen=True)
class Check:
    name: str
    metric: str
    value: float
    threshold: float
    op: str  # ">=" or "<="
    why: str = ""

    @property
    def passed(self) -> bool:
        return {">=": operator.ge, "<=": operator.le}[self.op](self.value, self.threshold)

    def describe(self) -> str:
        because = f": {self.why}" if self.why else ""
        return f"{self.metric} = {self.value:.4f} (needs {self.op} {self.threshold:.4f}{because}, gate.{self.name})"


def bento_name(bentofile: str | Path = "bentofile.yaml", default: str = "tgm-classifier-service") -> str:
    try:
        return (yaml.safe_load(Path(bentofile).read_text()) or {}).get("name") or default
    except (OSError, yaml.YAMLError):
        return default


def find_champion(model_name: str, bento: str) -> Champion | None:
    """The model the newest `bento` Bento serves, else the newest gated `model_name` model; None if neither.

    Looked up in the local BentoML store (BENTOML_HOME), which DVC does not track: see dvc.yaml's gate stage.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentos = bentoml.bentos.list(bento)
    except NotFound:
        bentos = []
    for b in sorted(bentos, key=lambda b: b.info.creation_time, reverse=True):
        tags = [m.tag for s in b.info.services for m in s.models if m.tag.name == model_name]
        tags += [m.tag for m in b.info.models if m.tag.name == model_name]
        if not tags:
            continue
        try:
            model = bentoml.models.get(tags[0])
        except NotFound:
            log.warning("gate: Bento %s serves %s, which is not in the model store; looking further", b.tag, tags[0])
            continue
        return Champion(str(model.tag), str(b.tag), dict(model.info.metadata.get("metrics", {})))
    try:
        models = [m for m in bentoml.models.list(model_name) if m.info.labels.get("gate") == "passed"]
    except NotFound:
        models = []
    if models:
        model = max(models, key=lambda m: m.info.creation_time)
        return Champion(str(model.tag), None, dict(model.info.metadata.get("metrics", {})))
    return None


def gate_checks(params: GateParams, metrics: dict, champion: Champion | None = None) -> list[Check]:
    checks = [
        Check("min_accuracy", "accuracy", float(metrics["accuracy"]), params.min_accuracy, ">="),
        Check("min_macro_f1", "macro_f1", float(metrics["macro_f1"]), params.min_macro_f1, ">="),
    ]
    if champion is not None and params.max_regression is not None:
        for metric in COMPARED:
            if metric in champion.metrics:
                best = float(champion.metrics[metric])
                checks.append(
                    Check(
                        "max_regression",
                        metric,
                        float(metrics[metric]),
                        best - params.max_regression,
                        ">=",
                        f"champion {champion.model} has {best:.4f}",
                    )
                )
    return checks


_LOOK_UP = object()


def gate(
    params: GateParams,
    metrics_path: str | Path = "metrics/evaluate.json",
    report_path: str | Path = "reports/gate.json",
    champion: Champion | None | object = _LOOK_UP,
    model_name: str = "tgm-classifier",
) -> dict:
    """Check the metrics; `champion` defaults to the one in the BentoML store (None: compare with nothing)."""
    if champion is _LOOK_UP:
        champion = find_champion(model_name, bento_name()) if params.max_regression is not None else None
    checks = gate_checks(params, read_json(metrics_path), champion)
    failed = [c for c in checks if not c.passed]
    report = {
        "passed": not failed,
        "checks": [
            {
                "name": c.name,
                "metric": c.metric,
                "value": c.value,
                "op": c.op,
                "threshold": c.threshold,
                "passed": c.passed,
                "why": c.why,
            }
            for c in checks
        ],
        "champion": None
        if champion is None
        else {"model": champion.model, "bento": champion.bento, **{m: champion.metrics.get(m) for m in COMPARED}},
    }
    write_json(report_path, report)
    if champion is None and params.max_regression is not None:
        log.info("gate: no champion in the BentoML store yet; nothing to compare with")
    for c in checks:
        log.info("gate: %s %s", "PASS" if c.passed else "FAIL", c.describe())
    if failed:
        raise GateFailed("gate failed: " + "; ".join(c.describe() for c in failed))
    return report
