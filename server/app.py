"""The API process: FastAPI app factory, error answers, background re-queueing of lost workers' jobs and deletion of
expired outputs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from engine.errors import InvalidParams
from server import routes, stream
from server.admission import LimitExceeded, QueueFull
from server.metrics import OUTPUTS_EXPIRED, RequestMetrics
from server.schemas import GenerateRequest, VideoCreateRequest, accepted_range
from server.settings import Settings, get_settings
from workers import jobs, output

log = logging.getLogger("sana.api")
STATIC_DIR = Path(__file__).parent / "static"

_ACCESS_TOKEN = re.compile(r"(access_token=)[^&\s\"]*")


class RedactAccessTokens(logging.Filter):
    """Blanks ``?access_token=`` in log lines: browsers and websockets send the API key in the URL, and uvicorn's
    access log (and its websocket lines) print the whole path."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "access_token=" in a for a in record.args):
            record.args = tuple(_ACCESS_TOKEN.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str) and "access_token=" in record.msg:
            record.msg = _ACCESS_TOKEN.sub(r"\1[redacted]", record.msg)
        return True


def redact_server_logs() -> None:
    """Put ``RedactAccessTokens`` on uvicorn's loggers (once; after uvicorn set up its logging)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactAccessTokens) for f in logger.filters):
            logger.addFilter(RedactAccessTokens())


def _requeue_pass(r: redis.Redis, settings: Settings) -> None:
    """Hand jobs of dead workers back to their queue (workers do this too; whoever holds the queue's maintenance lock
    does it). Covers the case where every worker of a model died: all queues are looked at."""
    jobs.requeue_abandoned(r, jobs.queued_models(r))


def _sweep_pass(r: redis.Redis, settings: Settings) -> None:
    """Delete the MP4 files whose job record has expired (a video lives as long as its record, SANA_RESULT_TTL_S
    after the job ended); without this the output volume would only grow."""
    deleted = output.sweep_expired(r, settings.output_dir, settings.result_ttl_s)
    if deleted:
        OUTPUTS_EXPIRED.inc(len(deleted))
        log.info("deleted %d expired output files", len(deleted))


async def _every(app: FastAPI, period_s: float, work, what: str, first_now: bool) -> None:
    """Run ``work(redis, settings)`` in a thread every ``period_s`` (the first time at once when ``first_now``), for
    the life of the API; a failed pass is logged and the next one comes as usual."""
    if not first_now:
        await asyncio.sleep(period_s)
    while True:
        try:
            await asyncio.to_thread(work, app.state.redis, app.state.settings)
        except redis.RedisError as exc:
            log.warning("%s skipped: %s", what, exc)
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(period_s)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    redact_server_logs()
    app.state.redis = jobs.connect(settings.redis_url)
    app.state.aredis = aioredis.Redis.from_url(settings.redis_url)
    loops = [_every(app, settings.heartbeat_s, _requeue_pass, "re-queue pass", first_now=False)]
    if settings.output_sweep_s > 0:
        loops.append(_every(app, settings.output_sweep_s, _sweep_pass, "output sweep", first_now=True))
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await app.state.aredis.aclose()
        app.state.redis.close()


def _retry_after(settings: Settings) -> dict[str, str]:
    return {"Retry-After": str(settings.retry_after_s)}


def _field_error(field: str, message: str, accepted: str | None, loc_root: str = "body") -> dict:
    return {"loc": [loc_root, field], "msg": message, "type": "value_error", "field": field, "accepted": accepted}


class BodyLimit:
    """ASGI middleware: request bodies over ``limit`` bytes get 413 naming the limit, refused on their
    Content-Length before a byte is read, or as soon as a chunked body passes the limit (nothing is buffered)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _error(self) -> dict:
        return {"detail": [{"loc": ["body"], "msg": f"the request body is over {self.limit} bytes",
                            "type": "too_large", "field": "body", "accepted": f"at most {self.limit} bytes"}]}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse(status_code=413, content=self._error())(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI re-raises HTTPExceptions from body reading as they are
                    raise StarletteHTTPException(413, self._error()["detail"])
            return message

        return await self.app(scope, limited, send)


def _api_routes(routes):
    """The APIRoutes under ``routes``, included routers opened (FastAPI keeps an included router as one entry)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from _api_routes(route.original_router.routes)
        elif hasattr(route, "routes"):
            yield from _api_routes(route.routes)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="SANA-Video server",
        version="0.1.0",
        description="Text-to-video jobs on SANA-Video: queue, watch live over a websocket, download the MP4.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics)
    app.include_router(routes.router)
    app.include_router(stream.router)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:
            # Starlette names only the first route matching the path; list the methods of all of them.
            methods = set()
            for route in _api_routes(request.app.router.routes):
                if route.matches(request.scope)[0] != Match.NONE:
                    methods |= route.methods
            exc = StarletteHTTPException(405, exc.detail, headers={"Allow": ", ".join(sorted(methods))})
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        schema = VideoCreateRequest if request.url.path.startswith("/v1/") else GenerateRequest
        detail = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            field = ".".join(loc[1:]) if len(loc) > 1 else (loc[0] if loc else "")
            item = {"loc": loc, "msg": err.get("msg", "invalid"), "type": err.get("type", "value_error"),
                    "field": field or "body"}
            accepted = accepted_range(schema, loc[1]) if len(loc) > 1 and loc[0] == "body" else None
            if accepted:
                item["accepted"] = accepted
            detail.append(item)
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            # Not JSON at all: the body, not a field, is wrong (the error's loc is a character offset).
            detail = [{"loc": ["body"], "msg": "the body is not valid JSON", "type": "json_invalid", "field": "body",
                       "accepted": "a UTF-8 JSON object"}]
            return JSONResponse(status_code=400, content={"detail": detail})
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(InvalidParams)
    async def _invalid_params(request: Request, exc: InvalidParams) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [_field_error(exc.field, exc.message, exc.accepted)]})

    @app.exception_handler(LimitExceeded)
    async def _limit(request: Request, exc: LimitExceeded) -> JSONResponse:
        return JSONResponse(status_code=429, headers=_retry_after(settings),
                            content={"detail": [_field_error(exc.field, exc.message, exc.accepted)]})

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(status_code=503, headers=_retry_after(settings), content={"detail": str(exc)})

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis error on %s: %s", request.url.path, exc)
        return JSONResponse(status_code=503, headers=_retry_after(settings),
                            content={"detail": f"the job store is unreachable: {type(exc).__name__}"})

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

    return app


def run_api(host: str | None = None, port: int | None = None, server_ready=None) -> None:
    """Serve the API with uvicorn until Ctrl-C (or its ``should_exit``: ``server_ready`` gets the uvicorn.Server
    before it starts)."""
    import uvicorn

    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host or settings.host,
                                           port=port or settings.port, log_level="info", ws="auto"))
    if server_ready is not None:
        server_ready(server)
    server.run()
