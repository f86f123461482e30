"""The shapes of the service's answers, as pydantic models: the OpenAPI page documents each endpoint's answer and
its errors from these, and the service tests validate every answer they get against them. The service itself
still writes its JSON directly (a model instance per answer would cost a validation per request)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ClassifyAnswer(BaseModel):
    label: str = Field(description="the most probable class")
    model: str = Field(description="the BentoML tag of the model that answered")
    probabilities: dict[str, float] = Field(description="every class's probability, to 6 decimals")
    bits_per_pixel: float = Field(description="the image's next-pixel cross-entropy under the model, in bits")
    typical: bool | None = Field(
        description="whether bits_per_pixel is within the model's typical range (null: a model without one)"
    )


class BatchAnswer(BaseModel):
    results: list[ClassifyAnswer] = Field(description="one answer per image, in the order they were sent")


class ErrorAnswer(BaseModel):
    error: str = Field(description="a code for programs, e.g. not_an_image, payload_too_large, overloaded")
    detail: str = Field(description="a sentence for people, naming the field and the problem")


class Metadata(BaseModel):
    model: str
    task: dict[str, Any] | None = Field(description="id, data source and class names of the model's task")
    classes: list[str]
    image_size: int
    palette_size: int
    color_mode: str
    metrics: dict[str, Any] | None = Field(description="the test metrics the model was gated on")
    params: dict[str, Any] | None = Field(description="the params of the stages that made the model")
    git_commit: str | None
    data_hash: str | None = Field(description="DVC's hash of the prepared data it was trained on")
    limits: dict[str, Any]
    batching: dict[str, Any]
    typicality: dict[str, Any]


# The errors each endpoint can answer with (tgm.service, tgm.http_guards), all in ErrorAnswer's shape.
ERRORS = {
    "400": "a bad request: an empty, corrupt or oversized image, a format not accepted, a missing or unknown field",
    "401": "TGM_API_KEY is set and the request has no `Authorization: Bearer <key>`, or another key",
    "413": "a body over TGM_MAX_REQUEST_BYTES (by its Content-Length, or as it streams)",
    "422": "an atypical image refused (TGM_REFUSE_ATYPICAL=1)",
    "431": "request headers over TGM_MAX_HEADER_BYTES",
    "503": "overloaded: the request waited in the batching queue longer than TGM_MAX_LATENCY_MS",
}
