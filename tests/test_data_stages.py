"""ingest -> validate -> prepare on real images: every file accounted for, splits that cannot leak."""

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import params_of
from PIL import Image

from tgm.errors import SourceChanged
from tgm.ingest import ingest
from tgm.prepare import load_split, prepare
from tgm.preprocess import PreprocessSpec, image_to_tokens
from tgm.schemas import DataContractError, SplitTable, check
from tgm.validate import DataUnusableError, validate


def png_bytes(arr, mode="L"):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root, classes=("cat", "dog"), per_class=8, size=12, rgb=False):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size, 3) if rgb else (size, size)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            (root / c / f"{c} {i}.png").write_bytes(png_bytes(arr, "RGB" if rgb else "L"))
    return root


def run_stages(
    tmp_path,
    source,
    validate_params=None,
    prepare_params=None,
):
    validate_params = validate_params or params_of("validate", min_images_per_class=2)
    prepare_params = prepare_params or params_of(
        "prepare", image_size=6, palette_size=8, val_fraction=0.2, test_fraction=0.25
    )
    raw, validated, prepared = tmp_path / "raw", tmp_path / "validated", tmp_path / "prepared"
    ingest(params_of("ingest", source=source), raw)
    summary = validate(validate_params, raw, validated, tmp_path / "validation.json", tmp_path / "docs")
    meta = prepare(prepare_params, validated, raw, prepared)
    return raw, validated, prepared, summary, meta


def test_builtin_digits_are_ingested_as_real_labelled_images(tmp_path):
    manifest = ingest(params_of("ingest", source="builtin:digits"), tmp_path / "raw")
    assert len(manifest) == 1797
    assert sorted(manifest["label"].unique()) == [str(i) for i in range(10)]
    with Image.open(tmp_path / "raw" / manifest["path"][0]) as im:
        assert im.size == (8, 8) and im.mode == "L"


def test_folder_source_accounts_for_every_file_and_quarantines_bad_ones(tmp_path):
    src = make_folder(tmp_path / "src")
    (src / "dog" / "broken.png").write_bytes(png_bytes(np.zeros((12, 12), np.uint8))[:40])
    (src / "dog" / "notes.png").write_text("not an image")
    (src / "cat" / "empty.jpg").write_bytes(b"")
    (src / "stray.png").write_bytes(png_bytes(np.zeros((12, 12), np.uint8)))
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    raw, validated, _, summary, meta = run_stages(tmp_path, f"folder:{src}")

    quarantine = pd.read_csv(validated / "quarantine.csv")
    accepted = pd.read_csv(validated / "manifest.csv.gz")
    assert summary["inputs"] == 16 + 4 == len(accepted) + len(quarantine)
    reasons = dict(zip(quarantine["path"].str.rsplit("/", n=1).str[-1], quarantine["reason"]))
    assert reasons == {
        "broken.png": "corrupt_image",
        "notes.png": "not_an_image",
        "empty.jpg": "empty_file",
        "stray.png": "unlabelled",
    }
    assert meta["classes"] == ["cat", "dog"]
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # the user's folder is untouched


def test_splits_are_stratified_and_an_image_never_sits_in_two_splits(tmp_path):
    src = make_folder(tmp_path / "src", per_class=12)
    dup = (src / "cat" / "cat 0.png").read_bytes()
    (src / "cat" / "copy of cat 0.png").write_bytes(dup)
    (src / "dog" / "cat 0 filed as dog.png").write_bytes(dup)
    (src / "dog" / "dog 1 again.png").write_bytes((src / "dog" / "dog 1.png").read_bytes())
    _, validated, prepared, summary, meta = run_stages(tmp_path, f"folder:{src}")
    # The picture filed under two labels is set aside everywhere; a same-class copy is dropped after the first.
    assert summary["rejected_by_reason"] == {"conflicting_labels": 3, "duplicate": 1}
    splits = pd.read_csv(prepared / "splits.csv.gz")
    assert splits["sha256"].is_unique
    for split in ("train", "val", "test"):
        assert set(splits.loc[splits["split"] == split, "label"]) == {"cat", "dog"}


def test_prepared_tokens_equal_the_serving_preprocessing(tmp_path):
    src = make_folder(tmp_path / "src", rgb=True)
    raw, _, prepared, _, meta = run_stages(tmp_path, f"folder:{src}")
    assert meta["color_mode"] == "rgb"
    spec = PreprocessSpec.load(prepared)
    splits = pd.read_csv(prepared / "splits.csv.gz")
    where = pd.read_csv(raw / "manifest.csv.gz").set_index("path")["source"]  # a folder is read where it is
    tokens, _ = load_split(prepared, "train")
    for row, expected in zip(splits[splits["split"] == "train"].itertuples(), tokens):
        with Image.open(where[row.path]) as im:
            assert (image_to_tokens(im, spec) == expected).all()


def test_split_table_contract_refuses_a_leak():
    table = pd.DataFrame(
        {"path": ["a.png", "b.png"], "label": ["x", "x"], "sha256": ["0" * 64] * 2, "split": ["train", "test"]}
    )
    with pytest.raises(DataContractError, match="more than one split"):
        check(SplitTable, table, "split table")


def test_a_single_class_is_a_clear_error(tmp_path):
    src = make_folder(tmp_path / "src", classes=("only",))
    ingest(params_of("ingest", source=f"folder:{src}"), tmp_path / "raw")
    with pytest.raises(DataUnusableError, match="only one class"):
        validate(
            params_of("validate", min_images_per_class=2), tmp_path / "raw", tmp_path / "v", tmp_path / "r.json", None
        )


def test_mostly_broken_folder_fails_with_the_worst_reasons(tmp_path):
    src = make_folder(tmp_path / "src", per_class=2)
    for i in range(10):
        (src / "cat" / f"junk{i}.png").write_text("junk")
    ingest(params_of("ingest", source=f"folder:{src}"), tmp_path / "raw")
    with pytest.raises(DataUnusableError, match=r"not_an_image: 10"):
        validate(
            params_of("validate", min_images_per_class=1), tmp_path / "raw", tmp_path / "v", tmp_path / "r.json", None
        )
    assert (tmp_path / "r.json").exists()  # the report is written even when the stage fails


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ingest(params_of("ingest", source=f"folder:{tmp_path}/nowhere"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # nothing half-written


def test_prepared_arrays_are_checked_before_training(tmp_path):
    from tgm.prepare import check_prepared

    src = make_folder(tmp_path / "src", per_class=12)
    _, _, prepared, _, meta = run_stages(tmp_path, f"folder:{src}")
    assert check_prepared(prepared)["classes"] == ["cat", "dog"]
    tokens = np.load(prepared / "train_tokens.npy")
    tokens[0, 0] = meta["palette_size"]  # one token outside the palette
    np.save(prepared / "train_tokens.npy", tokens)
    np.save(prepared / "test_labels.npy", np.zeros(meta["split_sizes"]["test"], dtype=np.int64))
    with pytest.raises(DataContractError) as err:
        check_prepared(prepared)
    assert "outside the palette" in str(err.value) and "test: no images of class(es) dog" in str(err.value)


def test_prepare_refuses_an_accepted_manifest_holding_a_picture_twice(tmp_path):
    src = make_folder(tmp_path / "src", per_class=12)
    raw, validated, _, _, _ = run_stages(tmp_path, f"folder:{src}")
    manifest = pd.read_csv(validated / "manifest.csv.gz")
    pd.concat([manifest, manifest.iloc[:1].assign(path="images/cat/copy.png")]).to_csv(
        validated / "manifest.csv.gz", index=False
    )
    with pytest.raises(DataContractError, match="sha256"):
        prepare(params_of("prepare", image_size=6, palette_size=8), validated, raw, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_outputs_are_byte_for_byte_the_same_with_one_or_two_workers(tmp_path, monkeypatch):
    """Enough files for several chunks, colour and grey, with broken ones: every output file is identical."""
    from tgm.parallel import CHUNK

    root = make_folder(tmp_path / "src", classes=("cat", "dog", "fox"), per_class=CHUNK // 2 + 7, rgb=True)
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "fox" / "notes.txt").write_text("not an image")
    (root / "cat" / "cut.png").write_bytes((root / "cat" / "cat 0.png").read_bytes()[:40])
    outputs = {}
    work = tmp_path / "work"  # the same place both times: messages and reports name paths in it
    for workers in ("1", "2"):
        monkeypatch.setenv("TGM_DATA_WORKERS", workers)
        shutil.rmtree(work, ignore_errors=True)
        run_stages(work, f"folder:{root}", prepare_params=params_of("prepare", image_size=6, palette_size=8))
        outputs[workers] = {
            p.relative_to(work).as_posix(): p.read_bytes()
            for p in sorted(work.rglob("*"))
            if p.is_file() and "docs" not in p.relative_to(work).parts  # GX Data Docs carry run ids and times
        }
    assert len(pd.read_csv(work / "raw/manifest.csv.gz")) > CHUNK  # more than one chunk of files
    assert outputs["1"].keys() == outputs["2"].keys()
    different = [k for k in outputs["1"] if outputs["1"][k] != outputs["2"][k]]
    assert not different, different[:5]


def test_a_folder_is_read_in_place_and_a_file_changed_after_ingest_is_refused(tmp_path):
    src = make_folder(tmp_path / "src")
    raw, validated = tmp_path / "raw", tmp_path / "validated"
    manifest = ingest(params_of("ingest", source=f"folder:{src}"), raw)
    validate(params_of("validate", min_images_per_class=2), raw, validated, tmp_path / "v.json", None)
    # Stored once: data/raw holds the listing, not a second copy of the images.
    assert sorted(p.name for p in raw.rglob("*")) == ["manifest.csv.gz", "source.json"]
    assert (manifest["source"].map(lambda s: Path(s).parent.parent) == src).all()

    changed = src / "cat" / "cat 1.png"
    changed.write_bytes(changed.read_bytes() + b"\0")  # the picture still decodes; its bytes differ
    prepare_params = params_of("prepare", image_size=6, palette_size=8, val_fraction=0.2, test_fraction=0.25)
    with pytest.raises(SourceChanged, match=r"cat 1\.png changed after ingest.*dvc repro"):
        prepare(prepare_params, validated, raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()  # nothing half-written
    with pytest.raises(SourceChanged, match=r"cat 1\.png changed after ingest"):
        validate(params_of("validate"), raw, tmp_path / "again", tmp_path / "v2.json", None)
    changed.unlink()
    with pytest.raises(SourceChanged, match=r"cat 1\.png was listed by ingest but no longer exists"):
        validate(params_of("validate"), raw, tmp_path / "again", tmp_path / "v2.json", None)
    assert not (tmp_path / "again").exists() and not (tmp_path / "v2.json").exists()


def test_a_bad_worker_count_is_a_clear_error(monkeypatch):
    from tgm.errors import UserError
    from tgm.parallel import map_in_order

    monkeypatch.setenv("TGM_DATA_WORKERS", "many")
    with pytest.raises(UserError, match="TGM_DATA_WORKERS='many' is not an integer"):
        map_in_order(str, range(3))
    monkeypatch.setenv("TGM_DATA_WORKERS", "0")
    with pytest.raises(UserError, match="must be at least 1"):
        map_in_order(str, range(3))


def test_a_dask_cluster_through_prefect_gives_the_same_outputs_as_one_process(tmp_path, monkeypatch):
    """TGM_DASK_ADDRESS: every chunk is a Prefect task on a real (local) Dask cluster; nothing in the outputs
    tells the two runs apart."""
    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from tgm.parallel import CHUNK

    root = make_folder(tmp_path / "src", classes=("cat", "dog", "fox"), per_class=CHUNK // 2 + 7, rgb=True)
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "cat" / "cut.png").write_bytes((root / "cat" / "cat 0.png").read_bytes()[:40])
    work, outputs = tmp_path / "work", {}
    prepare_params = params_of("prepare", image_size=6, palette_size=8)
    monkeypatch.setenv("TGM_DATA_WORKERS", "1")
    run_stages(work, f"folder:{root}", prepare_params=prepare_params)

    # GX Data Docs name their pages by run id and time; everything else must match.
    def written():
        return {p.relative_to(work): p.read_bytes() for p in work.rglob("*") if p.is_file() and "docs" not in p.parts}

    outputs["one process"] = written()
    shutil.rmtree(work)
    # LocalCluster's nannies run in this process and set OMP_NUM_THREADS=1 (and more) in its environment for
    # good: every later test's subprocess would train with one thread, and differ from runs made with two.
    environ = dict(os.environ)
    try:
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
            prefect_test_harness(server_startup_timeout=120),
        ):
            monkeypatch.setenv("TGM_DASK_ADDRESS", cluster.scheduler_address)
            run_stages(work, f"folder:{root}", prepare_params=prepare_params)
            ran = list(cluster.scheduler.task_prefixes)  # what the fresh cluster's scheduler was given
    finally:
        os.environ.clear()
        os.environ.update(environ)
    outputs["dask"] = written()
    assert outputs["one process"].keys() == outputs["dask"].keys()
    different = [str(k) for k, v in outputs["one process"].items() if v != outputs["dask"][k]]
    assert not different, different
    assert ran, "nothing ran on the cluster"


def test_outputs_written_atomically_get_the_modes_of_any_other_file(tmp_path):
    """Written through a temporary file, a report must not end up owner-only (mkstemp's 0600) when a file
    written plainly would not be."""
    from tgm.io import atomic_dir, write_json

    write_json(tmp_path / "metrics.json", {"accuracy": 1.0})
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "weights").write_bytes(b"")
    (tmp_path / "plain.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("metrics.json") == mode("plain.json") and mode("model") == mode("plain")
