"""Pretraining on images nobody labelled, in real DVC projects: a pool's copies of validation and test images
change nothing, a pretrained base travels to another project with `dvc get`, and Fashion-MNIST is built in
with its official test split."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY_PARAMS, commit_all, make_project, params_of, run, set_param
from PIL import Image

from tgm.ingest import FASHION_MNIST, ingest
from tgm.prepare import load_split, prepare
from tgm.validate import validate

pytestmark = pytest.mark.slow


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format=fmt)
    return buf.getvalue()


def set_pool(project: Path, pools: list[str]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["unlabelled"] = pools
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_copies_of_test_and_validation_images_in_a_pool_are_set_aside_and_change_no_metric(digits_project):
    project = digits_project
    raw = project / "data" / "raw"
    table = pd.read_csv(project / "data" / "prepared" / "splits.csv.gz")
    pool = project / "data" / "sources" / "pool"
    # New pictures for the pool: training digits mirrored left to right.
    for path in table.loc[table["split"] == "train", "path"][:300]:
        arr = np.asarray(Image.open(raw / path))[:, ::-1]
        (pool / "new").mkdir(parents=True, exist_ok=True)
        (pool / "new" / Path(path).name).write_bytes(png(np.ascontiguousarray(arr)))
    set_pool(project, ["folder:data/sources/pool"])
    # Short training, the same for both runs: what matters is that the two agree.
    set_param(project, "pretrain", "epochs", 2)
    set_param(project, "finetune", "epochs", 3)
    run(["dvc", "repro", "evaluate"], project, timeout=900)
    before = json.loads((project / "metrics/evaluate.json").read_text())
    pooled_before = json.loads((project / "data/prepared/meta.json").read_text())["pool_images"]

    # 50 test and 50 validation images copied into the pool: half byte for byte, half re-encoded as BMP.
    copies = {}
    for split in ("test", "val"):
        for k, path in enumerate(table.loc[table["split"] == split, "path"][:50]):
            name = f"{split}-{Path(path).stem}." + ("png" if k % 2 else "bmp")
            data = (raw / path).read_bytes() if k % 2 else png(np.asarray(Image.open(raw / path)), "BMP")
            (pool / "copies").mkdir(parents=True, exist_ok=True)
            (pool / "copies" / name).write_bytes(data)
            copies[f"unlabelled/pool/copies/{name}"] = (split, path, k % 2 == 1)
    run(["dvc", "repro", "evaluate"], project, timeout=900)

    aside = pd.read_csv(project / "data/prepared/set_aside.csv", keep_default_na=False).set_index("path")
    assert sorted(aside.index) == sorted(copies)
    for path, (split, original, exact) in copies.items():
        assert aside.loc[path, "matches"] == original
        assert aside.loc[path, "reason"] == f"{'copy' if exact else 'near_copy'}_of_{split}_image"
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["pool_images"] == pooled_before and meta["pools"]["pool"]["set_aside"] == 100
    assert json.loads((project / "metrics/evaluate.json").read_text()) == before
    report = json.loads((project / "reports/validation.json").read_text())
    assert report["pools"]["pool"]["accepted"] == 400


def write_words_source(project: Path, classes=("zero", "one", "two")) -> None:
    """scikit-learn's 8x8 digits 0-2 as PNG folders named by word: another task than the digits project's."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        if label < len(classes):
            folder = project / "data" / "sources" / "words" / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.png").write_bytes(png((image * 255 / 16).astype(np.uint8)))


def test_a_second_task_fine_tunes_from_a_base_fetched_from_the_first_project(built_project, tmp_path):
    second = make_project(
        tmp_path / "second",
        {
            **TINY_PARAMS,
            "ingest": {"source": "folder:data/sources/words"},
            "base": {"path": "bases/digits"},
            "pretrain": {**TINY_PARAMS["pretrain"], "epochs": 0},
            "finetune": {**TINY_PARAMS["finetune"], "epochs": 8},
        },
    )
    write_words_source(second)
    # Another project's pretrained model, fetched the way docs/own-data.md says, through its git + DVC.
    run(["dvc", "get", str(built_project), "models/pretrained", "-o", "bases/digits"], second, timeout=300)
    fetched = second / "bases" / "digits"
    assert (fetched / "model.safetensors").read_bytes() == (
        built_project / "models/pretrained/model.safetensors"
    ).read_bytes()
    commit_all(second, "a base from the digits project")

    run(["dvc", "repro", "gate"], second, timeout=900)
    # Tokenised with the base's palette; no pretraining epoch; the base's provenance travels to the gate.
    base_palette = np.load(fetched / "palette.npy")
    assert np.array_equal(np.load(second / "data/prepared/palette.npy"), base_palette)
    assert json.loads((second / "metrics/pretrain.json").read_text())["epochs_run"] == 0
    assert (second / "models/pretrained/model.safetensors").read_bytes() == (fetched / "model.safetensors").read_bytes()
    gate = json.loads((second / "reports/gate.json").read_text())
    assert gate["pretrained"]["base"]["path"] == "bases/digits"
    assert gate["pretrained"]["base"]["provenance"]["data"]["source"] == "builtin:digits"
    assert gate["task"]["classes"] == ["one", "two", "zero"]
    assert json.loads((second / "metrics/evaluate.json").read_text())["accuracy"] > 0.8  # 3 classes from a base

    # A base that does not fit is refused in one line naming both values, before anything is written.
    set_param(second, "prepare", "image_size", 6)
    proc = run(["dvc", "repro", "prepare"], second, check=False)
    assert proc.returncode != 0
    assert "tgm prepare: error: base bases/digits was pretrained with image_size 8, prepare.image_size is 6" in (
        proc.stderr
    )
    set_param(second, "prepare", "image_size", 8)
    set_param(second, "model", "n_layer", 3)
    proc = run(["dvc", "repro", "pretrain"], second, check=False)
    assert proc.returncode != 0 and "base bases/digits has n_layer 2, model.n_layer is 3" in proc.stderr


def fashion_available() -> bool:
    return Path(os.environ.get("TGM_FASHION_MNIST_DIR") or FASHION_MNIST).is_dir()


@pytest.mark.skipif(not fashion_available(), reason="apt-get install dataset-fashion-mnist (.ci/run installs it)")
def test_fashion_mnist_with_100_labels_per_class_keeps_the_official_test_split_and_pools_the_rest(tmp_path):
    raw, validated, prepared = tmp_path / "raw", tmp_path / "validated", tmp_path / "prepared"
    ingest(params_of("ingest", source="builtin:fashion-mnist", labels_per_class=100), raw)
    summary = validate(params_of("validate"), raw, validated, tmp_path / "validation.json", None)
    assert summary["inputs"] == 70_000 == summary["accepted"] + summary["rejected"]
    assert summary["images_per_split"] == {"test": 10_000, "train": 1_000}
    assert summary["labelled"]["inputs"] == 11_000 and summary["pools"]["withheld"]["inputs"] == 59_000
    assert summary["images_per_class"] == {c: 1_100 for c in summary["images_per_class"]} and summary["classes"] == 10
    meta = prepare(params_of("prepare"), validated, raw, prepared)
    assert meta["split_sizes"]["test"] == 10_000 and len(load_split(prepared, "test")[0]) == 10_000
    aside = pd.read_csv(prepared / "set_aside.csv", keep_default_na=False)
    labelled_aside = int((aside["pool"] == "").sum())
    # Every one of the 70,000: test, labelled train + val, pooled, or set aside as a copy of a held-out image.
    assert sum(meta["split_sizes"].values()) + meta["pool_images"] + len(aside) == 70_000
    assert meta["split_sizes"]["train"] + meta["split_sizes"]["val"] + labelled_aside == 1_000
    assert meta["pool_images"] + len(aside) - labelled_aside == 59_000
