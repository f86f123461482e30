"""The BentoML service: TGMClassifier answers /classify, /classify_batch, /complete and GET /metadata.

It decodes and checks uploads, turns images into tokens with the same function `prepare` used, and runs the
model in the same process. Concurrent classifications share one forward pass (tgm.batching: at most
TGM_MAX_BATCH_SIZE images; a request queued longer than TGM_MAX_LATENCY_MS gets a 503). Torch work runs one call
at a time, in a worker thread, so the event loop keeps taking requests meanwhile. More throughput on a bigger
machine: TGM_WORKERS processes (default 1), each a full copy of the model with TGM_TORCH_THREADS threads.

Which model: a built Bento serves the version it was built with (a Bento argument set by `tgm package`);
`bentoml serve` in the project root serves TGM_MODEL, else the champion (GTO's tags: of TGM_TASK, else of the
task promoted last; imported into the BentoML store from its DVC-tracked export if missing, so a fresh clone
serves it with no retraining), else the newest `tgm-classifier`. GET /model_card is the model's card.

Limits (environment, read at start): TGM_MAX_REQUEST_BYTES (default 10 MiB), TGM_MAX_HEADER_BYTES (all
request headers together, default 64 KiB), TGM_MAX_PIXELS (decompression
bombs, default 40 Mpx), TGM_MAX_IMAGES (per /classify_batch, default 64), TGM_MAX_SAMPLES (per /complete,
default 16). Every client mistake is a 4xx with a JSON body naming the problem.
With TGM_API_KEY set, every endpoint but the health checks needs `Authorization: Bearer <key>`.

Typicality: each answer carries the image's bits per pixel under the model's next-pixel head (from the same
forward pass) and whether that is within the model's typical range (tgm.typicality); /metrics counts them. With
TGM_REFUSE_ATYPICAL=1 an atypical image is refused with a 422 instead of classified.
"""

from __future__ import annotations

import os
import typing as t
from pathlib import Path

import anyio.to_thread
import bentoml
import numpy as np
from bentoml.validators import ContentType
from fastapi import FastAPI
from PIL import Image
from prometheus_client import Counter, Histogram
from pydantic import Field
from starlette.responses import JSONResponse, Response

from tgm.answers import ERRORS, BatchAnswer, ClassifyAnswer, ErrorAnswer, Metadata
from tgm.batching import MicroBatcher, Overloaded
from tgm.http_guards import LimitsAndAuth, strict_multipart
from tgm.images import InvalidImage, open_image
from tgm.inference import answer
from tgm.model import load_config
from tgm.model_card import FILE as CARD_FILE
from tgm.preprocess import PreprocessSpec, completion_tiles, image_to_tokens
from tgm.typicality import FILE as TYPICALITY_FILE
from tgm.typicality import Typicality


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"{name}={value!r} is not an integer") from None


def _model_to_serve() -> str:
    chosen = getattr(bentoml.use_arguments(), "model", None) or os.environ.get("TGM_MODEL")
    if chosen:
        return chosen
    from tgm.registry import Champions, RegistryError, served_model

    task = os.environ.get("TGM_TASK") or None
    try:
        served = served_model(".", task)
        if task is not None and served is None:
            known = ", ".join(Champions().tasks()) or "none"
            raise SystemExit(f"TGM_TASK={task!r} has no champion here (tasks: {known}; `git fetch --tags` gets more)")
    except RegistryError as exc:
        raise SystemExit(f"TGM_TASK={task!r}: {exc}" if task else str(exc)) from None
    return served or "tgm-classifier:latest"


MODEL = _model_to_serve()
MAX_BATCH_SIZE = _env_int("TGM_MAX_BATCH_SIZE", 32)
MAX_LATENCY_MS = _env_int("TGM_MAX_LATENCY_MS", 5000)
MAX_REQUEST_BYTES = _env_int("TGM_MAX_REQUEST_BYTES", 10 * 1024 * 1024)
MAX_HEADER_BYTES = _env_int("TGM_MAX_HEADER_BYTES", 64 * 1024)
MAX_PIXELS = _env_int("TGM_MAX_PIXELS", 40_000_000)
MAX_IMAGES = _env_int("TGM_MAX_IMAGES", 64)
MAX_SAMPLES = _env_int("TGM_MAX_SAMPLES", 16)
WORKERS = _env_int("TGM_WORKERS", 1)
REFUSE_ATYPICAL = _env_int("TGM_REFUSE_ATYPICAL", 0) == 1
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
for _name, _value in (
    ("TGM_MAX_BATCH_SIZE", MAX_BATCH_SIZE),
    ("TGM_MAX_LATENCY_MS", MAX_LATENCY_MS),
    ("TGM_WORKERS", WORKERS),
):
    if _value < 1:
        raise SystemExit(f"{_name}={_value} must be at least 1")

strict_multipart()
# Prometheus, on BentoML's /metrics: how full the batches are under the traffic this server sees.
BATCH_SIZES = Histogram(
    "tgm_batch_size", "images per forward pass of /classify and /classify_batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
BITS_PER_PIXEL = Histogram(
    "tgm_bits_per_pixel",
    "bits per pixel of each classified image under the model's next-pixel head (typicality)",
    buckets=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0),
)
ATYPICAL = Counter("tgm_atypical_images", "classified images above the model's typical bits per pixel")


class BadRequest(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class Atypical(BadRequest):
    """An image outside the model's typical range, refused (TGM_REFUSE_ATYPICAL=1) rather than classified."""


def error_response(exc: BadRequest | Overloaded) -> JSONResponse:
    if isinstance(exc, Overloaded):
        return JSONResponse({"error": "overloaded", "detail": str(exc)}, status_code=503)
    return JSONResponse(
        {"error": exc.reason, "detail": exc.detail}, status_code=422 if isinstance(exc, Atypical) else 400
    )


def decode(path: Path, field: str) -> Image.Image:
    """Open an upload in full, or raise BadRequest naming the field and what is wrong with it."""
    try:
        image = open_image(path, max_pixels=MAX_PIXELS)
    except InvalidImage as exc:
        raise BadRequest(exc.reason, f"{field}: {exc}") from None
    if image.format not in ACCEPTED_FORMATS:
        raise BadRequest(
            "format_not_accepted",
            f"{field}: {image.format} images are not accepted (send {', '.join(ACCEPTED_FORMATS)})",
        )
    return image


http = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # BentoML's own docs: / and /docs.json


@bentoml.service(workers=WORKERS, traffic={"timeout": 120})
@bentoml.asgi_app(http, path="/")
class TGMClassifier:
    bento_model = bentoml.models.BentoModel(MODEL)

    def __init__(self) -> None:
        import torch

        from tgm.model import load_model
        from tgm.typicality import classify_and_score

        path = self.bento_model.path
        torch.set_num_threads(_env_int("TGM_TORCH_THREADS", torch.get_num_threads()))
        self.model = load_model(path).eval()
        self.torch_lane = anyio.CapacityLimiter(1)  # one torch call at a time: it uses every core by itself
        self.batcher = MicroBatcher(
            # One row per image: its class probabilities, then its bits per pixel.
            lambda tokens: np.column_stack(classify_and_score(self.model, tokens)),
            MAX_BATCH_SIZE,
            MAX_LATENCY_MS,
            self.torch_lane,
            BATCH_SIZES.observe,
        )
        self.spec = PreprocessSpec.load(path)
        self.classes: list[str] = load_config(path)["classes"]
        # Models packaged before typicality existed answer without a verdict (typical: null).
        calibration = Path(path) / TYPICALITY_FILE
        self.typicality = Typicality.load(calibration) if calibration.exists() else None
        info = self.bento_model.info.metadata or {}
        card = Path(path) / CARD_FILE
        self.card = card.read_text() if card.exists() else None  # models packaged before cards existed have none
        self.about = {
            "model": str(self.bento_model.tag),
            "task": info.get("task"),
            "classes": self.classes,
            "image_size": self.spec.image_size,
            "palette_size": self.spec.palette_size,
            "color_mode": self.spec.color_mode,
            "metrics": info.get("metrics"),
            "params": info.get("params"),
            "git_commit": info.get("git_commit"),
            "data_hash": info.get("data_hash"),
            "limits": {
                "max_request_bytes": MAX_REQUEST_BYTES,
                "max_header_bytes": MAX_HEADER_BYTES,
                "max_pixels": MAX_PIXELS,
                "max_images": MAX_IMAGES,
                "max_samples": MAX_SAMPLES,
                "accepted_formats": list(ACCEPTED_FORMATS),
            },
            "batching": {"max_batch_size": MAX_BATCH_SIZE, "max_latency_ms": MAX_LATENCY_MS},
            "typicality": {
                **(self.typicality.describe() if self.typicality else {"threshold_bpp": None}),
                "refuse_atypical": REFUSE_ATYPICAL,
            },
        }

    def _sample(self, prefix: np.ndarray, n: int, seed: int, temperature: float, top_k: int) -> np.ndarray:
        """n completions (n, T) of one token prefix (P,), sampled with the KV cache."""
        import torch

        batch = torch.from_numpy(np.repeat(prefix[None, :], n, axis=0).astype(np.int64))
        gen = torch.Generator().manual_seed(seed)
        return self.model.complete(batch, gen, temperature=temperature, top_k=top_k).numpy()

    async def _tokens(self, path: Path, field: str) -> np.ndarray:
        # Decoding and quantising are CPU work: off the event loop, which keeps accepting requests meanwhile.
        return await anyio.to_thread.run_sync(lambda: image_to_tokens(decode(path, field), self.spec))

    def _answer(self, row: np.ndarray) -> dict:
        """The answer for one image's row of the batcher: class probabilities, then bits per pixel."""
        bpp = float(row[-1])
        typical = bool(self.typicality.typical(bpp)) if self.typicality else None
        BITS_PER_PIXEL.observe(bpp)
        if typical is False:
            ATYPICAL.inc()
        return {
            **answer(self.classes, row[:-1], model=self.about["model"]),
            "bits_per_pixel": round(bpp, 4),
            "typical": typical,
        }

    def _refuse_atypical(self, answers: list[dict], fields: list[str]) -> None:
        if not REFUSE_ATYPICAL:
            return
        atypical = [(f, a["bits_per_pixel"]) for f, a in zip(fields, answers) if a["typical"] is False]
        if atypical:
            limit = self.typicality.threshold
            raise Atypical(
                "atypical_image",
                "; ".join(f"{f}: {b:.3f} bits per pixel, above the typical {limit:.3f}" for f, b in atypical)
                + " (unlike the images the model was trained on; TGM_REFUSE_ATYPICAL=1 refuses these)",
            )

    @http.get("/metadata", response_model=Metadata, responses={"401": {"model": ErrorAnswer}})
    def metadata(self) -> dict:
        """Which model answers: tag, classes, image and palette size, metrics, params, git commit, data hash."""
        return self.about

    @http.get(
        "/model_card",
        response_class=Response,
        responses={
            "200": {"content": {"text/markdown": {}}, "description": "the model card"},
            "404": {"model": ErrorAnswer, "description": "a model packaged before model cards existed"},
            "401": {"model": ErrorAnswer},
        },
    )
    def model_card(self) -> Response:
        """The model card (markdown): intended use, training data, metrics, label efficiency, limits, provenance."""
        if self.card is None:
            return JSONResponse({"error": "no_model_card", "detail": f"{self.about['model']} has none"}, 404)
        return Response(self.card, media_type="text/markdown; charset=utf-8")

    @bentoml.api
    async def classify(self, image: Path) -> ClassifyAnswer:
        """Classify one image (multipart field `image`): its label, every class's probability, its bits per pixel
        and whether it is typical of the training images.

        Concurrent requests are batched into one forward pass. Example:
        `curl -F image=@digit.png http://localhost:3000/classify`"""
        try:
            rows = await self.batcher((await self._tokens(image, "image"))[None, :])
            result = self._answer(rows[0])
            self._refuse_atypical([result], ["image"])
        except (BadRequest, Overloaded) as exc:
            return error_response(exc)
        # A Response goes out as it is; a dict would cost a JSON-schema walk and a chunked body per request.
        return JSONResponse(result)

    @bentoml.api
    async def classify_batch(self, images: list[Path]) -> BatchAnswer:
        """Classify several images in one request (repeat the multipart field `images`, at most TGM_MAX_IMAGES).

        Example: `curl -F images=@a.png -F images=@b.png http://localhost:3000/classify_batch`"""
        if not 1 <= len(images) <= MAX_IMAGES:
            return error_response(
                BadRequest("too_many_images", f"images: send 1 to {MAX_IMAGES} files, got {len(images)}")
            )
        try:
            tokens = np.stack([await self._tokens(p, f"images[{i}]") for i, p in enumerate(images)])
            results = [self._answer(row) for row in await self.batcher(tokens)]
            self._refuse_atypical(results, [f"images[{i}]" for i in range(len(results))])
        except (BadRequest, Overloaded) as exc:
            return error_response(exc)
        return JSONResponse({"results": results})

    @bentoml.api
    async def complete(
        self,
        image: Path,
        keep_fraction: t.Annotated[
            float,
            Field(
                ge=0.0, le=1.0, description="share of the rows kept from the top", json_schema_extra={"example": 0.5}
            ),
        ] = 0.5,
        n: t.Annotated[
            int, Field(ge=1, le=MAX_SAMPLES, description="completions to sample", json_schema_extra={"example": 4})
        ] = 4,
        seed: t.Annotated[int, Field(ge=0, le=2**63 - 1, json_schema_extra={"example": 0})] = 0,
        temperature: t.Annotated[float, Field(ge=0.01, le=10.0, json_schema_extra={"example": 1.0})] = 1.0,
        top_k: t.Annotated[
            int, Field(ge=0, le=4096, description="0: the whole palette", json_schema_extra={"example": 0})
        ] = 0,
    ) -> t.Annotated[Image.Image, ContentType("image/png")]:
        """Keep the top `keep_fraction` of the image's rows and let the model sample the rest, `n` times.

        Returns a PNG: the original (as the model sees it), the kept part, then the n completions, side by side,
        one-pixel white gaps between them, each pixel enlarged to a square of 64 // image_size pixels.
        Example: `curl -F image=@digit.png -F keep_fraction=0.5 -F n=4 http://localhost:3000/complete -o out.png`"""
        try:
            tokens = await self._tokens(image, "image")
        except BadRequest as exc:
            return error_response(exc)
        size = self.spec.image_size
        keep = round(keep_fraction * size) * size  # whole rows
        samples = await anyio.to_thread.run_sync(
            lambda: self._sample(tokens[:keep], n=n, seed=seed, temperature=temperature, top_k=top_k),
            limiter=self.torch_lane,
        )
        tiles = completion_tiles(tokens, samples, keep, self.spec)
        gap = np.full((size, 1, tiles[0].shape[2]), 255, dtype=np.uint8)
        row = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
        grid = Image.fromarray(row.squeeze(-1) if row.shape[2] == 1 else row)
        scale = max(1, 64 // size)  # small images stay visible; nearest keeps the pixels exact
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
        grid.format = "PNG"  # BentoML writes a returned image in its own format
        return grid


TGMClassifier.add_asgi_middleware(LimitsAndAuth, max_bytes=MAX_REQUEST_BYTES, max_header_bytes=MAX_HEADER_BYTES)


def _about_page() -> tuple[str, str]:
    """(version, description) of the OpenAPI page: T-GM's own words, its version and the model it serves."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tgm = version("tgm")
    except PackageNotFoundError:
        tgm = "unknown"
    info = bentoml.models.get(MODEL).info
    task = (info.metadata or {}).get("task") or {}
    classes = ", ".join(f"`{c}`" for c in task.get("classes", [])) or "its classes"
    text = (
        f"T-GM {tgm} serves **`{info.tag}`**, a GPT-style transformer pretrained to predict the next pixel, then "
        f"fine-tuned as a classifier of {classes} (task `{task.get('id', '?')}`, data `{task.get('source', '?')}`).\n\n"
        "`POST /classify` and `/classify_batch` answer each image with its label, every class's probability, "
        "its bits per pixel and whether it is typical of the training images; `POST /complete` samples the rest "
        "of an image; `GET /metadata` and `GET /model_card` describe the model. Every error is JSON, "
        '`{"error": code, "detail": sentence}`: ' + "; ".join(f"{code} {why}" for code, why in ERRORS.items()) + "."
    )
    return f"{tgm} ({info.tag})", text


class _DocumentedService(type(TGMClassifier)):
    """TGMClassifier with its OpenAPI page (/ and /docs.json) in T-GM's words: BentoML's default is a placeholder
    README, and a version only for a built Bento. Every API also documents its error answers."""

    __slots__ = ()  # the same layout as BentoML's service, so the instance can take this class

    @property
    def openapi_spec(self):
        import attrs
        from bentoml._internal.service.openapi.specification import Info, MediaType, Reference
        from bentoml._internal.service.openapi.specification import Response as Documented

        version, description = _about_page()
        info = Info(title="T-GM classifier", description=description, version=version)
        spec = attrs.evolve(super().openapi_spec, info=info)  # the spec is a frozen attrs class
        schemas = spec.components["schemas"] if isinstance(spec.components, dict) else spec.components.schemas
        schemas["ErrorAnswer"] = ErrorAnswer.model_json_schema()
        error = MediaType(schema=Reference("#/components/schemas/ErrorAnswer"))
        for route in ("/classify", "/classify_batch", "/complete"):
            responses = spec.paths[route].post["responses"]
            for code, why in ERRORS.items():  # BentoML keys its own (400, 404, 500) by number
                responses[int(code)] = Documented(description=why, content={"application/json": error})
        return spec


TGMClassifier.__class__ = _DocumentedService
