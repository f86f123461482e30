"""The service's other answers, each from a real `bentoml serve`: load shed with a 503, formats it does not take,
a model without a card, the model chosen by TGM_MODEL or TGM_TASK, settings it refuses to start with, a colour
model whose answers are known by construction, and a streamed body over the limit."""

import asyncio
import io
import json
import math
import shutil
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from support import local_server

from tgm.model import TGM, TGMConfig, save_model
from tgm.preprocess import PreprocessSpec
from tgm.store import ensure_model

pytestmark = pytest.mark.slow


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def digit(built_project) -> bytes:
    return sorted((built_project / "data/raw/images/3").iterdir())[0].read_bytes()


def serve(cwd, env):
    proc, url, log = local_server.start([], cwd, env)
    return proc, url


def test_requests_queued_past_the_latency_limit_get_a_503_and_the_rest_an_answer(built_project):
    proc, url = serve(built_project, {"TGM_MAX_LATENCY_MS": "1", "TGM_MAX_BATCH_SIZE": "1"})
    image = digit(built_project)

    async def fire():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *[client.post(f"{url}/classify", files=[("image", ("d.png", image, "image/png"))]) for _ in range(48)]
            )

    try:
        answers = asyncio.run(fire())
    finally:
        local_server.stop(proc)
    codes = [r.status_code for r in answers]
    assert set(codes) == {200, 503}, codes
    shed = next(r for r in answers if r.status_code == 503).json()
    assert shed["error"] == "overloaded" and shed["detail"]


def test_an_image_format_it_does_not_take_is_a_400_naming_the_accepted_ones(built_project):
    proc, url = serve(built_project, {})
    try:
        arr = np.zeros((8, 8), np.uint8)
        r = httpx.post(f"{url}/classify", files=[("image", ("d.ppm", png(arr, "PPM"), "image/x-portable"))], timeout=30)
    finally:
        local_server.stop(proc)
    assert r.status_code == 400 and r.json()["error"] == "format_not_accepted"
    assert "PPM images are not accepted" in r.json()["detail"] and "PNG" in r.json()["detail"]


def copy_without_card(tag: str) -> str:
    """`tag` saved again as another version, without its model card (a model packaged before cards existed)."""
    source = bentoml.models.get(tag)
    with bentoml.models.create(
        "tgm-classifier:nocard", metadata=source.info.metadata, labels=source.info.labels
    ) as model:
        for f in Path(source.path).iterdir():
            if f.name != "model_card.md" and f.is_file():
                shutil.copy2(f, Path(model.path) / f.name)
    return "tgm-classifier:nocard"


def test_tgm_model_picks_the_model_and_one_without_a_card_answers_its_card_with_a_404(built_project):
    packaged = json.loads((built_project / "reports/package.json").read_text())["model_tag"]
    tag = copy_without_card(ensure_model(packaged, built_project / "models/packaged/model.bentomodel"))
    proc, url = serve(built_project, {"TGM_MODEL": tag})
    try:
        assert httpx.get(f"{url}/metadata", timeout=10).json()["model"] == tag
        card = httpx.get(f"{url}/model_card", timeout=10)
    finally:
        local_server.stop(proc)
    assert card.status_code == 404 and card.json() == {"error": "no_model_card", "detail": f"{tag} has none"}


def test_tgm_task_serves_that_tasks_champion_and_an_unknown_task_stops_the_server(built_project):
    promotion = json.loads((built_project / "reports/promotion.json").read_text())
    task = promotion["task"]
    proc, url = serve(built_project, {"TGM_TASK": task})
    try:
        assert httpx.get(f"{url}/metadata", timeout=10).json()["model"] == promotion["model"]
    finally:
        local_server.stop(proc)
    with pytest.raises(RuntimeError) as err:
        serve(built_project, {"TGM_TASK": "no-such-task"})
    assert f"TGM_TASK='no-such-task' has no champion here (tasks: {task};" in str(err.value)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TGM_MAX_BATCH_SIZE": "abc"}, "TGM_MAX_BATCH_SIZE='abc' is not an integer"),
        ({"TGM_WORKERS": "0"}, "TGM_WORKERS=0 must be at least 1"),
        ({"TGM_MAX_LATENCY_MS": "-5"}, "TGM_MAX_LATENCY_MS=-5 must be at least 1"),
    ],
)
def test_a_bad_setting_stops_the_server_naming_it(built_project, env, message):
    with pytest.raises(RuntimeError) as err:
        serve(built_project, env)
    assert message in str(err.value)


def constant_rgb_model(tmp_path, bias=(0.0, 1.0, 2.0)) -> str:
    """A colour classifier whose answer is known by construction: every weight zero, so each image gets the
    class probabilities softmax(bias) and a uniform next-pixel distribution over its 8 colours (3 bits)."""
    cfg = TGMConfig(palette_size=8, seq_len=64, n_layer=1, n_head=2, n_embd=16, n_classes=3, cls_grid=1)
    model = TGM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.cls_head.bias.copy_(torch.tensor(bias))
    palette = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], np.uint8)
    with bentoml.models.create("tgm-classifier:constantrgb", metadata={"classes": ["a", "b", "c"]}) as ref:
        save_model(model, ref.path, extra={"classes": ["a", "b", "c"]})
        PreprocessSpec(8, "rgb", palette).save(ref.path)
        calibration = {"threshold": 3.5, "quantile": 0.99, "median": 3.0, "reference": [3.0] * 10}
        (Path(ref.path) / "typicality.json").write_text(json.dumps(calibration))
    return "tgm-classifier:constantrgb"


def test_a_colour_model_answers_what_its_weights_say(built_project, tmp_path):
    tag = constant_rgb_model(tmp_path)
    proc, url = serve(built_project, {"TGM_MODEL": tag})
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    try:
        meta = httpx.get(f"{url}/metadata", timeout=10).json()
        r = httpx.post(f"{url}/classify", files=[("image", ("c.png", png(rgb), "image/png"))], timeout=30)
    finally:
        local_server.stop(proc)
    assert meta["color_mode"] == "rgb" and meta["palette_size"] == 8
    body = r.json()
    softmax = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    assert body["label"] == "c" and body["model"] == tag
    for c, p in zip("abc", softmax):
        assert body["probabilities"][c] == pytest.approx(p, abs=1e-6)
    assert body["bits_per_pixel"] == pytest.approx(math.log2(8), abs=1e-4) and body["typical"] is True


def test_a_streamed_body_over_the_limit_is_a_413(built_project):
    proc, url = serve(built_project, {"TGM_MAX_REQUEST_BYTES": "100000"})

    def body():
        yield b"--zz\r\nContent-Disposition: form-data; name=image; filename=x.png\r\n\r\n"
        for _ in range(8):
            yield b"\0" * 20_000

    try:
        r = httpx.post(
            f"{url}/classify", content=body(), headers={"content-type": "multipart/form-data; boundary=zz"}, timeout=30
        )
    finally:
        local_server.stop(proc)
    assert "content-length" not in {k.lower() for k in r.request.headers}  # chunked: no length to check up front
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
