"""A real `prefect server start` on 127.0.0.1 (its own SQLite database): the flow served with a cron schedule,
the schedule read back through the API, a run triggered with run_deployment, its artifacts read back; and
prefect.yaml deployed to a process work pool."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run
from support import local_server

pytestmark = pytest.mark.slow

CRON = "0 3 * * *"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    proc, api, log = local_server.start_prefect_server(home)
    try:
        yield api, home
    finally:
        local_server.stop(proc)


@pytest.fixture
def client_of(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api[0]}):
        with get_client(sync_client=True) as client:
            yield client


def wait_for_deployment(client, name: str, timeout_s: float = 120.0):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_served_flow_has_its_cron_schedule_and_runs_on_demand(prefect_api, client_of, digits_project):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    api, home = prefect_api
    env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    serve, log = local_server.start_process(
        [
            sys.executable,
            "-m",
            "flows.pipeline",
            "serve",
            "--cron",
            CRON,
            "--name",
            "tgm-test",
            "--workdir",
            str(digits_project),
        ],
        digits_project,
        env,
        "flow-serve",
    )
    try:
        deployment = wait_for_deployment(client_of, "tgm-pipeline/tgm-test")
        assert [s.schedule.cron for s in deployment.schedules] == [CRON]
        assert all(s.active for s in deployment.schedules)
        assert deployment.parameters["workdir"] == str(digits_project)

        flow_run = run_deployment("tgm-pipeline/tgm-test", timeout=900, poll_interval=2)
        assert flow_run.state.is_completed(), (flow_run.state, log.read_text()[-3000:])
        found = {
            a.key: a.data
            for a in client_of.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        }
        assert {"tgm-stages", "tgm-metrics", "tgm-validation", "tgm-gate", "tgm-package"} <= set(found)
        assert "| package | up to date, skipped |" in found["tgm-stages"]
        assert f"prefect-{flow_run.name}" in found["tgm-stages"]
        assert f"prefect-{flow_run.name}" in run(["dvc", "exp", "list", "--name-only"], digits_project).stdout
    finally:
        local_server.stop(serve)


def test_served_drift_flow_passes_new_test_images_and_fails_when_they_drift(
    prefect_api, client_of, built_project, tmp_path
):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from test_drift import incoming, replace_with_noise

    project = tmp_path / "project"
    for rel in ("params.yaml", "models/classifier", "reports/typicality.json"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        src = built_project / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / rel)
    files = incoming(built_project, tmp_path / "incoming")
    api, home = prefect_api
    env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    cmd = [sys.executable, "-m", "flows.drift", "serve", "--cron", "0 * * * *", "--name", "tgm-drift-test"]
    serve, log = local_server.start_process([*cmd, "--workdir", str(project)], project, env, "drift-serve")

    def artifact(flow_run) -> str:
        found = client_of.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        return {a.key: a.data for a in found}["tgm-drift"]

    try:
        deployment = wait_for_deployment(client_of, "tgm-drift/tgm-drift-test")
        assert [s.schedule.cron for s in deployment.schedules] == ["0 * * * *"]
        parameters = {"folder": str(tmp_path / "incoming")}
        passed = run_deployment("tgm-drift/tgm-drift-test", parameters=parameters, timeout=600, poll_interval=2)
        assert passed.state.is_completed(), (passed.state, log.read_text()[-3000:])
        assert "no drift" in artifact(passed)
        replace_with_noise(files, 1 / 3)
        failed = run_deployment("tgm-drift/tgm-drift-test", parameters=parameters, timeout=600, poll_interval=2)
        assert failed.state.is_failed() and "of the images are atypical" in failed.state.message
        assert "**drift**" in artifact(failed) and "| Kolmogorov-Smirnov statistic (p) |" in artifact(failed)
    finally:
        local_server.stop(serve)


def test_prefect_yaml_deploys_to_a_process_work_pool_and_a_worker_runs_it(prefect_api, client_of, digits_project):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    api, home = prefect_api
    prefect = str(Path(sys.executable).with_name("prefect"))
    # `prefect deploy` reads {{ $PWD }} for the working directory the worker will use: the project itself.
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(home),
        "PWD": str(digits_project),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    (digits_project / "prefect.yaml").write_text((ROOT / "prefect.yaml").read_text())
    try:
        run([prefect, "work-pool", "create", "tgm-process", "--type", "process"], digits_project, env=env)
        run([prefect, "--no-prompt", "deploy", "--all"], digits_project, env=env)
        drift = client_of.read_deployment_by_name("tgm-drift/tgm-drift-hourly")
        assert [s.schedule.cron for s in drift.schedules] == ["0 * * * *"] and drift.work_pool_name == "tgm-process"
        deployment = client_of.read_deployment_by_name("tgm-pipeline/tgm-nightly")
        assert [s.schedule.cron for s in deployment.schedules] == [CRON]
        assert deployment.work_pool_name == "tgm-process"
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(digits_project)}}
        ]

        flow_run = client_of.create_flow_run_from_deployment(deployment.id)
        run([prefect, "worker", "start", "--pool", "tgm-process", "--run-once"], digits_project, env=env, timeout=900)
        state = client_of.read_flow_run(flow_run.id).state
        assert state.is_completed(), state
        keys = {
            a.key
            for a in client_of.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        }
        assert "tgm-gate" in keys and "tgm-stages" in keys
    finally:
        (digits_project / "prefect.yaml").unlink()


def test_the_command_line_run_takes_overrides_and_pushes_to_the_default_remote(prefect_api, digits_project):
    api, home = prefect_api
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home)}
    storage = digits_project.parent / "tgm-dvc-storage"  # the committed default remote, next to the project
    before = (digits_project / "params.yaml").read_bytes()
    proc = run(
        [sys.executable, "-m", "flows.pipeline", "--workdir", str(digits_project), "-S", "evaluate.seed=1", "--push"],
        digits_project,
        env=env,
        timeout=900,
    )
    assert "stage evaluate: ran" in proc.stdout + proc.stderr
    assert (digits_project / "params.yaml").read_bytes() == before
    status = run(["dvc", "status", "--cloud", "--json"], digits_project).stdout
    assert storage.is_dir() and status.strip() in ("{}", "")  # everything the workspace uses is in the remote
    run(["dvc", "repro"], digits_project, timeout=600)


def events_named(api: str, name: str, resource: str, wait_s: float = 60, where=lambda event: True) -> list[dict]:
    """The events of that name about that resource that satisfy `where`, once the server has stored at least one
    (it takes them in asynchronously; the module's other tests share the server and may have sent their own)."""
    import httpx

    body = {"filter": {"event": {"name": [name]}, "resource": {"id": [resource]}}, "limit": 50}
    deadline = time.monotonic() + wait_s
    while True:
        events = [e for e in httpx.post(f"{api}/events/filter", json=body, timeout=30).json()["events"] if where(e)]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(1)


def test_drift_found_by_the_drift_flow_reruns_the_pipeline_and_its_promotion_is_an_event(
    prefect_api, client_of, digits_project, tmp_path
):
    """The reaction docs/prefect.md argues for, on a real server: the drift flow finds drift and emits
    tgm.drift.detected; the served pipeline's deployment trigger starts a run for the same project, which
    (a gate setting changed meanwhile) gates, packages and promotes, and says so as tgm.champion.promoted."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from test_drift import incoming, replace_with_noise

    from flows.drift import DRIFT_EVENT
    from flows.pipeline import PROMOTION_EVENT

    project = digits_project.resolve()
    # Retraining on the drifted images would take minutes of pretraining; a gate setting changed meanwhile makes
    # the run judge, package and promote again in seconds.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gate"]["max_regression"] = 0.02
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    files = incoming(project, tmp_path / "incoming")
    replace_with_noise(files, 1 / 3)
    api, home = prefect_api
    env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    cmd = [sys.executable, "-m", "flows.pipeline", "serve", "--cron", "0 3 1 1 *", "--name", "tgm-retrain"]
    serve, log = local_server.start_process([*cmd, "--workdir", str(project)], project, env, "pipeline-serve")
    try:
        deployment = wait_for_deployment(client_of, "tgm-pipeline/tgm-retrain")
        drift = subprocess.run(
            [sys.executable, "-m", "flows.drift", "--workdir", str(project), "--folder", str(tmp_path / "incoming")],
            cwd=project, env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert drift.returncode != 0 and "of the images are atypical" in drift.stdout + drift.stderr
        drifts = events_named(api, DRIFT_EVENT, f"tgm.project.{project}")
        assert len(drifts) == 1 and drifts[0]["payload"]["problems"], drifts
        deadline, runs = time.monotonic() + 300, []
        while time.monotonic() < deadline:
            runs = client_of.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            )
            runs = [r for r in runs if not r.auto_scheduled]  # the cron's future runs are not the reaction
            if runs and runs[0].state and runs[0].state.is_final():
                break
            time.sleep(2)
        assert len(runs) == 1, (runs, log.read_text()[-3000:])
        assert runs[0].state.is_completed(), (runs[0].state, log.read_text()[-3000:])
        assert runs[0].parameters["workdir"] == str(project)
    finally:
        local_server.stop(serve)
    promotion = json.loads((project / "reports" / "promotion.json").read_text())
    assert promotion["promoted"] and promotion["version"] == "v0.0.2", promotion  # after the built project's
    task = promotion["task"]
    promoted = events_named(
        api, PROMOTION_EVENT, f"tgm.task.{task}", where=lambda e: e["payload"]["workdir"] == str(project)
    )
    assert [e["payload"]["model"] for e in promoted] == [promotion["model"]], (
        events_named(api, PROMOTION_EVENT, f"tgm.task.{task}", wait_s=0),
        log.read_text()[-4000:],
    )
