"""Prefect flow that watches the inputs: score a folder of new images against the training distribution.

    python -m flows.drift --folder data/incoming                 # once, here
    python -m flows.drift serve --cron "0 * * * *"               # a deployment `tgm-drift/tgm-drift-hourly`

Each run is `tgm drift` in the project (the classifier and its typicality calibration as `dvc repro` left them),
leaves a `tgm-drift` artifact in the Prefect UI (share atypical, the two-sample test, unreadable files, the
Data Docs path) and fails when the folder drifts, with the reason as the run's message. A drift or a missing
folder is a finding, not a crash: it is not retried.
"""

# No `from __future__ import annotations`: a deployment's runner rebuilds the parameter model from these.

import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.commands import parse, run_or_serve
from tgm.io import read_json
from tgm.orchestrate import refusal

REPORT = "reports/drift.json"


class DriftFound(RuntimeError):
    """The folder drifted, or could not be judged; the message says why."""


@task(task_run_name="tgm drift {folder}")
def score_folder(workdir: str, folder: str | None) -> dict:
    """Run `tgm drift` in `workdir`; its report (None when it wrote none this time) and its refusal, if any."""
    started = time.time()
    cmd = [sys.executable, "-m", "tgm", "drift"] + (["--folder", folder] if folder else [])
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    for line in lines[-20:]:
        get_run_logger().info(line)
    report_path = Path(workdir) / REPORT
    fresh = report_path.exists() and report_path.stat().st_mtime >= started - 1
    if proc.returncode != 0 and refusal(lines) is None:  # a crash, not a verdict: let Prefect show it
        raise RuntimeError(f"tgm drift crashed (exit {proc.returncode}):\n" + "\n".join(lines[-20:]))
    return {"report": read_json(report_path) if fresh else None, "refusal": refusal(lines)}


def drift_markdown(report: dict | None, refused: str | None) -> str:
    """The `tgm-drift` artifact: the verdict, the numbers behind it and where the details are."""
    if report is None:
        return f"# Input drift\n\nNot judged: {refused}"
    verdict = "**drift**" if not report["passed"] else "no drift"
    lines = [
        "# Input drift",
        "",
        f"Folder `{report['folder']}`: {verdict}. {report['scored']} of {report['files']} files scored.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| atypical images (over {report['threshold_bpp']:.3f} bits per pixel) | "
        f"{report['atypical']} ({report['atypical_share']:.1%}) |",
        f"| median bits per pixel (validation) | {report['median_bpp']:.3f} ({report['validation_median_bpp']:.3f}) |",
        f"| Kolmogorov-Smirnov statistic (p) | {report['ks_statistic']:.3f} ({report['ks_p_value']:.2g}) |",
        "",
        "| bits per pixel at | new images | validation |",
        "|---|---|---|",
        *[f"| {q} | {new:.3f} | {val:.3f} |" for q, (new, val) in report["quantiles"].items()],
        "",
    ]
    lines += [f"- unreadable, {reason}: {n}" for reason, n in report.get("unreadable", {}).items()]
    lines += [f"- problem: {p}" for p in report["problems"]]
    lines += ["", "Per-image scores: `reports/drift_scores.csv`; Data Docs: `reports/drift_docs/index.html`."]
    return "\n".join(lines)


@flow(name="tgm-drift", log_prints=True)
def drift_check(workdir: str = ".", folder: str | None = None) -> dict:
    """Score the images in `folder` (default: params.yaml's drift.folder) against the training distribution.

    Args:
        workdir: the DVC project whose classifier and reports/typicality.json judge the images.
        folder: the folder of new images, relative to `workdir` or absolute.
    """
    from prefect.artifacts import create_markdown_artifact

    workdir = str(Path(workdir).resolve())
    result = score_folder(workdir, folder)
    report = result["report"]
    create_markdown_artifact(
        markdown=drift_markdown(report, result["refusal"]), key="tgm-drift", description="T-GM input drift"
    )
    if result["refusal"] is not None:
        if report is not None and report.get("problems"):  # drift itself, not a folder too small to judge
            emit_drift(workdir, report)
        raise DriftFound(result["refusal"])
    return report


DRIFT_EVENT = "tgm.drift.detected"


def emit_drift(workdir: str, report: dict) -> None:
    """The event a deployment trigger reacts to (prefect.yaml: the pipeline retrains): which project drifted,
    and by how much."""
    from prefect.events import emit_event

    project = Path(workdir).resolve()  # "." and the absolute path are the same project to a trigger
    emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"tgm.project.{project}", "prefect.resource.name": project.name},
        payload={k: report.get(k) for k in ("folder", "scored", "atypical_share", "ks_p_value", "problems")},
    )


def main(argv: list[str] | None = None) -> None:
    parser, commands = run_or_serve(__doc__, "tgm-drift-hourly", "0 * * * *")
    for p in commands:
        p.add_argument("--folder", help="folder of new images (default: params.yaml's drift.folder)")
    args = parse(parser, argv)
    parameters = {"workdir": str(Path(args.workdir).resolve()), "folder": args.folder}
    if args.command == "serve":
        drift_check.serve(
            name=args.name,
            cron=args.cron,
            interval=args.interval,
            parameters=parameters,
            limit=1,
            description="T-GM: score new images against the training distribution; fails on drift",
        )
    else:
        drift_check(**parameters)


if __name__ == "__main__":
    main()
