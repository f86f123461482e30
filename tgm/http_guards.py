"""What stands between the network and the T-GM service: request-size limit, optional API key, and multipart
parsing that answers client mistakes with 400s.

- LimitsAndAuth (an ASGI middleware): request headers over `max_header_bytes` in all are a 431 (uvicorn's
  httptools parser sets no limit of its own), a body over `max_bytes` is a 413, by its Content-Length or, for a
  streamed body, as soon as the count passes the limit. With TGM_API_KEY set, every path but the health
  checks needs `Authorization: Bearer <key>` (compared in constant time), else 401.
- strict_multipart(): BentoML 1.4's multipart parser answers three client mistakes with a 500 (a malformed
  body, a file under an unknown field name, a text value where a file belongs, which it would even try to
  download as a URL). The replacement raises pydantic validation errors, which BentoML turns into 400s in
  its usual {"error", "detail"} shape. It replaces a private method, hence `bentoml<1.5` in pyproject.toml;
  tests/test_service.py fails loudly if a BentoML update changes that method's contract.
"""

from __future__ import annotations

import hmac
import json
import os
import typing as t

HEALTH_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})


class _BodyTooLarge(Exception):
    pass


async def json_reply(send, status: int, body: dict, headers: tuple = ()) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


class LimitsAndAuth:
    def __init__(self, app, max_bytes: int, max_header_bytes: int = 64 * 1024, key_env: str = "TGM_API_KEY") -> None:
        self.app = app
        self.max_bytes, self.max_header_bytes = max_bytes, max_header_bytes
        key = os.environ.get(key_env, "")
        self.key = key.encode() if key else None  # read in each worker process when its app is built

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > self.max_header_bytes:
            detail = f"the request headers are {header_bytes} bytes, over the limit of {self.max_header_bytes}"
            return await json_reply(send, 431, {"error": "headers_too_large", "detail": detail})
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in HEALTH_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return await json_reply(
                    send,
                    401,
                    {"error": "unauthorized", "detail": "send the header 'Authorization: Bearer <key>'"},
                    ((b"www-authenticate", b"Bearer"),),
                )
        too_large = {"error": "payload_too_large", "detail": f"the request body is over {self.max_bytes} bytes"}
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await json_reply(send, 400, {"error": "bad_request", "detail": "invalid Content-Length"})
            if int(length) > self.max_bytes:
                return await json_reply(send, 413, too_large)

        seen, tripped, started = 0, False, False

        async def counting_receive():
            nonlocal seen, tripped
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    tripped = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            # BentoML turns the exception above into a 500 of its own; the client gets the 413 instead.
            nonlocal started
            if tripped:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await json_reply(send, 413, too_large)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await json_reply(send, 413, too_large)


def strict_multipart() -> None:
    from _bentoml_impl import serde
    from _bentoml_sdk.typing_utils import is_list_type, is_union_type
    from pydantic_core import PydanticCustomError, ValidationError
    from starlette.datastructures import UploadFile

    def invalid(loc: tuple, kind: str, message: str) -> ValidationError:
        return ValidationError.from_exception_data(
            "Input", [{"type": PydanticCustomError(kind, message), "loc": loc, "input": None}]
        )

    async def parse_request(self, request, cls):
        try:
            form = await request.form()
        except Exception as exc:  # noqa: BLE001 - starlette's HTTPException / MultiPartException for a broken body
            raise invalid((), "multipart_invalid", f"malformed multipart body: {getattr(exc, 'detail', exc)}") from None
        data: dict[str, t.Any] = {}
        for name in form:
            values = form.getlist(name)
            if name not in cls.model_fields:
                raise invalid(
                    (name,),
                    "unexpected_field",
                    f"unexpected form field {name!r}; this endpoint takes {sorted(cls.model_fields)}",
                )
            if name in cls.multipart_fields:
                if not all(isinstance(v, UploadFile) for v in values):
                    raise invalid((name,), "file_expected", f"field {name!r} must be a file upload")
                annotation = cls.model_fields[name].annotation
                if is_union_type(annotation):
                    annotation = t.get_args(annotation)[0]
                data[name] = values if is_list_type(annotation) else values[0]
            else:
                value = values[0]
                if isinstance(value, UploadFile):
                    raise invalid((name,), "value_expected", f"field {name!r} must be a form value, not a file")
                try:
                    data[name] = json.loads(value)
                except ValueError:
                    data[name] = value
        return cls.model_validate(data)

    serde.MultipartSerde.parse_request = parse_request
