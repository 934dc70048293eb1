"""The Label Studio ML backend: FastAPI app with the routes Label Studio calls.

Routes and payloads follow Label Studio's ML backend protocol (REFERENCE.md 4):
``GET /health`` and ``GET /``, ``POST /setup``, ``POST /predict``, ``POST /webhook``,
``GET /metrics``. Every route but the health checks sits behind optional basic auth.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
import redis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from egm.backend.auth import require_auth
from egm.labelstudio.config import LabelingConfigError, parse_labeling_config
from egm.backend.metrics import MetricsCollector
from egm.backend.models import (ErrorResponse, HealthResponse, PredictRequest, PredictResponse, SetupRequest,
                            SetupResponse, WebhookEvent)
from egm.backend.predictor import BadPredictRequest, Predictor, project_id_of
from egm.backend.version_sync import VersionSync
from egm.backend.versions import VersionSource
from egm.backend.webhook import WebhookHandler
from egm.backend.webhook_auth import ensure_webhook
from egm.config.settings import Settings, get_settings
from egm.fleet import FleetError
from egm.logs import configure_logging
from egm.redaction import redact
from egm.prompts import PromptError
from egm.queue import QueueClient

log = logging.getLogger(__name__)

ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
          422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
#: an error of a route whose success is not JSON (/metrics): the error body still is.
JSON_ERROR = {"description": "error",
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def create_app(settings: Settings | None = None, queue: QueueClient | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    queue = queue or QueueClient(settings)
    versions = VersionSource(settings, queue)
    predictor = Predictor(settings, queue, versions)
    webhooks = WebhookHandler(settings, queue.redis)
    metrics = MetricsCollector(settings, queue)
    version_sync = VersionSync(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # /predict blocks a thread while it waits for workers; allow many concurrent waits.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 256
        health = versions.health()
        log.info("backend ready", extra={"model_version": health.model_version, "workers": health.workers,
                                         "detail": health.detail, "redis": redact(settings.redis_url)})
        yield

    app = FastAPI(title="egm-assist ML backend", version="0.1.0", lifespan=lifespan,
                  description="Label Studio ML backend that pre-annotates images with EGM through Redis/RQ workers.")
    app.state.settings, app.state.queue, app.state.versions = settings, queue, versions

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # /predict carries every task a "Retrieve predictions" selected: its own, larger limit.
        limit = settings.max_predict_bytes if request.url.path == "/predict" else settings.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            setting = "EGM_MAX_PREDICT_BYTES" if limit == settings.max_predict_bytes else "EGM_MAX_REQUEST_BYTES"
            return JSONResponse({"detail": f"request body over {limit} bytes ({setting})"}, 413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}"}, 422)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError):
        log.error("redis unavailable", extra={"error": type(exc).__name__})
        return JSONResponse({"detail": "queue unavailable (Redis); retry shortly"}, 503)

    @app.exception_handler(FleetError)
    async def no_worker(request: Request, exc: FleetError):
        # no live worker (or none serving what was asked): nothing can be planned; say what to start
        log.warning("no worker can take the request", extra={"path": request.url.path, "reason": str(exc)})
        return JSONResponse({"detail": str(exc)}, 503)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see backend logs"}, 500)

    # Basic auth on every route but the health checks; declared only when configured, so the
    # OpenAPI schema tells clients the truth (new routes: use dependencies=protected).
    protected = [Depends(require_auth)] if settings.basic_auth_user else []

    @app.get("/", response_model=HealthResponse, include_in_schema=False)
    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    def health() -> HealthResponse:
        h = versions.health()
        body = HealthResponse(status="UP" if h.up else "DOWN", model_version=h.model_version, workers=h.workers,
                              detail=h.detail)
        # DOWN is a 503 so Label Studio's connection check (and any HTTP probe) tells the truth
        return body if h.up else JSONResponse(body.model_dump(), 503)

    @app.post("/setup", response_model=SetupResponse, responses=ERRORS, dependencies=protected)
    def setup(req: SetupRequest) -> SetupResponse:
        if req.schema_:
            try:
                parse_labeling_config(req.schema_)
            except LabelingConfigError as exc:
                return JSONResponse({"detail": str(exc)}, 422)
        try:
            project_id = project_id_of(req.project)
        except BadPredictRequest as exc:
            return JSONResponse({"detail": str(exc)}, 422)
        ensure_webhook(settings, project_id)
        version = versions.for_planning()
        version_sync.on_setup(project_id, version)  # background: never delays or fails /setup
        return SetupResponse(model_version=version)

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, dependencies=protected)
    def predict(req: PredictRequest) -> PredictResponse:
        try:
            return predictor.predict(req)
        except (BadPredictRequest, LabelingConfigError, PromptError) as exc:
            return JSONResponse({"detail": str(exc)}, 422)

    @app.post("/webhook", status_code=201, responses=ERRORS, dependencies=protected)
    def webhook(event: WebhookEvent) -> dict:
        return webhooks.handle(event)

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=protected,
             responses={code: JSON_ERROR for code in (401, 503)})
    def prometheus() -> PlainTextResponse:
        body, content_type = metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    return app


def serve(settings: Settings | None = None) -> None:
    import uvicorn

    settings = settings or get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                access_log=False, timeout_keep_alive=75)
