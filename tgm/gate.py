"""gate: decide whether the evaluated classifier may be packaged.

The report is written whether the gate passes or not; a failure raises GateFailed, so `tgm gate` exits
non-zero and DVC does not run `package`.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from pathlib import Path

from tgm.io import read_json, write_json
from tgm.params import GateParams

log = logging.getLogger(__name__)


class GateFailed(RuntimeError):
    """At least one gate check failed; the message names each one with its value."""


@dataclass(frozen=True)
class Check:
    name: str
    metric: str
    value: float
    threshold: float
    op: str  # ">=" or "<="

    @property
    def passed(self) -> bool:
        return {">=": operator.ge, "<=": operator.le}[self.op](self.value, self.threshold)

    def describe(self) -> str:
        return f"{self.metric} = {self.value:.4f} (needs {self.op} {self.threshold:.4f}, gate.{self.name})"


def gate_checks(params: GateParams, metrics: dict) -> list[Check]:
    return [
        Check("min_accuracy", "accuracy", float(metrics["accuracy"]), params.min_accuracy, ">="),
        Check("min_macro_f1", "macro_f1", float(metrics["macro_f1"]), params.min_macro_f1, ">="),
    ]


def gate(params: GateParams, metrics_path: str | Path = "metrics/evaluate.json",
         report_path: str | Path = "reports/gate.json") -> dict:
    checks = gate_checks(params, read_json(metrics_path))
    failed = [c for c in checks if not c.passed]
    report = {
        "passed": not failed,
        "checks": [{"name": c.name, "metric": c.metric, "value": c.value, "op": c.op, "threshold": c.threshold,
                    "passed": c.passed} for c in checks],
    }
    write_json(report_path, report)
    for c in checks:
        log.info("gate: %s %s", "PASS" if c.passed else "FAIL", c.describe())
    if failed:
        raise GateFailed("gate failed: " + "; ".join(c.describe() for c in failed))
    return report
