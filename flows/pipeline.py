"""Prefect flow over the DVC pipeline: each stage is a task that asks DVC to reproduce it.

    python -m flows.pipeline            # run once, in the current directory
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger, task

from tgm.orchestrate import reproduce_stage, stage_names, workspace_lock


@task(name="dvc-repro", retries=1, retry_delay_seconds=5, task_run_name="dvc repro {stage}")
def run_stage(stage: str, workdir: str) -> dict:
    logger = get_run_logger()
    result = reproduce_stage(stage, workdir, on_line=logger.info)
    logger.info("stage %s: %s", stage, "ran" if result.executed else "up to date, skipped")
    return {"stage": stage, "ran": result.ran, "skipped": result.skipped}


@flow(name="tgm-pipeline", log_prints=True)
def pipeline(workdir: str = ".", stages: list[str] | None = None, wait_for_workspace_s: float = 0.0) -> list[dict]:
    """Reproduce the stages of dvc.yaml in order; a failing stage (the gate, say) fails the flow.

    One run at a time per workspace: a second run waits up to `wait_for_workspace_s`, then fails saying
    which run holds the workspace.
    """
    workdir = str(Path(workdir).resolve())
    with workspace_lock(workdir, wait_s=wait_for_workspace_s):
        return [run_stage(stage, workdir) for stage in (stages or stage_names(workdir))]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=".", help="DVC project directory (default: .)")
    args = parser.parse_args()
    pipeline(workdir=args.workdir)
