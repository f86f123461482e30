"""The Prefect flow runs each stage through DVC, so it agrees with `dvc repro`, and fails when the gate does."""
import os
import threading
import time

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from conftest import run
from flows.pipeline import pipeline
from tgm.orchestrate import WorkspaceBusy, workspace_lock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def set_param(project, group, key, value):
    params = yaml.safe_load((project / "params.yaml").read_text())
    old = params[group][key]
    params[group][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return old


def test_flow_reruns_only_what_dvc_says_is_stale(prefect_server, digits_project):
    old = set_param(digits_project, "evaluate", "top_k", 3)
    try:
        results = pipeline(workdir=str(digits_project))
    finally:
        set_param(digits_project, "evaluate", "top_k", old)
    by_stage = {r["stage"]: r for r in results}
    assert list(by_stage) == ["ingest", "validate", "prepare", "pretrain", "finetune", "probe", "study",
                              "evaluate", "gate", "package"]
    assert by_stage["evaluate"]["ran"] == ["evaluate"]
    for stage in ("ingest", "validate", "prepare", "pretrain", "finetune", "probe", "study"):
        assert by_stage[stage]["ran"] == [] and by_stage[stage]["skipped"], stage
    run(["dvc", "repro"], digits_project, timeout=600)


def test_a_failing_gate_fails_the_flow_and_says_why(prefect_server, digits_project):
    old = set_param(digits_project, "gate", "min_accuracy", 1.0)
    try:
        state = pipeline(workdir=str(digits_project), return_state=True)
        assert state.is_failed()
        assert "gate failed" in state.message or "gate failed" in str(state.result(raise_on_failure=False))
    finally:
        set_param(digits_project, "gate", "min_accuracy", old)
        run(["dvc", "repro"], digits_project, timeout=600)


def test_a_second_run_in_a_busy_workspace_is_refused_with_a_clear_message(prefect_server, digits_project):
    with workspace_lock(digits_project):
        state = pipeline(workdir=str(digits_project), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "is busy" in message and f"pid {os.getpid()}" in message
    # Released: the next run goes ahead (nothing is stale, so it only asks DVC).
    assert [r["ran"] for r in pipeline(workdir=str(digits_project), stages=["ingest"])] == [[]]


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
