"""FastAPI app: ``POST /v1/segment``, ``POST /v1/chat``, ``GET /healthz`` (OpenAPI at ``/docs``, ``/openapi.json``).

Bad input is a 4xx JSON body ``{"error": ..., "request_id": ...}``, never a traceback: unreadable or too large
images and empty queries 400, bodies over ``max_request_bytes`` 413, unknown conversations 404, a full queue
503 with ``Retry-After``. Every response carries the request's id (``X-Request-ID`` header, or a new one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from lens.agent import Conversation, LensAgent
from lens.errors import InvalidInput
from lens.images import load_image, validate_query
from lens.pipeline import LensPipeline
from lens.serve.queue import QueueFull, SegmentQueue

logger = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    max_request_bytes: int = 20 * 1024 * 1024  # whole request body
    max_pixels: int = 40_000_000  # per image, checked before decoding
    max_queries: int = 32  # per segment request
    max_pending: int = 64  # segment requests queued or running; beyond: 503
    max_batch: int = 16  # (image, query) pairs per forward pass
    max_wait_s: float = 0.01  # how long a request waits for others to batch with
    max_conversations: int = 256  # least recently used ones are dropped beyond this


class SegmentBody(BaseModel):
    image: str = Field(description="the image file's bytes, base64")
    queries: list[str] = Field(min_length=1, description="what to segment; one result per query")
    attention: bool = Field(False, description="also return A_c per query")


class ChatBody(BaseModel):
    message: str
    conversation_id: str | None = Field(None, description="continue this conversation (omit: start one)")
    image: str | None = Field(None, description="a new image for the conversation, base64")
    intent: str | None = Field(None, description="skip the router: dialogue | segmentation | follow_up")


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _decode_base64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPProblem(400, f"{what} is not valid base64") from None


def create_app(
    pipeline: LensPipeline, agent: LensAgent | None = None, settings: ServeSettings | None = None
) -> FastAPI:
    settings = settings or ServeSettings()
    agent = agent or LensAgent(pipeline)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lens-model")  # the model's one thread
    queue = SegmentQueue(pipeline, executor, settings.max_pending, settings.max_batch, settings.max_wait_s)
    pipeline.batch_size = settings.max_batch
    conversations: OrderedDict[str, Conversation] = OrderedDict()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        queue.start()
        yield
        await queue.stop()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="LENS", version="0.1.0", lifespan=lifespan)
    app.state.queue, app.state.settings, app.state.conversations = queue, settings, conversations
    app.state.agent, app.state.executor = agent, executor

    @app.middleware("http")
    async def request_id_and_size(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            response = _problem(
                413,
                f"request body of {int(length):,} bytes exceeds {settings.max_request_bytes:,}",
                request_id,
            )
        else:
            response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        return response

    @app.exception_handler(HTTPProblem)
    async def on_problem(request: Request, error: HTTPProblem) -> JSONResponse:
        return _problem(error.status, error.message, request.state.request_id, error.headers)

    @app.exception_handler(InvalidInput)
    async def on_invalid(request: Request, error: InvalidInput) -> JSONResponse:
        return _problem(400, str(error), request.state.request_id)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _problem(422, f"{where}: {first.get('msg', 'invalid request')}", request.state.request_id)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        import psutil

        return {
            "status": "ok",
            "queue": queue.stats(),
            "conversations": len(conversations),
            "rss_bytes": psutil.Process().memory_info().rss,
        }

    async def _read_segment(request: Request) -> tuple[bytes, list[str], bool]:
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or not hasattr(upload, "read"):
                raise HTTPProblem(400, "multipart request needs an 'image' file field")
            queries = [str(q) for q in form.getlist("query")]
            if "queries" in form:
                try:
                    queries += [str(q) for q in json.loads(str(form["queries"]))]
                except (ValueError, TypeError):
                    raise HTTPProblem(400, "'queries' must be a JSON list of strings") from None
            return await upload.read(), queries, str(form.get("attention", "false")).lower() == "true"
        try:
            body = SegmentBody.model_validate_json(await request.body())
        except ValueError as error:
            raise RequestValidationError(getattr(error, "errors", lambda: [])()) from None
        return _decode_base64(body.image, "image"), body.queries, body.attention

    @app.post(
        "/v1/segment",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"schema": SegmentBody.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "query": {"type": "array", "items": {"type": "string"}},
                            },
                        }
                    },
                }
            }
        },
    )
    async def segment(request: Request) -> dict[str, Any]:
        """Segment one image for one or more queries: RLE masks, presence, scores, boxes, keypoints."""
        if queue.full():  # refuse before decoding anything: a full queue must answer fast
            raise HTTPProblem(
                503, f"busy: {queue.pending} requests pending; retry later", {"Retry-After": "1"}
            )
        data, queries, attention = await _read_segment(request)
        if not queries:
            raise HTTPProblem(400, "no query given")
        if len(queries) > settings.max_queries:
            raise HTTPProblem(400, f"{len(queries)} queries exceed the limit of {settings.max_queries}")
        queries = [validate_query(q) for q in queries]
        image = load_image(data, max_pixels=settings.max_pixels)
        try:
            results = await queue.submit(image, queries)
        except QueueFull as error:
            raise HTTPProblem(503, f"busy: {error}; retry later", {"Retry-After": "1"}) from None
        return {
            "request_id": request.state.request_id,
            "image": {
                "width": image.width,
                "height": image.height,
                "sha256": hashlib.sha256(data).hexdigest(),
            },
            "results": [r.to_dict(attention=attention) for r in results],
        }

    @app.post("/v1/chat")
    async def chat(request: Request, body: ChatBody) -> dict[str, Any]:
        """One conversation turn through the agent (router → dialogue, segmentation or follow-up)."""
        if body.conversation_id is None:
            conversation = Conversation()
        elif body.conversation_id in conversations:
            conversation = conversations[body.conversation_id]
        else:
            raise HTTPProblem(404, f"no conversation {body.conversation_id!r} (expired or never started)")
        image = None
        if body.image is not None:
            image = load_image(_decode_base64(body.image, "image"), max_pixels=settings.max_pixels)
        elif conversation.current_image is None:
            raise HTTPProblem(400, "the first message of a conversation needs an image")
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(
            executor, lambda: agent(conversation, body.message, image=image, intent=body.intent)
        )
        conversations[conversation.id] = conversation
        conversations.move_to_end(conversation.id)
        while len(conversations) > settings.max_conversations:
            conversations.popitem(last=False)
        out: dict[str, Any] = {
            "request_id": request.state.request_id,
            "conversation_id": conversation.id,
            "reply": reply.text,
            "intent": reply.intent,
            "routed": reply.routed,
            "route": None if reply.route is None else reply.route.log_likelihoods,
        }
        if reply.segmentation is not None:
            out["segmentation"] = reply.segmentation.to_dict()
            buffer = io.BytesIO()
            reply.overlay.save(buffer, format="PNG")
            out["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return out

    return app


def _problem(
    status: int, message: str, request_id: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message, "request_id": request_id}, status_code=status, headers=headers)


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0):
    """Run ``app`` with uvicorn in a background thread (tests, notebooks); yields the base URL."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout_s
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(10)
