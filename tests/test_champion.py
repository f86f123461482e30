"""The gate guards the champion: a model worse than the one the newest Bento serves is not packaged, and only a
model that passes becomes the next champion. Real pipeline, real BentoML store."""

import json

import pytest
from conftest import run, set_param

pytestmark = pytest.mark.slow


def bentos(project):
    out = run(["bentoml", "list", "tgm-classifier-service", "-o", "json"], project).stdout
    return sorted(json.loads(out), key=lambda b: b["creation_time"])


def accuracy(project):
    return json.loads((project / "metrics" / "evaluate.json").read_text())["accuracy"]


def test_a_worse_model_never_replaces_the_champion(digits_project):
    project = digits_project
    champion_accuracy = accuracy(project)
    champion_bento = json.loads((project / "reports" / "package.json").read_text())["bento_tag"]
    assert bentos(project)[-1]["tag"] == champion_bento
    set_param(project, "gate", "max_regression", 0.01)
    old_epochs = set_param(project, "finetune", "epochs", 1)
    try:
        # One epoch of fine-tuning: clearly worse, so the gate must refuse it and leave the champion alone.
        proc = run(["dvc", "repro"], project, check=False, timeout=600)
        assert proc.returncode != 0
        worse = accuracy(project)
        assert worse < champion_accuracy - 0.01, (worse, champion_accuracy)
        assert "gate.max_regression" in proc.stderr and "champion tgm-classifier:" in proc.stderr
        assert "Running stage 'package'" not in proc.stdout
        gate = json.loads((project / "reports" / "gate.json").read_text())
        assert gate["passed"] is False and gate["champion"]["accuracy"] == pytest.approx(champion_accuracy)
        assert bentos(project)[-1]["tag"] == champion_bento

        # Tolerate the regression and the same model passes, is packaged, and becomes the champion.
        set_param(project, "gate", "max_regression", 1.0)
        run(["dvc", "repro"], project, timeout=600)
        newest = bentos(project)[-1]["tag"]
        assert newest != champion_bento
        assert json.loads((project / "reports" / "package.json").read_text())["bento_tag"] == newest
    finally:
        set_param(project, "finetune", "epochs", old_epochs)
        set_param(project, "gate", "max_regression", 0.01)
    # Back to the better model: it passes against the worse champion and takes its place again.
    proc = run(["dvc", "repro"], project, timeout=600)
    assert accuracy(project) == champion_accuracy
    gate = json.loads((project / "reports" / "gate.json").read_text())
    assert gate["passed"] and gate["champion"]["accuracy"] == pytest.approx(worse)
    assert bentos(project)[-1]["tag"] == json.loads((project / "reports" / "package.json").read_text())["bento_tag"]
