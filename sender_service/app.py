"""Sender REST API: POST /v1/transmissions turns an upload into a semantic transmission.

The routes live on `router` and reach the process's resources (settings, segmenter, the channel
simulator's client, the HTTP client) through the `State` dependency; `create_app` adds the
middlewares and opens those resources in its lifespan, with the gRPC API (grpc_api.py) when the
process serves it. A transmission's form is one model, `TransmissionForm`: the parameters both
APIs share (transmissions.py) and the upload. The route sends it by the path the gRPC API takes
too (`transmissions.send_transmission`: the pipeline, then the channel simulator over gRPC), and
its failures become HTTP statuses with the error body of `shared.wire.rest_errors`. A client that
disconnects while waiting (wait=true) cancels its transmission, at the receiver too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from sender_service import receiver_client
from sender_service.auth import API_KEY_HEADER, OPEN_PATHS, OPEN_PREFIXES, ApiKeyGuard
from sender_service.channel_sim_client import ChannelSimClient
from sender_service.grpc_api import build_grpc_api, serve_when_ready
from sender_service.pipeline import SegmenterLoader
from sender_service.settings import SenderSettings
from sender_service.transmissions import (
    EMPTY_EXAMPLE,
    SenderState,
    TransmissionAccepted,
    TransmissionError,
    TransmissionParameters,
    send_transmission,
)
from sender_service.web import mount_web_page
from shared.limits import MAX_SNR_DB, MIN_SNR_DB
from shared.wire import grpc_security, transport
from shared.wire.docs_ui import mount_local_docs
from shared.wire.logging_setup import request_context
from shared.wire.monitoring import HttpMetricsMiddleware, ServiceMetrics
from shared.wire.rest_errors import ApiError, BodySizeLimit, add_error_handlers, error_response, validation_error

log = logging.getLogger(__name__)

# Room for the multipart boundaries and the small form fields around the uploaded file.
FORM_OVERHEAD_BYTES = 64 * 1024
# Calls of the gRPC API in flight get this long to finish at shutdown.
GRPC_SHUTDOWN_GRACE_S = 5.0
# The status of the answer to a client that closed its connection while waiting (nginx's
# convention): nobody reads it, but the request metrics count it.
CLIENT_CLOSED_REQUEST = 499

router = APIRouter()


def get_state(request: Request) -> SenderState:
    return request.app.state.sender


State = Annotated[SenderState, Depends(get_state)]


@dataclass(kw_only=True)
class TransmissionForm(TransmissionParameters):
    """The multipart form of POST /v1/transmissions: the upload and the transmission's parameters;
    empty optional fields take the defaults."""

    file: Annotated[UploadFile, File(description="a photo (PNG/JPEG/WebP/BMP) or a label-map PNG")]
    psnr_db: Annotated[float | None, Form(ge=MIN_SNR_DB, le=MAX_SNR_DB, deprecated=True, examples=EMPTY_EXAMPLE,
                                          description=(
        "deprecated alias of `snr_db` (it too follows `snr_definition`); refused when both differ"))] = None
    wait: Annotated[bool, Form(description="answer with the generated PNG once it is ready",
                               examples=EMPTY_EXAMPLE)] = False

    def __post_init__(self) -> None:
        if self.psnr_db is None:
            return
        if self.snr_db is not None and self.psnr_db != self.snr_db:
            raise validation_error("psnr_db", f"psnr_db is a deprecated alias of snr_db and differs from it "
                                              f"({self.psnr_db:g} against {self.snr_db:g}); send snr_db alone")
        self.snr_db = self.psnr_db


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(state: State) -> Response:
    """Prometheus text format: requests by route and status, stage latencies, process."""
    return state.metrics.response()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it may still be loading the segmenter)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Ready once the segmenter has loaded; 503 with the reason otherwise."""
    loader = state.segmenter
    body = {"ready": loader.ready, "segmenter": loader.info}
    if loader.ready:
        return JSONResponse(body)
    return JSONResponse({**body, "error": loader.error or "the segmenter is loading"}, status_code=503)


@router.post(
    "/v1/transmissions",
    status_code=202,
    response_model=TransmissionAccepted,
    responses={
        200: {"content": {"image/png": {}}, "description": "wait=true: the generated image"},
        400: {"description": "a form field or the upload is unusable"},
        401: {"description": f"an API key is configured and the {API_KEY_HEADER} header lacks it"},
        413: {"description": "the upload is too large"},
        422: {"description": "a form field is missing or out of range"},
        429: {"description": "the channel or receiver is busy (see Retry-After)"},
        502: {"description": "the channel, receiver or generation failed"},
        503: {"description": "the channel or receiver is unreachable, or the segmenter is not ready"},
        504: {"description": "the channel call or the wait timed out"},
    },
)
async def create_transmission(
    request: Request, form: Annotated[TransmissionForm, Depends()], state: State
) -> Response:
    """Send one photo or label map through the channel to the receiver.

    202 with the transmission's id, status and image URLs, the channel's report and the bit
    counts; with wait=true, 200 with the generated PNG once the receiver has made it.
    """
    transmission_id = transport.new_transmission_id()
    with request_context(transmission_id):
        data = await form.file.read(state.settings.max_upload_bytes + 1)
        answer = _answer(state, data, form, transmission_id)
        if not form.wait:  # the job is the client's to poll, whether or not it stays for the 202
            return await answer
        return await _unless_client_leaves(request, state, answer, transmission_id)


def create_app(settings: SenderSettings | None = None, grpc_api: bool = False) -> FastAPI:
    """Build the app; resources (segmenter, gRPC channel, HTTP client) open in its lifespan, and
    with `grpc_api` the gRPC API on settings.grpc_port (`python -m sender_service` serves it;
    in-process tests of the REST API leave it off)."""
    settings = settings or SenderSettings()
    # Read now, so a bad TLS setting stops the process at startup rather than failing each call.
    channel_credentials = grpc_security.channel_credentials(
        settings.channel_tls_ca_file, settings.channel_tls_cert_file, settings.channel_tls_key_file,
        prefix="GESCO_SENDER_CHANNEL_TLS_",
    )
    grpc_credentials = grpc_security.server_credentials(
        settings.grpc_tls_cert_file, settings.grpc_tls_key_file, settings.grpc_tls_client_ca_file,
        prefix="GESCO_SENDER_GRPC_TLS_",
    ) if grpc_api else None
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        segmenter = SegmenterLoader(settings)
        segmenter.start()
        channel_sim = ChannelSimClient(settings.channel_address, channel_credentials)
        # The receiver's key, when it has one, goes with every call to it (wait=true, the relay).
        receiver_key = settings.receiver_api_key.get_secret_value()
        async with httpx.AsyncClient(headers={API_KEY_HEADER: receiver_key} if receiver_key else None) as http:
            state = app.state.sender = SenderState(settings, metrics, segmenter, channel_sim, http)
            grpc_server = None
            if grpc_api:
                grpc_server, health = build_grpc_api(state, asyncio.get_running_loop(), grpc_credentials)
                grpc_server.start()
                log.info("gRPC listening", extra={"address": f"{settings.host}:{settings.grpc_port}"})
                serve_when_ready(state, health)
            try:
                yield
            finally:
                if grpc_server is not None:
                    health.set_serving(False)
                    # Off the event loop: calls in flight finish on it during the grace period.
                    await asyncio.to_thread(lambda: grpc_server.stop(GRPC_SHUTDOWN_GRACE_S).wait())
                await channel_sim.close()

    app = FastAPI(
        title="gesco sender",
        version="1",
        description="Segments a photo (or takes a label map), encodes the present-class maps and "
        "sends them over a simulated channel to the generative receiver.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_body_size=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
                       message=f"the request body is larger than the {settings.max_upload_bytes}-byte upload limit",
                       field="file")
    api_key = settings.api_key.get_secret_value()
    if api_key:
        # before the body is read
        app.add_middleware(ApiKeyGuard, api_key=api_key, open_paths=OPEN_PATHS, open_prefixes=OPEN_PREFIXES)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics, routes=app.router.routes)
    add_error_handlers(app)
    mount_local_docs(app, api_key_header=API_KEY_HEADER if api_key else None, open_paths=OPEN_PATHS)
    app.include_router(router)
    mount_web_page(app)
    return app


async def _answer(state: SenderState, data: bytes, form: TransmissionForm, transmission_id: str) -> Response:
    """Send the transmission; then the 202 with its record, or with wait=true the generated image."""
    try:
        accepted = await send_transmission(state, data, form, transmission_id)
    except TransmissionError as error:
        headers = None if error.retry_after_s is None else {"Retry-After": str(error.retry_after_s)}
        raise ApiError(error.http_status, error.message, field=error.field, headers=headers, **error.details) from None
    if not form.wait:
        return JSONResponse(accepted.model_dump(mode="json"), status_code=202, headers={"Location": accepted.status_url})
    return await _wait_for_image(state, transmission_id, accepted.status_url)


async def _unless_client_leaves(
    request: Request, state: SenderState, transmission: Coroutine[Any, Any, Response], transmission_id: str
) -> Response:
    """Run a wait=true transmission until it answers or its client disconnects.

    Once the client has gone nobody will get the image: the channel call, if still under way, is
    cancelled (so are its hops), and the receiver is asked to cancel the job, so its sampling time
    goes to clients that still wait.
    """
    answer = asyncio.ensure_future(transmission)
    disconnected = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((answer, disconnected), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled itself
        disconnected.cancel()
        answered = answer.done()
        answer.cancel()
    if answered:
        return answer.result()
    with contextlib.suppress(asyncio.CancelledError):
        await answer  # the channel call is cancelled before the receiver hears of the cancellation
    receiver_answer = await receiver_client.cancel(state.http, state.settings.receiver_poll_url, transmission_id)
    log.info("the client went away while waiting; transmission cancelled", extra={"receiver": receiver_answer})
    return error_response(CLIENT_CLOSED_REQUEST, "the client closed the connection; the transmission was cancelled",
                          id=transmission_id)


async def _until_disconnected(request: Request) -> None:
    """Return once the client has closed its connection (the form has been read by now)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait_for_image(state: SenderState, transmission_id: str, status_url: str) -> Response:
    settings = state.settings
    details = {"id": transmission_id, "status_url": status_url}
    try:
        png = await receiver_client.wait_for_image(
            state.http,
            settings.receiver_poll_url,
            transmission_id,
            settings.wait_timeout_s,
            settings.poll_interval_s,
            settings.status_long_poll_s,
        )
    except receiver_client.ReceiverUnavailableError as error:
        raise ApiError(503, str(error), **details) from None
    except receiver_client.GenerationFailedError as error:
        raise ApiError(502, str(error), **details) from None
    except receiver_client.WaitTimeoutError as error:
        raise ApiError(504, str(error), **details) from None
    return Response(png, media_type="image/png", headers={"X-Transmission-Id": transmission_id})
