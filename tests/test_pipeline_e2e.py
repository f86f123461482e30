"""The real `dvc repro` on builtin:digits: every stage runs, re-runs only what a change touches, and
`dvc metrics diff` reports the change."""

import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import commit_all, make_project, run

pytestmark = pytest.mark.slow
STAGES = ["ingest", "validate", "prepare", "pretrain", "finetune", "evaluate", "gate", "package"]


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def test_first_run_produces_every_output(built_project):
    p = built_project
    for path in [
        "data/raw/manifest.csv.gz",
        "data/validated/quarantine.csv",
        "data/prepared/meta.json",
        "models/pretrained/model.safetensors",
        "models/classifier/model.safetensors",
        "metrics/evaluate.json",
        "plots/confusion.csv",
        "plots/completions.png",
        "reports/gate.json",
        "reports/package.json",
        "reports/validation_docs/index.html",
        "data/validated/inspected.csv.gz",
    ]:
        assert (p / path).exists(), path
    metrics = json.loads((p / "metrics/evaluate.json").read_text())
    assert set(metrics) >= {"accuracy", "macro_f1", "per_class_recall", "test_bpp", "reference"}
    assert len(metrics["per_class_recall"]) == 10
    # Typicality: calibrated on validation, scored against every out-of-distribution set.
    calibration = json.loads((p / "reports/typicality.json").read_text())
    typicality = metrics["typicality"]
    assert typicality["threshold_bpp"] == calibration["threshold"] and len(calibration["reference"]) > 0
    assert set(typicality["ood"]) == {"uniform_noise", "inverted_test", "digits_8x8_upscaled", "photo_crops"}
    assert typicality["ood"]["uniform_noise"]["auroc_typicality"] > 0.9  # even a tiny model finds noise atypical
    # Even tiny, the pipeline learns something: far above chance (10%) on 10 digit classes.
    assert metrics["accuracy"] > 0.5
    package = json.loads((p / "reports/package.json").read_text())
    assert package["model_tag"].startswith("tgm-classifier:") and package["bento_tag"]
    # The model card opens with Hugging Face's metadata block, its numbers the evaluation's.
    card = (p / "reports/model_card.md").read_text()
    hub = yaml.safe_load(card.split("---\n")[1])
    assert hub["pipeline_tag"] == "image-classification" and hub["datasets"] == ["builtin:digits"]
    scored = {m["type"]: m["value"] for m in hub["model-index"][0]["results"][0]["metrics"]}
    assert hub["model-index"][0]["name"] == package["model_tag"]
    assert scored == {"accuracy": metrics["accuracy"], "f1": metrics["macro_f1"]}
    assert not list(p.rglob("*.pkl")) and not list((p / "models").rglob("*.pt"))


def test_nothing_changed_means_no_stage_runs_but_the_gate(digits_project):
    # The gate always runs (the champion is a git tag, which DVC cannot see); its verdict is unchanged, so
    # nothing after it does.
    out = run(["dvc", "repro"], digits_project).stdout
    assert ran_stages(out) == ["gate"]
    assert "Stage 'package' didn't change" in out and "Stage 'promote' didn't change" in out


def stale_after(project, path: str, edit) -> set[str]:
    """The stages `dvc status` calls stale after `edit` changes `path` (put back afterwards), but the gate,
    which DVC always calls changed."""
    file = project / path
    before = file.read_text()
    file.write_text(edit(before))
    try:
        return set(json.loads(run(["dvc", "status", "--json"], project).stdout or "{}")) - {"gate"}
    finally:
        file.write_text(before)


def test_an_edit_makes_stale_only_the_stages_whose_outputs_it_can_change(digits_project):
    p = digits_project
    assert stale_after(p, "tgm/cli.py", lambda s: s.replace("List every file", "List each file")) == set()
    assert stale_after(p, "pyproject.toml", lambda s: s.replace('version = "', 'version = "9')) == set()
    assert stale_after(p, "tgm/champion.py", lambda s: s.replace("no champion yet", "no champion so far")) == set()
    # The registry: promote writes the champions, the Bento packs the service that serves them (and the gate,
    # which reads them, runs every time anyway).
    registry = stale_after(p, "tgm/registry.py", lambda s: s + "\n# a comment\n")
    assert registry == {"package", "promote"}, registry
    checkpoints = stale_after(p, "tgm/training/checkpoint.py", lambda s: s + "\n# a comment\n")
    assert checkpoints == {"pretrain", "finetune"}, checkpoints  # not study, whose fits take no checkpoints
    objectives = stale_after(p, "tgm/training/objectives.py", lambda s: s + "\n# a comment\n")
    assert objectives == {"pretrain", "finetune", "study", "evaluate"}, objectives


def test_changing_a_finetune_param_reruns_only_finetune_and_downstream(digits_project):
    p = digits_project
    params = yaml.safe_load((p / "params.yaml").read_text())
    params["finetune"]["lr"] = params["finetune"]["lr"] / 3
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = run(["dvc", "repro"], p, timeout=600).stdout
    ran = ran_stages(out)
    # The study may re-run (it shares the finetune.* recipe) but not for the rate: it has its own, study.finetune_lrs.
    assert "finetune" in ran and set(ran) <= {"finetune", "study", "evaluate", "gate", "package", "promote"}, ran
    assert {"ingest", "validate", "prepare", "pretrain"}.isdisjoint(ran)

    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], p).stdout)
    assert "metrics/finetune.json" in diff and diff["metrics/finetune.json"], diff
    params_diff = json.loads(run(["dvc", "params", "diff", "--json"], p).stdout)
    assert "finetune.lr" in params_diff["params.yaml"]
    commit_all(p, "lower finetune lr")


def test_same_params_give_the_same_metrics(digits_project, tmp_path):
    """Re-running finetune from scratch with unchanged params reproduces its metrics exactly."""
    p = digits_project
    before = (p / "metrics/finetune.json").read_text()
    run(["dvc", "repro", "--force", "--single-item", "finetune"], p, timeout=600)
    assert (p / "metrics/finetune.json").read_text() == before


def test_dvc_exp_run_shows_step_level_training_curves_and_plots_diff_compares_commits(digits_project):
    p = digits_project
    out = run(["dvc", "exp", "run", "-S", "finetune.epochs=3", "-n", "short"], p, timeout=600).stdout
    assert "Running stage 'finetune'" in out

    exps = json.loads(run(["dvc", "exp", "show", "--json"], p).stdout)
    revs = [rev for baseline in exps for exp in baseline.get("experiments") or [] for rev in exp.get("revs") or []]
    short = next(rev["data"] for rev in revs if rev.get("name") == "short")
    live = short["metrics"]["dvclive/finetune/metrics.json"]["data"]
    # One step per batch: 3 epochs of ceil(train images / batch) steps, and the loss logged along the way.
    train_images = json.loads((p / "data/prepared/meta.json").read_text())["split_sizes"]["train"]
    assert live["step"] == 3 * -(-train_images // 32) and live["epoch"] == 3
    assert live["train"]["loss"] > 0 and 0 <= live["val"]["accuracy"] <= 1
    pretrain = short["metrics"]["dvclive/pretrain/metrics.json"]["data"]
    assert pretrain["step"] > 0 and pretrain["val"]["bpp"] > 0

    # The experiment made a commit of its own; plots diff compares it with the first run, old plots and new.
    run(["dvc", "exp", "apply", "short"], p)
    commit_all(p, "three fine-tuning epochs")
    diff = json.loads(run(["dvc", "plots", "diff", "HEAD~1", "HEAD", "--json"], p).stdout)
    curves = [d for d in diff["data"] if d.endswith("dvclive/finetune/plots/metrics/train/loss.tsv")]
    assert curves, list(diff["data"])
    points = [row for d in curves for plot in diff["data"][d] for row in plot["content"]["data"]["values"]]
    assert {row["rev"] for row in points} == {"HEAD~1", "HEAD"}
    assert max(int(row["step"]) for row in points if row["rev"] == "HEAD") < live["step"] + 1
    # Today's per-epoch plot definitions (dvc.yaml's titled plots) are still drawn for both commits.
    epochs = diff["data"]["Fine-tuning (validation)"][0]["content"]["data"]["values"]
    assert {row["rev"] for row in epochs} == {"HEAD~1", "HEAD"}
    assert "Test confusion matrix" in diff["data"]  # declared once, in dvc.yaml's plots
    assert not any("dvclive/evaluate" in name for name in diff["data"])


def test_a_queued_two_point_sweep_evaluates_each_point_and_packages_none(digits_project):
    """docs/commands.md's sweep: two learning rates queued up to `evaluate`, run by a queue worker, compared
    with `dvc exp show`; neither point is gated, packaged or promoted."""
    import time

    p = digits_project
    lock = yaml.safe_load((p / "dvc.lock").read_text())["stages"]
    run(["dvc", "exp", "run", "--queue", "-S", "finetune.lr=0.002,0.008", "evaluate"], p)
    run(["dvc", "queue", "start"], p)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = run(["dvc", "queue", "status"], p).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(3)
        assert status.count("Success") == 2, status
    finally:
        run(["dvc", "queue", "stop", "--kill"], p, check=False)
    found = json.loads(run(["dvc", "exp", "show", "--json"], p).stdout)
    points = [rev for baseline in found for exp in baseline.get("experiments") or [] for rev in exp.get("revs") or []]
    lrs = sorted(r["data"]["params"]["params.yaml"]["data"]["finetune"]["lr"] for r in points)
    assert lrs == [0.002, 0.008]
    for point in points:
        assert "accuracy" in point["data"]["metrics"]["metrics/evaluate.json"]["data"]
        exp_lock = yaml.safe_load(run(["git", "show", f"{point['rev']}:dvc.lock"], p).stdout)["stages"]
        assert exp_lock["finetune"] != lock["finetune"]  # fine-tuned anew at its rate ...
        for stage in ("gate", "package", "promote"):  # ... and never judged, packaged or promoted
            assert exp_lock[stage] == lock[stage], stage
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], p).stdout == ""


def test_a_folder_versioned_with_dvc_add_is_stored_once_and_an_edit_reruns_what_depends_on_it(tmp_path):
    """docs/scale.md's setup: a hard-link cache and `dvc add data/sources/NAME`. The images exist once on disk
    (folder and cache are the same files), data/raw holds no copy, and editing one image reruns ingest and the
    stages its new manifest changes."""
    from test_data_stages import make_folder, png_bytes

    project = make_project(tmp_path / "project", {"ingest": {"source": "folder:data/sources/pets"}})
    images = make_folder(project / "data/sources/pets", classes=("cat", "dog"), per_class=12, size=16)
    run(["dvc", "config", "--local", "cache.type", "hardlink"], project)
    run(["dvc", "add", "data/sources/pets"], project)
    run(["dvc", "repro", "prepare"], project, timeout=600)
    commit_all(project, "pets")

    files = sorted(p for p in images.rglob("*.png"))
    cached = {p.stat().st_ino for p in (project / ".dvc/cache").rglob("*") if p.is_file()}
    assert len(files) == 24 and all(p.stat().st_ino in cached and p.stat().st_nlink == 2 for p in files)
    assert sorted(p.name for p in (project / "data/raw").iterdir()) == ["manifest.csv.gz", "source.json"]
    manifest = pd.read_csv(project / "data/raw/manifest.csv.gz")
    assert set(manifest["source"]) == {str(p.relative_to(project)) for p in files}

    edited = images / "dog" / "dog 3.png"
    run(["dvc", "unprotect", str(edited.relative_to(project))], project)
    edited.write_bytes(png_bytes(np.arange(256, dtype=np.uint8).reshape(16, 16)))
    run(["dvc", "add", "data/sources/pets"], project)
    out = run(["dvc", "repro", "prepare"], project, timeout=600).stdout
    assert all(f"Running stage '{s}'" in out for s in ("ingest", "validate", "prepare")), out
    after = pd.read_csv(project / "data/raw/manifest.csv.gz").set_index("path")["sha256"]
    assert after["images/dog/dog 3.png"] == hashlib.sha256(edited.read_bytes()).hexdigest()
