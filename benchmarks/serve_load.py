"""Load on the served model: images/s and latency percentiles at several concurrencies, next to the
in-process batched throughput of the same model measured in the same run (the ceiling, before and after).

    python benchmarks/serve_load.py [--requests 300] [--concurrency 1,8,32] [--model tgm-classifier:latest]

Starts `bentoml serve` on 127.0.0.1 (a free port) for the given model, sends a bounded number of /classify
requests per concurrency level from an asyncio httpx client, and stops the server. The ceiling decodes,
tokenises and classifies the same images in-process in batches of TGM_MAX_BATCH_SIZE (default 32). Client,
server and ceiling share this machine's cores, so the served figures carry the client's cost as well.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from tgm import local_server  # noqa: E402


def ceiling(model_dir: Path, paths: list[Path], batch: int, seconds: float = 3.0) -> float:
    from tgm.images import open_image
    from tgm.inference import Classifier, predict_proba

    clf = Classifier(model_dir)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(paths), batch):
            tokens = np.stack([clf.tokens(open_image(p)) for p in paths[i:i + batch]])
            predict_proba(clf.model, tokens)
            done += len(tokens)
    return done / (time.perf_counter() - start)


async def load(url: str, payloads: list[bytes], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies, errors = [], {}

    async def one(client: httpx.AsyncClient, body: bytes) -> None:
        nonlocal errors
        async with gate:
            t0 = time.perf_counter()
            r = await client.post(f"{url}/classify", files={"image": ("x.png", body, "image/png")})
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                key = f"{r.status_code} {r.text[:120]}"
                errors[key] = errors.get(key, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await one(client, payloads[0])  # warm the connection and the server
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one(client, b) for b in payloads))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return {"concurrency": concurrency, "images_per_s": len(payloads) / wall, "p50_ms": q[49] * 1e3,
            "p95_ms": q[94] * 1e3, "p99_ms": q[98] * 1e3, "errors": sum(errors.values()), "error_kinds": errors,
            "requests": len(payloads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tgm-classifier:latest")
    ap.add_argument("--images", default="data/raw/images", help="folder of images to send")
    ap.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32")
    args = ap.parse_args()
    import bentoml

    root = Path(__file__).resolve().parents[1]
    ref = bentoml.models.get(args.model)
    paths = sorted(p for p in Path(args.images).rglob("*") if p.is_file())[:: 7][:args.requests]
    if not paths:
        sys.exit(f"serve_load: no images under {args.images}")
    payloads = [paths[i % len(paths)].read_bytes() for i in range(args.requests)]
    batch = int(os.environ.get("TGM_MAX_BATCH_SIZE", "32"))
    # On a shared machine one short measurement of the ceiling swings by a third from run to run: take it
    # before and after the load and compare with their mean.
    before = ceiling(Path(ref.path), paths, batch)
    print(f"model {ref.tag}; {args.requests} requests per level; in-process batched ceiling {before:,.0f} images/s")
    proc, url, log = local_server.start([], root, {"TGM_MODEL": str(ref.tag)})
    print(f"server log: {log}")
    rows = []
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            rows.append(asyncio.run(load(url, payloads, c)))
    finally:
        local_server.stop(proc)
    after = ceiling(Path(ref.path), paths, batch)
    best = (before + after) / 2
    print(f"ceiling after the load {after:,.0f} images/s; compared with their mean, {best:,.0f} images/s")
    print(f"{'conc':>5}{'images/s':>10}{'of ceiling':>12}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for r in rows:
        print(f"{r['concurrency']:>5}{r['images_per_s']:>10.1f}{r['images_per_s'] / best:>12.1%}{r['p50_ms']:>9.1f}"
              f"{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8}")
    print(json.dumps({"model": str(ref.tag), "ceiling_images_per_s": best, "levels": rows}))


if __name__ == "__main__":
    main()
