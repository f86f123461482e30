"""Load on the served model: images/s and latency percentiles at several concurrencies, next to the
in-process batched throughput of the same model measured in the same run (the ceiling, before and after).

    python benchmarks/serve_load.py [--requests 300] [--concurrency 1,8,32] [--model tgm-classifier:latest]

Starts `bentoml serve` on 127.0.0.1 (a free port) for the given model, sends a bounded number of /classify
requests per concurrency level from an asyncio client (by default raw HTTP/1.1 on keep-alive connections, see
RawHTTP; --client httpx for a full client), and stops the server. The ceiling decodes,
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

from tests.support import local_server  # noqa: E402


def ceiling(model_dir: Path, paths: list[Path], batch: int, seconds: float = 3.0) -> float:
    from tests.support.classifier import Classifier
    from tgm.images import open_image
    from tgm.typicality import classify_and_score

    clf = Classifier(model_dir)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(paths), batch):
            tokens = np.stack([clf.tokens(open_image(p)) for p in paths[i : i + batch]])
            classify_and_score(clf.model, tokens)  # what the service computes: classes and bits per pixel
            done += len(tokens)
    return done / (time.perf_counter() - start)


def multipart(body: bytes, boundary: str = "tgm-load-boundary") -> tuple[bytes, str]:
    """A /classify form with one file field `image`, encoded once up front."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class RawHTTP:
    """One keep-alive HTTP/1.1 connection that sends pre-encoded POSTs and reads Content-Length bodies.

    A full client (httpx) spends about 3 ms of CPU per request here, on the same two cores as the server it
    measures; this one spends a tenth of that, so the figures describe the server more than the client."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while size := int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
                data += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load(
    url: str, payloads: list[bytes], concurrency: int, client: str = "raw", timeout_s: float = 120.0
) -> dict:
    """Send every payload to /classify, `concurrency` at a time; every answer must be a 200 with a label."""
    latencies, errors = [], {}
    host, port = url.removeprefix("http://").split(":")
    forms = [multipart(body) for body in payloads]

    def record(t0: float, status: int, text: str) -> None:
        latencies.append(time.perf_counter() - t0)
        if status != 200 or '"label"' not in text:
            key = f"{status} {text[:120]}"
            errors[key] = errors.get(key, 0) + 1

    async def raw_worker(todo) -> None:
        conn = RawHTTP(host, int(port))
        try:
            for form, content_type in todo:
                t0 = time.perf_counter()
                status, data = await asyncio.wait_for(conn.post("/classify", form, content_type), timeout_s)
                record(t0, status, data.decode(errors="replace"))
        finally:
            await conn.close()

    async def httpx_worker(todo, http: httpx.AsyncClient) -> None:
        for form, content_type in todo:
            t0 = time.perf_counter()
            r = await http.post(f"{url}/classify", content=form, headers={"content-type": content_type})
            record(t0, r.status_code, r.text)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:

        async def run(items: list, workers: int) -> float:
            todo, start = iter(items), time.perf_counter()  # one shared iterator: each item is sent once
            await asyncio.gather(
                *(raw_worker(todo) if client == "raw" else httpx_worker(todo, http) for _ in range(workers))
            )
            return time.perf_counter() - start

        await run(forms[:1], 1)  # warm the server
        latencies.clear()
        wall = await run(forms, concurrency)
    q = statistics.quantiles(latencies, n=100)
    return {
        "concurrency": concurrency,
        "client": client,
        "images_per_s": len(payloads) / wall,
        "p50_ms": q[49] * 1e3,
        "p95_ms": q[94] * 1e3,
        "p99_ms": q[98] * 1e3,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "requests": len(payloads),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tgm-classifier:latest")
    ap.add_argument("--images", default="data/raw/images", help="folder of images to send")
    ap.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="raw: pre-encoded requests on keep-alive connections (cheap); httpx: a full client",
    )
    args = ap.parse_args()
    import bentoml

    root = Path(__file__).resolve().parents[1]
    ref = bentoml.models.get(args.model)
    paths = sorted(p for p in Path(args.images).rglob("*") if p.is_file())[::7][: args.requests]
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
            rows.append(asyncio.run(load(url, payloads, c, args.client)))
    finally:
        local_server.stop(proc)
    after = ceiling(Path(ref.path), paths, batch)
    best = (before + after) / 2
    print(f"ceiling after the load {after:,.0f} images/s; compared with their mean, {best:,.0f} images/s")
    print(f"{'conc':>5}{'images/s':>10}{'of ceiling':>12}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for r in rows:
        print(
            f"{r['concurrency']:>5}{r['images_per_s']:>10.1f}{r['images_per_s'] / best:>12.1%}{r['p50_ms']:>9.1f}"
            f"{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8}"
        )
    print(json.dumps({"model": str(ref.tag), "ceiling_images_per_s": best, "levels": rows}))


if __name__ == "__main__":
    main()
