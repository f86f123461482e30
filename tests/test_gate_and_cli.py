"""The gate blocks a weak model with a message naming each failed check; every stage explains itself."""

import json
import os
import subprocess
import sys

import pytest

from tgm.cli import STAGES
from tgm.gate import GateFailed, gate
from tgm.params import GateParams


def write_metrics(tmp_path, accuracy, macro_f1):
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps({"accuracy": accuracy, "macro_f1": macro_f1}))
    return path


def test_gate_passes_a_good_model_and_writes_its_report(tmp_path):
    report = gate(GateParams(0.9, 0.9), write_metrics(tmp_path, 0.95, 0.94), tmp_path / "gate.json", champion=None)
    assert report["passed"] and json.loads((tmp_path / "gate.json").read_text())["passed"]


def test_gate_names_each_failed_check_with_its_value(tmp_path):
    with pytest.raises(GateFailed) as err:
        gate(GateParams(0.9, 0.9), write_metrics(tmp_path, 0.85, 0.95), tmp_path / "gate.json", champion=None)
    assert "accuracy = 0.8500" in str(err.value) and "gate.min_accuracy" in str(err.value)
    assert "macro_f1" not in str(err.value)
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["passed"] is False
    assert [c["passed"] for c in report["checks"]] == [False, True]


def test_gate_command_exits_non_zero_when_a_check_fails(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({"accuracy": 0.5, "macro_f1": 0.5}))
    (tmp_path / "params.yaml").write_text("gate: {min_accuracy: 0.9, min_macro_f1: 0.9}\n")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}  # an empty store: no champion
    proc = subprocess.run([sys.executable, "-m", "tgm", "gate"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "accuracy = 0.5000 (needs >= 0.9000, gate.min_accuracy)" in proc.stderr
    assert (tmp_path / "reports" / "gate.json").exists()


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_help(stage):
    proc = subprocess.run([sys.executable, "-m", "tgm", stage, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--params" in proc.stdout and len(proc.stdout) > 200


def test_a_bad_parameter_stops_the_stage_with_its_key(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare: {image_size: big}\n")
    proc = subprocess.run([sys.executable, "-m", "tgm", "prepare"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "prepare.image_size: expected an integer, got 'big'" in proc.stderr


def champion(accuracy, macro_f1):
    from tgm.gate import Champion

    return Champion("tgm-classifier:old", "tgm-classifier-service:old", {"accuracy": accuracy, "macro_f1": macro_f1})


def test_gate_refuses_a_model_worse_than_the_champion_by_more_than_the_tolerance(tmp_path):
    params = GateParams(0.5, 0.5, max_regression=0.01)
    with pytest.raises(GateFailed) as err:
        gate(params, write_metrics(tmp_path, 0.93, 0.95), tmp_path / "gate.json", champion=champion(0.95, 0.95))
    assert "accuracy = 0.9300 (needs >= 0.9400: champion tgm-classifier:old has 0.9500, gate.max_regression)" in str(
        err.value
    )
    assert "macro_f1" not in str(err.value)
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["champion"]["model"] == "tgm-classifier:old" and report["passed"] is False


def test_gate_passes_a_model_within_the_tolerance_or_better_than_the_champion(tmp_path):
    params = GateParams(0.5, 0.5, max_regression=0.01)
    assert gate(params, write_metrics(tmp_path, 0.945, 0.96), tmp_path / "gate.json", champion=champion(0.95, 0.95))[
        "passed"
    ]
    # No champion yet, or the comparison switched off: only the floors count.
    assert gate(params, write_metrics(tmp_path, 0.6, 0.6), tmp_path / "gate.json", champion=None)["passed"]
    assert gate(
        GateParams(0.5, 0.5, max_regression=None),
        write_metrics(tmp_path, 0.6, 0.6),
        tmp_path / "gate.json",
        champion=champion(0.95, 0.95),
    )["passed"]
