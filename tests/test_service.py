"""`bentoml serve` in the project root answers /classify over real HTTP, as the in-process model would."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tgm.inference import Classifier

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(digits_project):
    port = free_port()
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    proc = subprocess.Popen([bentoml, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=digits_project,
                            env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"bentoml serve exited early:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("bentoml serve did not become ready within 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_classify_a_real_image_over_http(served, digits_project):
    classifier = Classifier(digits_project / "models/classifier")
    images = sorted((digits_project / "data/raw/images").rglob("*.png"))[::300][:5]
    for path in images:
        with open(path, "rb") as f:
            r = httpx.post(f"{served}/classify", files={"image": (path.name, f, "image/png")}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        with Image.open(path) as im:
            expected = classifier.classify([im])[0]
        assert body["label"] == expected["label"]
        assert set(body["probabilities"]) == set(classifier.classes)
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
        for c, prob in expected["probabilities"].items():
            assert body["probabilities"][c] == pytest.approx(prob, abs=1e-5)


@pytest.mark.parametrize("payload, problem", [
    (b"this is not an image", "not an image format"),
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x08", "truncated or damaged"),
])
def test_a_bad_upload_is_a_400_that_names_the_problem(served, payload, problem):
    r = httpx.post(f"{served}/classify", files={"image": ("x.png", payload, "image/png")}, timeout=30)
    assert r.status_code == 400, r.text
    assert problem in r.text
