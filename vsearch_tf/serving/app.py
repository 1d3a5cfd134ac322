"""The HTTP API and web page of `vsearch serve` (FastAPI on uvicorn).

Every 4xx (and 5xx) body is one line of JSON, ``{"error": "..."}``; a bad request never stops the
server. Routes under ``/v1`` and ``/metrics`` need the API key when one is set; the page, its
files, ``/healthz`` and ``/readyz`` do not (the page asks for the key and sends it itself).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import ipaddress
import json
import logging
import logging.config
import math
import mimetypes
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.serving.service import Answer, BadRequest, Box, SearchService

log = logging.getLogger("vsearch_tf.serving")

STATIC = Path(__file__).with_name("static")
DEFAULT_TOP_K = 10
MAX_TOP_K = 100
# A phone photo is a few MB; base64 in JSON adds a third.
MAX_BODY_BYTES = 32 << 20
_JSON_FIELDS = ("image_b64", "bbox", "top_k")
_FORM_FIELDS = ("image", "bbox", "top_k")
# The page loads nothing from anywhere else: it works offline and cannot leak a query.
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)


@functools.lru_cache(maxsize=1 << 16)
def gallery_url(seller_img_id: str) -> str:
    return f"/v1/gallery/{quote(seller_img_id, safe='')}/image"


def _answer_json(answer: Answer, took_s: float) -> dict[str, Any]:
    snapshot = answer.snapshot
    results = [
        {
            "rank": rank,
            "product_id": str(snapshot.product_ids[row]),
            "seller_img_id": str(snapshot.seller_ids[row]),
            "score": round(float(score), 6),
            "image_url": gallery_url(str(snapshot.seller_ids[row])),
        }
        for rank, (row, score) in enumerate(zip(answer.rows, answer.scores), start=1)
    ]
    return {
        "results": results,
        "model_fingerprint": snapshot.fingerprint,
        "index_version": snapshot.version,
        "took_ms": round(took_s * 1000, 2),
    }


# ------------------------------------------------------------------------------ request parsing


def _box(values: Any) -> Box | None:
    """``[x, y, w, h]`` in pixels, finite, w and h > 0; ``None`` (whole image) when absent."""
    if values is None:
        return None
    numbers = (
        values
        if isinstance(values, list)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        else None
    )
    if numbers is None or len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
        raise BadRequest(f"bbox: expected four numbers x, y, w, h in pixels, got {values!r:.80}")
    if numbers[2] <= 0 or numbers[3] <= 0:
        raise BadRequest(f"bbox: width and height must be > 0, got {numbers}")
    return tuple(float(v) for v in numbers)  # type: ignore[return-value]


def _box_text(text: str | None) -> Box | None:
    if text is None or not text.strip():
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise BadRequest(f"bbox: expected x,y,w,h in pixels, got {text!r:.80}") from None
    return _box(values)


def _top_k(value: Any) -> int:
    if value is None:
        return DEFAULT_TOP_K
    try:
        k = int(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
    except ValueError:
        k = None
    if k is None or not 1 <= k <= MAX_TOP_K:
        raise BadRequest(f"top_k: expected an integer from 1 to {MAX_TOP_K}, got {value!r:.40}")
    return k


def _unknown(fields: Any, known: tuple[str, ...]) -> None:
    extra = sorted(set(fields) - set(known))
    if extra:
        raise BadRequest(f"unknown field {extra[0]!r:.40}; expected {', '.join(known)}")


def _from_json(body: bytes) -> tuple[bytes, Box | None, int]:
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise BadRequest(f"body is not valid JSON ({one_line(err)})") from None
    if not isinstance(payload, dict):
        raise BadRequest(
            'body must be a JSON object: {"image_b64": ..., "bbox": ..., "top_k": ...}'
        )
    _unknown(payload, _JSON_FIELDS)
    if not isinstance(payload.get("image_b64"), str):
        raise BadRequest("image_b64: required, the image file as a base64 string")
    try:
        image = base64.b64decode(payload["image_b64"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image_b64: not valid base64") from None
    return image, _box(payload.get("bbox")), _top_k(payload.get("top_k"))


async def _from_form(request: Request) -> tuple[bytes, Box | None, int]:
    async with request.form(max_files=1, max_fields=len(_FORM_FIELDS)) as form:
        _unknown(form.keys(), _FORM_FIELDS)
        upload, bbox, top_k = form.get("image"), form.get("bbox"), form.get("top_k")
        if not isinstance(upload, UploadFile):
            raise BadRequest("image: required, a file field of the multipart form")
        if not isinstance(bbox, str | None) or not isinstance(top_k, str | None):
            raise BadRequest("bbox and top_k must be text fields, not files")
        return await upload.read(), _box_text(bbox), _top_k(top_k)


async def _text_request(request: Request) -> tuple[str, int] | None:
    """``{"text": ..., "top_k": ...}`` (search by text), else None (an image request)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return None
    try:
        payload = json.loads(await request.body())
    except ValueError:
        return None  # _from_json reports it
    if not isinstance(payload, dict) or "text" not in payload:
        return None
    _unknown(payload, ("text", "top_k"))
    text = payload["text"]
    if not isinstance(text, str) or not text.strip() or len(text) > 1000:
        raise BadRequest("text: expected a non-empty string of at most 1000 characters")
    return text, _top_k(payload.get("top_k"))


async def _search_request(request: Request) -> tuple[bytes, Box | None, int]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _from_json(await request.body())
    if kind == "multipart/form-data":
        return await _from_form(request)
    raise HTTPException(
        415, "send multipart/form-data (an image file field) or application/json (image_b64)"
    )


# ----------------------------------------------------------------------------------- the edges


class _Edge:
    """Outermost layer: request metrics by route, and the body size limit (by Content-Length
    up front, and by counting for a chunked body)."""

    def __init__(self, app: ASGIApp, service: SearchService, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = service.metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            declared = dict(scope["headers"]).get(b"content-length", b"0")
            if not declared.isdigit() or int(declared) > self.max_body_bytes:
                await self._too_large(scope, receive, send_and_note)
            else:
                await self.app(scope, self._counted(receive), send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - start)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than {self.max_body_bytes} bytes"
        await JSONResponse({"error": message}, 413)(scope, receive, send)

    def _counted(self, receive: Receive) -> Callable[[], Awaitable[Message]]:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, f"request body is larger than {self.max_body_bytes} bytes")
            return message

        return counted


def _key_guard(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency that refuses requests without the key (``X-API-Key: KEY`` or
    ``Authorization: Bearer KEY``)."""

    async def require_key(request: Request) -> None:
        bearer = request.headers.get("authorization", "")
        given = request.headers.get("x-api-key") or bearer.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(
                401,
                "missing or wrong API key: send it as X-API-Key: KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_key


def _error(status: int, message: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(str(message))}, status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message, where = exc.detail, f"{request.method} {request.url.path:.80}"
        if exc.status_code == 404 and "route" not in request.scope:
            message = f"no route {where}"
        elif exc.status_code == 405:
            message = f"method not allowed: {where}"
        return _error(exc.status_code, message, exc.headers)

    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(400, exc)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, one_line(exc))
        return _error(500, f"internal error ({type(exc).__name__}); the server logged it")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(BadRequest, bad_request)
    app.add_exception_handler(Exception, unexpected)


# ------------------------------------------------------------------------------------ the app


def create_app(
    service: SearchService, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The FastAPI app over ``service``; starting it (lifespan) loads the index if needed and
    starts batching and hot reload, stopping it stops them."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.start)
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(
        title="vsearch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    _install_error_handlers(app)
    app.add_middleware(_Edge, service=service, max_body_bytes=max_body_bytes)
    guarded = [Depends(_key_guard(api_key))] if api_key is not None else []

    @app.post("/v1/search", dependencies=guarded)
    async def search(request: Request) -> JSONResponse:
        start = time.perf_counter()
        with service.arriving():
            text = await _text_request(request)
            if text is None:
                image, box, k = await _search_request(request)
        if text is not None:  # search by text: outside the image micro-batches
            answer = await service.search_text(*text)
            return JSONResponse(_answer_json(answer, time.perf_counter() - start))
        answer = await service.search(image, box, k)
        return JSONResponse(_answer_json(answer, time.perf_counter() - start))

    @app.get("/v1/gallery/{seller_img_id:path}/image", dependencies=guarded)
    def gallery_image(seller_img_id: str) -> FileResponse:
        path = service.holder.current.image_path(seller_img_id)
        if path is None:
            raise HTTPException(404, f"seller_img_id {seller_img_id!r:.80} is not in the index")
        if not path.is_file():
            raise HTTPException(404, f"the catalogue image of {seller_img_id!r:.80} is missing")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(
            path,
            media_type=media_type,
            headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if not service.ready:
            return _error(503, "not ready: the index is loading or the batcher stopped")
        snapshot = service.holder.current
        return JSONResponse(
            {
                "ready": True,
                "index_version": snapshot.version,
                "model_fingerprint": snapshot.fingerprint,
                "vectors": snapshot.index.count,
                "reload_error": service.holder.last_error,
                "api_key_required": api_key is not None,
            }
        )

    @app.get("/metrics", dependencies=guarded)
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html", headers={"Content-Security-Policy": _PAGE_POLICY}
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---------------------------------------------------------------------------------- `serve`


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str | Path) -> str:
    try:
        key = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise VSearchError(f"{path}: cannot read the API key ({one_line(err)})") from None
    if not key or any(c.isspace() for c in key):
        raise VSearchError(f"{path}: the API key must be one word on one line")
    return key


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with this package's reload and error messages beside its own."""
    from uvicorn.config import LOGGING_CONFIG

    config = json.loads(json.dumps(LOGGING_CONFIG))
    config["loggers"]["vsearch_tf"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def serve(
    index_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    api_key_file: str | Path | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    access_log: bool = True,
) -> None:
    """Serve ``index_dir`` until interrupted. The index and its model are loaded before the port
    is opened, so a broken index is a one-line ``VSearchError``, not a server that never gets
    ready. A host other than loopback needs an API key."""
    import uvicorn

    api_key = read_api_key(api_key_file) if api_key_file is not None else None
    if api_key is None and not is_loopback(host):
        raise VSearchError(
            f"--host {host} is reachable from other machines: give --api-key-file too"
        )
    service = SearchService(index_dir, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    snapshot = service.holder.load()
    log_config = _log_config()
    logging.config.dictConfig(log_config)
    log.info(
        "index %s: version %s, %d vectors, model %s",
        index_dir,
        snapshot.version,
        snapshot.index.count,
        snapshot.model.path,
    )
    app = create_app(service, api_key=api_key, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_config=log_config, access_log=access_log)
