"""A folder collected by people and scripts: every file gets a verdict, nothing crashes, nothing is lost."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from conftest import params_of
from PIL import Image

from tgm.ingest import ingest
from tgm.prepare import prepare
from tgm.validate import DataUnusableError, validate


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def digit(seed, size=16, mode="L"):
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size), np.uint8)
    arr[rng.integers(2, 6) : rng.integers(10, 14), rng.integers(2, 6) : rng.integers(10, 14)] = 255
    arr = np.clip(arr.astype(int) + rng.integers(0, 40, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert(mode)


def png_claiming(width, height):
    """A valid PNG signature and IHDR that claims a huge size, with no pixel data worth the name."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    )


def seed_of(cls, i):
    return 100 + i + (0 if cls == "cats" else 50)


@pytest.fixture
def hostile(tmp_path):
    root = tmp_path / "hostile"
    outside = tmp_path / "outside.png"
    outside.write_bytes(encode(digit(99), "PNG"))
    files = {}
    for c in ("cats", "dogs"):
        for i in range(12):
            files[f"{c}/ok {i}.png"] = (encode(digit(seed_of(c, i)), "PNG"), "accepted")
    good_png = encode(digit(1), "PNG")
    good_jpg = encode(digit(2).convert("RGB"), "JPEG", quality=95)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (4, 4, 12, 12))
    p_trans = digit(3).convert("P")
    p_trans.info["transparency"] = 0
    frames = [digit(10 + k) for k in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    files.update(
        {
            "cats/zero bytes.png": (b"", "empty_file"),
            "cats/truncated.png": (good_png[: len(good_png) // 2], "corrupt_image"),
            "cats/truncated.jpg": (good_jpg[: len(good_jpg) // 2], "corrupt_image"),
            "cats/notes.png": (b"just some text, not pixels\n", "not_an_image"),
            "cats/page.jpg": (b"<!doctype html><html><body>404</body></html>", "not_an_image"),
            "cats/bomb.png": (png_claiming(60000, 60000), "too_large"),
            "cats/one pixel.png": (encode(Image.new("L", (1, 1)), "PNG"), "too_small"),
            "cats/strip.png": (encode(digit(4).resize((400, 8)), "PNG"), "bad_aspect_ratio"),
            "cats/rgba.png": (encode(rgba, "PNG"), "accepted"),
            "cats/la.png": (encode(digit(5, mode="LA"), "PNG"), "accepted"),
            "cats/palette transparent.png": (encode(p_trans, "PNG", transparency=0), "accepted"),
            "cats/sixteen bit.png": (encode(Image.fromarray(np.asarray(digit(6), np.uint16) * 257), "PNG"), "accepted"),
            "cats/cmyk.jpg": (encode(digit(7).convert("CMYK"), "JPEG"), "accepted"),
            "cats/animated.gif": (gif.getvalue(), "accepted"),
            "cats/rotated.jpg": (encode(digit(8).resize((16, 24)).convert("RGB"), "JPEG", exif=exif), "accepted"),
            "cats/chat 日本 ünïcode.png": (encode(digit(9), "PNG"), "accepted"),
            "cats/.hidden.png": (good_png, "system_file"),
            "cats/Thumbs.db": (b"\x00" * 64, "system_file"),
            "dogs/.DS_Store": (b"\x00\x00\x00\x01Bud1", "system_file"),
            "dogs/nested/deeper/puppy.png": (encode(digit(11), "PNG"), "accepted"),
            "dogs/same picture.png": (encode(digit(12), "PNG"), "conflicting_labels"),
            "cats/same picture.png": (encode(digit(12), "PNG"), "conflicting_labels"),
            "dogs/ok 0 recompressed.png": (encode(digit(seed_of("dogs", 0)), "PNG", compress_level=1), "accepted"),
            "stray at top level.png": (good_png, "unlabelled"),
            "dogs/blank scan.png": (encode(Image.new("L", (16, 16), 200), "PNG"), "accepted"),
        }
    )
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "birds").mkdir()  # an empty class folder
    os.symlink(outside, root / "dogs" / "link outside.png")
    files["dogs/link outside.png"] = (None, "not_a_regular_file")
    return root, {rel: verdict for rel, (_, verdict) in files.items()}


def test_every_file_gets_its_verdict_and_nothing_is_lost(hostile, tmp_path):
    root, expected = hostile
    before = sorted((p.relative_to(root), p.is_symlink()) for p in root.rglob("*"))
    ingest(params_of("ingest", source=f"folder:{root}"), tmp_path / "raw")
    summary = validate(
        params_of("validate", min_images_per_class=5, max_reject_fraction=0.5),
        tmp_path / "raw",
        tmp_path / "validated",
        tmp_path / "validation.json",
        tmp_path / "docs",
    )

    accepted = pd.read_csv(tmp_path / "validated" / "manifest.csv.gz")
    quarantine = pd.read_csv(tmp_path / "validated" / "quarantine.csv")

    def to_rel(p: str) -> str:
        return p.split("/", 1)[1].removeprefix("_unlabelled/")

    verdicts = {to_rel(p): "accepted" for p in accepted["path"]}
    verdicts |= {to_rel(p): r for p, r in zip(quarantine["path"], quarantine["reason"])}
    assert len(accepted) + len(quarantine) == len(expected) == summary["inputs"]  # 0 unaccounted files
    assert quarantine["path"].is_unique and quarantine["message"].str.len().min() > 10
    assert verdicts == expected

    details = json.loads((tmp_path / "validated" / "details.json").read_text())
    assert details["empty_class_folders"] == ["birds"]
    assert details["animated_first_frame_used"] == ["images/cats/animated.gif"]
    assert details["flagged_near_constant"] == ["images/dogs/blank scan.png"]
    assert (tmp_path / "docs" / "index.html").exists()
    rotated = accepted.set_index("path").loc["images/cats/rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (24, 16)  # EXIF orientation applied
    assert sorted((p.relative_to(root), p.is_symlink()) for p in root.rglob("*")) == before  # folder untouched

    meta = prepare(
        params_of("prepare", image_size=8, palette_size=8, val_fraction=0.2, test_fraction=0.3),
        tmp_path / "validated",
        tmp_path / "raw",
        tmp_path / "prepared",
    )
    assert meta["color_mode"] == "rgb" and meta["classes"] == ["cats", "dogs"]
    splits = pd.read_csv(tmp_path / "prepared" / "splits.csv.gz").set_index("path")
    # The recompressed copy of a dog is a near-duplicate: it lands in the same split as its original.
    assert splits.loc["images/dogs/ok 0 recompressed.png", "split"] == splits.loc["images/dogs/ok 0.png", "split"]


def test_a_folder_of_mostly_broken_files_fails_with_a_readable_summary(tmp_path):
    root = tmp_path / "broken"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "fine.png").write_bytes(encode(digit(0 if c == "a" else 1), "PNG"))
        for i in range(5):
            (root / c / f"junk {i}.jpg").write_bytes(b"<html>not a picture</html>")
    ingest(params_of("ingest", source=f"folder:{root}"), tmp_path / "raw")
    with pytest.raises(DataUnusableError) as err:
        validate(
            params_of("validate", min_images_per_class=1), tmp_path / "raw", tmp_path / "v", tmp_path / "r.json", None
        )
    assert "10 of 12 files rejected" in str(err.value) and "not_an_image: 10" in str(err.value)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False and report["rejected_by_reason"] == {"not_an_image": 10}
