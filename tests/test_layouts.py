"""Data in the shapes users have: class folders, split folders, metadata.csv, unlabelled pools beside them or
listed in ingest.unlabelled. Each is read as the layout it is, an ambiguous one is refused in one line, and no
copy of a validation or test image is ever pretrained on."""

import io
import json

import numpy as np
import pandas as pd
import pytest
from conftest import params_of
from PIL import Image

from tgm.errors import SourceMissing
from tgm.ingest import LayoutError, ingest
from tgm.prepare import load_pool, load_split, prepare
from tgm.validate import validate

CLASSES = ("cat", "dog", "fox")


def picture(seed: int) -> np.ndarray:
    """A 16x16 grey picture of 8x8 random dark and light cells: no two seeds share a perceptual hash, and a
    re-encoded copy keeps its own (every pixel is far from the mean)."""
    cells = np.random.default_rng(seed).integers(0, 2, (8, 8))
    return np.kron(np.where(cells, 215, 40), np.ones((2, 2))).astype(np.uint8)


def save(path, arr, fmt="PNG", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())


def split_tree(root, counts=(("train", 30), ("test", 10))):
    """root/<split>/<class>/<n>.png, 3 classes: with the default counts, 90 training and 30 test images."""
    seed = 0
    for split, n in counts:
        for c in CLASSES:
            for i in range(n):
                seed += 1
                save(root / split / c / f"{i}.png", picture(seed))
    return root


def stages(tmp_path, source, **ingest_changes):
    """ingest, validate, prepare into tmp_path; (validation summary, prepare's meta)."""
    raw, validated, prepared = tmp_path / "raw", tmp_path / "validated", tmp_path / "prepared"
    ingest(params_of("ingest", source=source, **ingest_changes), raw)
    summary = validate(params_of("validate", min_images_per_class=2), raw, validated, tmp_path / "v.json", None)
    meta = prepare(
        params_of("prepare", image_size=6, palette_size=8, val_fraction=0.2, test_fraction=0.25),
        validated,
        raw,
        prepared,
    )
    return summary, meta


def splits(tmp_path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "prepared" / "splits.csv.gz")


def test_split_folders_are_splits_not_classes_and_the_users_test_split_stays_the_test_split(tmp_path):
    root = split_tree(tmp_path / "pets")
    summary, meta = stages(tmp_path, f"folder:{root}")
    assert summary["classes"] == 3 and summary["images_per_class"] == {c: 40 for c in CLASSES}
    assert summary["images_per_split"] == {"test": 30, "train": 90}
    assert json.loads((tmp_path / "raw" / "source.json").read_text())["layout"] == "split_folders"
    table = splits(tmp_path)
    assert sorted(table.loc[table["split"] == "test", "path"]) == sorted(
        f"images/test/{c}/{i}.png" for c in CLASSES for i in range(10)
    )
    # No user validation split: it is drawn from the user's training images only, stratified.
    val = table[table["split"] == "val"]
    assert len(val) == meta["split_sizes"]["val"] == 18 and val["path"].str.startswith("images/train/").all()
    assert meta["split_sizes"] == {"train": 72, "val": 18, "test": 30}


def test_a_validation_folder_is_used_as_the_validation_split(tmp_path):
    root = split_tree(tmp_path / "pets", (("train", 20), ("valid", 5), ("test", 5)))
    summary, meta = stages(tmp_path, f"folder:{root}")
    table = splits(tmp_path)
    assert summary["images_per_split"] == {"test": 15, "train": 60, "val": 15}
    assert table.loc[table["split"] == "val", "path"].str.startswith("images/val/").all()
    assert meta["split_sizes"] == {"train": 60, "val": 15, "test": 15}


def test_metadata_csv_labels_the_images_and_a_file_it_does_not_name_is_unlabelled(tmp_path):
    root = tmp_path / "pets"
    rows = []
    for i in range(24):
        save(root / "images" / f"{i:03d}.png", picture(i))
        rows.append({"file_name": f"images/{i:03d}.png", "label": CLASSES[i % 3]})
    save(root / "images" / "stray.png", picture(99))
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    summary, _ = stages(tmp_path, f"folder:{root}")
    assert summary["images_per_class"] == {c: 8 for c in CLASSES}
    assert summary["inputs"] == 25 and summary["rejected_by_reason"] == {"unlabelled": 1}
    manifest = pd.read_csv(tmp_path / "raw" / "manifest.csv.gz", keep_default_na=False).set_index("path")
    assert manifest.loc["images/cat/images/000.png", "label"] == "cat"
    assert json.loads((tmp_path / "raw" / "source.json").read_text())["layout"] == "metadata_csv"


def test_a_class_folder_tree_with_an_unlabelled_pool_beside_it(tmp_path):
    root = tmp_path / "pets"
    for k, c in enumerate(CLASSES):
        for i in range(10):
            save(root / c / f"{i}.png", picture(100 * k + i))
    for i in range(15):
        save(root / "unlabelled" / "batch1" / f"{i}.png", picture(1000 + i))
    (root / "unlabelled" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    save(root / "unlabelled" / "again.png", picture(1000))  # the same picture twice in the pool
    summary, meta = stages(tmp_path, f"folder:{root}")
    assert summary["classes"] == 3  # `unlabelled` is not a class
    assert summary["labelled"]["inputs"] == 30
    pool = summary["pools"]["unlabelled"]
    assert pool == {
        "inputs": 17,
        "accepted": 15,
        "rejected": 2,
        "reject_fraction": round(2 / 17, 6),
        "rejected_by_reason": {"corrupt_image": 1, "duplicate": 1},
    }
    assert summary["inputs"] == 47 == summary["accepted"] + summary["rejected"]
    assert meta["pool_images"] == 15 and load_pool(tmp_path / "prepared").shape == (15, 36)


def test_pools_listed_in_ingest_unlabelled_any_depth_and_the_guards_still_apply(tmp_path):
    root = split_tree(tmp_path / "pets", (("train", 10), ("test", 4)))
    extra = tmp_path / "crawl"
    for i in range(12):
        save(extra / "a" / "b" / f"{i}.png", picture(5000 + i))
    (extra / "a" / "notes.txt").write_text("not an image")
    summary, meta = stages(tmp_path, f"folder:{root}", unlabelled=(f"folder:{extra}",))
    assert summary["pools"]["crawl"]["accepted"] == 12
    assert summary["pools"]["crawl"]["rejected_by_reason"] == {"not_an_image": 1}
    assert meta["pools"] == {"crawl": {"images": 12, "set_aside": 0}}


def test_copies_of_validation_and_test_images_in_a_pool_are_set_aside_and_named(tmp_path):
    root = split_tree(tmp_path / "pets", (("train", 20), ("val", 20), ("test", 20)))
    pool = tmp_path / "pool"
    for i in range(20):
        save(pool / f"new {i}.png", picture(9000 + i))
    copies = {}
    for split in ("val", "test"):
        for c in CLASSES:
            for i in range(0, 20, 2):
                src = root / split / c / f"{i}.png"
                arr = np.asarray(Image.open(src))
                name = f"{split} {c} {i}"
                # Half exact copies, half re-encoded as JPEG (another sha256, the same picture).
                if i % 4 == 0:
                    (pool / f"{name}.png").write_bytes(src.read_bytes())
                else:
                    save(pool / f"{name}.jpg", arr, "JPEG", quality=95)
                copies[name] = (split, f"images/{split}/{c}/{i}.png", i % 4 == 0)
    assert len(copies) == 60
    _, meta = stages(tmp_path, f"folder:{root}", unlabelled=(f"folder:{pool}",))
    aside = pd.read_csv(tmp_path / "prepared" / "set_aside.csv", keep_default_na=False)
    assert len(aside) == 60 and meta["pools"] == {"pool": {"images": 20, "set_aside": 60}}
    for row in aside.itertuples():
        split, original, exact = copies[row.path.removeprefix("unlabelled/pool/").rsplit(".", 1)[0]]
        assert row.matches == original and row.pool == "pool"
        assert row.reason == f"{'copy' if exact else 'near_copy'}_of_{split}_image"
    # What is pretrained on: exactly the 20 new pictures.
    assert load_pool(tmp_path / "prepared").shape[0] == 20


def test_a_users_training_image_that_copies_a_test_image_is_set_aside(tmp_path):
    root = split_tree(tmp_path / "pets", (("train", 10), ("test", 4)))
    leak = np.asarray(Image.open(root / "test" / "cat" / "0.png"))
    save(root / "train" / "cat" / "leak.jpg", leak, "JPEG", quality=95)
    _, meta = stages(tmp_path, f"folder:{root}")
    aside = pd.read_csv(tmp_path / "prepared" / "set_aside.csv", keep_default_na=False)
    assert aside[["path", "reason", "matches"]].values.tolist() == [
        ["images/train/cat/leak.jpg", "near_copy_of_test_image", "images/test/cat/0.png"]
    ]
    assert "images/train/cat/leak.jpg" not in set(splits(tmp_path)["path"])
    assert meta["set_aside"] == {"near_copy_of_test_image": 1}


@pytest.mark.parametrize(
    "make, found, expected",
    [
        (
            lambda r: (split_tree(r, (("train", 3),)), save(r / "dog" / "1.png", picture(1))),
            "mixes split folders (train/) with other folders (dog/)",
            "expected either split folders only",
        ),
        (
            lambda r: [save(r / "train" / f"{i}.png", picture(i)) for i in range(3)],
            "train holds images but no class folders",
            "expected train/<class>/<image>",
        ),
        (
            lambda r: [save(r / f"{i}.png", picture(i)) for i in range(3)],
            "holds images but no class folders",
            "list the folder in ingest.unlabelled",
        ),
        (
            lambda r: (
                [save(r / c / f"{i}.png", picture(10 * k + i)) for k, c in enumerate(CLASSES) for i in range(3)],
                pd.DataFrame(
                    {"file_name": [f"{c}/{i}.png" for c in CLASSES for i in range(3)], "label": ["cat"] * 9}
                ).to_csv(r / "metadata.csv", index=False),
            ),
            "metadata.csv and the class folders disagree on 6 file(s), e.g. dog/0.png: folder 'dog'",
            "expected the labels in one place",
        ),
        (
            lambda r: (
                save(r / "a.png", picture(1)),
                pd.DataFrame({"file_name": ["a.png", "b.png"], "label": ["x", "y"]}).to_csv(
                    r / "metadata.csv", index=False
                ),
            ),
            "names 1 file(s) that are not in",
            "b.png",
        ),
        (
            lambda r: (save(r / "a.png", picture(1)), (r / "metadata.csv").write_text("name,class\na.png,x\n")),
            "has columns name, class",
            "expected file_name,label",
        ),
        (
            lambda r: (split_tree(r, (("val", 2), ("valid", 2))),),
            "more than one folder names the same split",
            "val, valid",
        ),
    ],
    ids=[
        "class folders beside split folders",
        "split folder without class folders",
        "loose images only",
        "metadata.csv against class folders",
        "metadata.csv names missing files",
        "metadata.csv without its columns",
        "two folders for one split",
    ],
)
def test_an_ambiguous_layout_is_refused_in_one_line_naming_what_was_found(tmp_path, make, found, expected):
    root = tmp_path / "pets"
    root.mkdir()
    make(root)
    with pytest.raises(LayoutError) as err:
        ingest(params_of("ingest", source=f"folder:{root}"), tmp_path / "raw")
    message = str(err.value)
    assert found in message and expected in message and "\n" not in message
    assert not (tmp_path / "raw").exists()  # nothing half-written


def test_labels_per_class_keeps_that_many_training_labels_and_pools_the_rest(tmp_path):
    root = split_tree(tmp_path / "pets", (("train", 20), ("test", 5)))
    summary, meta = stages(tmp_path, f"folder:{root}", labels_per_class=6, seed=3)
    assert summary["images_per_split"] == {"test": 15, "train": 18}
    assert summary["pools"]["withheld"]["accepted"] == 42
    manifest = pd.read_csv(tmp_path / "raw" / "manifest.csv.gz", keep_default_na=False)
    withheld = manifest[manifest["pool"] == "withheld"]
    assert (withheld["label"] == "").all() and withheld["path"].str.startswith("unlabelled/withheld/train/").all()
    assert meta["pool_images"] == 42 and len(load_split(tmp_path / "prepared", "test")[0]) == 15


def test_without_the_fashion_mnist_package_ingest_names_the_command_that_installs_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TGM_FASHION_MNIST_DIR", str(tmp_path / "nothing here"))
    with pytest.raises(SourceMissing) as err:
        ingest(params_of("ingest", source="builtin:fashion-mnist"), tmp_path / "raw")
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "raw").exists()
