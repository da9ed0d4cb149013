"""The sender's side of the paper's framework (sec. 3.2), apart from the HTTP layer.

upload -> bounded decode -> label map (segmented photo, or the uploaded map) at the semantic size
-> present-class maps, compressed and power-normalised by `shared.semantic.codec` -> a TransmissionHeader
and the symbols that follow it on the wire. The header's channel request (SNR, model) is not the
pipeline's: the channel simulator's client adds it. Request errors are `FieldError`s naming the
form field.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gesco.options import DEFAULT_GUIDANCE, DEFAULT_LINK, DEFAULT_SNR_DB, DEFAULT_SNR_DEFINITION, Link
from gesco.v1 import gesco_pb2
from sender_service.budget import BudgetError, BudgetRequest, TableUnavailableError, choose_coding, load_table
from sender_service.link_coding import (
    LinkEncoding,
    average_power_snr,
    choose_scheme,
    encode_digital,
    encode_learned,
    encode_maps,
    map_encoder_symbols,
    map_encoders,
)
from sender_service.settings import SenderSettings
from shared.limits import SamplingOptions
from shared.paths import REPO_ROOT
from shared.semantic import codec
from shared.semantic.digital_link import code_layout, label_option
from shared.wire import imageio, transport

log = logging.getLogger(__name__)

PHOTO = "photo"
LABEL_MAP = "label_map"


class FieldError(ValueError):
    """A request value the sender cannot use; `field` is the form field to blame."""

    def __init__(self, field: str, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status_code = status_code


class NotReadyError(RuntimeError):
    """The segmenter has not loaded (yet, or at all): photos cannot be segmented."""


@dataclass(frozen=True)
class TransmissionRequest:
    """What a client chose for the payload and its sampling, already range-checked by the HTTP layer."""

    kind: str = PHOTO
    sampling: SamplingOptions = SamplingOptions(guidance=DEFAULT_GUIDANCE)
    seed: int = 0
    downsample_factor: int = 1
    compression: codec.Compression = codec.Compression.NONE
    jpeg_quality: int = 75
    use_fds: bool = True
    # A channel-use budget: the map coding is then chosen from the rate-quality table.
    budget: BudgetRequest | None = None
    link: Link = DEFAULT_LINK
    scheme: str | None = None  # the digital link's scheme; None: the scheme for the SNR
    # The client chose downsample_factor (the digital link then sends the label map at it, else whole).
    factor_given: bool = False
    snr_db: float = DEFAULT_SNR_DB
    snr_definition: str = DEFAULT_SNR_DEFINITION.value


@dataclass(frozen=True)
class PreparedTransmission:
    """A transmission ready to stream: the wire header (no channel request yet), the symbols and
    what the client is told."""

    header: gesco_pb2.TransmissionHeader
    symbols: np.ndarray
    semantic: codec.SemanticHeader
    segmenter_used: bool
    # Seconds spent per stage ("decode", "segment" for photos, "encode"), for the service's metrics.
    timings_s: dict[str, float] = field(default_factory=dict)
    # The label map that was encoded (the segmentation of a photo), at the semantic size.
    labels: np.ndarray | None = None
    # With a budget: what it was, the table and the coding chosen (sender_service/budget.py).
    budget: dict[str, Any] | None = None


@dataclass
class SegmenterLoader:
    """Loads the segmenter off the event loop at startup; /readyz reports when it is usable.

    A missing checkpoint falls back to an untrained network (label maps are then arbitrary), which
    keeps the pipeline runnable on a fresh clone; `info` says so in every response.
    """

    settings: SenderSettings
    segmenter: Any = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _ready: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        threading.Thread(target=self._load, name="segmenter-loader", daemon=True).start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.segmenter is not None

    def wait(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self.segmenter is not None

    def segment(self, image: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        """The photo's label map at `out_size`, segmented at the segmenter's own resolution."""
        if not self.ready:
            raise NotReadyError(self.error or "the segmenter is still loading")
        with self._lock:  # one forward pass at a time keeps memory flat under load
            return self.segmenter.segment(image, out_size)

    def _load(self) -> None:
        from shared.semantic.segmenter import Segmenter, SegmenterConfig  # torch import off the startup path

        path = self.settings.segmenter_checkpoint
        try:
            if path.is_file():
                segmenter = Segmenter.from_checkpoint(path, device=self.settings.device)
                info = {"trained": True, "checkpoint": _display_path(path)}
                log.info("segmenter loaded", extra={"checkpoint": str(path)})
            else:
                config = SegmenterConfig(num_classes=self.settings.num_classes)
                segmenter = Segmenter.untrained(config, device=self.settings.device)
                info = {
                    "trained": False,
                    "checkpoint": None,
                    "note": f"checkpoint {_display_path(path)} not found: an untrained segmenter "
                    "is in use, so label maps from photos are arbitrary",
                }
                log.warning("segmenter checkpoint missing: using an untrained segmenter",
                            extra={"checkpoint": str(path)})
            if segmenter.config.num_classes != self.settings.num_classes:
                raise ValueError(
                    f"the segmenter predicts {segmenter.config.num_classes} classes but "
                    f"num_classes is {self.settings.num_classes}"
                )
            info["device"] = str(segmenter.device)
            self.info = info
            self.segmenter = segmenter
        except Exception as error:  # readiness must report any load failure, never crash the app
            self.error = f"segmenter failed to load from {path}: {error}"
            self.info = {"trained": False, "checkpoint": _display_path(path), "error": self.error}
            log.exception("segmenter failed to load")
        finally:
            self._ready.set()


def prepare_transmission(
    data: bytes,
    request: TransmissionRequest,
    settings: SenderSettings,
    segmenter: SegmenterLoader,
    transmission_id: str,
) -> PreparedTransmission:
    """Turn an upload into the header and symbols of one transmission (blocking: run it off the
    event loop)."""
    height, width = settings.map_height, settings.map_width
    factor = request.downsample_factor
    if height % factor or width % factor:
        raise FieldError(
            "downsample_factor",
            f"downsample_factor {factor} must divide the semantic map size {height}x{width}",
        )
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        if request.kind == PHOTO:
            image = imageio.decode_image_bounded(data, settings.max_upload_bytes, settings.max_pixels)
        else:
            labels = imageio.decode_label_map_png(
                data, settings.num_classes, settings.max_upload_bytes, settings.max_pixels
            )
    except imageio.UploadTooLargeError as error:
        raise FieldError("file", str(error), status_code=413) from error
    except imageio.ImageDecodeError as error:
        raise FieldError("file", str(error)) from error
    timings["decode"] = time.perf_counter() - started

    if request.kind == PHOTO:
        started = time.perf_counter()
        # The photo as decoded: the segmenter reads it at its own resolution, the map comes at the map size.
        labels = segmenter.segment(image, (height, width))
        timings["segment"] = time.perf_counter() - started
        image = _resize(image, height, width, cv2.INTER_AREA)
        image_bits = codec.jpeg_bits(image, settings.image_jpeg_quality)
        image_quality = settings.image_jpeg_quality
    else:
        labels = _resize(labels, height, width, cv2.INTER_NEAREST)
        image_bits, image_quality = 0, 0

    started = time.perf_counter()
    budget_record = None
    if request.budget is not None:
        try:
            choice = choose_coding(labels, request.budget, settings)
        except BudgetError as error:
            raise FieldError("budget", error.message, status_code=error.status_code) from None
        encoded, budget_record = choice.encoding, choice.record
    else:
        encoded = _encode_link(labels, request, settings)
    timings["encode"] = time.perf_counter() - started
    header = gesco_pb2.TransmissionHeader(
        transmission_id=transmission_id,
        semantic=transport.semantic_header_to_proto(encoded.semantic, encoded.framing),
        sampling=gesco_pb2.SamplingRequest(
            sampler=request.sampling.sampler,
            steps=request.sampling.steps,
            guidance=request.sampling.guidance,
            seed=request.seed,
            use_fds=request.use_fds,
        ),
        image_bits_jpeg=image_bits,
        image_jpeg_quality=image_quality,
    )
    return PreparedTransmission(
        header=header,
        symbols=encoded.symbols,
        semantic=encoded.semantic,
        segmenter_used=request.kind == PHOTO,
        timings_s=timings,
        labels=labels,
        budget=budget_record,
    )


def _encode_link(labels: np.ndarray, request: TransmissionRequest, settings: SenderSettings) -> LinkEncoding:
    """The request's link without a budget: the maps at the request's coding, the whole label map (or
    at the request's downsample_factor) over the digital link, or the learned link's widest encoder."""
    num_classes = settings.num_classes
    if request.link is Link.AUTO:
        raise FieldError("link", "link auto picks the representation for a budget: give budget too", status_code=422)
    if request.link is Link.MAPS:
        return encode_maps(labels, codec.CodecConfig(num_classes=num_classes, downsample_factor=request.downsample_factor,
                                                     compression=request.compression,
                                                     jpeg_quality=request.jpeg_quality))
    if request.link is Link.DIGITAL:
        try:
            table = None if request.scheme else load_table(settings.rate_quality_table)
        except TableUnavailableError:
            table = None  # no link adaptation measured: the most robust scheme, and the record says so
        try:
            scheme = choose_scheme(table, average_power_snr(labels, num_classes, request.snr_db,
                                                            request.snr_definition), request.scheme)
        except ValueError as error:
            raise FieldError("scheme", str(error), status_code=422) from None
        option = label_option(labels, request.downsample_factor if request.factor_given else 1, num_classes)
        return encode_digital(labels, option, code_layout(option.bits, scheme.mcs), num_classes)
    encoders = map_encoders(settings.map_encoders_dir)
    if not encoders:
        raise FieldError("link", f"no map encoder ({settings.map_encoders_dir.name}/map-jscc-*.pt) is installed: "
                                 "the learned link is unavailable", status_code=503)
    widest = max(encoders.values(), key=map_encoder_symbols)
    try:
        return encode_learned(labels, widest, num_classes)
    except ValueError as error:
        raise FieldError("link", str(error)) from None


def _resize(array: np.ndarray, height: int, width: int, shrink_interpolation: int) -> np.ndarray:
    """Resize to (height, width); maps already at that size are passed through untouched."""
    if array.shape[:2] == (height, width):
        return array
    enlarging = array.shape[0] * array.shape[1] < height * width
    interpolation = (
        cv2.INTER_LINEAR if enlarging and shrink_interpolation == cv2.INTER_AREA else shrink_interpolation
    )
    return np.ascontiguousarray(cv2.resize(array, (width, height), interpolation=interpolation))


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
