"""create_app(settings): the FastAPI application. Models load once in the lifespan and are injected."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.bundle import Bundle
from service.errors import GuardError, GuardFailure, error_response, guard_error_handler
from service.guard import NonFiniteScore
from service.routes import classify, health, infer, metrics, ui
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)
BundleLoader = Callable[[Settings], Bundle]


def load_bundle(settings: Settings) -> Bundle:
    return Bundle.load(
        settings.models_dir,
        threads=settings.ort_threads,
        prefer_gpu=settings.prefer_gpu,
        expected_digest=settings.bundle_sha256,  # checked before anything else of the bundle is read
    )


class RequestMetrics:
    """Pure ASGI middleware: requests by route template and status, and their latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            runtime: Runtime | None = getattr(scope["app"].state, "runtime", None)
            route = scope.get("route")
            path = getattr(route, "path", "other")  # the template, so labels stay bounded
            if runtime is not None and path != "/metrics":
                runtime.metrics.requests.labels(route=path, status=str(status)).inc()
                runtime.metrics.latency.labels(route=path).observe(time.perf_counter() - start)


def create_app(settings: Settings, loader: BundleLoader = load_bundle) -> FastAPI:
    """The service over `settings.models_dir`; `loader` is injectable for tests."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bundle = loader(settings)  # verifies every SHA-256; raises (and the start fails) on any mismatch
        runtime = Runtime.build(settings, bundle)
        runtime.batcher.start()
        app.state.runtime = runtime
        warm = asyncio.create_task(runtime.warm_up(), name="warm-up")
        try:
            yield
        finally:
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            await runtime.batcher.stop()
            runtime.decoder.close()
            app.state.runtime = None

    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from the package, not a CDN.
    app = FastAPIOffline(
        title="backdoor-guard",
        summary="Classify images and flag backdoor triggers: restoration, STRIP and Neural Cleanse on ONNX Runtime.",
        version=__version__,
        lifespan=lifespan,
        favicon_url="/static/favicon.svg",
    )
    app.add_middleware(RequestMetrics)
    app.add_exception_handler(GuardError, guard_error_handler)

    async def http_error(request: Any, exc: Exception) -> Any:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), headers=exc.headers)  # e.g. Allow on 405

    async def validation_error(request: Any, exc: Exception) -> Any:
        assert isinstance(exc, RequestValidationError)
        return error_response(request, 422, "invalid_request", str(exc.errors()))

    async def non_finite_score(request: Any, exc: Exception) -> Any:
        return await guard_error_handler(request, GuardFailure(str(exc)))

    app.add_exception_handler(NonFiniteScore, non_finite_score)  # the guard fails closed: 500, never "clean"
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(classify.router)
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with this app's own file limit (the route is declared once for every app)."""
        document = generate_openapi()  # cached by FastAPI after the first call
        document["paths"]["/classify"]["post"].update(classify.upload_body(settings.max_files))
        return document

    app.openapi = openapi  # type: ignore[method-assign]
    app.include_router(health.router)
    app.include_router(infer.router)
    app.include_router(metrics.router)
    app.include_router(ui.router)
    app.mount("/static", ui.static_files(), name="static")
    return app
