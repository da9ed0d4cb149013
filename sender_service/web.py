"""The web page of the whole link (served at /) and the small API it needs beside the sender's own.

* `GET /`, `/static/...`: the page (plain HTML, JS and CSS in sender_service/static, no CDN).
* `GET /v1/examples`, `/v1/examples/{name}`: the bundled example inputs.
* `GET /v1/classes`: class ids, names and the palette every map on the page is drawn in (CamVid's
  colours for the project's 12 classes).
* `POST /v1/preview`: what the sender transmits for an upload, without transmitting it: the label
  map (the segmentation of a photo) and the present-class maps after downsampling and compression,
  as PNGs, with the bit counts. It runs the same `pipeline.prepare_transmission` as
  POST /v1/transmissions, and segmentation is deterministic, so it shows what that call sends.
* `POST /v1/analog`: the analog baseline of the evaluation (the RGB pixels themselves as unit-power
  symbols, `codec.encode_image_analog`) through the same channel model at several SNRs. It runs
  `shared.semantic.channels.apply_channel`, the function channel_sim runs, in this process: the
  channel simulator only forwards semantic transmissions to the receiver and has no call that
  returns corrupted symbols. Same model, SNR definition, equalisation and seed as a transmission.
* `/receiver/v1/transmissions/{id}...`: the receiver's status (long poll included), image, maps
  and cancel, relayed to `GESCO_SENDER_RECEIVER_INTERNAL_URL` (or the public URL), so a browser
  that can reach only the sender sees every stage without CORS. `?colour=true` on a `*_labels.png`
  map answers it in the class palette.

The module imports no torch: the CamVid palette and the channel models are imported on first use.
"""
from __future__ import annotations

import base64
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import cv2
import httpx
import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from gesco import options
from gesco.options import DEFAULT_CHANNEL, DEFAULT_RICIAN_K_DB, DEFAULT_SNR_DEFINITION, ChannelModel, SnrDefinition
from sender_service.pipeline import (
    LABEL_MAP,
    PHOTO,
    FieldError,
    NotReadyError,
    PreparedTransmission,
    SegmenterLoader,
    TransmissionRequest,
    prepare_transmission,
)
from sender_service.settings import SenderSettings
from sender_service.transmissions import EMPTY_EXAMPLE
from shared.limits import (
    MAX_DOWNSAMPLE_FACTOR,
    MAX_GUIDANCE,
    MAX_RICIAN_K_DB,
    MAX_SNR_DB,
    MAX_STATUS_WAIT_S,
    MAX_STEPS,
    MIN_RICIAN_K_DB,
    MIN_SNR_DB,
    MIN_STEPS,
    InvalidRequestError,
)
from shared.paths import REPO_ROOT
from shared.semantic import codec
from shared.semantic.codec import Compression
from shared.semantic.digital_link import MCS_TABLE
from shared.wire import imageio, transport
from shared.wire.rest_errors import error_response

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The SNRs of the page's strip (dB).
STRIP_SNRS_DB = (1.0, 5.0, 10.0, 20.0, 100.0)
MAX_ANALOG_SNRS = 8
# A relayed request gets this long beyond its long poll.
RELAY_TIMEOUT_S = 15.0
RELAYED_MAPS = ("received.png", "fds.png", "received_labels.png", "fds_labels.png")
_COMPRESSION_TITLES = {Compression.NONE: "none (the maps as they are)", Compression.JPEG: "JPEG"}

TransmissionId = Annotated[
    str, PathParam(pattern=transport.TRANSMISSION_ID_PATTERN.pattern, description="32 lowercase hex characters")
]
Kind = Annotated[Literal["photo", "label_map"], Form(description="what `file` is", examples=EMPTY_EXAMPLE)]
Upload = Annotated[UploadFile, File(description="a photo (PNG/JPEG/WebP/BMP) or a label-map PNG of class ids")]


@dataclass(frozen=True)
class Example:
    name: str
    kind: str
    title: str

    @property
    def path(self) -> Path:
        return REPO_ROOT / "examples" / self.name


EXAMPLES = {
    example.name: example
    for example in (
        Example("street_labels.png", LABEL_MAP, "Street layout (label map drawn by examples/make_examples.py)"),
        Example("street_photo.jpg", PHOTO, "Street photo (made by the project's diffusion model from that layout)"),
    )
}

router = APIRouter()


def mount_web_page(app: FastAPI) -> None:
    """Serve the page at /, its assets at /static and the routes above."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="web-static")


@router.get("/", include_in_schema=False)
def web_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/v1/examples", tags=["web page"])
def list_examples() -> list[dict[str, str]]:
    """The bundled example inputs: name, kind (the form's `kind` for it), title and URL."""
    return [
        {"name": e.name, "kind": e.kind, "title": e.title, "url": f"/v1/examples/{e.name}"}
        for e in EXAMPLES.values()
    ]


@router.get("/v1/examples/{name}", tags=["web page"], response_class=Response,
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}, 404: {}})
def get_example(name: str) -> Response:
    """One bundled example file."""
    example = EXAMPLES.get(name)
    if example is None:
        return error_response(404, f"no example {name[:40]!r}; expected one of {sorted(EXAMPLES)}", "name")
    media_type = "image/png" if name.endswith(".png") else "image/jpeg"
    return FileResponse(example.path, media_type=media_type)


class Choice(BaseModel):
    """One value a field takes: `name` as requests spell it, `title` as a list shows it."""

    name: str
    title: str


class SamplerChoice(Choice):
    default_steps: int


class Range(BaseModel):
    min: float
    max: float


class Options(BaseModel):
    """What the transmission fields take (POST /v1/transmissions, the gRPC Sender.Transmit):
    the choices of each list, the ranges of numbers and the value of each field left empty."""

    channels: list[Choice]
    snr_definitions: list[Choice]
    samplers: list[SamplerChoice]
    compressions: list[Choice]
    downsample_factors: list[int]
    links: list[Choice]
    schemes: list[str]  # the digital link's modulation and coding schemes, most robust first
    limits: dict[str, Range]
    defaults: dict[str, Any]


@router.get("/v1/options", tags=["web page"])
def list_options(request: Request) -> Options:
    """The choices, limits and defaults of the transmission fields, from the registries the
    services check requests against (gesco/options.py, shared/limits.py) and this sender's
    settings; the web page builds its form from them. `defaults.sampler` is the model's default
    sampler: a receiver may be set to another one for requests that name none."""
    settings = _settings(request)
    return Options(
        channels=[Choice(name=model.value, title=options.CHANNEL_TITLES[model]) for model in ChannelModel],
        snr_definitions=[Choice(name=definition.value, title=options.SNR_DEFINITION_TITLES[definition])
                         for definition in SnrDefinition],
        samplers=[SamplerChoice(name=name, title=options.SAMPLER_TITLES[name], default_steps=steps)
                  for name, steps in options.SAMPLER_DEFAULT_STEPS.items()],
        compressions=[Choice(name=compression.value, title=_COMPRESSION_TITLES[compression]) for compression in Compression],
        downsample_factors=list(options.DOWNSAMPLE_FACTORS),
        links=[Choice(name=link.value, title=options.LINK_TITLES[link]) for link in options.Link],
        schemes=[mcs.name for mcs in MCS_TABLE],
        limits={
            "snr_db": Range(min=MIN_SNR_DB, max=MAX_SNR_DB),
            "steps": Range(min=MIN_STEPS, max=MAX_STEPS),
            "guidance": Range(min=0.0, max=MAX_GUIDANCE),
            "rician_k_db": Range(min=MIN_RICIAN_K_DB, max=MAX_RICIAN_K_DB),
            "downsample_factor": Range(min=1, max=MAX_DOWNSAMPLE_FACTOR),
            "jpeg_quality": Range(min=1, max=100),
        },
        defaults={
            "channel": DEFAULT_CHANNEL.value,
            "snr_definition": DEFAULT_SNR_DEFINITION.value,
            "snr_db": options.DEFAULT_SNR_DB,
            "rician_k_db": DEFAULT_RICIAN_K_DB,
            "sampler": options.DEFAULT_SAMPLER,
            "guidance": options.DEFAULT_GUIDANCE,
            "downsample_factor": settings.downsample_factor,
            "compression": settings.compression.value,
            "jpeg_quality": settings.jpeg_quality,
            "link": options.DEFAULT_LINK.value,
        },
    )


@router.get("/v1/classes", tags=["web page"])
async def list_classes(request: Request) -> list[dict[str, Any]]:
    """Every class id with its name and the colour the page and `?colour=true` maps draw it in."""
    return await run_in_threadpool(class_table, _settings(request).num_classes)


@router.post("/v1/preview", tags=["web page"],
             responses={400: {"description": "the upload or a field is unusable"},
                        413: {"description": "the upload is too large"},
                        503: {"description": "photos cannot be segmented yet"}})
async def preview(
    request: Request,
    file: Upload,
    kind: Kind = PHOTO,
    downsample_factor: Annotated[int | None, Form(ge=1, le=MAX_DOWNSAMPLE_FACTOR, description="empty: the sender's setting",
                                                  examples=EMPTY_EXAMPLE)] = None,
    compression: Annotated[Compression | None, Form(description="empty: the sender's setting",
                                                    examples=EMPTY_EXAMPLE)] = None,
    jpeg_quality: Annotated[int | None, Form(ge=1, le=100, description="empty: the sender's setting",
                                             examples=EMPTY_EXAMPLE)] = None,
) -> JSONResponse:
    """The label map and the transmitted present-class maps of an upload, without sending it.

    `segmentation_png` is the label map in the class palette, `labels_png` its class ids (8-bit);
    `transmitted_maps` holds one greyscale PNG per present class: the map as the symbols carry it
    (after downsampling and compression, before power scaling), 0 black to 1 white.
    """
    settings = _settings(request)
    spec = TransmissionRequest(
        kind=kind,
        downsample_factor=downsample_factor or settings.downsample_factor,
        compression=compression or settings.compression,
        jpeg_quality=jpeg_quality or settings.jpeg_quality,
    )
    data = await file.read(settings.max_upload_bytes + 1)
    started = time.perf_counter()
    try:
        prepared = await run_in_threadpool(
            prepare_transmission, data, spec, settings, _segmenter(request), transport.new_transmission_id()
        )
    except FieldError as error:
        return error_response(error.status_code, error.message, error.field)
    except NotReadyError as error:
        return error_response(503, f"photos cannot be segmented yet: {error}", headers={"Retry-After": "5"})
    answer = await run_in_threadpool(_preview_body, prepared, settings.num_classes)
    answer["timings_ms"] = {
        **{stage: round(seconds * 1000.0, 2) for stage, seconds in prepared.timings_s.items()},
        "total": round((time.perf_counter() - started) * 1000.0, 2),
    }
    answer["segmenter"] = {"used": prepared.segmenter_used, **(_segmenter(request).info or {})}
    return JSONResponse(answer)


@router.post("/v1/analog", tags=["web page"],
             responses={400: {"description": "the upload or a field is unusable"},
                        413: {"description": "the upload is too large"}})
async def analog(
    request: Request,
    file: Upload,
    kind: Kind = PHOTO,
    snrs_db: Annotated[str, Form(description=f"comma-separated SNRs in dB, at most {MAX_ANALOG_SNRS}",
                                 examples=EMPTY_EXAMPLE)] = ",".join(f"{snr:g}" for snr in STRIP_SNRS_DB),
    snr_definition: Annotated[SnrDefinition, Form(examples=EMPTY_EXAMPLE)] = DEFAULT_SNR_DEFINITION,
    channel: Annotated[ChannelModel, Form(examples=EMPTY_EXAMPLE)] = DEFAULT_CHANNEL,
    equalize: Annotated[bool, Form(description="zero-forcing equalisation of fading channels",
                                   examples=EMPTY_EXAMPLE)] = True,
    rician_k_db: Annotated[float, Form(ge=MIN_RICIAN_K_DB, le=MAX_RICIAN_K_DB,
                                       description="Rician K-factor in dB", examples=EMPTY_EXAMPLE)] = DEFAULT_RICIAN_K_DB,
    seed: Annotated[int, Form(ge=0, le=2**63 - 1, description="channel noise seed", examples=EMPTY_EXAMPLE)] = 0,
) -> JSONResponse:
    """The analog baseline: the input's RGB pixels sent as unit-power symbols through the channel.

    A photo is sent at the semantic map size (resized as the sender resizes it before
    segmentation); a label map is sent as its picture in the class palette. Computed in the
    sender with the channel simulator's own channel code (`shared.semantic.channels`), as the
    evaluation computes its analog baseline; `method` in the answer says so.
    """
    settings = _settings(request)
    try:
        snrs = _parse_snrs(snrs_db)
    except ValueError as error:
        return error_response(422, str(error), "snrs_db")
    data = await file.read(settings.max_upload_bytes + 1)
    try:
        image = await run_in_threadpool(_analog_input, data, kind, settings)
    except FieldError as error:
        return error_response(error.status_code, error.message, error.field)
    try:
        results = await run_in_threadpool(
            _analog_through_channel, image, snrs, channel, snr_definition, equalize, rician_k_db, seed
        )
    except InvalidRequestError as error:
        return error_response(400, str(error), None)
    return JSONResponse({
        "method": "analog baseline: centred RGB pixels at unit power (codec.encode_image_analog) through "
                  "shared.semantic.channels.apply_channel, computed in the sender",
        "input_png": _data_url(imageio.encode_png(image)),
        "payload_bits": int(image.size * codec.PIXEL_BITS),
        "channel": {"model": channel.value, "snr_definition": snr_definition.value, "equalize": equalize,
                    "rician_k_db": rician_k_db, "seed": seed},
        "results": results,
    })


@router.get("/receiver/v1/transmissions/{transmission_id}", tags=["receiver relay"],
            responses={503: {"description": "the receiver cannot be reached"}})
async def relay_status(
    request: Request,
    transmission_id: TransmissionId,
    wait_s: Annotated[float, Query(ge=0, le=MAX_STATUS_WAIT_S, description="the receiver's long poll")] = 0.0,
) -> Response:
    """The receiver's status of a transmission, relayed as it answers."""
    params = {"wait_s": f"{wait_s:g}"} if wait_s > 0 else None
    return await _relay(request, "GET", f"/v1/transmissions/{transmission_id}", params, RELAY_TIMEOUT_S + wait_s)


@router.get("/receiver/v1/transmissions/{transmission_id}/image", tags=["receiver relay"], response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 503: {"description": "the receiver cannot be reached"}})
async def relay_image(request: Request, transmission_id: TransmissionId) -> Response:
    """The generated image, relayed."""
    return await _relay(request, "GET", f"/v1/transmissions/{transmission_id}/image")


@router.get("/receiver/v1/transmissions/{transmission_id}/maps/{map_name}", tags=["receiver relay"],
            response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 503: {"description": "the receiver cannot be reached"}})
async def relay_map(
    request: Request,
    transmission_id: TransmissionId,
    map_name: Literal["received.png", "fds.png", "received_labels.png", "fds_labels.png"],
    colour: Annotated[bool, Query(description="a *_labels.png map in the class palette of /v1/classes")] = False,
) -> Response:
    """A map of the receiver, relayed; with colour=true a label map is drawn in the class palette."""
    if colour and not map_name.endswith("_labels.png"):
        return error_response(422, "colour=true applies to received_labels.png and fds_labels.png", "colour")
    answer = await _relay(request, "GET", f"/v1/transmissions/{transmission_id}/maps/{map_name}")
    if not colour or answer.status_code != 200:
        return answer
    try:
        labels = imageio.decode_label_map_png(answer.body, 256, len(answer.body), 1 << 24)
    except imageio.ImageDecodeError as error:
        return error_response(502, f"the receiver's {map_name} is not a label map: {error}", None)
    palette = await run_in_threadpool(_palette, _settings(request).num_classes)
    if int(labels.max()) >= len(palette):
        return error_response(502, f"the receiver's {map_name} has class id {int(labels.max())}", None)
    return Response(imageio.encode_png(palette[labels]), media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.post("/receiver/v1/transmissions/{transmission_id}/cancel", tags=["receiver relay"],
             responses={503: {"description": "the receiver cannot be reached"}})
async def relay_cancel(request: Request, transmission_id: TransmissionId) -> Response:
    """Ask the receiver to cancel a transmission, relayed as it answers."""
    return await _relay(request, "POST", f"/v1/transmissions/{transmission_id}/cancel")


@functools.cache
def class_table(num_classes: int) -> list[dict[str, Any]]:
    """Id, name and "#rrggbb" colour of each class: CamVid's for its 12 classes, else generic."""
    palette = _palette(num_classes)
    names = _class_names(num_classes)
    return [{"id": k, "name": names[k], "colour": "#{:02x}{:02x}{:02x}".format(*palette[k])}
            for k in range(num_classes)]


@functools.cache
def _palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB: CamVid's palette for 12 classes, else hues around the circle."""
    from shared.semantic.data import CAMVID_CLASSES, CAMVID_COLORS  # torch: imported on first use

    if num_classes == len(CAMVID_CLASSES):
        return np.asarray(CAMVID_COLORS, dtype=np.uint8)
    hsv = np.stack([np.arange(num_classes) * 180 // num_classes, np.full(num_classes, 200),
                    np.where(np.arange(num_classes) % 2, 150, 230)], axis=-1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def _class_names(num_classes: int) -> list[str]:
    from shared.semantic.data import CAMVID_CLASSES

    if num_classes == len(CAMVID_CLASSES):
        return list(CAMVID_CLASSES)
    return [f"class {k}" for k in range(num_classes)]


def _preview_body(prepared: PreparedTransmission, num_classes: int) -> dict[str, Any]:
    semantic = prepared.semantic
    present = semantic.present_class_ids
    maps = (prepared.symbols.astype(np.float64) / semantic.scale).reshape(
        len(present), semantic.map_height, semantic.map_width
    )
    names = _class_names(num_classes)
    tiles = [
        {"class_id": class_id, "name": names[class_id],
         "png": _data_url(imageio.encode_png(np.rint(np.clip(class_map, 0.0, 1.0) * 255).astype(np.uint8)))}
        for class_id, class_map in zip(present, maps)
    ]
    labels = prepared.labels
    return {
        "segmentation_png": _data_url(imageio.encode_png(_palette(num_classes)[labels])),
        "labels_png": _data_url(imageio.encode_png(labels)),
        "transmitted_maps": tiles,
        "semantic": {
            "height": semantic.height,
            "width": semantic.width,
            "map_height": semantic.map_height,
            "map_width": semantic.map_width,
            "present_class_ids": list(present),
            "downsample_factor": semantic.downsample_factor,
            "compression": semantic.compression.value,
            # What to add to an SNR under each definition for the average-power SNR of these
            # symbols: the paper's PSNR refers the noise to the 0/1 maps, which the symbols carry
            # times `scale` at unit power (docs/snr-definitions.md).
            "average_power_snr_offset_db": {
                definition.value: -20.0 * math.log10(semantic.scale) if definition is SnrDefinition.PAPER_PSNR else 0.0
                for definition in SnrDefinition
            },
        },
        "bits": {
            "payload_bits": semantic.payload_bits,
            "num_symbols": semantic.num_symbols,
            "channel_uses": math.ceil(semantic.num_symbols / 2),
            "image_bits_jpeg": prepared.header.image_bits_jpeg,
        },
        "classes": class_table(num_classes),
    }


def _analog_input(data: bytes, kind: str, settings: SenderSettings) -> np.ndarray:
    """The RGB picture the analog baseline sends, at the semantic map size."""
    size = (settings.map_width, settings.map_height)
    try:
        if kind == PHOTO:
            image = imageio.decode_image_bounded(data, settings.max_upload_bytes, settings.max_pixels)
            shrinking = image.shape[0] >= settings.map_height and image.shape[1] >= settings.map_width
            return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        labels = imageio.decode_label_map_png(data, settings.num_classes, settings.max_upload_bytes,
                                              settings.max_pixels)
    except imageio.UploadTooLargeError as error:
        raise FieldError("file", str(error), status_code=413) from error
    except imageio.ImageDecodeError as error:
        raise FieldError("file", str(error)) from error
    return _palette(settings.num_classes)[cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)]


def _analog_through_channel(image: np.ndarray, snrs: list[float], model: ChannelModel, definition: SnrDefinition,
                            equalize: bool, rician_k_db: float, seed: int) -> list[dict[str, Any]]:
    """As the evaluation's analog baseline: for the paper's PSNR the noise is referred to the peak
    1 of the [0, 1] pixels (map_scale = the encoder's scale), as eq. 1 refers it to the 0/1 maps."""
    from shared.semantic.channels import ChannelConfig, apply_channel  # torch and Sionna: first use

    encoded = codec.encode_image_analog(image)
    results = []
    for snr_db in snrs:
        config = ChannelConfig(model=model, snr_db=snr_db, snr_definition=definition, equalize=equalize,
                               rician_k_db=rician_k_db)
        received = apply_channel(encoded.symbols, config, seed=seed, map_scale=encoded.scale)
        results.append({
            "snr_db": snr_db,
            "measured_snr_db": round(received.measured_snr_db, 3),
            "channel_uses": received.channel_uses,
            "png": _data_url(imageio.encode_png(codec.decode_image_analog(received.symbols, encoded))),
        })
    return results


def _parse_snrs(text: str) -> list[float]:
    try:
        snrs = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"snrs_db must be comma-separated numbers, got {text[:60]!r}") from None
    if not 1 <= len(snrs) <= MAX_ANALOG_SNRS:
        raise ValueError(f"snrs_db needs 1 to {MAX_ANALOG_SNRS} values, got {len(snrs)}")
    for snr in snrs:
        if not (math.isfinite(snr) and MIN_SNR_DB <= snr <= MAX_SNR_DB):
            raise ValueError(f"each SNR must lie in [{MIN_SNR_DB:g}, {MAX_SNR_DB:g}] dB, got {snr:g}")
    return snrs


async def _relay(request: Request, method: str, path: str, params: dict[str, str] | None = None,
                 timeout_s: float = RELAY_TIMEOUT_S) -> Response:
    settings = _settings(request)
    url = f"{settings.receiver_poll_url}{path}"
    try:
        answer = await _http(request).request(method, url, params=params, timeout=timeout_s)
    except httpx.TimeoutException:
        return error_response(504, f"the receiver at {settings.receiver_poll_url} did not answer within {timeout_s:g} s")
    except httpx.TransportError as error:
        return error_response(503, f"the receiver at {settings.receiver_poll_url} cannot be reached: "
                               f"{type(error).__name__}", headers={"Retry-After": str(settings.retry_after_s)})
    headers = {"Cache-Control": "no-cache"}
    if "retry-after" in answer.headers:
        headers["Retry-After"] = answer.headers["retry-after"]
    return Response(answer.content, status_code=answer.status_code, headers=headers,
                    media_type=answer.headers.get("content-type"))


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# The sender's resources (sender_service.app.SenderState), opened by the app's lifespan.
def _settings(request: Request) -> SenderSettings:
    return request.app.state.sender.settings


def _segmenter(request: Request) -> SegmenterLoader:
    return request.app.state.sender.segmenter


def _http(request: Request) -> httpx.AsyncClient:
    return request.app.state.sender.http
