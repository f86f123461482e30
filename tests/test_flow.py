"""The Prefect flow runs each stage through DVC, so it agrees with `dvc repro`, and fails when the gate does."""

import os
import re
import threading
import time

import pytest
import yaml
from conftest import run
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import pipeline
from tgm.orchestrate import WorkspaceBusy, workspace_lock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def artifacts_of(state) -> dict[str, str]:
    """The markdown artifacts of a flow run, read back through the Prefect API: {key: markdown}."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return {a.key: a.data for a in found}


def experiments(project) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its params and metrics."""
    import json

    out = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    found = {}
    for baseline in out:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    found[rev["name"]] = rev["data"]
    return found


def test_flow_runs_only_what_dvc_says_is_stale_and_records_an_experiment(prefect_server, digits_project):
    before = (digits_project / "params.yaml").read_bytes()
    state = pipeline(workdir=str(digits_project), overrides=["evaluate.top_k=3"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    by_stage = {r["stage"]: r for r in result["stages"]}
    assert list(by_stage) == [
        "ingest",
        "validate",
        "prepare",
        "pretrain",
        "finetune",
        "probe",
        "study",
        "evaluate",
        "gate",
        "package",
        "promote",
    ]
    assert by_stage["evaluate"]["ran"] == ["evaluate"]
    for stage in ("ingest", "validate", "prepare", "pretrain", "finetune", "probe", "study"):
        assert by_stage[stage]["ran"] == [] and by_stage[stage]["skipped"] == [stage], stage
    # The override held for the run only; the experiment keeps it.
    assert (digits_project / "params.yaml").read_bytes() == before
    name = result["experiment"]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run_name = client.read_flow_run(state.state_details.flow_run_id).name
    assert name == "prefect-" + re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-.")  # named after the flow run
    exp = experiments(digits_project)[name]
    assert exp["params"]["params.yaml"]["data"]["evaluate"]["top_k"] == 3
    assert "accuracy" in exp["metrics"]["metrics/evaluate.json"]["data"]
    diff = run(["dvc", "metrics", "diff", "HEAD", name, "--all", "--json"], digits_project).stdout
    assert "metrics/evaluate.json" in diff

    found = artifacts_of(state)
    assert set(found) >= {"tgm-stages", "tgm-metrics", "tgm-validation", "tgm-gate", "tgm-package"}
    # evaluate changed the metrics, so the model was packaged anew (with its card) and promoted.
    assert found["tgm-model-card"].startswith("---\n") and "\n# Model card: `tgm-classifier:" in found["tgm-model-card"]
    assert "(champion)" in found["tgm-champion"] and "Task: `builtin-digits-" in found["tgm-gate"]
    assert "| evaluate | ran |" in found["tgm-stages"] and "| ingest | up to date, skipped |" in found["tgm-stages"]
    assert "| accuracy |" in found["tgm-metrics"] and "dvc metrics diff HEAD" in found["tgm-metrics"]
    assert "Validation passed" in found["tgm-validation"]
    assert "| gate.min_accuracy | accuracy |" in found["tgm-gate"]
    assert "tgm-classifier-service:" in found["tgm-package"]


def test_a_failing_gate_fails_the_flow_and_says_why(prefect_server, digits_project):
    lock_before = yaml.safe_load((digits_project / "dvc.lock").read_text())["stages"]["gate"]
    state = pipeline(workdir=str(digits_project), overrides=["gate.min_accuracy=1.0"], return_state=True)
    assert state.is_failed()
    assert "stage gate stopped the pipeline: gate failed: accuracy = " in state.message
    assert "needs >= 1.0000" in state.message
    found = artifacts_of(state)
    assert "**FAIL**" in found["tgm-gate"] and "tgm-package" not in found
    assert "| gate | **failed**: gate failed: accuracy" in found["tgm-stages"]
    # The refusal is not retried, and not recorded as an up-to-date gate in dvc.lock.
    assert yaml.safe_load((digits_project / "dvc.lock").read_text())["stages"]["gate"] == lock_before


def test_failing_validation_fails_the_flow_with_its_reasons(prefect_server, digits_project, tmp_path):
    import numpy as np
    from PIL import Image

    for i in range(3):  # one class of real images, one of files that are not images: half the files rejected
        (tmp_path / "bad" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "bad" / "a" / f"{i}.png")
        (tmp_path / "bad" / "b").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / "b" / f"{i}.png").write_text("not a picture")
    state = pipeline(
        workdir=str(digits_project), source=f"folder:{tmp_path / 'bad'}", experiment=False, return_state=True
    )
    assert state.is_failed()
    assert "stage validate stopped the pipeline: validation failed" in state.message
    assert "not_an_image" in state.message
    found = artifacts_of(state)
    assert "Validation **failed**" in found["tgm-validation"] and "| not_an_image | 3 |" in found["tgm-validation"]


def test_a_bad_override_stops_the_flow_before_any_stage(prefect_server, digits_project):
    state = pipeline(workdir=str(digits_project), overrides=["gate.min_accuracy=1.5"], return_state=True)
    assert state.is_failed() and "gate.min_accuracy: Input should be less than or equal to 1 (got 1.5)" in state.message
    # The typed form the Prefect UI shows is checked the same way.
    state = pipeline(workdir=str(digits_project), params={"gate": {"min_accuracy": 1.5}}, return_state=True)
    assert state.is_failed() and "gate.min_accuracy: Input should be less than or equal to 1" in state.message
    state = pipeline(workdir=str(digits_project), overrides=["lr=0.1"], return_state=True)
    assert state.is_failed() and "expected group.key=value" in state.message


def test_a_second_run_in_a_busy_workspace_is_refused_with_a_clear_message(prefect_server, digits_project):
    with workspace_lock(digits_project):
        state = pipeline(workdir=str(digits_project), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "is busy" in message and f"pid {os.getpid()}" in message
    # Released: the next run goes ahead (nothing is stale, so it only asks DVC).
    result = pipeline(workdir=str(digits_project), stages=["ingest"], experiment=False)
    assert [r["ran"] for r in result["stages"]] == [[]]


def test_the_workspace_lock_waits_for_its_holder(tmp_path):
    (tmp_path / ".dvc").mkdir()
    release = threading.Event()

    def hold():
        with workspace_lock(tmp_path):
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.3)
    with pytest.raises(WorkspaceBusy):
        with workspace_lock(tmp_path, wait_s=0.2, poll_s=0.05):
            pass
    threading.Timer(0.5, release.set).start()
    with workspace_lock(tmp_path, wait_s=10, poll_s=0.05):
        pass  # got it once the holder let go
    holder.join()


def test_the_dask_address_reaches_the_stages_with_this_flows_api_and_is_then_restored(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import environment, stage_environment

    monkeypatch.delenv("TGM_DASK_ADDRESS", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://before")
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        address = "tcp://scheduler:8786"
        with environment(**stage_environment(address)):  # what the flow enters around its stages
            assert os.environ["TGM_DASK_ADDRESS"] == address
            assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
        assert "TGM_DASK_ADDRESS" not in os.environ and os.environ["PREFECT_API_URL"] == "http://before"
        with environment(**stage_environment(None)):  # no cluster: nothing is touched
            assert "TGM_DASK_ADDRESS" not in os.environ and os.environ["PREFECT_API_URL"] == "http://before"
