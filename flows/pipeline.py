"""Prefect flow over the DVC pipeline: each stage is a task that asks DVC to reproduce it.

    python -m flows.pipeline                                  # run once, here
    python -m flows.pipeline run -S finetune.lr=0.001 --push  # with overrides, then `dvc push`
    python -m flows.pipeline serve --cron "0 3 * * *"         # a deployment with a cron schedule

DVC stays the judge of what is out of date: a stage runs through `dvc repro <stage>`, and one that
`dvc status` says is current is skipped without starting DVC again. Every run is saved as a DVC experiment
named after the flow run (`dvc exp show`), and leaves artifacts in the Prefect UI: the stages, the
evaluation metrics next to the last commit's, the validation summary, the gate decision, the packaged tags.
"""

# No `from __future__ import annotations` here: a deployment's runner rebuilds the flow's parameter model from
# these annotations in another process, and the typed `params` form must be a class there, not a string.

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL

from flows import artifacts
from flows.commands import parse, run_or_serve
from tgm.orchestrate import (
    StageFailed,
    metrics_diff,
    overridden_params,
    parse_overrides,
    reproduce_stage,
    save_experiment,
    stage_names,
    stale_stages,
    workspace_lock,
)
from tgm.orchestrate import push as dvc_push
from tgm.params import ParamsOverride, override_pairs

# A crashed or killed pretrain/finetune resumes from its last checkpoint, so a retry loses little.
RETRIES = {"pretrain": 2, "finetune": 2}


class PipelineStopped(RuntimeError):
    """A stage refused to go on (bad data, the gate, bad params) or kept failing; the message says why."""


def _retry_unless_refused(task, task_run, state) -> bool:
    # A deliberate refusal (`tgm <stage>: error: ...`) would say the same again; a crash might not.
    try:
        state.result()
    except StageFailed as exc:
        return exc.refusal is None
    except Exception:  # noqa: BLE001 - a crash of any kind may not recur
        return True
    return False


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_refused, task_run_name="dvc repro {stage}")
def run_stage(stage: str, workdir: str, up_to_date: bool = False) -> dict:
    logger = get_run_logger()
    if up_to_date:
        logger.info("stage %s: up to date (dvc status), skipped", stage)
        return {"stage": stage, "ran": [], "skipped": [stage]}
    result = reproduce_stage(stage, workdir, on_line=logger.info)
    logger.info("stage %s: %s", stage, "ran" if result.executed else "up to date, skipped")
    return {"stage": stage, "ran": result.ran, "skipped": result.skipped}


@task(task_run_name="dvc exp save {name}")
def record_experiment(workdir: str, name: str, stages: list[str], message: str) -> str:
    return save_experiment(workdir, name, message, stages=stages)


@task(retries=2, retry_delay_seconds=10, task_run_name="dvc push")
def push_outputs(workdir: str, remote: str | None) -> str:
    return dvc_push(workdir, remote, on_line=get_run_logger().info)


def experiment_name() -> str:
    # Git ref names: keep it to letters, digits, '-', '_' and '.'.
    name = flow_run.get_name() or time.strftime("%Y%m%d-%H%M%S")
    return "prefect-" + re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")


def reproduce(workdir: str, stages: list[str]) -> tuple[list[dict], StageFailed | None]:
    """Each stage in turn as a task, until one fails; stages `dvc status` calls current are skipped unless a
    stage before them ran."""
    results: list[dict] = []
    stale = stale_stages(workdir)
    upstream_ran = False
    for stage in stages:
        try:
            result = run_stage.with_options(retries=RETRIES.get(stage, 1))(
                stage, workdir, up_to_date=stage not in stale and not upstream_ran
            )
        except StageFailed as exc:
            return results, exc
        upstream_ran = upstream_ran or bool(result["ran"])
        results.append(result)
    return results, None


def record(workdir: str, results: list[dict], failure: StageFailed | None) -> str | None:
    """Save the run as DVC experiment `prefect-<flow run name>`; its name, or None when that is not possible."""
    exp_name = experiment_name()
    message = f"Prefect flow run {flow_run.get_name()}" + (f" ({failure.stage} failed)" if failure else "")
    try:
        # Every finished stage is already committed to dvc.lock (by its `dvc repro`, or it was up to
        # date), so DVC needs to commit only one of them; never the failed or unreached ones.
        return record_experiment(workdir, exp_name, [results[-1]["stage"]], message)
    except Exception as exc:  # noqa: BLE001 - a run without git still counts; say so rather than fail it
        get_run_logger().warning("not recorded as a DVC experiment: %s", exc)
        return None


@flow(name="tgm-pipeline", log_prints=True)
def pipeline(
    workdir: str = ".",
    *,
    source: str | None = None,
    params: ParamsOverride | None = None,
    overrides: list[str] | None = None,
    push: bool = False,
    remote: str | None = None,
    stages: list[str] | None = None,
    experiment: bool = True,
    wait_for_workspace_s: float = 0.0,
    dask_address: str | None = None,
) -> dict:
    """Reproduce the stages of dvc.yaml in order, record the run as a DVC experiment, optionally `dvc push`.

    Args:
        workdir: the DVC project (a git repository, for experiments).
        source: data source for this run, e.g. `folder:data/sources/pets` (sets ingest.source).
        params: params for this run only, as a form in the Prefect UI: each group of params.yaml, blank keys keep
            the file's value. Applied like `overrides`.
        overrides: `group.key=value` params for this run only, as `dvc exp run -S` takes them; params.yaml is
            put back afterwards (the experiment keeps them).
        push: `dvc push` the outputs when the run succeeds, to `remote` or the default remote.
        stages: a subset of the stages (default: all, in dvc.yaml order).
        experiment: save the run as DVC experiment `prefect-<flow run name>`.
        wait_for_workspace_s: how long to wait for another run holding the workspace before failing.
        dask_address: a Dask scheduler (tcp://host:8786) for the per-file work of ingest, validate and prepare
            (TGM_DASK_ADDRESS, docs/scale.md); default: a process pool on this machine.
    """
    logger = get_run_logger()
    workdir = str(Path(workdir).resolve())
    sets = {
        **override_pairs(params),
        **parse_overrides(list(overrides or []) + ([f"ingest.source={source}"] if source else [])),
    }
    with (
        workspace_lock(workdir, wait_s=wait_for_workspace_s),
        overridden_params(workdir, sets),
        environment(**stage_environment(dask_address)),
    ):
        if sets:
            logger.info("params for this run: %s", ", ".join(f"{k}={v!r}" for k, v in sets.items()))
        results, failure = reproduce(workdir, stages or stage_names(workdir))
        exp_name = record(workdir, results, failure) if experiment and results else None
        markdown = artifacts.render(
            Path(workdir),
            results,
            (failure.stage, failure.reason) if failure else None,
            exp_name,
            metrics_diff(workdir),
            {s for r in results for s in r["ran"]},
        )
        artifacts.publish(markdown)

    if any("promote" in r["ran"] for r in results):
        emit_promotion(workdir)
    if failure is not None:
        raise PipelineStopped(f"stage {failure.stage} stopped the pipeline: {failure.reason}")
    pushed = push_outputs(workdir, remote) if push else None
    return {"stages": results, "experiment": exp_name, "pushed": pushed}


PROMOTION_EVENT = "tgm.champion.promoted"


def emit_promotion(workdir: str) -> None:
    """A promotion as an event (for automations and the UI's event feed): the task and its new champion."""
    from prefect.events import emit_event

    promotion = json.loads((Path(workdir) / "reports/promotion.json").read_text())
    if not promotion["promoted"]:
        return
    task = promotion["task"]
    emit_event(
        event=PROMOTION_EVENT,
        resource={"prefect.resource.id": f"tgm.task.{task}", "prefect.resource.name": str(task)},
        payload={
            "model": promotion["model"],
            "version": promotion["version"],
            "commit": promotion["commit"],
            "metrics": promotion["metrics"],
            "workdir": str(Path(workdir).resolve()),
        },
    )


def retrain_on_drift(workdir: str):
    """The deployment trigger that reruns the pipeline when the drift flow finds drift in this project's inputs
    (flows.drift emits the event; prefect.yaml declares the same trigger for the work pool's deployment)."""
    from prefect.events import DeploymentEventTrigger

    from flows.drift import DRIFT_EVENT

    return DeploymentEventTrigger(
        name="retrain on drift",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": f"tgm.project.{Path(workdir).resolve()}"},
        parameters={"workdir": workdir},
    )


def serve(cron: str | None, interval: float | None, name: str, parameters: dict, limit: int | None) -> None:
    """Serve the flow as a deployment with a schedule, rerun as well when this project's inputs drift; runs
    happen in this process until it is stopped."""
    pipeline.serve(
        name=name,
        cron=cron,
        interval=interval,
        parameters=parameters,
        limit=limit,
        triggers=[retrain_on_drift(parameters["workdir"])],
        description="T-GM: reproduce the DVC pipeline, gate and package; runs saved as DVC experiments; "
        "reruns when the drift flow finds drift",
    )


def stage_environment(dask_address: str | None) -> dict[str, str | None]:
    """What the stages this flow starts must see: the Dask scheduler for their per-file work, and then this
    flow's Prefect API, so that the chunks' flow run (tgm-data-chunks) reports to the same server."""
    return {"TGM_DASK_ADDRESS": dask_address, "PREFECT_API_URL": PREFECT_API_URL.value() if dask_address else None}


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set the non-None `values` for the stages this flow starts (they inherit its environment), then restore."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> None:
    parser, commands = run_or_serve(__doc__, "tgm-scheduled", "0 3 * * *")
    for p in commands:
        p.add_argument("--source", help="data source, e.g. builtin:digits or folder:data/sources/NAME")
        p.add_argument(
            "-S",
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="params override for the run(s), as `dvc exp run -S` (repeatable)",
        )
        p.add_argument("--push", action="store_true", help="`dvc push` after a successful run")
        p.add_argument("--remote", help="DVC remote to push to (default: the default remote)")
        p.add_argument(
            "--no-experiment", dest="experiment", action="store_false", help="do not save the run as a DVC experiment"
        )
        p.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="wait this long for another run holding the workspace (default: fail at once)",
        )
        p.add_argument("--dask-address", help="run the data stages' per-file work on this Dask scheduler")
    commands[1].add_argument(
        "--limit",
        type=int,
        default=1,
        help="most concurrent runs this server starts (default: 1; the workspace lock still "
        "guards against runs from elsewhere)",
    )
    args = parse(parser, argv)
    parameters = {
        "workdir": str(Path(args.workdir).resolve()),
        "source": args.source,
        "overrides": args.overrides,
        "push": args.push,
        "remote": args.remote,
        "experiment": args.experiment,
        "wait_for_workspace_s": args.wait,
        "dask_address": args.dask_address,
    }
    parse_overrides(args.overrides)  # a malformed override fails here, not at 3 a.m.
    if args.command == "serve":
        serve(args.cron, args.interval, args.name, parameters, args.limit)
    else:
        pipeline(**parameters)


if __name__ == "__main__":
    main()
