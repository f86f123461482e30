"""`bentoml serve` answers over real HTTP what the model says (computed apart from the service's own helpers,
tests/support/reference.py), refuses bad requests with 4xx JSON errors, sheds load with a 503, serves the
model it is told to, and, with TGM_API_KEY set, only talks to callers that hold the key."""

import asyncio
import io
import json
import re
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from support import local_server
from support.reference import Reference

from tgm.answers import ERRORS, BatchAnswer, ClassifyAnswer, ErrorAnswer, Metadata
from tgm.preprocess import PreprocessSpec, image_to_tokens, tokens_to_image

pytestmark = pytest.mark.slow
MAX_BYTES = 200_000


def start_server(target: list[str], cwd: Path, env: dict):
    proc, url, _ = local_server.start(target, cwd, env)
    return proc, url


@pytest.fixture(scope="module")
def served(built_project):
    proc, url = start_server([], built_project, {"TGM_MAX_REQUEST_BYTES": str(MAX_BYTES)})
    yield url
    local_server.stop(proc)


@pytest.fixture(scope="module")
def classifier(built_project):
    return Reference(built_project / "models/classifier", built_project / "reports/typicality.json")


@pytest.fixture(scope="module")
def images(built_project) -> list[Path]:
    return sorted((built_project / "data/raw/images").rglob("*.png"))[::20][:64]


def upload(path: Path, field: str = "image"):
    return (field, (path.name, path.read_bytes(), "image/png"))


def expected(classifier: Reference, path: Path) -> dict:
    return classifier.answer(path)


def same_answer(body: dict, want: dict) -> None:
    ClassifyAnswer.model_validate(body)  # the shape the OpenAPI page documents
    assert body["label"] == want["label"]
    assert body["bits_per_pixel"] == pytest.approx(want["bits_per_pixel"], abs=1e-3)
    assert body["typical"] is want["typical"] and isinstance(body["typical"], bool)
    assert set(body["probabilities"]) == set(want["probabilities"])
    for c, prob in want["probabilities"].items():
        assert body["probabilities"][c] == pytest.approx(prob, abs=1e-5)


def test_classify_matches_the_in_process_model(served, classifier, images):
    for path in images[:5]:
        r = httpx.post(f"{served}/classify", files=[upload(path)], timeout=30)
        assert r.status_code == 200, r.text
        same_answer(r.json(), expected(classifier, path))


def test_classify_batch_answers_each_image_in_order(served, classifier, images):
    picked = images[:7]
    r = httpx.post(f"{served}/classify_batch", files=[upload(p, "images") for p in picked], timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(picked)
    for body, path in zip(results, picked):
        same_answer(body, expected(classifier, path))


def test_64_concurrent_requests_all_get_the_in_process_answer(served, classifier, images):
    async def fire():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{served}/classify", files=[upload(p)]) for p in images])

    def batches() -> tuple[float, float]:
        """(forward passes, images) so far, from the tgm_batch_size histogram on BentoML's /metrics."""
        lines = httpx.get(f"{served}/metrics", timeout=10).text.splitlines()
        value = {k: float(v) for k, _, v in (line.rpartition(" ") for line in lines if line.startswith("tgm_batch"))}
        return value.get("tgm_batch_size_count", 0.0), value.get("tgm_batch_size_sum", 0.0)

    passes_before, images_before = batches()
    responses = asyncio.run(fire())
    assert len(responses) == 64
    for r, path in zip(responses, images):
        assert r.status_code == 200, r.text
        same_answer(r.json(), expected(classifier, path))
    passes, images_done = (after - before for after, before in zip(batches(), (passes_before, images_before)))
    assert images_done == 64
    assert passes < 64, "concurrent requests should share forward passes"


def test_served_preprocessing_is_prepares(served, built_project, images):
    """keep_fraction=1 samples nothing: every tile is the image exactly as tokenised by the server."""
    spec = PreprocessSpec.load(built_project / "data/prepared")
    path = images[3]
    r = httpx.post(f"{served}/complete", files=[upload(path)], data={"keep_fraction": "1.0", "n": "2"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    grid = np.asarray(Image.open(io.BytesIO(r.content)))
    scale = max(1, 64 // spec.image_size)
    with Image.open(path) as im:
        ours = tokens_to_image(image_to_tokens(im, spec), spec)[..., 0]
    first_tile = grid[: spec.image_size * scale : scale, : spec.image_size * scale : scale]
    assert np.array_equal(first_tile, ours)


def test_completions_are_seeded(served, images):
    def complete(seed):
        r = httpx.post(
            f"{served}/complete",
            files=[upload(images[0])],
            data={"keep_fraction": "0.5", "n": "3", "seed": str(seed), "top_k": "4"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.content

    assert complete(1) == complete(1)
    assert complete(1) != complete(2)


def test_metadata_says_which_model_answers(served, built_project):
    r = httpx.get(f"{served}/metadata", timeout=10)
    assert r.status_code == 200
    meta = r.json()
    assert meta["model"] == json.loads((built_project / "reports/package.json").read_text())["model_tag"]
    assert meta["classes"] == [str(d) for d in range(10)]
    assert meta["image_size"] == 8 and meta["palette_size"] == 8
    assert meta["metrics"]["accuracy"] == json.loads((built_project / "metrics/evaluate.json").read_text())["accuracy"]
    assert meta["params"]["model"]["n_layer"] == 2
    calibration = json.loads((built_project / "reports/typicality.json").read_text())
    assert meta["typicality"]["threshold_bpp"] == calibration["threshold"]
    assert meta["typicality"]["refuse_atypical"] is False
    # The commit the pipeline ran on (package runs before `first run` is committed, on top of the project's).
    first = subprocess.run(
        ["git", "rev-list", "--max-parents=0", "HEAD"], cwd=built_project, capture_output=True, text=True
    )
    assert meta["git_commit"].removesuffix("-dirty") == first.stdout.strip()
    lock = yaml.safe_load((built_project / "dvc.lock").read_text())
    prepared = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    assert meta["data_hash"] == prepared["md5"]


def schema_of(spec: dict, schema: dict) -> dict:
    """A schema of the spec with its $ref followed."""
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def test_openapi_documents_every_answer_and_error_in_tgms_own_words(served, built_project):
    spec = httpx.get(f"{served}/docs.json", timeout=10).json()
    tag = json.loads((built_project / "reports/package.json").read_text())["model_tag"]
    info = spec["info"]
    assert info["title"] == "T-GM classifier" and tag in info["version"] and tag in info["description"]
    assert "created with BentoML" not in info["description"] and info["version"] != "None"
    for route, model in (("/classify", ClassifyAnswer), ("/classify_batch", BatchAnswer)):
        responses = spec["paths"][route]["post"]["responses"]
        answer = schema_of(spec, responses["200"]["content"]["application/json"]["schema"])
        assert set(answer["properties"]) == set(model.model_fields), route
        for code in ERRORS:
            error = schema_of(spec, responses[code]["content"]["application/json"]["schema"])
            assert set(error["properties"]) == set(ErrorAnswer.model_fields), (route, code)
    metadata = spec["paths"]["/metadata"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(schema_of(spec, metadata)["properties"]) == set(Metadata.model_fields)
    card = spec["paths"]["/model_card"]["get"]["responses"]
    assert "text/markdown" in card["200"]["content"]
    assert set(schema_of(spec, card["404"]["content"]["application/json"]["schema"])["properties"]) == {
        "error",
        "detail",
    }
    Metadata.model_validate(httpx.get(f"{served}/metadata", timeout=10).json())
    assert httpx.get(f"{served}/", timeout=10).status_code == 200  # the Swagger UI


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="apt-get install chromium (.ci/run installs it)")
def test_the_swagger_page_shows_tgm_its_version_model_and_the_answers_in_a_real_browser(served, built_project):
    tag = json.loads((built_project / "reports/package.json").read_text())["model_tag"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with tempfile.TemporaryDirectory() as profile:
        page = subprocess.run(
            [str(CHROMIUM), *flags, f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom",
             f"{served}/"],
            capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
    text = re.sub(r"<[^>]+>", " ", page)  # what the page shows, as rendered by Swagger UI's scripts
    assert "T-GM classifier" in text and tag in text, text[:2000]
    assert "created with BentoML" not in text and "Slack" not in text
    for shown in ("/classify", "/classify_batch", "/complete", "/metadata", "/model_card"):
        assert shown in text, shown
    for model in ("ClassifyAnswer", "BatchAnswer", "ErrorAnswer", "Metadata"):
        assert model in text, model


@pytest.mark.parametrize(
    "endpoint, files, data, headers, status, problem",
    [
        ("classify", [("image", ("x.png", b"", "image/png"))], {}, {}, 400, "empty"),
        ("classify", [("image", ("x.png", b"this is not an image", "image/png"))], {}, {}, 400, "not_an_image"),
        (
            "classify",
            [("image", ("x.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "image/png"))],
            {},
            {},
            400,
            "truncated or damaged",
        ),
        (
            "classify",
            [("img", ("x.png", b"\x89PNG\r\n\x1a\n\x00binary\xff\xfe", "image/png"))],
            {},
            {},
            400,
            "unexpected form field 'img'",
        ),
        ("classify", None, {"image": "hello"}, {}, 400, "must be a file upload"),
        ("classify", None, None, {"content-type": "application/json"}, 400, "image"),
        ("classify", None, None, {"content-type": "multipart/form-data; boundary=zz"}, 400, "malformed multipart"),
        ("classify", None, None, {}, 400, "image"),
        ("classify", [("image", ("big.png", b"\0" * (MAX_BYTES + 1), "image/png"))], {}, {}, 413, "payload_too_large"),
        ("complete", "IMAGE", {"keep_fraction": "7"}, {}, 400, "keep_fraction"),
        ("complete", "IMAGE", {"n": "1000000"}, {}, 400, '["n"]'),
        ("complete", "IMAGE", {"temperature": "0"}, {}, 400, "temperature"),
        ("complete", "IMAGE", {"top_k": "-1"}, {}, 400, "top_k"),
        ("complete", "IMAGE", {"seed": "abc"}, {}, 400, "seed"),
        ("classify_batch", "MANY", {}, {}, 400, "too_many_images"),
    ],
)
def test_bad_requests_get_a_4xx_json_error_naming_the_problem(
    served, images, endpoint, files, data, headers, status, problem
):
    if files == "IMAGE":
        files = [upload(images[0])]
    elif files == "MANY":
        files = [upload(images[0], "images")] * 65
    kwargs = {"files": files, "data": data, "headers": headers}
    if headers.get("content-type") == "application/json":
        kwargs = {"content": b'{"image": "x.png"}', "headers": headers}
    elif headers.get("content-type", "").startswith("multipart"):
        kwargs = {"content": b"junk", "headers": headers}
    r = httpx.post(f"{served}/{endpoint}", timeout=60, **{k: v for k, v in kwargs.items() if v is not None})
    assert r.status_code == status, r.text
    assert problem in r.text
    assert isinstance(r.json(), dict) and "error" in r.json()
    # Never a crashed worker: the next good request still works.
    ok = httpx.post(f"{served}/classify", files=[upload(images[0])], timeout=30)
    assert ok.status_code == 200


def noise_png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def counters(url: str) -> dict[str, float]:
    """tgm_bits_per_pixel_count and tgm_atypical_images_total on BentoML's /metrics (0 before the first)."""
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    found = {name: 0.0 for name in ("tgm_bits_per_pixel_count", "tgm_atypical_images_total")}
    for line in lines:
        name, _, value = line.rpartition(" ")
        if name.split("{")[0] in found:
            found[name.split("{")[0]] += float(value)
    return found


def test_typicality_is_answered_and_counted_on_metrics(served, images):
    before = counters(served)
    noise = httpx.post(f"{served}/classify", files=[("image", ("n.png", noise_png(), "image/png"))], timeout=30)
    assert noise.status_code == 200 and noise.json()["typical"] is False  # answered, flagged
    r = httpx.post(f"{served}/classify_batch", files=[upload(p, "images") for p in images[:4]], timeout=30)
    results = r.json()["results"]
    assert all(isinstance(a["bits_per_pixel"], float) for a in results)
    after = counters(served)
    # This test's five images, whatever earlier tests counted: each scored, each atypical one counted once.
    assert after["tgm_bits_per_pixel_count"] - before["tgm_bits_per_pixel_count"] == 5
    atypical = 1 + sum(a["typical"] is False for a in results)
    assert after["tgm_atypical_images_total"] - before["tgm_atypical_images_total"] == atypical


def test_oversized_headers_get_a_431(served, images):
    big = {"X-Padding": "a" * 100_000}
    r = httpx.post(f"{served}/classify", files=[upload(images[0])], headers=big, timeout=30)
    assert r.status_code == 431 and r.json()["error"] == "headers_too_large"
    assert httpx.get(f"{served}/metadata", headers={"X-Padding": "a" * 1000}, timeout=10).status_code == 200


def test_a_decompression_bomb_is_refused_before_decoding(served):
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, format="PNG")  # 64 Mpx, compresses to a few kB
    r = httpx.post(f"{served}/classify", files=[("image", ("bomb.png", buf.getvalue(), "image/png"))], timeout=60)
    assert r.status_code == 400 and "too_large" in r.text


def test_the_bento_carries_the_tested_environment(built_project):
    """Every package the Bento installs is pinned, at the version constraints.txt says the tests ran with."""
    import bentoml
    from conftest import ROOT

    from tgm.bento_env import canonical, pins

    bento = bentoml.bentos.get(json.loads((built_project / "reports/package.json").read_text())["bento_tag"])
    text = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("#", "-"))]
    assert all("==" in line for line in lines), [line for line in lines if "==" not in line]
    installed = {canonical(n): v for n, v in (line.split("==", 1) for line in lines)}
    tested = pins(ROOT / "constraints.txt")
    assert {"torch", "numpy", "pillow", "fastapi", "safetensors", "pandera"} <= set(installed)
    assert {n: v for n, v in installed.items() if tested.get(n) != v} == {}


def test_the_bento_serves_outside_the_repo_with_its_own_model_and_an_api_key(built_project, tmp_path, images):
    bento = json.loads((built_project / "reports/package.json").read_text())
    proc, url = start_server([bento["bento_tag"]], tmp_path, {"TGM_API_KEY": "s3cret", "TGM_REFUSE_ATYPICAL": "1"})
    try:
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200  # health checks need no key
        assert httpx.get(f"{url}/metadata", timeout=10).status_code == 401
        wrong = httpx.post(
            f"{url}/classify", files=[upload(images[0])], timeout=30, headers={"Authorization": "Bearer wrong"}
        )
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
        key = {"Authorization": "Bearer s3cret"}
        meta = httpx.get(f"{url}/metadata", headers=key, timeout=10)
        assert meta.status_code == 200 and meta.json()["model"] == bento["model_tag"]
        assert meta.json()["task"]["source"] == "builtin:digits"
        # The model card travels inside the model: the same page package wrote into reports/.
        assert httpx.get(f"{url}/model_card", timeout=10).status_code == 401
        card = httpx.get(f"{url}/model_card", headers=key, timeout=10)
        assert card.status_code == 200 and card.headers["content-type"].startswith("text/markdown")
        assert card.text == (built_project / "reports/model_card.md").read_text()
        assert card.text.startswith("---\nlibrary_name: t-gm\npipeline_tag: image-classification\n")
        assert f"\n---\n\n# Model card: `{bento['model_tag']}`" in card.text
        typical = next(
            p
            for p in images
            if expected(Reference(built_project / "models/classifier", built_project / "reports/typicality.json"), p)[
                "typical"
            ]
        )
        r = httpx.post(f"{url}/classify", files=[upload(typical)], headers=key, timeout=30)
        assert r.status_code == 200 and r.json()["typical"] is True, r.text
        # TGM_REFUSE_ATYPICAL=1: an image unlike the training data is refused, naming why, not classified.
        files = [
            ("images", ("a.png", typical.read_bytes(), "image/png")),
            ("images", ("n.png", noise_png(), "image/png")),
        ]
        refused = httpx.post(f"{url}/classify_batch", files=files, headers=key, timeout=30)
        assert refused.status_code == 422 and refused.json()["error"] == "atypical_image"
        assert "images[1]" in refused.json()["detail"] and "images[0]" not in refused.json()["detail"]
        assert httpx.get(f"{url}/metadata", headers=key, timeout=10).json()["typicality"]["refuse_atypical"] is True
    finally:
        local_server.stop(proc)
