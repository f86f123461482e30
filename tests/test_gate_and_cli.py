"""The gate blocks a weak model with a message naming each failed check; every stage explains itself; the
registry keeps each task's champion on GTO's git tags, its history and its rollback, and two clones that promote
in turn share them through a git remote without a conflict."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, merge, params_of

from tgm.cli import HELP
from tgm.gate import GateFailed, judge
from tgm.registry import Champions, RegistryError, task_of
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
        root=git_repo(tmp_path / "repo"),
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
            root=git_repo(tmp_path / "repo"),
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
    git_repo(tmp_path)
    proc = tgm("gate", cwd=tmp_path, env=os.environ)  # no GTO tags: no champion
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


def git_repo(path: Path, dvc: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for cmd in (["init", "-q"], ["config", "user.name", "Ada"], ["config", "user.email", "ada@t-gm.invalid"]):
        subprocess.run(["git", *cmd], cwd=path, check=True)
    if dvc:
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "start"], cwd=path, check=True)
    return path


def repo_with_champion(tmp_path, task, accuracy, macro_f1, model="tgm-classifier:old") -> Path:
    """A git repository whose GTO tags make `model` `task`'s champion, made with git and GTO directly (as
    `promote` would leave it, with no model behind it): what the gate reads."""
    import gto.api

    repo = tmp_path / "repo"
    if not (repo / ".git").exists():
        git_repo(repo)
    (repo / "reports").mkdir(exist_ok=True)
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "reports/package.json").write_text(json.dumps({"model_tag": model}))
    (repo / "metrics/evaluate.json").write_text(json.dumps({"accuracy": accuracy, "macro_f1": macro_f1}))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", f"{model} for {task.id}"], cwd=repo, check=True)
    gto.api.register(str(repo), task.id, "HEAD")
    gto.api.assign(str(repo), task.id, "champion", ref="HEAD")
    return repo


def test_gate_refuses_a_model_worse_than_the_champion_by_more_than_the_tolerance(tmp_path):
    params = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=0.01)
    repo = repo_with_champion(tmp_path, DIGITS, 0.95, 0.95)
    with pytest.raises(GateFailed) as err:
        judge(params, DIGITS, write_metrics(tmp_path, 0.93, 0.95), tmp_path / "gate.json", root=repo)
    assert "accuracy = 0.9300 (needs >= 0.9400: champion tgm-classifier:old has 0.9500, gate.max_regression)" in str(
        err.value
    )
    assert "macro_f1" not in str(err.value)
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["champion"]["model"] == "tgm-classifier:old" and report["passed"] is False
    assert report["champion"]["version"] == "v0.0.1" and report["champion"]["promoted_by"] == "Ada <ada@t-gm.invalid>"


def test_gate_passes_a_model_within_the_tolerance_or_better_than_the_champion(tmp_path):
    params = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=0.01)
    repo = repo_with_champion(tmp_path, DIGITS, 0.95, 0.95)
    assert judge(params, DIGITS, write_metrics(tmp_path, 0.945, 0.96), tmp_path / "gate.json", root=repo)["passed"]
    # The comparison switched off: only the floors count.
    off = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=None)
    report = judge(off, DIGITS, write_metrics(tmp_path, 0.6, 0.6), tmp_path / "gate.json", root=repo)
    assert report["passed"] and report["champion"] is None


def test_a_model_of_another_task_is_never_compared_with_this_tasks_champion(tmp_path):
    params = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=0.01)
    repo = repo_with_champion(tmp_path, DIGITS, 0.99, 0.99)
    # Same source, other classes; other source, same classes: both are other tasks, with no champion yet.
    for other in (task_of("builtin:digits", ["0", "1", "2"]), task_of("folder:data/sources/scans", DIGITS.classes)):
        assert other.id != DIGITS.id
        report = judge(params, other, write_metrics(tmp_path, 0.6, 0.6), tmp_path / "gate.json", root=repo)
        assert report["passed"] and report["champion"] is None and report["task"]["id"] == other.id
        assert [c["name"] for c in report["checks"]] == ["min_accuracy", "min_macro_f1"]
    # A task named in params (gate.task) keeps its champion across a change of source.
    named = task_of("builtin:digits", DIGITS.classes, name="digits")
    repo_with_champion(tmp_path, named, 0.99, 0.99)
    with pytest.raises(GateFailed, match="champion tgm-classifier:old has 0.9900"):
        elsewhere = task_of("folder:elsewhere", ["x"], name="digits")
        judge(params, elsewhere, write_metrics(tmp_path, 0.6, 0.6), tmp_path / "gate.json", root=repo)


def test_a_task_name_gto_cannot_carry_is_refused_naming_the_rule():
    for bad in ("pets.v2", "pets-", "_pets"):
        with pytest.raises(RegistryError, match=f"gate.task '{re.escape(bad)}' cannot name a GTO artifact"):
            task_of("folder:pets", ["cat"], name=bad)
    assert task_of("folder:pets", ["cat"], name="pets_v2-b").id == "pets_v2-b"


def test_task_ids_are_stable_and_readable():
    assert DIGITS == task_of("builtin:digits", [str(d) for d in range(10)])
    assert DIGITS.id.startswith("builtin-digits-") and len(DIGITS.id) == len("builtin-digits-") + 8
    assert task_of("folder:data/sources/pets", ["cat", "dog"]).id.startswith("folder-data-sources-pets-")


def test_a_gate_outside_git_or_a_foreign_tag_is_a_clear_error_not_a_traceback(tmp_path):
    params = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=0.01)
    (tmp_path / "nogit").mkdir()
    with pytest.raises(RegistryError, match="is not a git repository: champions are git tags"):
        judge(params, DIGITS, write_metrics(tmp_path, 0.9, 0.9), tmp_path / "gate.json", root=tmp_path / "nogit")
    # A champion tag someone made by hand on a commit that holds no packaged model.
    import gto.api

    repo = git_repo(tmp_path / "repo")
    gto.api.register(str(repo), DIGITS.id, "HEAD")
    gto.api.assign(str(repo), DIGITS.id, "champion", ref="HEAD")
    with pytest.raises(RegistryError, match=r"points at [0-9a-f]{12}, which has no reports/package.json"):
        judge(params, DIGITS, write_metrics(tmp_path, 0.9, 0.9), tmp_path / "gate.json", root=repo)


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


def package_here(repo: Path, tag: str, accuracy: float, task) -> None:
    """What `package` leaves in a project, made directly: the model exported to models/packaged/ (tracked by
    DVC), its report and metrics, and the gate's passing verdict for `task`."""
    import bentoml

    (repo / "models/packaged").mkdir(parents=True, exist_ok=True)
    (repo / "reports").mkdir(exist_ok=True)
    (repo / "metrics").mkdir(exist_ok=True)
    bentoml.models.export_model(tag, str(repo / "models/packaged/model.bentomodel"))
    (repo / "reports/package.json").write_text(json.dumps({"model_tag": tag}))
    (repo / "metrics/evaluate.json").write_text(json.dumps({"accuracy": accuracy, "macro_f1": accuracy}))
    (repo / "reports/gate.json").write_text(json.dumps({"passed": True, "task": task.describe()}))
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "models/packaged"], cwd=repo, check=True)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_the_registry_promotes_keeps_history_rolls_back_and_refills_the_store(tmp_path, stored_models):
    import bentoml

    first, second = stored_models
    pets = task_of("folder:pets", ["cat", "dog"])
    repo = git_repo(tmp_path / "project", dvc=True)
    head = git(repo, "rev-parse", "HEAD")
    champions = Champions(repo)
    package_here(repo, first, 0.9, DIGITS)
    assert champions.promote(DIGITS)["version"] == "v0.0.1"
    package_here(repo, second, 0.95, DIGITS)
    assert champions.promote(DIGITS)["version"] == "v0.0.2"
    again = champions.promote(DIGITS)  # already the champion: nothing to do
    assert not again["promoted"] and "already the champion" in again["why"]
    package_here(repo, first, 0.7, pets)
    # Which task changed last is known to the second (git tags' time): promote pets in a later one.
    time.sleep(1.05 - time.time() % 1)
    assert champions.promote(pets, "by hand")["promoted"]

    reread = Champions(repo)  # what a later process (or a clone after `git fetch --tags`) sees
    assert [c.model for c in reread.assigned(DIGITS.id)] == [second, first]
    assert reread.champion(pets.id).model == first and reread.champion(pets.id).how == "by hand"
    assert reread.latest() == pets.id and reread.champion(DIGITS.id).metrics["accuracy"] == 0.95
    assert reread.champion(DIGITS.id).promoted_by == "Ada <ada@t-gm.invalid>"
    tags = set(git(repo, "tag").split())
    assert {f"{DIGITS.id}@v0.0.1", f"{DIGITS.id}@v0.0.2", f"{pets.id}@v0.0.1"} <= tags
    # Promotion commits are on no branch, and the branch and working tree are as they were.
    assert git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "branch", "--contains", reread.champion(DIGITS.id).commit) == ""
    assert git(repo, "show", f"{reread.champion(DIGITS.id).commit}:reports/package.json") == json.dumps(
        {"model_tag": second}
    )

    assert reread.rollback(DIGITS.id).model == first  # another task's champion is untouched
    assert Champions(repo).champion(DIGITS.id).model == first and Champions(repo).champion(pets.id).model == first
    assert any("#champion!#" in t for t in git(repo, "tag").split())  # a rollback is a tag too
    with pytest.raises(RegistryError, match="no earlier champion"):
        reread.rollback(DIGITS.id)
    with pytest.raises(RegistryError, match="no task 'elsewhere'"):
        reread.rollback("elsewhere")
    # The pipeline does not bring back a rolled-back champion; a person does.
    package_here(repo, second, 0.95, DIGITS)
    refused = Champions(repo).promote(DIGITS)
    assert not refused["promoted"] and "was champion v0.0.2" in refused["why"]
    assert Champions(repo).champion(DIGITS.id).model == first
    assert Champions(repo).promote(DIGITS, "by hand")["version"] == "v0.0.2"
    assert [c.model for c in Champions(repo).assigned(DIGITS.id)] == [second, first]

    # A machine whose store lacks a champion gets it through DVC at the champion's own commit (the workspace
    # holds another model now).
    bentoml.models.delete(first)
    assert Champions(repo).ensure_in_store(Champions(repo).champion(pets.id)) == first
    assert (Path(bentoml.models.get(first).path) / "weights").read_text() == "unit1"


def test_two_clones_promote_in_turn_through_one_remote_without_a_conflict(tmp_path, stored_models):
    """The caveats the registry in a DVC output had: each clone's promotion rewrote dvc.lock (a conflict on
    push), and a champion promoted elsewhere reached the gate only with `dvc pull`. On GTO's tags: no file on
    a branch changes, and `git fetch --tags` is all another clone needs to gate against it and to serve it."""
    import bentoml

    first, second = stored_models
    remote, storage = tmp_path / "remote.git", tmp_path / "dvc-storage"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    a = git_repo(tmp_path / "a", dvc=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(storage)], cwd=a, check=True)
    git(a, "add", "-A")
    git(a, "commit", "-q", "-m", "dvc remote")
    git(a, "remote", "add", "origin", str(remote))
    git(a, "push", "-q", "origin", "HEAD:main")
    b = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", "-b", "main", str(remote), str(b)], check=True)
    git(b, "config", "user.name", "Bo")
    git(b, "config", "user.email", "bo@t-gm.invalid")

    package_here(a, first, 0.9, DIGITS)
    Champions(a).promote(DIGITS)
    subprocess.run([sys.executable, "-m", "dvc", "push", "-q"], cwd=a, check=True)
    git(a, "push", "-q", "origin", "--tags")

    git(b, "fetch", "-q", "--tags")
    params = params_of("gate", min_accuracy=0.5, min_macro_f1=0.5, max_regression=0.01)
    with pytest.raises(GateFailed, match=f"champion {first} has 0.9000"):  # b's gate compares with a's champion
        judge(params, DIGITS, write_metrics(tmp_path, 0.8, 0.8), tmp_path / "gate.json", root=b)
    package_here(b, second, 0.95, DIGITS)
    assert Champions(b).promote(DIGITS)["version"] == "v0.0.2"
    subprocess.run([sys.executable, "-m", "dvc", "push", "-q"], cwd=b, check=True)
    git(b, "push", "-q", "origin", "--tags")  # no conflict: a pushed tags of its own, no branch moved

    git(a, "fetch", "-q", "--tags")
    assert [(c.model, c.promoted_by) for c in Champions(a).assigned(DIGITS.id)] == [
        (second, "Bo <bo@t-gm.invalid>"),
        (first, "Ada <ada@t-gm.invalid>"),
    ]
    assert Champions(a).rollback(DIGITS.id).model == first
    git(a, "push", "-q", "origin", "--tags")
    git(b, "fetch", "-q", "--tags")
    assert Champions(b).champion(DIGITS.id).model == first
    assert git(a, "status", "--porcelain", "--untracked-files=no") == ""
    assert git(b, "status", "--porcelain", "--untracked-files=no") == ""
    # a serves b's model without having trained or stored it: its bytes come from the DVC remote.
    bentoml.models.delete(second)
    assert Champions(a).ensure_in_store(Champions(a).versions(DIGITS.id)[second]) == second
