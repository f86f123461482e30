"""`tgm drift` on a folder of new images: the test split passes; the same folder with a third of it replaced by
images unlike the training data fails, naming the share and the test's statistic. Real pipeline outputs."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def incoming(project, dest, n=150, seed=0):
    """`n` test-split images of the project, copied into `dest` (a user's folder of new images)."""
    splits = pd.read_csv(project / "data/prepared/splits.csv.gz")
    test = splits[splits["split"] == "test"].sample(min(n, (splits["split"] == "test").sum()), random_state=seed)
    dest.mkdir(parents=True)
    for path in test["path"]:
        shutil.copy2(project / "data/raw" / path, dest / path.replace("/", "_"))
    return sorted(dest.iterdir())


def replace_with_noise(files, share, seed=0):
    rng = np.random.default_rng(seed)
    for f in files[: int(len(files) * share)]:
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(f, format="PNG")


def tgm_drift(project, folder):
    return subprocess.run(
        [sys.executable, "-m", "tgm", "drift", "--folder", str(folder)], cwd=project, capture_output=True, text=True
    )


def test_test_images_pass_and_a_third_of_noise_fails(built_project, tmp_path):
    project = tmp_path / "project"  # drift writes its reports into the project: work on a copy of the outputs
    for rel in ("params.yaml", "models/classifier", "reports/typicality.json"):
        src, dst = built_project / rel, project / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    files = incoming(built_project, tmp_path / "incoming")
    (tmp_path / "incoming" / "notes.txt").write_text("not an image")

    ok = tgm_drift(project, tmp_path / "incoming")
    assert ok.returncode == 0, ok.stderr
    report = json.loads((project / "reports/drift.json").read_text())
    assert report["passed"] and report["files"] == len(files) + 1 and report["scored"] == len(files)
    assert report["unreadable"] == {"not_an_image": 1}
    scores = pd.read_csv(project / "reports/drift_scores.csv")
    assert len(scores) == len(files) + 1  # every file accounted for, the unreadable one with its reason
    assert (project / "reports/drift_docs/index.html").exists()

    replace_with_noise(files, 1 / 3)
    drifted = tgm_drift(project, tmp_path / "incoming")
    assert drifted.returncode == 1 and "Traceback" not in drifted.stderr
    message = drifted.stderr.strip().splitlines()[-1]
    assert message.startswith("tgm drift: error: drift in")
    assert "% of the images are atypical" in message and "Kolmogorov-Smirnov statistic" in message
    report = json.loads((project / "reports/drift.json").read_text())
    assert not report["passed"] and report["atypical_share"] >= 0.3
    new_p90, validation_p90 = report["quantiles"]["p90"]
    assert new_p90 > validation_p90  # noise sits in the upper tail


def test_a_missing_folder_is_a_clear_error(built_project, tmp_path):
    proc = tgm_drift(built_project, tmp_path / "nowhere")
    assert proc.returncode == 1 and "drift.folder" in proc.stderr and "Traceback" not in proc.stderr
