"""The champion of each task, on GTO's git tags: a worse model never replaces it, a model of another task is never
compared with it, and it travels: another clone, after `git clone` alone, gates against it and serves it, and a
champion promoted there reaches the first clone's gate with `git fetch --tags`.
Real pipeline, real git and DVC remotes, real BentoML store and server. What the tests read of the champions
they read with GTO's own API and git, not through tgm.registry."""

import json
import os
import re
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import ROOT, run, set_param
from PIL import Image
from support import local_server

pytestmark = pytest.mark.slow


def champions(project, task_id) -> list[str]:
    """The model tags GTO says are in `task_id`'s champion stage, the champion first."""
    import gto.api

    found = gto.api.find_versions_in_stage(str(project), task_id, "champion", versions_per_stage=-1)
    latest_first = sorted(found, key=lambda v: max(int(a.tag.rsplit("#", 1)[1]) for a in v.assignments), reverse=True)
    show = ["git", "show"]
    return [
        json.loads(run([*show, f"{v.commit_hexsha}:reports/package.json"], project).stdout)["model_tag"]
        for v in latest_first
    ]


def gate_report(project) -> dict:
    return json.loads((project / "reports" / "gate.json").read_text())


def champion_of(project, task_id) -> str:
    return champions(project, task_id)[0]


def ran(proc) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", proc.stdout)


def accuracy(project):
    return json.loads((project / "metrics" / "evaluate.json").read_text())["accuracy"]


def test_a_worse_model_never_replaces_the_champion_and_a_rollback_is_one_command(digits_project):
    project = digits_project
    task = gate_report(project)["task"]["id"]
    head = run(["git", "rev-parse", "HEAD"], project).stdout
    first = champion_of(project, task)
    assert first == json.loads((project / "reports" / "package.json").read_text())["model_tag"]
    champion_accuracy = accuracy(project)
    set_param(project, "gate", "max_regression", 0.01)
    set_param(project, "finetune", "epochs", 1)
    # One epoch of fine-tuning: clearly worse, so the gate must refuse it and leave the champion alone.
    proc = run(["dvc", "repro"], project, check=False, timeout=600)
    assert proc.returncode != 0
    assert accuracy(project) < champion_accuracy - 0.01
    assert "gate.max_regression" in proc.stderr and f"champion {first} has" in proc.stderr
    assert "Running stage 'package'" not in proc.stdout and "Running stage 'promote'" not in proc.stdout
    assert gate_report(project)["champion"]["model"] == first
    assert champion_of(project, task) == first

    # Tolerate the regression: the same model passes, is packaged and promoted; the old champion is kept.
    set_param(project, "gate", "max_regression", 1.0)
    run(["dvc", "repro"], project, timeout=600)
    second = champion_of(project, task)
    assert second != first and second == json.loads((project / "reports" / "package.json").read_text())["model_tag"]
    assert champions(project, task) == [second, first]
    promotion = json.loads((project / "reports" / "promotion.json").read_text())
    assert promotion["promoted"] and promotion["version"] == "v0.0.2" and promotion["how"] == "pipeline"
    assert promotion["promoted_by"] == "T-GM tests <test@t-gm.invalid>"
    assert promotion["metrics"]["accuracy"] == accuracy(project)
    # The promotion commit is on no branch: the project's own history did not move.
    assert run(["git", "rev-parse", "HEAD"], project).stdout == head
    assert run(["git", "branch", "--contains", promotion["commit"]], project).stdout == ""
    # Its own promotion changes nothing the gate decides: a second run runs the gate alone.
    assert ran(run(["dvc", "repro"], project, timeout=600)) == ["gate"]

    # Roll back: one command, a git tag; the pipeline does not undo it by promoting the workspace's model again.
    proc = run(["tgm", "champion", "rollback"], project)
    assert f"{first} is the champion of {task} again" in proc.stdout and "git push --tags" in proc.stdout
    assert champion_of(project, task) == first
    assert ran(run(["dvc", "repro"], project, timeout=600)) == ["gate"]
    assert champion_of(project, task) == first
    shown = run(["tgm", "champion", "show"], project).stdout
    assert f"{task} (latest): {first} (v0.0.1)" in shown and "0 earlier" in shown
    failed = run(["tgm", "champion", "rollback"], project, check=False)
    assert failed.returncode == 1 and "has no earlier champion" in failed.stderr

    # Promote by hand: the model packaged here (or any earlier champion) comes back as a new assignment.
    proc = run(["tgm", "champion", "promote", second], project)
    assert f"{second} is the champion of {task}" in proc.stdout
    assert champions(project, task) == [second, first]
    assert "(by hand)" in run(["git", "tag", "-n1", "-l", f"{task}#champion#*"], project).stdout
    unknown = run(["tgm", "champion", "promote", "tgm-classifier:nosuchversion"], project, check=False)
    assert unknown.returncode == 1 and "neither the model packaged here nor an earlier champion" in unknown.stderr


def write_words_source(project, n_classes=3):
    """scikit-learn's 8x8 digits 0-2 as PNG folders named by word: other classes, another task."""
    from sklearn.datasets import load_digits

    words = ["zero", "one", "two", "three", "four"][:n_classes]
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        if label < n_classes:
            folder = project / "data" / "sources" / "words" / words[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return words


def test_a_new_task_in_the_same_checkout_is_not_compared_with_another_tasks_champion(digits_project):
    project = digits_project
    digits_task = gate_report(project)["task"]["id"]
    digits_champion = champion_of(project, digits_task)
    words = write_words_source(project)
    set_param(project, "ingest", "source", "folder:data/sources/words")
    set_param(project, "gate", "max_regression", 0.0)  # the strictest comparison, had there been one
    set_param(project, "finetune", "epochs", 1)  # a quick, weaker model: it must still pass as a first champion
    run(["dvc", "repro"], project, timeout=900)

    report = gate_report(project)
    assert report["passed"] and report["champion"] is None
    assert report["task"]["classes"] == sorted(words) and report["task"]["source"] == "folder:data/sources/words"
    assert report["task"]["id"] != digits_task
    assert [c["name"] for c in report["checks"]] == ["min_accuracy", "min_macro_f1"]
    # Both tasks have a champion now; the digits one is untouched, and the new one is what is served by default.
    assert champion_of(project, digits_task) == digits_champion
    new = champion_of(project, report["task"]["id"])
    assert new != digits_champion
    assert f"{report['task']['id']} (latest): {new}" in run(["tgm", "champion", "show"], project).stdout


def client_example() -> str:
    """The README's Python client example, as a user would copy it."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- client-example", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_the_champion_travels_through_git_and_dvc_remotes_to_a_fresh_clone_and_back(
    digits_project, tmp_path, monkeypatch
):
    first = digits_project
    remote, storage = tmp_path / "remote.git", tmp_path / "storage"
    run(["git", "init", "-q", "--bare", str(remote)], tmp_path)
    run(["git", "remote", "add", "origin", str(remote)], first)
    run(["git", "push", "-q", "origin", "HEAD:main", "--tags"], first)
    run(["dvc", "remote", "modify", "--local", "local", "url", str(storage)], first)
    run(["dvc", "push"], first, timeout=300)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "-b", "main", str(remote), str(clone)], tmp_path)
    run(["git", "config", "user.name", "Bo"], clone)
    run(["git", "config", "user.email", "bo@t-gm.invalid"], clone)
    run(["dvc", "remote", "modify", "--local", "local", "url", str(storage)], clone)
    run(["dvc", "pull"], clone, timeout=300)
    task = gate_report(clone)["task"]["id"]
    champion = champion_of(clone, task)
    assert champion == champion_of(first, task)
    # A machine that never trained this model: an empty BentoML store.
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "empty_bentoml_home"))

    # `bentoml serve` in the clone serves the champion, its bytes fetched through DVC, no retraining.
    server, url, _ = local_server.start([], clone, {"TGM_API_KEY": "k3y"})
    try:
        meta = httpx.get(f"{url}/metadata", headers={"Authorization": "Bearer k3y"}, timeout=10).json()
        assert meta["model"] == champion and meta["task"]["id"] == task
        card = httpx.get(f"{url}/model_card", headers={"Authorization": "Bearer k3y"}, timeout=10)
        assert card.text.startswith("---\n") and f"\n---\n\n# Model card: `{champion}`" in card.text
        # The README's client example, as written but for the address and the image files.
        images = sorted((clone / "data" / "raw" / "images" / "3").iterdir())[:2]
        for name, image in zip(("digit.png", "another.png"), images):
            shutil.copy(image, tmp_path / name)
        code = client_example().replace("http://localhost:3000", url)
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env={**os.environ, "TGM_API_KEY": "k3y"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        assert len(lines) == 3 and lines[0].split()[0] in meta["classes"] and lines[0].split()[2] in ("True", "False")
    finally:
        local_server.stop(server)
    # The clone's store, empty before, now holds the champion (imported by the service).
    assert run(["bentoml", "models", "get", champion, "-o", "json"], clone).returncode == 0

    # The clone's gate compares with the champion and refuses a worse model ...
    set_param(clone, "gate", "max_regression", 0.01)
    set_param(clone, "finetune", "epochs", 1)
    proc = run(["dvc", "repro"], clone, check=False, timeout=600)
    assert proc.returncode != 0 and f"champion {champion} has" in proc.stderr
    assert "Running stage 'package'" not in proc.stdout
    # ... promotes it when told to tolerate it, and shares the promotion with a push of tags alone.
    set_param(clone, "gate", "max_regression", 1.0)
    run(["dvc", "repro"], clone, timeout=600)
    newer = champion_of(clone, task)
    assert newer != champion
    run(["dvc", "push"], clone, timeout=300)
    run(["git", "push", "-q", "origin", "--tags"], clone)

    # Back in the first clone: `git fetch --tags`, and the next `dvc repro` gates against the newer champion.
    run(["git", "fetch", "-q", "--tags"], first)
    assert champion_of(first, task) == newer
    set_param(first, "gate", "max_regression", 0.5)
    proc = run(["dvc", "repro"], first, timeout=600)
    assert gate_report(first)["champion"]["model"] == newer
    assert json.loads((first / "reports" / "promotion.json").read_text())["version"] == "v0.0.3"
    run(["git", "push", "-q", "origin", "--tags"], first)  # the third promotion, in turn: no conflict
    run(["git", "fetch", "-q", "--tags"], clone)
    assert champions(clone, task) == [champion_of(first, task), newer, champion]
