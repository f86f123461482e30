"""gate: decide whether the evaluated classifier may be packaged, and so become its task's champion.

Two kinds of check: absolute floors (gate.min_accuracy, gate.min_macro_f1), and no regression against the
champion of the same task - the version GTO's tags say is in its `champion` stage (tgm.registry), with the
metrics of the commit it was promoted from - by more than gate.max_regression. A model of another task (other
classes, another data source, another gate.task) is never compared with: a new task has no champion until its
first model passes.

The report is written whether the gate passes or not; a failure raises GateFailed, so `tgm gate` exits
non-zero and DVC does not run `package`.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from pathlib import Path

from tgm.errors import UserError
from tgm.io import read_json, write_json
from tgm.params import GateParams
from tgm.registry import Champion, Champions, Task, kept_metrics, task_for

log = logging.getLogger(__name__)

COMPARED = ("accuracy", "macro_f1")


class GateFailed(UserError):
    """At least one gate check failed; the message names each one with its value."""


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


def find_champion(task: Task, metrics: dict, root: str | Path = ".") -> Champion | None:
    """`task`'s champion (`git fetch --tags` brings those promoted elsewhere); None for a task without one.
    A champion with this model's own evaluation is this model, promoted already: it is judged against the
    champion it replaced, so that its own promotion does not change the verdict or make DVC rerun what follows."""
    own = kept_metrics(metrics)
    return next((c for c in Champions(root).assigned(task.id) if c.metrics != own), None)


def _pretrained(classifier_dir: str | Path | None) -> dict | None:
    path = Path(classifier_dir or ".") / "provenance.json"
    return read_json(path).get("pretrained") if classifier_dir and path.exists() else None


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


def gate(
    params: GateParams,
    *,
    source: str,
    metrics_path: str | Path,
    report_path: str | Path,
    classifier_dir: str | Path,
    root: str | Path = ".",
) -> dict:
    """The `gate` stage: the classifier's task is its data source (ingest.source) and class names, or
    gate.task; then `judge`."""
    task = task_for(source, params.task, classifier_dir)
    return judge(params, task, metrics_path, report_path, classifier_dir, root)


def judge(
    params: GateParams,
    task: Task,
    metrics_path: str | Path,
    report_path: str | Path,
    classifier_dir: str | Path | None = None,
    root: str | Path = ".",
) -> dict:
    """Check the metrics against the floors and, unless gate.max_regression is null, `task`'s champion in the
    git repository at `root`."""
    metrics = read_json(metrics_path)
    champion = find_champion(task, metrics, root) if params.max_regression is not None else None
    checks = gate_checks(params, metrics, champion)
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
        "task": task.describe(),
        # What the classifier's pretrained weights saw, and the base they continued from (finetune copies it).
        "pretrained": _pretrained(classifier_dir),
        "champion": None
        if champion is None
        else {
            "model": champion.model,
            "version": champion.version,
            "promoted_at": champion.promoted_at,
            "promoted_by": champion.promoted_by,
            **{m: champion.metrics.get(m) for m in COMPARED},
        },
    }
    write_json(report_path, report)
    if champion is None and params.max_regression is not None:
        log.info("gate: task %s has no champion yet; nothing to compare with", task.id)
    for c in checks:
        log.info("gate: %s %s", "PASS" if c.passed else "FAIL", c.describe())
    if failed:
        raise GateFailed("gate failed: " + "; ".join(c.describe() for c in failed))
    return report
