"""GET /metrics: Prometheus text exposition, on an explicit route (no redirect)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import NotReady, responses
from service.runtime import RuntimeDep

router = APIRouter()


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}}, **responses(NotReady)},
)
async def metrics(runtime: RuntimeDep) -> Response:
    runtime.metrics.queue.set(runtime.batcher.pending)
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
