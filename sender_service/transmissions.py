"""One transmission, whichever API asked for it: the parameters a client chooses, the path that
sends them and its errors.

The REST route (app.py) and the gRPC Sender.Transmit (grpc_api.py) share all of it.
`TransmissionParameters` declares the parameters and their ranges once: the REST form extends it
with the upload, and a gRPC request is checked against the same declarations by
`parse_parameters`. `send_transmission` prepares the payload (`pipeline.prepare_transmission`),
streams it through the channel simulator (`ChannelSimClient`) and answers the transmission's
record. Every failure is a `TransmissionError`, which each API turns into its own answer: an HTTP
status with the JSON error body, or a gRPC status code with the field in its details.
"""
# No `from __future__ import annotations` in this module: app.TransmissionForm extends
# TransmissionParameters, and FastAPI reads the inherited fields from the subclass's __init__,
# where postponed (string) annotations would be evaluated in app.py's namespace, not this one's.
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import grpc
import httpx
from fastapi import Form
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from gesco.options import (
    DEFAULT_CHANNEL,
    DEFAULT_GUIDANCE,
    DEFAULT_LINK,
    DEFAULT_RICIAN_K_DB,
    DEFAULT_SNR_DB,
    DEFAULT_SNR_DEFINITION,
    ChannelModel,
    Link,
    SnrDefinition,
)
from gesco.v1 import gesco_pb2
from sender_service import receiver_client
from sender_service.budget import BudgetRequest, TableUnavailableError
from sender_service.channel_sim_client import ChannelSimCallError, ChannelSimClient
from sender_service.pipeline import PHOTO, FieldError, NotReadyError, SegmenterLoader, TransmissionRequest, prepare_transmission
from sender_service.settings import SenderSettings
from shared.limits import (
    MAX_DOWNSAMPLE_FACTOR,
    MAX_GUIDANCE,
    MAX_RICIAN_K_DB,
    MAX_SNR_DB,
    MAX_STEPS,
    MIN_RICIAN_K_DB,
    MIN_SNR_DB,
    MIN_STEPS,
    SAMPLER_NAME_PATTERN,
    SamplingOptions,
)
from shared.semantic.codec import Compression
from shared.semantic.digital_link import MCS_BY_NAME
from shared.wire import transport
from shared.wire.monitoring import ServiceMetrics
from shared.wire.records import TransmissionRecord

log = logging.getLogger("sender_service")

MAX_SEED = 2**64 - 1
# The example of every optional form field. Swagger UI's "Try it out" fills a field with its
# example, else with its default or a sample of its type (its minimum, "string") and sends it, so
# an untouched request would not take the defaults; an empty example leaves the field empty.
EMPTY_EXAMPLE = [""]
# Retry-After of an answer given while the segmenter is not ready.
NOT_READY_RETRY_AFTER_S = 5

_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# An INVALID_ARGUMENT's details start with the header field they refuse; these are parameters.
_PARAMETERS_OF_HEADER = {"sampling.sampler": "sampler", "sampling.steps": "steps", "sampling.guidance": "guidance"}


@dataclass
class SenderState:
    """The process's resources, opened by the app's lifespan."""

    settings: SenderSettings
    metrics: ServiceMetrics
    segmenter: SegmenterLoader
    channel_sim: ChannelSimClient
    http: httpx.AsyncClient


@dataclass(kw_only=True)
class TransmissionParameters:
    """How to send one image: channel, sampling and map coding; empty optional fields take the
    defaults (the sender's settings, the receiver's sampler)."""

    kind: Annotated[Literal["photo", "label_map"], Form(description="what `file` is", examples=EMPTY_EXAMPLE)] = PHOTO
    snr_db: Annotated[float | None, Form(ge=MIN_SNR_DB, le=MAX_SNR_DB, examples=EMPTY_EXAMPLE, description=(
        f"channel SNR in dB under `snr_definition`; empty: {DEFAULT_SNR_DB:g}"))] = None
    snr_definition: Annotated[SnrDefinition, Form(examples=EMPTY_EXAMPLE, description=(
        "what `snr_db` refers to: the paper's PSNR (eq. 1) or the average symbol power"))] = DEFAULT_SNR_DEFINITION
    channel: Annotated[ChannelModel, Form(examples=EMPTY_EXAMPLE)] = DEFAULT_CHANNEL
    equalize: Annotated[bool, Form(description="zero-forcing equalisation of fading channels",
                                   examples=EMPTY_EXAMPLE)] = True
    rician_k_db: Annotated[float, Form(ge=MIN_RICIAN_K_DB, le=MAX_RICIAN_K_DB, description="Rician K-factor in dB",
                                       examples=EMPTY_EXAMPLE)] = DEFAULT_RICIAN_K_DB
    sampler: Annotated[str | None, Form(pattern=SAMPLER_NAME_PATTERN, description="empty: the receiver's default",
                                        examples=EMPTY_EXAMPLE)] = None
    steps: Annotated[int | None, Form(ge=MIN_STEPS, le=MAX_STEPS, description="empty: the sampler's default",
                                      examples=EMPTY_EXAMPLE)] = None
    guidance: Annotated[float, Form(ge=0, le=MAX_GUIDANCE, description="classifier-free guidance scale",
                                    examples=EMPTY_EXAMPLE)] = DEFAULT_GUIDANCE
    seed: Annotated[int | None, Form(ge=0, le=MAX_SEED, description="empty: random", examples=EMPTY_EXAMPLE)] = None
    downsample_factor: Annotated[int | None, Form(ge=1, le=MAX_DOWNSAMPLE_FACTOR, description="empty: the sender's setting",
                                                  examples=EMPTY_EXAMPLE)] = None
    compression: Annotated[Compression | None, Form(description="empty: the sender's setting",
                                                    examples=EMPTY_EXAMPLE)] = None
    jpeg_quality: Annotated[int | None, Form(ge=1, le=100, description="empty: the sender's setting",
                                             examples=EMPTY_EXAMPLE)] = None
    budget: Annotated[str | None, Form(max_length=40, examples=EMPTY_EXAMPLE, description=(
        "channel-use budget: complex channel uses (an integer: 3072) or a bandwidth ratio per value of the "
        "H x W x 3 source (a fraction or a decimal: 1/12, 0.083, 2.0); the sender picks downsample_factor, "
        "compression and jpeg_quality with the best expected mIoU at the requested SNR within it "
        "(docs/rate-quality.md), so those must stay empty"))] = None
    use_fds: Annotated[bool, Form(description="fast denoising of the received maps", examples=EMPTY_EXAMPLE)] = True
    link: Annotated[Link, Form(examples=EMPTY_EXAMPLE, description=(
        "how the scene travels: maps (the paper's present-class maps as analog symbols), digital (the label map "
        "coded losslessly, 5G LDPC + QAM), learned (the learned map encoder) or auto (with budget: the one the "
        "rate-quality table expects to do best at the SNR, docs/rate-quality.md)"))] = DEFAULT_LINK
    scheme: Annotated[str | None, Form(max_length=40, examples=EMPTY_EXAMPLE, description=(
        f"the digital link's modulation and code rate, one of {', '.join(MCS_BY_NAME)}; empty: the scheme "
        "measured to decode at the SNR (link adaptation)"))] = None

    def transmission_request(self, settings: SenderSettings) -> TransmissionRequest:
        """What the pipeline sends, the sender's settings filling the empty fields (a random seed).
        A scheme is the digital link's: with another link it is refused (422, naming `scheme`)."""
        if self.scheme is not None and self.link not in (Link.DIGITAL, Link.AUTO):
            raise TransmissionError(grpc.StatusCode.INVALID_ARGUMENT, 422,
                                    f"scheme sets the digital link's modulation and code rate; link is {self.link.value}",
                                    field="scheme")
        snr_db = DEFAULT_SNR_DB if self.snr_db is None else self.snr_db
        return TransmissionRequest(
            kind=self.kind,
            sampling=SamplingOptions(sampler=self.sampler or "", steps=self.steps or 0, guidance=self.guidance),
            seed=secrets.randbits(32) if self.seed is None else self.seed,
            downsample_factor=self.downsample_factor or settings.downsample_factor,
            compression=self.compression or settings.compression,
            jpeg_quality=self.jpeg_quality or settings.jpeg_quality,
            use_fds=self.use_fds,
            budget=None if self.budget is None else BudgetRequest(
                text=self.budget, snr_db=snr_db, snr_definition=self.snr_definition.value, link=self.link,
                codec_given=any(v is not None for v in (self.downsample_factor, self.compression, self.jpeg_quality)),
                scheme=self.scheme),
            link=self.link,
            scheme=self.scheme,
            factor_given=self.downsample_factor is not None,
            snr_db=snr_db,
            snr_definition=self.snr_definition.value,
        )

    def channel_request(self, seed: int) -> gesco_pb2.ChannelRequest:
        """The channel the transmission goes through: its model, and the SNR (DEFAULT_SNR_DB when
        empty) under snr_definition."""
        return gesco_pb2.ChannelRequest(
            model=self.channel.value,
            snr_db=DEFAULT_SNR_DB if self.snr_db is None else self.snr_db,
            snr_definition=transport.snr_definition_to_proto(self.snr_definition),
            equalize=self.equalize,
            seed=seed,
            rician_k_db=self.rician_k_db,
        )


_PARAMETERS = TypeAdapter(TransmissionParameters)


class TransmissionError(Exception):
    """The transmission was not sent. `code` is its gRPC status, `http_status` its REST one;
    `field` names the parameter to blame (`file`: the image), `retry_after_s` says when to come
    back, `details` are further keys of the REST error body."""

    def __init__(self, code: grpc.StatusCode, http_status: int, message: str, field: str | None = None,
                 retry_after_s: int | None = None, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
        self.details = details


def parse_parameters(values: Mapping[str, Any]) -> TransmissionParameters:
    """Parameters from the fields a client set, checked against the REST form's declarations;
    a TransmissionError naming the first bad field (INVALID_ARGUMENT, 422) otherwise."""
    try:
        return _PARAMETERS.validate_python(dict(values))
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise TransmissionError(grpc.StatusCode.INVALID_ARGUMENT, 422, first["msg"], field=field) from None


class TransmissionAccepted(TransmissionRecord):
    """The answer to a transmission sent: where to follow it, and the record of what was sent."""

    id: str
    status_url: str
    image_url: str
    queue_position: int
    seed: int
    segmenter: dict[str, Any]
    # With a budget: the budget, the rate-quality table and the coding it picked (sender_service/budget.py).
    budget: dict[str, Any] | None = None


async def send_transmission(
    state: SenderState, data: bytes, parameters: TransmissionParameters, transmission_id: str
) -> TransmissionAccepted:
    """Prepare `data` (a photo or a label map) as `parameters` ask, stream it through the channel
    simulator to the receiver and answer what was sent; TransmissionError when it cannot be."""
    settings = state.settings
    request = parameters.transmission_request(settings)
    try:
        prepared = await run_in_threadpool(prepare_transmission, data, request, settings, state.segmenter,
                                           transmission_id)
    except FieldError as error:
        raise TransmissionError(grpc.StatusCode.INVALID_ARGUMENT, error.status_code, error.message,
                                field=error.field) from None
    except NotReadyError as error:
        raise TransmissionError(grpc.StatusCode.UNAVAILABLE, 503, f"photos cannot be segmented yet: {error}",
                                retry_after_s=NOT_READY_RETRY_AFTER_S) from None
    except TableUnavailableError as error:
        raise TransmissionError(grpc.StatusCode.UNAVAILABLE, 503, str(error), field="budget") from None
    for stage, seconds in prepared.timings_s.items():
        state.metrics.observe_stage(stage, seconds)
    channel = parameters.channel_request(request.seed)
    try:
        with state.metrics.time_stage("channel_rpc"):
            ack = await state.channel_sim.transmit(prepared.header, channel, prepared.symbols, settings.rpc_timeout_s)
    except ChannelSimCallError as error:
        log.warning("channel call failed", extra={"grpc_code": error.code.name})
        raise _channel_error(error, settings, transmission_id) from None

    header = prepared.header
    header.channel_report.CopyFrom(ack.channel_report)
    public = settings.receiver_public_url
    log.info("transmission sent", extra={"queue_position": ack.queue_position})
    return TransmissionAccepted(
        id=transmission_id,
        status_url=receiver_client.status_url(public, transmission_id),
        image_url=receiver_client.image_url(public, transmission_id),
        queue_position=ack.queue_position,
        seed=request.seed,
        segmenter={"used": prepared.segmenter_used, **_segmenter_summary(state.segmenter)},
        budget=prepared.budget,
        **dict(TransmissionRecord.from_header(header, header.sampling)),
    )


def _segmenter_summary(loader: SegmenterLoader) -> dict[str, Any]:
    return dict(loader.info) if loader.info else {"trained": False, "note": "the segmenter is loading"}


def _channel_error(error: ChannelSimCallError, settings: SenderSettings, transmission_id: str) -> TransmissionError:
    """The channel simulator's (or, through it, the receiver's) refusal: its gRPC code, and the
    HTTP status a REST client gets (502 for a code with no better match). A refused sampling
    option is the receiver's setting, and says so."""
    http_status = _GRPC_TO_HTTP.get(error.code, 502)
    message = {
        503: f"the channel at {settings.channel_address} is unavailable: {error.details}",
        504: f"the channel call exceeded its {settings.rpc_timeout_s:g} s deadline: {error.details}",
    }.get(http_status, f"the channel refused the transmission: {error.details}")
    field = None
    if error.code is grpc.StatusCode.INVALID_ARGUMENT:
        prefix, field = next(((prefix, name) for prefix, name in _PARAMETERS_OF_HEADER.items()
                              if error.details.startswith(prefix)), (None, None))
        if prefix is not None:
            message = f"the receiver refused the sampling: {field}{error.details.removeprefix(prefix)}"
    # Busy: when the receiver said, else the sender's default; unavailable (its job store down):
    # when the receiver said, if it did.
    retry_after_s = {429: error.retry_after_s or settings.retry_after_s, 503: error.retry_after_s}.get(http_status)
    return TransmissionError(error.code, http_status, message, field=field, retry_after_s=retry_after_s,
                             grpc_code=error.code.name, id=transmission_id)
