"""The gate blocks a weak model with a message naming each failed check; every stage explains itself; the
registry keeps each task's champion, its history and its rollback."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, merge, params_of

from tgm.cli import HELP
from tgm.gate import GateFailed, judge
from tgm.registry import Registry, RegistryError, task_of
from tgm.stages import STAGES

DIGITS = task_of("builtin:digits", [str(d) for d in range(10)])


def write_params(directory, changes: dict) -> None:
    """The project's params.yaml (every key is required) with `changes`, in `directory`."""
    project = yaml.safe_load((ROOT / "params.yaml").read_text())
    (directory / "params.yaml").write_text(yaml.safe_dump(merge(project, changes)))


def tgm(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tgm", *args], cwd=cwd, capture_output=True, text=True, env=env)


def write_metrics(tmp_path, accuracy, macro_f1):
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps({"accuracy": accuracy, "macro_f1": macro_f1}))
    return path


def test_gate_passes_a_good_model_and_writes_its_report(tmp_path):
    report = judge(
        params_of("gate", min_accuracy=0.9, min_macro_f1=0.9),
        DIGITS,
        write_metrics(tmp_path, 0.95, 0.94),
        tmp_path / "gate.json",
        registry=tmp_path / "registry",
    )
    assert report["passed"] and json.loads((tmp_path / "gate.json").read_text())["passed"]
    assert report["task"] == DIGITS.describe() and report["champion"] is None


def test_gate_names_each_failed_check_with_its_value(tmp_path):
    with pytest.raises(GateFailed) as err:
        judge(
            params_of("gate", min_accuracy=0.9, min_macro_f1=0.9),
            DIGITS,
            write_metrics(tmp_path, 0.85, 0.95),
            tmp_path / "gate.json",
            registry=tmp_path / "registry",
        )
    assert "accuracy = 0.8500" in str(err.value) and "gate.min_accuracy" in str(err.value)
    assert "macro_f1" not in str(err.value)
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["passed"] is False
    assert [c["passed"] for c in report["checks"]] == [False, True]


def test_gate_command_exits_non_zero_when_a_check_fails(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({"accuracy": 0.5, "macro_f1": 0.5}))
    (tmp_path / "models" / "classifier").mkdir(parents=True)
    (tmp_path / "models" / "classifier" / "config.json").write_text(json.dumps({"classes": ["a", "b"]}))
    write_params(tmp_path, {"gate": {"min_accuracy": 0.9, "min_macro_f1": 0.9}})
    proc = tgm("gate", cwd=tmp_path, env=os.environ)  # no registry/: no champion
    assert proc.returncode == 1
    assert "accuracy = 0.5000 (needs >= 0.9000, gate.min_accuracy)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "reports" / "gate.json").exists()


def test_every_stage_of_the_table_has_help_and_nothing_else_does():
    assert set(HELP) == set(STAGES)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_help(stage):
    proc = tgm(stage, "--help")
    summary, description = HELP[stage]
    assert proc.returncode == 0 and "--params" in proc.stdout
    assert " ".join(description.split()) in " ".join(proc.stdout.split())


def test_top_level_help_shows_each_summary_whole_and_version_works():
    listing = "".join(tgm("--help").stdout.split())  # argparse wraps lines, at hyphens too
    for summary, _ in HELP.values():
        assert "".join(summary.split()) in listing
    version = tgm("--version")
    assert version.returncode == 0 and version.stdout.startswith("tgm ") and version.stdout.split()[1][0].isdigit()


def test_a_user_mistake_is_one_line_on_stderr_without_a_traceback(tmp_path):
    write_params(tmp_path, {"ingest": {"source": f"folder:{tmp_path}/nowhere"}})
    proc = tgm("ingest", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tgm ingest: error: ingest.source: folder")


def test_a_bad_parameter_stops_the_stage_with_its_key(tmp_path):
    write_params(tmp_path, {"prepare": {"image_size": "big"}})
    proc = tgm("prepare", cwd=tmp_path)
    assert proc.returncode == 2
    assert "prepare.image_size: Input should be a valid integer (got 'big')" in proc.stderr


def registry_with_champion(tmp_path, task, accuracy, macro_f1):
    """registry/ as `promote` leaves it, written directly: these tests need no model behind the entry."""
    registry = Registry(tmp_path / "registry")
    champion = {"model": "tgm-classifier:old", "file": "models/x.bentomodel", "how": "pipeline"}
    champion["metrics"] = {"accuracy": accuracy, "macro_f1": macro_f1}
    registry.data["tasks"][task.id] = {**task.describe(), "champion": champion, "earlier": [], "log": []}
    registry.save()
    return registry.root


def test_gate_refuses_a_model_worse_than_the_champion_by_more_than_the_tolerance(tmp_path):
    params = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=0.01)
    registry = registry_with_champion(tmp_path, DIGITS, 0.95, 0.95)
    with pytest.raises(GateFailed) as err:
        judge(params, DIGITS, write_metrics(tmp_path, 0.93, 0.95), tmp_path / "gate.json", registry)
    assert "accuracy = 0.9300 (needs >= 0.9400: champion tgm-classifier:old has 0.9500, gate.max_regression)" in str(
        err.value
    )
    assert "macro_f1" not in str(err.value)
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["champion"]["model"] == "tgm-classifier:old" and report["passed"] is False


def test_gate_passes_a_model_within_the_tolerance_or_better_than_the_champion(tmp_path):
    params = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=0.01)
    registry = registry_with_champion(tmp_path, DIGITS, 0.95, 0.95)
    assert judge(params, DIGITS, write_metrics(tmp_path, 0.945, 0.96), tmp_path / "gate.json", registry)["passed"]
    # The comparison switched off: only the floors count.
    off = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=None)
    report = judge(off, DIGITS, write_metrics(tmp_path, 0.6, 0.6), tmp_path / "gate.json", registry)
    assert report["passed"] and report["champion"] is None


def test_a_model_of_another_task_is_never_compared_with_this_tasks_champion(tmp_path):
    params = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=0.01)
    registry = registry_with_champion(tmp_path, DIGITS, 0.99, 0.99)
    # Same source, other classes; other source, same classes: both are other tasks, with no champion yet.
    for other in (task_of("builtin:digits", ["0", "1", "2"]), task_of("folder:data/sources/scans", DIGITS.classes)):
        assert other.id != DIGITS.id
        report = judge(params, other, write_metrics(tmp_path, 0.6, 0.6), tmp_path / "gate.json", registry)
        assert report["passed"] and report["champion"] is None and report["task"]["id"] == other.id
        assert [c["name"] for c in report["checks"]] == ["min_accuracy", "min_macro_f1"]
    # A task named in params (gate.task) keeps its champion across a change of source.
    named = task_of("builtin:digits", DIGITS.classes, name="digits")
    registry_with_champion(tmp_path, named, 0.99, 0.99)
    with pytest.raises(GateFailed, match="champion tgm-classifier:old has 0.9900"):
        elsewhere = task_of("folder:elsewhere", ["x"], name="digits")
        judge(params, elsewhere, write_metrics(tmp_path, 0.6, 0.6), tmp_path / "gate.json", registry)


def test_task_ids_are_stable_and_readable():
    assert DIGITS == task_of("builtin:digits", [str(d) for d in range(10)])
    assert DIGITS.id.startswith("builtin-digits-") and len(DIGITS.id) == len("builtin-digits-") + 8
    assert task_of("folder:data/sources/pets", ["cat", "dog"]).id.startswith("folder-data-sources-pets-")


def test_a_damaged_registry_is_a_clear_error_not_a_traceback(tmp_path):
    from tgm.registry import RegistryError

    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "champions.json").write_text('{"latest": ')
    params = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=0.01)
    with pytest.raises(RegistryError, match="champions.json is not valid JSON .*dvc checkout registry"):
        judge(params, DIGITS, write_metrics(tmp_path, 0.9, 0.9), tmp_path / "gate.json", tmp_path / "registry")


@pytest.fixture
def stored_models(bentoml_home):
    """Two small models in the BentoML store this process uses, under a name no other test serves; removed after."""
    import bentoml

    tags = []
    for version in ("unit1", "unit2"):
        with bentoml.models.create(f"tgm-registry-unit:{version}") as model:
            (Path(model.path) / "weights").write_text(version)
        tags.append(str(model.tag))
    yield tags
    for tag in tags:
        with contextlib.suppress(bentoml.exceptions.NotFound):
            bentoml.models.delete(tag)


def test_the_registry_promotes_keeps_history_rolls_back_and_refills_the_store(tmp_path, stored_models):
    import bentoml

    first, second = stored_models
    pets = task_of("folder:pets", ["cat", "dog"])
    registry = Registry(tmp_path / "registry")
    registry.promote(first, DIGITS, {"accuracy": 0.9, "macro_f1": 0.9}, how="gate")
    registry.promote(second, DIGITS, {"accuracy": 0.95, "macro_f1": 0.94}, how="gate")
    assert registry.promote(second, DIGITS, {"accuracy": 0.95}, how="gate")["model"] == second  # already: no-op
    registry.promote(first, pets, {"accuracy": 0.7, "macro_f1": 0.7}, how="by hand")

    reread = Registry(tmp_path / "registry")  # what a later process (or a clone after dvc pull) sees
    assert reread.champion(DIGITS.id)["model"] == second and reread.champion(pets.id)["model"] == first
    assert [e["model"] for e in reread.tasks()[DIGITS.id]["earlier"]] == [first]
    assert [e["event"] for e in reread.tasks()[DIGITS.id]["log"]] == ["promote", "promote"]
    assert reread.data["latest"] == pets.id and reread.champion(DIGITS.id)["metrics"]["accuracy"] == 0.95
    for entry in reread.tasks().values():
        assert (tmp_path / "registry" / entry["champion"]["file"]).is_file()  # exported beside the index

    assert reread.rollback(DIGITS.id)["model"] == first  # another task's champion is untouched
    assert Registry(tmp_path / "registry").champion(pets.id)["model"] == first
    with pytest.raises(RegistryError, match="no earlier champion"):
        reread.rollback(DIGITS.id)
    with pytest.raises(RegistryError, match="no task 'elsewhere'"):
        reread.rollback("elsewhere")

    bentoml.models.delete(first)  # a machine whose store lacks the champion imports it from the registry
    assert reread.ensure_in_store(reread.champion(DIGITS.id)) == first
    assert (Path(bentoml.models.get(first).path) / "weights").read_text() == "unit1"
