"""After `make run` on CI's clean clone: `bentoml serve` in the project serves the champion and classifies a test
image the way the in-process classifier does. Run with the project's venv from the repository root."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support import local_server  # noqa: E402


def main() -> int:
    registry = json.loads((ROOT / "registry/champions.json").read_text())
    champion = registry["tasks"][registry["latest"]]["champion"]["model"]
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
