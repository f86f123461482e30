"""After `make run` on CI's clean clone: the run promoted its model (a GTO champion tag on its promotion commit),
and `bentoml serve` in the project serves that champion and classifies a test image. Run with the project's
venv from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support import local_server  # noqa: E402


def main() -> int:
    promotion = json.loads((ROOT / "reports/promotion.json").read_text())
    champion = promotion["model"]
    tag = f"{promotion['task']}#champion#1"
    tagged = subprocess.run(["git", "rev-list", "-n", "1", tag], cwd=ROOT, capture_output=True, text=True)
    if tagged.stdout.strip() != promotion["commit"]:
        print(f"serve check failed: {promotion} ({tag}: {tagged.stdout.strip() or tagged.stderr.strip()})")
        return 1
    image = sorted((ROOT / "data/raw/images").rglob("*.png"))[0]
    server, url, log = local_server.start([], ROOT)
    try:
        meta = httpx.get(f"{url}/metadata", timeout=10).json()
        answer = httpx.post(
            f"{url}/classify", files=[("image", (image.name, image.read_bytes(), "image/png"))], timeout=30
        )
    finally:
        local_server.stop(server)
    if meta["model"] != champion or answer.status_code != 200 or answer.json()["label"] not in meta["classes"]:
        print(f"serve check failed: serving {meta['model']} (champion {champion}): {answer.text}\nlog: {log}")
        return 1
    print(f"serve check: {champion} classified {image.relative_to(ROOT)} as {answer.json()['label']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
