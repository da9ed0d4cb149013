"""Property-based fuzzing (hypothesis) of everything a peer or a client can send.

- gRPC frame streams (`transport.assemble_frames`), from structured frames and from raw bytes
  parsed as protobuf, raise nothing but ValueError;
- a semantic header with any field values is refused with ValueError or yields a codec header
  whose maps decode (inverse codec + FDS) with any finite symbols, again raising only ValueError;
- a channel request with any field values becomes a channel config or a ValueError;
- image uploads of any bytes decode within the bounds or raise ImageDecodeError;
- the sender's upload endpoint answers any bytes and any form values without a 5xx;
- the clients' gRPC API answers any request (structured, and raw bytes parsed as protobuf) with OK
  or a status that blames the request (or a service's state), never INTERNAL or UNKNOWN:
  Sender.Transmit with any image and parameter values, the receiver's GetTransmission and
  WatchTransmission with any id.

The suite runs a short budget (GESCO_FUZZ_EXAMPLES, default 50 per property);
`python scripts/ci/fuzz.py --examples N` runs the same properties longer.
"""
from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from channel_sim.server import channel_config_from_proto
from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service.grpc_server import build_grpc_server
from receiver_service.settings import ReceiverSettings
from receiver_service.store import TransmissionStore
from receiver_service.worker import GenerationWorker
from sender_service.app import create_app
from sender_service.settings import SenderSettings
from shared.semantic import codec, link
from shared.wire import imageio, transport
from tests.service_procs import free_port
from tests.sender_helpers import serve_fake_channel

EXAMPLES = int(os.environ.get("GESCO_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("GESCO_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
MAX_SYMBOLS = 50_000

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
DOUBLE = st.floats(allow_nan=True, allow_infinity=True)
ENUM = st.integers(-(2**31), 2**31 - 1)
# Any value a field of that type can carry on the wire, for the mutated fields.
WILD_VALUES = {
    "num_classes": U32, "height": U32, "width": U32, "map_height": U32, "map_width": U32,
    "downsample_factor": U32, "compression": ENUM, "jpeg_quality": U32, "scale": DOUBLE,
    "num_symbols": U64, "payload_bits": U64,
    "present_class_ids": st.lists(st.one_of(st.integers(0, 20), U32), max_size=8),
}


@st.composite
def semantic_headers(draw) -> gesco_pb2.SemanticHeader:
    """A valid header with, half of the time, one to three fields set to anything."""
    num_classes = draw(st.integers(1, 16))
    ids = sorted(draw(st.sets(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes)))
    factor = draw(st.integers(1, 4))
    map_height, map_width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    compression = draw(st.sampled_from([gesco_pb2.COMPRESSION_NONE, gesco_pb2.COMPRESSION_JPEG]))
    message = gesco_pb2.SemanticHeader(
        num_classes=num_classes, height=map_height * factor, width=map_width * factor,
        map_height=map_height, map_width=map_width, present_class_ids=ids, downsample_factor=factor,
        compression=compression,
        jpeg_quality=draw(st.integers(1, 100)) if compression == gesco_pb2.COMPRESSION_JPEG else 0,
        scale=draw(st.floats(0.01, 100)), num_symbols=len(ids) * map_height * map_width,
        payload_bits=draw(U64),
    )
    if draw(st.booleans()):
        for name in draw(st.lists(st.sampled_from(sorted(WILD_VALUES)), min_size=1, max_size=3, unique=True)):
            value = draw(WILD_VALUES[name])
            if name == "present_class_ids":
                message.ClearField(name)
                message.present_class_ids.extend(value)
            else:
                setattr(message, name, value)
    return message


@st.composite
def transmission_ids(draw) -> str:
    """Mostly valid ids; otherwise any text, or hex of the wrong length or case."""
    if not rarely(draw):
        return draw(st.uuids()).hex
    return draw(st.one_of(st.text(max_size=40), st.text(alphabet="0123456789abcdefABCDEF", min_size=31, max_size=33)))


@st.composite
def headers(draw) -> gesco_pb2.TransmissionHeader:
    header = gesco_pb2.TransmissionHeader(transmission_id=draw(transmission_ids()))
    if not rarely(draw):
        header.semantic.CopyFrom(draw(semantic_headers()))
    header.channel.CopyFrom(gesco_pb2.ChannelRequest(model=draw(st.text(max_size=12)), snr_db=draw(DOUBLE)))
    return header


def rarely(draw) -> bool:
    """True about one draw in ten (hypothesis favours small integers, so test the top value)."""
    return draw(st.integers(0, 9)) == 9


def symbol_bytes(count: int, draw) -> bytes:
    kind = "raw" if rarely(draw) else "special" if rarely(draw) else "finite"
    if kind == "raw":
        return draw(st.binary(max_size=64))
    values = draw(st.lists(st.floats(width=32, allow_nan=kind == "special", allow_infinity=kind == "special"),
                           min_size=min(count, 16), max_size=min(count, 16)))
    pattern = np.asarray(values or [0.0], dtype="<f4")
    return np.resize(pattern, count).astype("<f4").tobytes()


@st.composite
def frame_streams(draw) -> list[gesco_pb2.Frame]:
    """A header (or not) and chunks that may be short, long, ragged, non-finite or headers again."""
    frames = []
    header = draw(headers())
    if not rarely(draw):
        frames.append(gesco_pb2.Frame(header=header))
    expected = min(header.semantic.num_symbols, MAX_SYMBOLS + 10)
    split = draw(st.integers(1, 4))
    for part in range(split):
        count = expected // split + (expected % split if part == split - 1 else 0)
        frames.append(gesco_pb2.Frame(chunk=gesco_pb2.SymbolChunk(float32_le=symbol_bytes(count, draw))))
    for _ in range(draw(st.integers(0, 2)) if rarely(draw) else 0):
        extra = draw(st.sampled_from(["empty", "header", "chunk"]))
        if extra == "empty":
            frames.append(gesco_pb2.Frame())
        elif extra == "header":
            frames.append(gesco_pb2.Frame(header=header))
        else:
            frames.append(gesco_pb2.Frame(chunk=gesco_pb2.SymbolChunk(float32_le=draw(st.binary(max_size=40)))))
    return draw(st.permutations(frames)) if rarely(draw) else frames


@FUZZ
@given(frame_streams())
def test_assembling_any_frame_stream_raises_only_value_error(frames) -> None:
    try:
        header, symbols = transport.assemble_frames(iter(frames), MAX_SYMBOLS)
    except ValueError:
        return
    semantic = transport.semantic_header_from_proto(header.semantic)
    assert symbols.dtype == np.float32 and symbols.size == semantic.num_symbols <= MAX_SYMBOLS
    assert np.isfinite(symbols).all()
    assert transport.TRANSMISSION_ID_PATTERN.fullmatch(header.transmission_id)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_frames_parsed_from_raw_bytes_raise_only_value_error(payloads) -> None:
    """What the gRPC layer deserialises from arbitrary wire bytes, handed to the assembler."""
    frames = []
    for payload in payloads:
        try:
            frames.append(gesco_pb2.Frame.FromString(payload))
        except DecodeError:
            continue
    try:
        transport.assemble_frames(iter(frames), MAX_SYMBOLS)
    except ValueError:
        pass


@FUZZ
@given(semantic_headers(), st.data())
def test_any_semantic_header_is_refused_or_decodes(message, data) -> None:
    try:
        header = transport.semantic_header_from_proto(message)
    except ValueError:
        return
    assert 1 <= header.num_classes <= transport.MAX_NUM_CLASSES
    assert header.num_symbols == len(header.present_class_ids) * header.map_height * header.map_width
    assume(header.num_symbols <= MAX_SYMBOLS and header.height * header.width <= 1_000_000
           and header.num_classes <= 64)
    scale = data.draw(st.floats(-1e6, 1e6, width=32))
    symbols = np.full(header.num_symbols, scale, dtype=np.float32)
    symbols[:: max(1, header.num_symbols // 7)] = data.draw(st.floats(-1e3, 1e3, width=32))
    try:
        views = link.received_views(symbols, header, use_fds=True)
    except ValueError:
        return
    expected = (header.num_classes, header.height, header.width)
    assert views.noisy_maps.shape == expected and views.fds_maps.shape == expected


@FUZZ
@given(st.builds(gesco_pb2.ChannelRequest, model=st.one_of(st.sampled_from(["awgn", "rayleigh", "rician", "tdl_ofdm"]),
                                                          st.text(max_size=20)),
                 snr_db=DOUBLE, snr_definition=st.one_of(st.integers(0, 3), ENUM), equalize=st.booleans(), seed=U64, rician_k_db=DOUBLE))
def test_any_channel_request_is_a_config_or_value_error(request_message) -> None:
    try:
        config = channel_config_from_proto(request_message)
    except ValueError:
        return
    assert config.model.value == request_message.model


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the data is a 1x1 image's)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR (CRC left stale)
    return bytes(data)


@st.composite
def uploads(draw) -> bytes:
    kind = "image" if draw(st.booleans()) else draw(st.sampled_from(["random", "truncated", "claims-huge", "garbled"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "claims-huge":
        return png_claiming(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    mode = draw(st.sampled_from(["L", "P", "RGB", "RGBA", "I;16", "1"]))
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    pixels = np.frombuffer(draw(st.binary(min_size=size[0] * size[1], max_size=size[0] * size[1])), dtype=np.uint8)
    image = Image.fromarray(pixels.reshape(size[1], size[0]), "L").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=draw(st.sampled_from(["PNG", "BMP", "WEBP", "TIFF", "GIF"])) if mode != "I;16" else "PNG")
    data = buffer.getvalue()
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "garbled":
        position = draw(st.integers(0, len(data) - 1))
        return data[:position] + draw(st.binary(min_size=1, max_size=16)) + data[position + 1:]
    return data


@FUZZ
@given(uploads(), st.integers(1, 13))
def test_image_decoding_is_bounded_and_raises_only_decode_errors(data, num_classes) -> None:
    max_bytes, max_pixels = 1500, 2500
    for decode in (lambda: imageio.decode_image_bounded(data, max_bytes, max_pixels),
                   lambda: imageio.decode_label_map_png(data, num_classes, max_bytes, max_pixels)):
        try:
            array = decode()
        except imageio.ImageDecodeError:
            continue
        assert len(data) <= max_bytes and array.shape[0] * array.shape[1] <= max_pixels


# ------------------------------------------------------------------ the sender's upload endpoint


@contextmanager
def ready_sender(grpc_port: int | None = None, **client_options) -> Iterator[TestClient]:
    """The sender app in process before a fake channel, once its segmenter has loaded, with its
    gRPC API on `grpc_port` when given; small upload limits, so that fuzzed uploads hit them."""
    with serve_fake_channel() as channel:
        settings = SenderSettings(channel_address=f"127.0.0.1:{channel.port}", device="cpu", max_upload_bytes=4096,
                                  max_pixels=5000, map_height=24, map_width=32,
                                  **({} if grpc_port is None else {"grpc_port": grpc_port}))
        with TestClient(create_app(settings, grpc_api=grpc_port is not None), **client_options) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the segmenter never loaded"
                time.sleep(0.1)
            yield client


@pytest.fixture(scope="module")
def sender_client():
    with ready_sender(raise_server_exceptions=False) as client:
        yield client


@st.composite
def form_value(draw, valid) -> str:
    """Mostly a value in range (so requests get deep), sometimes any text or an edge case."""
    if not rarely(draw):
        return draw(valid)
    return draw(st.one_of(st.text(max_size=12), st.sampled_from(
        ["", " ", "nan", "inf", "-1", "1e309", "true", "0x10", "1" * 40, "\x00"])))


FORM_FIELDS = {
    "kind": form_value(st.sampled_from(["photo", "label_map"])),
    "snr_db": form_value(st.floats(-20, 120).map(str)),
    "psnr_db": form_value(st.floats(-20, 120).map(str)),
    "snr_definition": form_value(st.sampled_from(["paper_psnr", "average_power"])),
    "channel": form_value(st.sampled_from(["awgn", "rayleigh", "rician", "tdl_ofdm"])),
    "equalize": form_value(st.sampled_from(["true", "false", "1", "0"])),
    "rician_k_db": form_value(st.floats(-40, 50).map(str)),
    "sampler": form_value(st.sampled_from(["ddim", "ddpm", "x" * 33])),
    "steps": form_value(st.integers(-5, 1200).map(str)),
    "guidance": form_value(st.floats(-1, 25).map(str)),
    "seed": form_value(st.integers(-1, 2**65).map(str)),
    "downsample_factor": form_value(st.integers(0, 70).map(str)),
    "compression": form_value(st.sampled_from(["none", "jpeg"])),
    "jpeg_quality": form_value(st.integers(0, 101).map(str)),
    "use_fds": form_value(st.sampled_from(["true", "false"])),
}


@FUZZ
@given(uploads(), st.fixed_dictionaries({}, optional=FORM_FIELDS), st.text(max_size=30))
def test_the_upload_endpoint_never_answers_5xx(sender_client, data, fields, filename) -> None:
    response = sender_client.post("/v1/transmissions", files={"file": (filename or "f", data)}, data=fields)
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code != 202:
        assert "error" in response.json()


@FUZZ
@given(st.binary(max_size=3000), st.sampled_from(["multipart/form-data; boundary=xyz", "multipart/form-data",
                                                  "application/x-www-form-urlencoded", "text/plain", ""]))
def test_a_malformed_body_never_answers_5xx(sender_client, body, content_type) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = sender_client.post("/v1/transmissions", content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text[:500])


def test_the_codec_header_fields_round_trip() -> None:
    """A sanity anchor for the strategies above: a real header passes unchanged."""
    encoded = codec.encode_label_map(np.array([[0, 1], [2, 2]]), codec.CodecConfig(num_classes=4))
    message = transport.semantic_header_to_proto(encoded.header)
    assert transport.semantic_header_from_proto(message) == encoded.header


# ------------------------------------------------------------------ the clients' gRPC API

# Codes that blame the request, or a service's state (UNAVAILABLE: a budget without the
# rate-quality table, say), never a failure of the server (INTERNAL, UNKNOWN) or a hang.
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
# A value of each field type a TransmitRequest parameter can carry on the wire.
WIRE_VALUES = {
    gesco_pb2.TransmitRequest.DESCRIPTOR.fields_by_name["snr_db"].type: DOUBLE,
    gesco_pb2.TransmitRequest.DESCRIPTOR.fields_by_name["steps"].type: U32,
    gesco_pb2.TransmitRequest.DESCRIPTOR.fields_by_name["seed"].type: U64,
    gesco_pb2.TransmitRequest.DESCRIPTOR.fields_by_name["use_fds"].type: st.booleans(),
    gesco_pb2.TransmitRequest.DESCRIPTOR.fields_by_name["kind"].type: st.text(max_size=12),
}
# Mostly valid values, so requests get deep (a field without any here gets wire values only).
VALID_PARAMETERS = {
    "kind": st.sampled_from(["photo", "label_map"]), "snr_db": st.floats(-10, 100),
    "snr_definition": st.sampled_from(["paper_psnr", "average_power"]),
    "channel": st.sampled_from(["awgn", "rayleigh", "rician", "tdl_ofdm"]), "equalize": st.booleans(),
    "rician_k_db": st.floats(-30, 40), "sampler": st.sampled_from(["ddim", "ddpm", "dpmpp2m"]),
    "steps": st.integers(1, 50), "guidance": st.floats(0, 20), "seed": U64, "downsample_factor": st.sampled_from([1, 2, 4]),
    "compression": st.sampled_from(["none", "jpeg"]), "jpeg_quality": st.integers(1, 100), "use_fds": st.booleans(),
    "budget": st.sampled_from(["3072", "1/12", "0.083"]),
}


@pytest.fixture(scope="module")
def grpc_sender():
    """The sender's gRPC API in process, before a fake channel."""
    grpc_port = free_port()
    with ready_sender(grpc_port), grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as grpc_channel:
        yield grpc_channel


@pytest.fixture(scope="module")
def grpc_receiver(tmp_path_factory):
    """The receiver's gRPC server in process over an empty store, without a model."""
    settings = ReceiverSettings(grpc_port=free_port(), store_dir=tmp_path_factory.mktemp("fuzz-store"))
    store = TransmissionStore(settings.store_dir, 10, 3600)
    store.open()
    server, _ = build_grpc_server(settings, GenerationWorker(settings, store))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            yield channel
    finally:
        server.stop(0)


@st.composite
def transmit_requests(draw) -> gesco_pb2.TransmitRequest:
    """An upload and any subset of the parameters, mostly in range, sometimes any wire value."""
    request = gesco_pb2.TransmitRequest(image=draw(uploads()))
    for field in gesco_pb2.TransmitRequest.DESCRIPTOR.fields:
        if field.name != "image" and draw(st.booleans()):
            valid = VALID_PARAMETERS.get(field.name, WIRE_VALUES[field.type])
            value = draw(WIRE_VALUES[field.type] if rarely(draw) else valid)
            setattr(request, field.name, value)
    return request


def call_code(call, request, stream: bool = False) -> grpc.StatusCode:
    """The status code `call` ends with (a stream read to its end)."""
    try:
        answer = call(request, timeout=30)
        if stream:
            list(answer)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def parsed(message_type, raw: bytes):
    """`raw` parsed as a `message_type` (examples that are not protobuf are skipped)."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        assume(False)


@FUZZ
@given(st.one_of(transmit_requests(), st.binary(max_size=600).map(lambda raw: parsed(gesco_pb2.TransmitRequest, raw))))
def test_transmit_answers_any_request_with_a_code_that_blames_it(grpc_sender, request) -> None:
    assert call_code(gesco_pb2_grpc.SenderStub(grpc_sender).Transmit, request) in CLIENT_CODES


@FUZZ
@given(st.one_of(st.text(max_size=40), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)),
       st.booleans(), st.binary(max_size=80))
def test_get_and_watch_answer_any_id_with_a_code_that_blames_it(grpc_receiver, transmission_id, include_image,
                                                                 raw) -> None:
    stub = gesco_pb2_grpc.ReceiverStub(grpc_receiver)
    for get in (gesco_pb2.GetTransmissionRequest(transmission_id=transmission_id, include_image=include_image),
                parsed(gesco_pb2.GetTransmissionRequest, raw)):
        assert call_code(stub.GetTransmission, get) in CLIENT_CODES
    for watch in (gesco_pb2.WatchTransmissionRequest(transmission_id=transmission_id),
                  parsed(gesco_pb2.WatchTransmissionRequest, raw)):
        assert call_code(stub.WatchTransmission, watch, stream=True) in CLIENT_CODES
