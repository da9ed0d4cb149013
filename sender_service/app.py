"""Sender REST API: POST /v1/transmissions turns an upload into a semantic transmission.

The routes live on `router` and reach the process's resources (settings, segmenter, the channel
simulator's client, the HTTP client) through the `State` dependency; `create_app` adds the
middlewares and opens those resources in its lifespan. A transmission's form is one model,
`TransmissionForm`; `pipeline.prepare_transmission` runs in a worker thread, the result streams to
the channel simulator over gRPC and failures map to HTTP statuses with the error body of
`shared.wire.rest_errors`. A client that disconnects while waiting (wait=true) cancels its
transmission, at the receiver too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import grpc
import httpx
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from gesco.v1 import gesco_pb2
from sender_service import receiver_client
from sender_service.auth import API_KEY_HEADER, OPEN_PATHS, OPEN_PREFIXES, ApiKeyGuard
from sender_service.channel_sim_client import ChannelSimCallError, ChannelSimClient
from sender_service.pipeline import (
    PHOTO,
    FieldError,
    NotReadyError,
    PreparedTransmission,
    SegmenterLoader,
    TransmissionRequest,
    prepare_transmission,
)
from sender_service.settings import SenderSettings
from sender_service.web import mount_web_page
from shared.limits import (
    MAX_GUIDANCE,
    MAX_SNR_DB,
    MAX_STEPS,
    MIN_SNR_DB,
    MIN_STEPS,
    SAMPLER_NAME_PATTERN,
    SamplingOptions,
)
from shared.semantic.codec import Compression
from shared.wire import grpc_security, transport
from shared.wire.docs_ui import mount_local_docs
from shared.wire.logging_setup import request_context
from shared.wire.monitoring import HttpMetricsMiddleware, ServiceMetrics
from shared.wire.records import TransmissionRecord
from shared.wire.rest_errors import ApiError, BodySizeLimit, add_error_handlers, error_response, validation_error

log = logging.getLogger(__name__)

# Room for the multipart boundaries and the small form fields around the uploaded file.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_SEED = 2**64 - 1
# When a request gives neither snr_db nor its deprecated alias psnr_db.
DEFAULT_SNR_DB = 100.0
# The status of the answer to a client that closed its connection while waiting (nginx's
# convention): nobody reads it, but the request metrics count it.
CLIENT_CLOSED_REQUEST = 499

_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# An INVALID_ARGUMENT's details start with the header field they refuse; these are form fields.
_FORM_FIELDS_OF_HEADER = {"sampling.sampler": "sampler", "sampling.steps": "steps", "sampling.guidance": "guidance"}

router = APIRouter()


@dataclass
class SenderState:
    """The process's resources, opened by the app's lifespan."""

    settings: SenderSettings
    metrics: ServiceMetrics
    segmenter: SegmenterLoader
    channel_sim: ChannelSimClient
    http: httpx.AsyncClient


def get_state(request: Request) -> SenderState:
    return request.app.state.sender


State = Annotated[SenderState, Depends(get_state)]


@dataclass
class TransmissionForm:
    """The multipart form of POST /v1/transmissions; empty optional fields take the defaults."""

    file: Annotated[UploadFile, File(description="a photo (PNG/JPEG/WebP/BMP) or a label-map PNG")]
    kind: Annotated[Literal["photo", "label_map"], Form(description="what `file` is", examples=["photo"])] = PHOTO
    snr_db: Annotated[float | None, Form(ge=MIN_SNR_DB, le=MAX_SNR_DB, examples=[10.0], description=(
        f"channel SNR in dB under `snr_definition`; empty: {DEFAULT_SNR_DB:g}"))] = None
    snr_definition: Annotated[Literal["paper_psnr", "average_power"], Form(examples=["paper_psnr"], description=(
        "what `snr_db` refers to: the paper's PSNR (eq. 1) or the average symbol power"))] = "paper_psnr"
    psnr_db: Annotated[float | None, Form(ge=MIN_SNR_DB, le=MAX_SNR_DB, deprecated=True, examples=[10.0], description=(
        "deprecated alias of `snr_db` (it too follows `snr_definition`); refused when both differ"))] = None
    channel: Annotated[Literal["awgn", "rayleigh", "rician", "tdl_ofdm"], Form(examples=["awgn"])] = "awgn"
    equalize: Annotated[bool, Form(description="zero-forcing equalisation of fading channels", examples=[True])] = True
    rician_k_db: Annotated[float, Form(ge=-30, le=40, description="Rician K-factor in dB", examples=[6.0])] = 6.0
    sampler: Annotated[str | None, Form(pattern=SAMPLER_NAME_PATTERN, description="empty: the receiver's default",
                                            examples=["ddim"])] = None
    steps: Annotated[int | None, Form(ge=MIN_STEPS, le=MAX_STEPS, description="empty: the sampler's default",
                                          examples=[10])] = None
    guidance: Annotated[float, Form(ge=0, le=MAX_GUIDANCE, description="classifier-free guidance scale",
                                        examples=[2.0])] = 2.0
    seed: Annotated[int | None, Form(ge=0, le=MAX_SEED, description="empty: random", examples=[7])] = None
    downsample_factor: Annotated[int | None, Form(ge=1, le=64, description="empty: the sender's setting",
                                                  examples=[1])] = None
    compression: Annotated[Compression | None, Form(description="empty: the sender's setting", examples=["none"])] = None
    jpeg_quality: Annotated[int | None, Form(ge=1, le=100, description="empty: the sender's setting",
                                             examples=[75])] = None
    use_fds: Annotated[bool, Form(description="fast denoising of the received maps", examples=[True])] = True
    wait: Annotated[bool, Form(description="answer with the generated PNG once it is ready",
                                        examples=[False])] = False

    def __post_init__(self) -> None:
        if self.psnr_db is not None and self.snr_db is not None and self.psnr_db != self.snr_db:
            raise validation_error("psnr_db", f"psnr_db is a deprecated alias of snr_db and differs from it "
                                              f"({self.psnr_db:g} against {self.snr_db:g}); send snr_db alone")

    def transmission_request(self, settings: SenderSettings) -> TransmissionRequest:
        """What the pipeline sends, the sender's settings filling the empty fields (a random seed)."""
        return TransmissionRequest(
            kind=self.kind,
            sampling=SamplingOptions(sampler=self.sampler or "", steps=self.steps or 0, guidance=self.guidance),
            seed=secrets.randbits(32) if self.seed is None else self.seed,
            downsample_factor=self.downsample_factor or settings.downsample_factor,
            compression=self.compression or settings.compression,
            jpeg_quality=self.jpeg_quality or settings.jpeg_quality,
            use_fds=self.use_fds,
        )

    def channel_request(self, seed: int) -> gesco_pb2.ChannelRequest:
        """The channel the transmission goes through: its model, and the SNR (snr_db, else the
        deprecated psnr_db, else DEFAULT_SNR_DB) under snr_definition."""
        return gesco_pb2.ChannelRequest(
            model=self.channel,
            snr_db=next((snr for snr in (self.snr_db, self.psnr_db) if snr is not None), DEFAULT_SNR_DB),
            snr_definition=transport.snr_definition_to_proto(self.snr_definition),
            equalize=self.equalize,
            seed=seed,
            rician_k_db=self.rician_k_db,
        )


class TransmissionAccepted(TransmissionRecord):
    """The 202 answer: where to follow the transmission, and the record of what was sent."""

    id: str
    status_url: str
    image_url: str
    queue_position: int
    seed: int
    segmenter: dict[str, Any]


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
    settings = state.settings
    transmission_id = transport.new_transmission_id()
    with request_context(transmission_id):
        spec = form.transmission_request(settings)
        data = await form.file.read(settings.max_upload_bytes + 1)
        try:
            prepared = await run_in_threadpool(
                prepare_transmission, data, spec, settings, state.segmenter, transmission_id
            )
        except FieldError as error:
            raise ApiError(error.status_code, error.message, field=error.field) from None
        except NotReadyError as error:
            raise ApiError(503, f"photos cannot be segmented yet: {error}", headers={"Retry-After": "5"}) from None
        for stage, seconds in prepared.timings_s.items():
            state.metrics.observe_stage(stage, seconds)
        channel = form.channel_request(spec.seed)
        channel_call = state.channel_sim.transmit(prepared.header, channel, prepared.symbols, settings.rpc_timeout_s)
        answer = _answer(state, channel_call, prepared, spec.seed, form.wait)
        if not form.wait:  # the job is the client's to poll, whether or not it stays for the 202
            return await answer
        return await _unless_client_leaves(request, state, answer, transmission_id)


def create_app(settings: SenderSettings | None = None) -> FastAPI:
    """Build the app; resources (segmenter, gRPC channel, HTTP client) open in its lifespan."""
    settings = settings or SenderSettings()
    # Read now, so a bad TLS setting stops the process at startup rather than failing each call.
    channel_credentials = grpc_security.channel_credentials(
        settings.channel_tls_ca_file, settings.channel_tls_cert_file, settings.channel_tls_key_file,
        prefix="GESCO_SENDER_CHANNEL_TLS_",
    )
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        segmenter = SegmenterLoader(settings)
        segmenter.start()
        channel_sim = ChannelSimClient(settings.channel_address, channel_credentials)
        # The receiver's key, when it has one, goes with every call to it (wait=true, the relay).
        receiver_key = settings.receiver_api_key.get_secret_value()
        async with httpx.AsyncClient(headers={API_KEY_HEADER: receiver_key} if receiver_key else None) as http:
            app.state.sender = SenderState(settings, metrics, segmenter, channel_sim, http)
            try:
                yield
            finally:
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


async def _answer(
    state: SenderState,
    channel_call: Coroutine[Any, Any, gesco_pb2.TransmissionAck],
    prepared: PreparedTransmission,
    seed: int,
    wait: bool,
) -> Response:
    """Await the channel simulator's acknowledgement; then the 202 with the transmission's record,
    or with wait=true the generated image."""
    settings, transmission_id = state.settings, prepared.header.transmission_id
    try:
        with state.metrics.time_stage("channel_rpc"):
            ack = await channel_call
    except ChannelSimCallError as error:
        log.warning("channel call failed", extra={"grpc_code": error.code.name})
        raise _channel_error(error, settings, transmission_id) from None

    header = prepared.header
    header.channel_report.CopyFrom(ack.channel_report)
    public = settings.receiver_public_url
    accepted = TransmissionAccepted(
        id=transmission_id,
        status_url=receiver_client.status_url(public, transmission_id),
        image_url=receiver_client.image_url(public, transmission_id),
        queue_position=ack.queue_position,
        seed=seed,
        segmenter={"used": prepared.segmenter_used, **_segmenter_summary(state.segmenter)},
        **dict(TransmissionRecord.from_header(header, header.sampling)),
    )
    log.info("transmission sent", extra={"queue_position": ack.queue_position})
    if not wait:
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


def _segmenter_summary(loader: SegmenterLoader) -> dict[str, Any]:
    return dict(loader.info) if loader.info else {"trained": False, "note": "the segmenter is loading"}


def _channel_error(error: ChannelSimCallError, settings: SenderSettings, transmission_id: str) -> ApiError:
    status_code = _GRPC_TO_HTTP.get(error.code, 502)
    headers = None
    if status_code == 429:
        headers = {"Retry-After": str(error.retry_after_s or settings.retry_after_s)}
    message = {
        503: f"the channel at {settings.channel_address} is unavailable: {error.details}",
        504: f"the channel call exceeded its {settings.rpc_timeout_s:g} s deadline: {error.details}",
    }.get(status_code, f"the channel refused the transmission: {error.details}")
    field = None
    if error.code is grpc.StatusCode.INVALID_ARGUMENT:
        field = next((name for prefix, name in _FORM_FIELDS_OF_HEADER.items() if error.details.startswith(prefix)), None)
    return ApiError(status_code, message, field=field, headers=headers, grpc_code=error.code.name, id=transmission_id)
