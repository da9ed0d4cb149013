"""Receiver REST API, and the lifespan that runs the gRPC server, model loading and worker with it.

The routes live on `router` and reach the process's store, worker and waiters through the `State`
dependency. Clients poll GET /v1/transmissions/{id} (a long poll with ?wait_s=) until the status is done or
failed, then fetch the image and the debug maps; POST .../cancel drops a job whose image nobody
will fetch. The store (on disk, or Redis shared by the replicas: store_factory.py) is read
directly, so the API needs no lock with the worker beyond the store's own; with Redis any replica
answers for any transmission. A store that cannot be reached answers 503 and fails /readyz. With
GESCO_RECEIVER_API_KEY set, status, image, maps and cancel need the X-API-Key header.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from receiver_service.grpc_server import build_grpc_server
from receiver_service.long_poll import FinishWaiters
from receiver_service.settings import ReceiverSettings
from receiver_service.status import MAP_ARTIFACTS, TransmissionStatus, public_status, status_json
from receiver_service.store import (
    FINISHED,
    STORE_RETRY_AFTER_S,
    JobStatus,
    StoreUnavailableError,
    UnknownTransmissionError,
)
from receiver_service.store_factory import JobStore, create_store
from receiver_service.watch_hub import WatchHub
from receiver_service.worker import GenerationWorker
from shared.limits import MAX_STATUS_WAIT_S
from shared.wire.api_key import API_KEY_HEADER, ApiKeyGuard
from shared.wire.docs_ui import mount_local_docs
from shared.wire.monitoring import HttpMetricsMiddleware, ServiceMetrics
from shared.wire.rest_errors import ApiError, add_error_handlers, error_response
from shared.wire.transport import TRANSMISSION_ID_PATTERN

log = logging.getLogger("receiver_service")

TransmissionId = Annotated[
    str, Path(pattern=TRANSMISSION_ID_PATTERN.pattern, description="32 lowercase hex characters")
]
WaitSeconds = Annotated[float, Query(ge=0, le=MAX_STATUS_WAIT_S, description=(
    "long poll: answer once the transmission has finished (done, failed or cancelled), or after this "
    "many seconds with its status then; 0 answers at once"))]
CANCEL_REASON = "cancelled at a client's request"
# Open without the API key: probes, scrapers and the docs pages (the schema reveals no secret).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/docs/",)


router = APIRouter()


@dataclass
class ReceiverState:
    """What the routes use: the settings, the job store, the worker and the long-poll waiters."""

    settings: ReceiverSettings
    store: JobStore
    worker: GenerationWorker
    waiters: FinishWaiters
    metrics: ServiceMetrics


def get_state(request: Request) -> ReceiverState:
    return request.app.state.receiver


State = Annotated[ReceiverState, Depends(get_state)]


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(state: State) -> Response:
    """Prometheus text format: requests by route/status and gRPC method/code, queue depth,
    batch sizes, stage latencies, process."""
    return state.metrics.response()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "model loading or failed to load, or the store unreachable"}})
def readyz(state: State) -> Response:
    """200 once the model is loaded and the store answers: transmissions are accepted."""
    worker = state.worker
    if worker.load_error:
        return JSONResponse({"status": "failed", "error": worker.load_error}, status_code=503)
    if not worker.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    try:
        state.store.check()
    except StoreUnavailableError:
        return JSONResponse({"status": "store unavailable", "error": "the job store cannot be reached"},
                            status_code=503)
    return JSONResponse({"status": "ready", "model": worker.host.base().info.as_dict()})


@router.get("/v1/transmissions/{transmission_id}", response_model=TransmissionStatus,
            responses={404: {"description": "unknown or evicted transmission"}})
async def get_transmission(transmission_id: TransmissionId, state: State, wait_s: WaitSeconds = 0.0) -> Any:
    """Status, timings, channel report, bit counts, sampling and model of one transmission."""
    waiters, store = state.waiters, state.store
    finished = waiters.register(transmission_id)
    try:
        record = await run_in_threadpool(store.get, transmission_id)
        if wait_s > 0 and record["status"] not in FINISHED and await waiters.wait(finished, wait_s):
            record = await run_in_threadpool(store.get, transmission_id)
    except UnknownTransmissionError:
        raise _unknown(transmission_id) from None
    finally:
        waiters.unregister(transmission_id, finished)
    return await run_in_threadpool(public_status, record, state.settings.public_url, state.worker, store)


@router.post("/v1/transmissions/{transmission_id}/cancel", response_model=TransmissionStatus,
             responses={202: {"description": "running: it stops at its next sampling step"},
                        404: {"description": "unknown or evicted transmission"},
                        409: {"description": "already done or failed"}})
def cancel_transmission(transmission_id: TransmissionId, state: State) -> Any:
    """Cancel a transmission whose image nobody will fetch (the sender does so when a client
    waiting for the image disconnects). Queued: cancelled at once (200). Running: 202, and
    cancelled once its batch stops, at the next sampling step unless other jobs share it."""
    state.worker.cancel(transmission_id, CANCEL_REASON)
    try:
        record = state.store.request_cancel(transmission_id, CANCEL_REASON)  # whichever replica holds it
    except UnknownTransmissionError:
        raise _unknown(transmission_id) from None
    if record["status"] == JobStatus.CANCELLED.value:
        return status_json(record, state.settings.public_url)
    if record["status"] in FINISHED:
        raise ApiError(409, f"transmission {transmission_id} is already {record['status']}", status=record["status"])
    return JSONResponse(status_json(record, state.settings.public_url), status_code=202)


@router.get("/v1/transmissions/{transmission_id}/image", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {}, 409: {"description": "not done"}})
def get_image(transmission_id: TransmissionId, state: State) -> Response:
    """The generated image (PNG) once the status is done."""
    return _artifact_response(state.store, transmission_id, "image")


@router.get("/v1/transmissions/{transmission_id}/maps/{map_name}", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {}, 409: {"description": "not written yet"}})
def get_map(transmission_id: TransmissionId, map_name: str, state: State) -> Response:
    """received.png / fds.png: argmax of the received / FDS maps, coloured by class;
    received_labels.png / fds_labels.png: those argmax class ids as 8-bit values at the
    transmitted size."""
    if map_name not in MAP_ARTIFACTS:
        raise ApiError(404, f"unknown map {map_name[:40]!r}; expected one of {sorted(MAP_ARTIFACTS)}",
                       field="map_name")
    return _artifact_response(state.store, transmission_id, MAP_ARTIFACTS[map_name])


def create_app(settings: ReceiverSettings | None = None) -> FastAPI:
    """Build the app; its lifespan opens the store, serves gRPC and loads the model."""
    settings = settings or ReceiverSettings()
    waiters = FinishWaiters()  # the REST long polls
    hub = WatchHub()  # the gRPC watches

    def finished(transmission_id: str) -> None:
        waiters.notify_finished(transmission_id)
        hub.notify_finished(transmission_id)

    store = create_store(settings, on_finished=finished)
    if not settings.sampling and not store.shares_jobs:
        raise ValueError("GESCO_RECEIVER_SAMPLING=false: a serving replica hands its jobs to sampling replicas "
                         "through the shared Redis store; set GESCO_RECEIVER_REDIS_URL")
    metrics = ServiceMetrics(queue=True)
    worker = GenerationWorker(settings, store, metrics)
    metrics.queue_depth.set_function(lambda: worker.queue_depth)
    store.set_cancel_handler(worker.cancel)  # a shared store relays other replicas' cancels and
    store.set_progress_listener(hub.notify_progress)  # steps, and
    store.set_job_holder(worker.held_ids)  # fails a job of this one whose end it never heard of

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        waiters.bind(asyncio.get_running_loop())
        recovered = store.open()
        if recovered:
            log.warning("marked unfinished jobs of the previous run failed", extra={"transmission_ids": recovered})
        grpc_server, health = build_grpc_server(settings, worker, metrics, hub)
        grpc_server.start()
        log.info("gRPC listening", extra={"address": f"{settings.host}:{settings.grpc_port}"})

        def load() -> None:
            worker.load_model()
            if worker.ready:
                health.set_serving(True)

        threading.Thread(target=load, name="model-loader", daemon=True).start()
        try:
            yield
        finally:
            log.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
            health.set_serving(False)
            if store.shares_jobs:  # the other replicas take the waiting jobs now, not after the calls' grace
                await asyncio.to_thread(worker.hand_back_waiting)
            await asyncio.to_thread(lambda: grpc_server.stop(settings.shutdown_grace_s).wait())
            worker.stop(settings.shutdown_grace_s)
            failed = store.close()
            if failed:
                log.warning("marked unfinished jobs failed at shutdown", extra={"transmission_ids": failed})

    app = FastAPI(
        title="gesco receiver",
        description="Status and results of semantic transmissions received over gRPC.",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.receiver = ReceiverState(settings, store, worker, waiters, metrics)
    api_key = settings.api_key.get_secret_value()
    if api_key:
        app.add_middleware(ApiKeyGuard, api_key=api_key, open_paths=OPEN_PATHS, open_prefixes=OPEN_PREFIXES)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics, routes=app.router.routes)
    add_error_handlers(app)
    _answer_store_outages(app)
    mount_local_docs(app, api_key_header=API_KEY_HEADER if api_key else None, open_paths=OPEN_PATHS)
    app.include_router(router)
    return app


def _unknown(transmission_id: str) -> ApiError:
    return ApiError(404, f"no transmission {transmission_id} (unknown or evicted)", field="transmission_id")


def _answer_store_outages(app: FastAPI) -> None:
    """A store that cannot be reached (Redis down) is a 503 with the JSON error body, whichever
    route met it (the detail, which names Redis's address, is only logged); the next request
    after Redis is back succeeds."""

    @app.exception_handler(StoreUnavailableError)
    async def store_unavailable(_: Request, error: StoreUnavailableError) -> Response:
        log.warning("store unavailable", extra={"error": str(error)})
        return error_response(503, "the receiver's job store is unavailable; retry later", None,
                              headers={"Retry-After": str(STORE_RETRY_AFTER_S)})


def _artifact_response(store: JobStore, transmission_id: str, name: str) -> Response:
    try:
        data = store.read_artifact(transmission_id, name)
        record = store.get(transmission_id) if data is None else None
    except UnknownTransmissionError:
        raise _unknown(transmission_id) from None
    if data is None:
        assert record is not None
        message = f"transmission {transmission_id} is {record['status']}; no {name} is available"
        if record.get("error"):
            message += f" ({record['error']})"
        raise ApiError(409, message, status=record["status"])
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})
