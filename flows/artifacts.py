"""What a pipeline run shows in the Prefect UI: markdown built from the reports the stages write.

The render functions are plain (file in, markdown out) so they can be read and tested without Prefect;
`publish` turns them into Prefect artifacts with stable keys, so the UI keeps one history per kind.
"""

from __future__ import annotations

import json
from pathlib import Path

KEYS = {
    "stages": "tgm-stages",
    "metrics": "tgm-metrics",
    "validation": "tgm-validation",
    "gate": "tgm-gate",
    "package": "tgm-package",
    "model_card": "tgm-model-card",
    "champion": "tgm-champion",
}


# metrics/evaluate.json's headline figures, named as `dvc metrics diff` names them (nested keys joined by dots).
HEADLINE = ["accuracy", "macro_f1", "test_bpp", "reference.svm_rbf_accuracy"]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def stages_markdown(results: list[dict], failed: tuple[str, str] | None, experiment: str | None) -> str:
    rows = ["| stage | DVC |", "|---|---|"]
    for r in results:
        # `dvc repro <stage>` also reruns the gate upstream of it (always changed): a stage ran when it did.
        rows.append(f"| {r['stage']} | {'ran' if r['stage'] in r['ran'] else 'up to date, skipped'} |")
    if failed:
        rows.append(f"| {failed[0]} | **failed**: {failed[1].splitlines()[0]} |")
    lines = ["# Stages", "", *rows, ""]
    lines.append(
        f"Recorded as DVC experiment `{experiment}` (`dvc exp show`)."
        if experiment
        else "Not recorded as a DVC experiment."
    )
    return "\n".join(lines)


def metrics_markdown(diff: dict, rev: str = "HEAD", target: str = "metrics/evaluate.json") -> str:
    """The `dvc metrics diff` of one metrics file, as a table: previous version, this run, change."""
    if not diff:
        return f"# Evaluation metrics\n\nNo `{target}` to compare (no previous version at `{rev}`, or no metrics yet)."
    rows = [f"| metric | {rev} | this run | change |", "|---|---|---|---|"]
    # The headline metrics first, then the rest (per-class recall...) in name order.
    for name in [m for m in HEADLINE if m in diff] + sorted(m for m in diff if m not in HEADLINE):
        d = diff[name]
        change = d.get("diff")
        rows.append(
            f"| {name} | {_num(d.get('old'))} | {_num(d.get('new'))} | {'-' if change is None else f'{change:+.4f}'} |"
        )
    return "\n".join([f"# Evaluation metrics (`dvc metrics diff {rev}`)", "", *rows])


def validation_markdown(report: dict | None) -> str | None:
    if report is None:
        return None
    verdict = "passed" if report.get("passed") else "**failed**"
    lines = [
        "# Data validation",
        "",
        f"Validation {verdict}: {report.get('accepted')} of {report.get('inputs')} "
        f"files accepted, {report.get('rejected')} quarantined ({_num(report.get('reject_fraction'))}), "
        f"{report.get('classes')} classes.",
        "",
    ]
    if report.get("rejected_by_reason"):
        lines += ["| quarantine reason | files |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(report["rejected_by_reason"].items())] + [""]
    per_class = report.get("images_per_class") or {}
    if per_class:
        lines += ["| class | accepted images |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in per_class.items()] + [""]
    if report.get("images_per_split"):
        lines += ["| your split | accepted images |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["images_per_split"].items()] + [""]
    if report.get("pools"):
        lines += ["| unlabelled pool (pretraining only) | files | accepted | quarantined |", "|---|---|---|---|"]
        lines += [
            f"| {name} | {c['inputs']} | {c['accepted']} | {c['rejected']} |" for name, c in report["pools"].items()
        ] + [""]
    for kind in ("problems", "warnings"):
        for item in report.get(kind) or []:
            lines.append(f"- {kind[:-1]}: {item}")
    return "\n".join(lines)


def gate_markdown(report: dict | None) -> str | None:
    if report is None:
        return None
    lines = [
        "# Gate",
        "",
        f"Decision: {'**passed**' if report.get('passed') else '**failed**'}",
        "",
        "| check | metric | value | needs | result |",
        "|---|---|---|---|---|",
    ]
    for c in report.get("checks", []):
        needs = f"{c['op']} {_num(c['threshold'])}" + (f" ({c['why']})" if c.get("why") else "")
        lines.append(
            f"| gate.{c['name']} | {c['metric']} | {_num(c['value'])} | {needs} | "
            f"{'pass' if c['passed'] else '**FAIL**'} |"
        )
    champion, task = report.get("champion"), report.get("task") or {}
    lines += [
        "",
        f"Task: `{task.get('id')}` (source `{task.get('source')}`, {len(task.get('classes', []))} classes).",
        "",
        f"Champion compared with: `{champion['model']}`, promoted {champion.get('promoted_at')} by "
        f"{champion.get('promoted_by')}."
        if champion
        else "No champion compared with (this task has none yet, or gate.max_regression is null).",
    ]
    return "\n".join(lines)


def champion_markdown(promotion: dict | None, assigned: list[dict]) -> str | None:
    """After `promote`: what it did, and the champions of its task (GTO), the champion first."""
    if not promotion or not assigned:
        return None
    task_id = promotion["task"]
    lines = [f"# Champion of task `{task_id}`", "", f"promote: {promotion['why']}", ""]
    lines += ["| model | version | accuracy | macro-F1 | promoted | by | how |", "|---|---|---|---|---|---|---|"]
    for i, c in enumerate(assigned):
        name = f"**`{c['model']}`** (champion)" if i == 0 else f"`{c['model']}`"
        m = c.get("metrics", {})
        lines.append(
            f"| {name} | {c['version']} | {_num(m.get('accuracy'))} | {_num(m.get('macro_f1'))} | "
            f"{c.get('promoted_at')} | {c.get('promoted_by')} | {c.get('how')} |"
        )
    lines += ["", "Share it: `git push --tags`. Roll back to the previous one: `tgm champion rollback`."]
    return "\n".join(lines)


def _champions(workdir: Path, promotion: dict | None) -> list[dict]:
    from tgm.registry import Champions

    return [c.describe() for c in Champions(workdir).assigned(promotion["task"])] if promotion else []


def package_markdown(report: dict | None) -> str | None:
    if report is None:
        return None
    return "\n".join(
        [
            "# Packaged",
            "",
            f"- model: `{report.get('model_tag')}`",
            f"- Bento: `{report.get('bento_tag')}`" if report.get("bento_tag") else "- Bento: not built",
            "",
            f"Serve it: `bentoml serve {report.get('bento_tag') or report.get('model_tag')}`",
        ]
    )


def render(
    workdir: Path,
    results: list[dict],
    failed: tuple[str, str] | None,
    experiment: str | None,
    diff: dict,
    ran: set[str],
) -> dict[str, str]:
    """The markdown of each artifact this run has something current to say about."""
    out = {"stages": stages_markdown(results, failed, experiment), "metrics": metrics_markdown(diff)}
    finished = {r["stage"] for r in results}
    failed_stage = failed[0] if failed else None
    # A report is current when its stage finished in this run or is the one that failed while writing it.
    for kind, stage, path, fn in [
        ("validation", "validate", "reports/validation.json", validation_markdown),
        ("gate", "gate", "reports/gate.json", gate_markdown),
        ("package", "package", "reports/package.json", package_markdown),
        ("model_card", "package", "reports/model_card.md", _text),
        ("champion", "promote", "reports/promotion.json", lambda p: champion_markdown(p, _champions(workdir, p))),
    ]:
        if stage in finished or stage == failed_stage:
            text = fn(_read(workdir / path) if path.endswith(".json") else workdir / path)
            if text:
                if stage == failed_stage or stage in ran:
                    out[kind] = text
                else:
                    out[kind] = text + "\n\n(up to date: this stage did not need to run.)"
    return out


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def publish(markdown: dict[str, str]) -> list[str]:
    from prefect.artifacts import create_markdown_artifact

    keys = []
    for kind, text in markdown.items():
        create_markdown_artifact(markdown=text, key=KEYS[kind], description=f"T-GM {kind}")
        keys.append(KEYS[kind])
    return keys
