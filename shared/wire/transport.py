"""Wire format of a transmission: header-first frame streams and the semantic header in protobuf.

Every hop (sender -> channel -> receiver) speaks the same client stream: one TransmissionHeader,
then little-endian float32 symbol chunks of at most MAX_CHUNK_BYTES, so a large map never meets
gRPC's 4 MiB message limit. Everything read from the wire is validated here, once, before any
service trusts it: transmission ids end up in file paths and header sizes decide allocations.
"""
from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Iterator

import numpy as np

from gesco.options import Link, SnrDefinition, names
from gesco.v1 import gesco_pb2
from shared.limits import InvalidRequestError
from shared.semantic import codec
from shared.semantic.links import DigitalFraming, LinkFraming

MAX_CHUNK_BYTES = 1 << 20
TRANSMISSION_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
REQUEST_ID_METADATA_KEY = "x-request-id"
# Trailing-metadata key with the seconds a busy receiver asks callers to wait.
RETRY_AFTER_METADATA_KEY = "retry-after"
# Client channels between the services: a restarted peer is used again within seconds instead
# of after gRPC's default reconnect backoff of up to two minutes.
CLIENT_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
# Bounds on what a header may ask a receiver to allocate (K maps at height x width).
MAX_NUM_CLASSES = 1024
MAX_IMAGE_SIDE = 4096

SYMBOL_DTYPE = np.dtype("<f4")

_COMPRESSION_TO_PROTO = {
    codec.Compression.NONE: gesco_pb2.COMPRESSION_NONE,
    codec.Compression.JPEG: gesco_pb2.COMPRESSION_JPEG,
}
_COMPRESSION_FROM_PROTO = {value: key for key, value in _COMPRESSION_TO_PROTO.items()}
_SNR_DEFINITION_TO_PROTO = {
    SnrDefinition.AVERAGE_POWER: gesco_pb2.SNR_DEFINITION_AVERAGE_POWER,
    SnrDefinition.PAPER_PSNR: gesco_pb2.SNR_DEFINITION_PAPER_PSNR,
}
_SNR_DEFINITION_FROM_PROTO = {value: key for key, value in _SNR_DEFINITION_TO_PROTO.items()}
_LINK_TO_PROTO = {Link.MAPS: gesco_pb2.LINK_MAPS, Link.DIGITAL: gesco_pb2.LINK_DIGITAL,
                  Link.LEARNED: gesco_pb2.LINK_LEARNED}
# A header from a sender that predates links leaves it unset: the maps link.
_LINK_FROM_PROTO = {gesco_pb2.LINK_UNSPECIFIED: Link.MAPS} | {value: key for key, value in _LINK_TO_PROTO.items()}


def new_transmission_id() -> str:
    """A fresh random id: 32 lowercase hex characters."""
    return uuid.uuid4().hex


def validate_transmission_id(value: str) -> str:
    """Return `value` if it is 32 lowercase hex characters; InvalidRequestError otherwise."""
    if not isinstance(value, str) or not TRANSMISSION_ID_PATTERN.fullmatch(value):
        shown = value[:40] if isinstance(value, str) else value
        raise InvalidRequestError(f"transmission_id must be 32 lowercase hex characters, got {shown!r}")
    return value


def snr_definition_to_proto(name: str) -> int:
    """The proto enum value of an SNR definition name (gesco.options.SnrDefinition)."""
    try:
        return _SNR_DEFINITION_TO_PROTO[SnrDefinition(name)]
    except ValueError:
        raise InvalidRequestError(f"snr_definition must be one of {list(names(SnrDefinition))}, got {name!r}") from None


def snr_definition_from_proto(value: int) -> str:
    """The SNR definition name of a proto enum value; InvalidRequestError for UNSPECIFIED or unknown."""
    if value not in _SNR_DEFINITION_FROM_PROTO:
        raise InvalidRequestError(
            f"channel.snr_definition must be SNR_DEFINITION_AVERAGE_POWER or "
            f"SNR_DEFINITION_PAPER_PSNR, got {value}"
        )
    return _SNR_DEFINITION_FROM_PROTO[value].value


def semantic_header_to_proto(header: codec.SemanticHeader, framing: LinkFraming = LinkFraming()
                             ) -> gesco_pb2.SemanticHeader:
    """The codec's header and the link's framing as the protobuf message the sender puts on the wire."""
    message = gesco_pb2.SemanticHeader(
        num_classes=header.num_classes,
        height=header.height,
        width=header.width,
        map_height=header.map_height,
        map_width=header.map_width,
        present_class_ids=list(header.present_class_ids),
        downsample_factor=header.downsample_factor,
        compression=_COMPRESSION_TO_PROTO[codec.Compression(header.compression)],
        jpeg_quality=header.jpeg_quality,
        scale=header.scale,
        num_symbols=header.num_symbols,
        payload_bits=header.payload_bits,
        link=_LINK_TO_PROTO[framing.link],
    )
    if framing.digital is not None:
        d = framing.digital
        message.digital.CopyFrom(gesco_pb2.DigitalFraming(
            scheme=d.scheme, num_blocks=d.num_blocks, block_info_bits=d.block_info_bits,
            block_coded_bits=d.block_coded_bits, payload_bytes=d.payload_bytes, symbol_power=d.symbol_power))
    if framing.learned_model is not None:
        message.learned.model = framing.learned_model
    return message


def link_framing_from_proto(message: gesco_pb2.SemanticHeader) -> LinkFraming:
    """The link and its framing of a received header; InvalidRequestError names the field."""
    if message.link not in _LINK_FROM_PROTO:
        raise InvalidRequestError(f"semantic.link must be LINK_MAPS, LINK_DIGITAL or LINK_LEARNED, got {message.link}")
    link = _LINK_FROM_PROTO[message.link]
    try:
        digital = None
        if link is Link.DIGITAL:
            d = message.digital
            digital = DigitalFraming(d.scheme, d.num_blocks, d.block_info_bits, d.block_coded_bits, d.payload_bytes,
                                     d.symbol_power)
        learned = message.learned.model[:80] if link is Link.LEARNED else None
        return LinkFraming(link, digital, learned)
    except ValueError as error:
        raise InvalidRequestError(f"semantic.{str(error).removeprefix('semantic.')}") from None


def semantic_header_from_proto(message: gesco_pb2.SemanticHeader) -> codec.SemanticHeader:
    """Validate a received header and return the codec's dataclass; InvalidRequestError names the field."""
    num_classes = message.num_classes
    if not 1 <= num_classes <= MAX_NUM_CLASSES:
        raise InvalidRequestError(f"semantic.num_classes must be in 1..{MAX_NUM_CLASSES}, got {num_classes}")
    for name in ("height", "width"):
        value = getattr(message, name)
        if not 1 <= value <= MAX_IMAGE_SIDE:
            raise InvalidRequestError(f"semantic.{name} must be in 1..{MAX_IMAGE_SIDE}, got {value}")
    factor = message.downsample_factor
    if factor < 1:
        raise InvalidRequestError(f"semantic.downsample_factor must be >= 1, got {factor}")
    for name, full in (("map_height", message.height), ("map_width", message.width)):
        value = getattr(message, name)
        if value < 1 or value * factor != full:
            raise InvalidRequestError(
                f"semantic.{name} must be {full} / downsample_factor {factor} (a positive "
                f"integer), got {value}"
            )
    ids = tuple(int(class_id) for class_id in message.present_class_ids)
    if not ids:
        raise InvalidRequestError("semantic.present_class_ids must name at least one class")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise InvalidRequestError(f"semantic.present_class_ids must be sorted and unique, got {list(ids)[:16]}")
    if ids[-1] >= num_classes:
        raise InvalidRequestError(
            f"semantic.present_class_ids must be < num_classes {num_classes}, got {ids[-1]}"
        )
    if message.compression not in _COMPRESSION_FROM_PROTO:
        raise InvalidRequestError(f"semantic.compression must be NONE or JPEG, got {message.compression}")
    compression = _COMPRESSION_FROM_PROTO[message.compression]
    quality = message.jpeg_quality
    low = 1 if compression is codec.Compression.JPEG else 0
    if not low <= quality <= 100:
        raise InvalidRequestError(f"semantic.jpeg_quality must be in {low}..100, got {quality}")
    if not math.isfinite(message.scale) or message.scale <= 0:
        raise InvalidRequestError(f"semantic.scale must be finite and > 0, got {message.scale}")
    framing = link_framing_from_proto(message)
    expected = framing.expected_symbols()
    if framing.link is Link.MAPS:
        expected = len(ids) * message.map_height * message.map_width
        if message.num_symbols != expected:
            raise InvalidRequestError(
                f"semantic.num_symbols must be {len(ids)} maps x {message.map_height}x"
                f"{message.map_width} = {expected}, got {message.num_symbols}"
            )
    elif expected is not None and message.num_symbols != expected:
        raise InvalidRequestError(f"semantic.num_symbols must be the {expected} real symbols of the digital "
                                  f"framing, got {message.num_symbols}")
    elif not 1 <= message.num_symbols <= MAX_NUM_CLASSES * MAX_IMAGE_SIDE:
        raise InvalidRequestError(f"semantic.num_symbols must be in 1..{MAX_NUM_CLASSES * MAX_IMAGE_SIDE}, "
                                  f"got {message.num_symbols}")
    expected = message.num_symbols
    return codec.SemanticHeader(
        num_classes=num_classes,
        height=message.height,
        width=message.width,
        map_height=message.map_height,
        map_width=message.map_width,
        present_class_ids=ids,
        downsample_factor=factor,
        compression=compression,
        jpeg_quality=quality,
        scale=float(message.scale),
        num_symbols=expected,
        payload_bits=message.payload_bits,
    )


def symbol_frames(
    header: gesco_pb2.TransmissionHeader,
    symbols: np.ndarray,
    chunk_bytes: int = MAX_CHUNK_BYTES,
) -> Iterator[gesco_pb2.Frame]:
    """Yield the header frame, then the symbols as little-endian float32 chunks of <= chunk_bytes."""
    if not 4 <= chunk_bytes <= MAX_CHUNK_BYTES or chunk_bytes % 4:
        raise ValueError(
            f"chunk_bytes must be a multiple of 4 in 4..{MAX_CHUNK_BYTES}, got {chunk_bytes}"
        )
    symbols = np.asarray(symbols)
    if symbols.ndim != 1:
        raise ValueError(f"symbols must be a 1-D array, got shape {symbols.shape}")
    payload = memoryview(symbols.astype(SYMBOL_DTYPE, copy=False).tobytes())
    yield gesco_pb2.Frame(header=header)
    for start in range(0, len(payload), chunk_bytes):
        chunk = gesco_pb2.SymbolChunk(float32_le=bytes(payload[start : start + chunk_bytes]))
        yield gesco_pb2.Frame(chunk=chunk)


def assemble_frames(
    frames: Iterable[gesco_pb2.Frame], max_symbols: int
) -> tuple[gesco_pb2.TransmissionHeader, np.ndarray]:
    """Read one header-first stream into (header, float32 symbols); InvalidRequestError on any violation.

    The header is validated before any chunk is read, the symbol buffer is sized by the header, and
    reading stops at the first chunk that would overflow it, so a hostile stream cannot make the
    reader buffer more than min(num_symbols, max_symbols) symbols.
    """
    if max_symbols < 1:
        raise ValueError(f"max_symbols must be >= 1, got {max_symbols}")
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise InvalidRequestError("the stream is empty: expected a header frame first")
    if first.WhichOneof("payload") != "header":
        raise InvalidRequestError("the first frame must be a header")
    header = first.header
    validate_transmission_id(header.transmission_id)
    if not header.HasField("semantic"):
        raise InvalidRequestError("header.semantic is missing")
    semantic = semantic_header_from_proto(header.semantic)
    expected = semantic.num_symbols
    if expected > max_symbols:
        raise InvalidRequestError(
            f"semantic.num_symbols {expected} exceeds this service's limit of {max_symbols}"
        )
    symbols = np.empty(expected, dtype=np.float32)
    received = 0
    for frame in iterator:
        kind = frame.WhichOneof("payload")
        if kind == "header":
            raise InvalidRequestError("a second header frame arrived; a stream carries one transmission")
        if kind != "chunk":
            raise InvalidRequestError("a frame carries neither a header nor a chunk")
        data = frame.chunk.float32_le
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidRequestError(f"a chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES} bytes")
        if len(data) % 4:
            raise InvalidRequestError(f"a chunk of {len(data)} bytes is not a whole number of float32")
        count = len(data) // 4
        if received + count > expected:
            raise InvalidRequestError(
                f"more symbols than semantic.num_symbols {expected} (at least {received + count})"
            )
        symbols[received : received + count] = np.frombuffer(data, dtype=SYMBOL_DTYPE)
        received += count
    if received != expected:
        raise InvalidRequestError(f"the stream ended after {received} of {expected} symbols")
    if not np.isfinite(symbols).all():
        raise InvalidRequestError("symbols contain NaN or inf")
    return header, symbols
