"""The champion of each task: a worse model never replaces it, a model of another task is never compared with it,
and it travels: another clone, after `git clone` + `dvc pull` alone, gates against it and serves it.
Real pipeline, real DVC remote, real BentoML store and server."""

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


def registry(project) -> dict:
    return json.loads((project / "registry" / "champions.json").read_text())


def gate_report(project) -> dict:
    return json.loads((project / "reports" / "gate.json").read_text())


def champion_of(project, task_id) -> str:
    return registry(project)["tasks"][task_id]["champion"]["model"]


def accuracy(project):
    return json.loads((project / "metrics" / "evaluate.json").read_text())["accuracy"]


def test_a_worse_model_never_replaces_the_champion_and_a_rollback_is_one_command(digits_project):
    project = digits_project
    task = gate_report(project)["task"]["id"]
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
    entry = registry(project)["tasks"][task]
    assert [c["model"] for c in entry["earlier"]] == [first]
    assert entry["champion"]["how"] == "pipeline"
    assert entry["champion"]["promoted_by"] == "T-GM tests <test@t-gm.invalid>"
    assert entry["champion"]["metrics"]["accuracy"] == accuracy(project)
    assert (project / "registry" / entry["champion"]["file"]).stat().st_size > 0

    # Roll back: one command, recorded in dvc.lock so that git and the DVC remote carry it.
    proc = run(["tgm", "champion", "rollback"], project)
    assert f"{first} is the champion again" in proc.stdout
    assert champion_of(project, task) == first
    assert [e["event"] for e in registry(project)["tasks"][task]["log"]] == ["promote", "promote", "rollback"]
    assert "promote" not in run(["dvc", "status", "promote"], project).stdout
    shown = run(["tgm", "champion", "show"], project).stdout
    assert f"{task} (latest): {first}" in shown and "0 earlier" in shown
    failed = run(["tgm", "champion", "rollback"], project, check=False)
    assert failed.returncode == 1 and "has no earlier champion" in failed.stderr

    # Promote by hand: any model packaged after passing the gate, recorded like the pipeline's promotions.
    proc = run(["tgm", "champion", "promote", second], project)
    assert f"{second} is the champion of {task}" in proc.stdout
    entry = registry(project)["tasks"][task]
    assert entry["champion"]["model"] == second and entry["champion"]["how"] == "by hand"
    assert "promote" not in run(["dvc", "status", "promote"], project).stdout
    unknown = run(["tgm", "champion", "promote", "tgm-classifier:nosuchversion"], project, check=False)
    assert unknown.returncode == 1 and "is not in the BentoML store" in unknown.stderr


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
    assert new != digits_champion and registry(project)["latest"] == report["task"]["id"]


def client_example() -> str:
    """The README's Python client example, as a user would copy it."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- client-example", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_the_champion_travels_through_the_dvc_remote_to_a_fresh_clone(digits_project, tmp_path, monkeypatch):
    first = digits_project
    remote = tmp_path / "remote"
    run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], first)
    run(["dvc", "push"], first, timeout=300)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(first), str(clone)], tmp_path)
    run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], clone)
    run(["dvc", "pull"], clone, timeout=300)
    task = gate_report(clone)["task"]["id"]
    champion = champion_of(clone, task)
    assert champion == champion_of(first, task)
    # A machine that never trained this model: an empty BentoML store.
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "empty_bentoml_home"))

    # Its gate compares with the pulled champion and refuses a worse model.
    set_param(clone, "gate", "max_regression", 0.01)
    set_param(clone, "finetune", "epochs", 1)
    proc = run(["dvc", "repro"], clone, check=False, timeout=600)
    assert proc.returncode != 0 and f"champion {champion} has" in proc.stderr
    assert "Running stage 'package'" not in proc.stdout

    # `bentoml serve` in the clone serves the champion, imported from the pulled registry, no retraining.
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
    # The clone's store, empty before, now holds the champion (imported from registry/ by the service).
    assert run(["bentoml", "models", "get", champion, "-o", "json"], clone).returncode == 0
