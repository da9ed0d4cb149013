"""Frame streams and header conversion: lossless round trips and every way a stream can be wrong."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gesco.v1 import gesco_pb2
from shared.limits import SamplingOptions
from shared.semantic import codec
from shared.wire import transport
from shared.wire.records import ChannelRecord, TransmissionRecord

TRANSMISSION_ID = "0123456789abcdef0123456789abcdef"


def encoded_maps(height: int = 16, width: int = 24, factor: int = 1) -> codec.EncodedMaps:
    label_map = np.zeros((height, width), dtype=np.int64)
    label_map[: height // 2] = 3
    label_map[height // 2 :, : width // 2] = 7
    return codec.encode_label_map(label_map, codec.CodecConfig(num_classes=12, downsample_factor=factor))


def transmission_header(encoded: codec.EncodedMaps) -> gesco_pb2.TransmissionHeader:
    return gesco_pb2.TransmissionHeader(
        transmission_id=TRANSMISSION_ID,
        semantic=transport.semantic_header_to_proto(encoded.header),
        channel=gesco_pb2.ChannelRequest(model="awgn", snr_db=10.0),
    )


def valid_frames(chunk_bytes: int = 64) -> list[gesco_pb2.Frame]:
    encoded = encoded_maps()
    return list(transport.symbol_frames(transmission_header(encoded), encoded.symbols, chunk_bytes))


def chunk(values) -> gesco_pb2.Frame:
    data = np.asarray(values, dtype="<f4").tobytes()
    return gesco_pb2.Frame(chunk=gesco_pb2.SymbolChunk(float32_le=data))


def test_new_ids_are_valid_and_distinct():
    ids = {transport.new_transmission_id() for _ in range(100)}
    assert len(ids) == 100
    for value in ids:
        assert transport.validate_transmission_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "0123", TRANSMISSION_ID.upper(), TRANSMISSION_ID + "0", "../" + TRANSMISSION_ID[3:],
     TRANSMISSION_ID[:-1] + "g", TRANSMISSION_ID + "\n", None],
)
def test_bad_ids_are_rejected(value):
    with pytest.raises(ValueError, match="transmission_id"):
        transport.validate_transmission_id(value)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_semantic_header_round_trip(factor):
    header = encoded_maps(factor=factor).header
    assert transport.semantic_header_from_proto(transport.semantic_header_to_proto(header)) == header


def test_jpeg_header_round_trip():
    label_map = np.zeros((16, 16), dtype=np.int64)
    label_map[4:] = 2
    config = codec.CodecConfig(num_classes=5, compression=codec.Compression.JPEG, jpeg_quality=30)
    header = codec.encode_label_map(label_map, config).header
    assert transport.semantic_header_from_proto(transport.semantic_header_to_proto(header)) == header


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_classes", 0, "num_classes"),
        ("num_classes", 5, "present_class_ids"),  # ids 3 and 7 are no longer < K
        ("height", 0, "height"),
        ("width", 0, "width"),
        ("height", transport.MAX_IMAGE_SIDE + 1, "height"),
        ("map_height", 15, "map_height"),
        ("map_width", 0, "map_width"),
        ("downsample_factor", 0, "downsample_factor"),
        ("downsample_factor", 5, "map_height"),
        ("present_class_ids", [], "present_class_ids"),
        ("present_class_ids", [7, 3], "present_class_ids"),
        ("present_class_ids", [3, 3], "present_class_ids"),
        ("compression", gesco_pb2.COMPRESSION_UNSPECIFIED, "compression"),
        ("jpeg_quality", 101, "jpeg_quality"),
        ("scale", 0.0, "scale"),
        ("scale", -1.0, "scale"),
        ("scale", float("nan"), "scale"),
        ("scale", float("inf"), "scale"),
        ("num_symbols", 1, "num_symbols"),
    ],
)
def test_bad_semantic_headers_name_the_field(field, value, message):
    proto = transport.semantic_header_to_proto(encoded_maps().header)
    if field == "present_class_ids":
        del proto.present_class_ids[:]
        proto.present_class_ids.extend(value)
    else:
        setattr(proto, field, value)
    with pytest.raises(ValueError, match=message):
        transport.semantic_header_from_proto(proto)


def test_round_trip_over_several_chunks():
    encoded = encoded_maps()
    frames = list(transport.symbol_frames(transmission_header(encoded), encoded.symbols, 100))
    assert frames[0].WhichOneof("payload") == "header"
    assert len(frames) == 1 + -(-encoded.symbols.size * 4 // 100)
    assert all(len(f.chunk.float32_le) <= 100 for f in frames[1:])
    header, symbols = transport.assemble_frames(frames, max_symbols=10_000)
    assert header.transmission_id == TRANSMISSION_ID
    assert header.channel.model == "awgn"
    assert symbols.dtype == np.float32
    np.testing.assert_array_equal(symbols, encoded.symbols)


def test_symbol_frames_rejects_bad_arguments():
    encoded = encoded_maps()
    header = transmission_header(encoded)
    for chunk_bytes in (0, 6, transport.MAX_CHUNK_BYTES + 4):
        with pytest.raises(ValueError, match="chunk_bytes"):
            next(transport.symbol_frames(header, encoded.symbols, chunk_bytes))
    with pytest.raises(ValueError, match="1-D"):
        next(transport.symbol_frames(header, encoded.symbols.reshape(2, -1)))


def test_empty_stream():
    with pytest.raises(ValueError, match="empty"):
        transport.assemble_frames([], max_symbols=10)


def test_first_frame_must_be_a_header():
    frames = valid_frames()
    with pytest.raises(ValueError, match="first frame"):
        transport.assemble_frames(frames[1:], max_symbols=10_000)


def test_second_header():
    frames = valid_frames()
    with pytest.raises(ValueError, match="second header"):
        transport.assemble_frames([*frames[:2], frames[0], *frames[2:]], max_symbols=10_000)


def test_frame_without_payload():
    frames = valid_frames()
    with pytest.raises(ValueError, match="neither"):
        transport.assemble_frames([frames[0], gesco_pb2.Frame()], max_symbols=10_000)


def test_chunk_not_a_multiple_of_four():
    frames = valid_frames()
    bad = gesco_pb2.Frame(chunk=gesco_pb2.SymbolChunk(float32_le=b"\x00" * 6))
    with pytest.raises(ValueError, match="whole number"):
        transport.assemble_frames([frames[0], bad], max_symbols=10_000)


def test_oversized_chunk():
    frames = valid_frames()
    bad = gesco_pb2.Frame(chunk=gesco_pb2.SymbolChunk(float32_le=b"\x00" * (transport.MAX_CHUNK_BYTES + 4)))
    with pytest.raises(ValueError, match="exceeds"):
        transport.assemble_frames([frames[0], bad], max_symbols=10_000)


def test_too_many_symbols_stops_reading_early():
    frames = valid_frames()
    consumed = []

    def stream():
        for frame in [*frames, chunk([1.0]), chunk([2.0])]:
            consumed.append(frame)
            yield frame

    with pytest.raises(ValueError, match="more symbols"):
        transport.assemble_frames(stream(), max_symbols=10_000)
    assert len(consumed) == len(frames) + 1


def test_header_over_max_symbols_is_rejected_before_any_chunk():
    frames = valid_frames()
    with pytest.raises(ValueError, match="limit"):
        transport.assemble_frames(iter([frames[0]]), max_symbols=10)


def test_too_few_symbols():
    frames = valid_frames()
    with pytest.raises(ValueError, match="ended after"):
        transport.assemble_frames(frames[:-1], max_symbols=10_000)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_symbols(bad_value):
    encoded = encoded_maps()
    symbols = encoded.symbols.copy()
    symbols[5] = bad_value
    frames = transport.symbol_frames(transmission_header(encoded), symbols)
    with pytest.raises(ValueError, match="NaN"):
        transport.assemble_frames(frames, max_symbols=10_000)


def test_bad_transmission_id_in_stream():
    frames = valid_frames()
    frames[0].header.transmission_id = "../../etc/passwd"
    with pytest.raises(ValueError, match="transmission_id"):
        transport.assemble_frames(frames, max_symbols=10_000)


def test_missing_semantic_header():
    frames = valid_frames()
    frames[0].header.ClearField("semantic")
    with pytest.raises(ValueError, match="semantic"):
        transport.assemble_frames(frames, max_symbols=10_000)


def test_bad_semantic_header_in_stream():
    frames = valid_frames()
    frames[0].header.semantic.num_symbols += 1
    with pytest.raises(ValueError, match="num_symbols"):
        transport.assemble_frames(frames, max_symbols=10_000)


@settings(max_examples=60, deadline=None)
@given(
    chunk_words=st.integers(min_value=1, max_value=300),
    num_symbols=st.integers(min_value=1, max_value=1000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_chunking_round_trips(chunk_words, num_symbols, seed):
    symbols = np.random.default_rng(seed).standard_normal(num_symbols).astype(np.float32)
    semantic = gesco_pb2.SemanticHeader(
        num_classes=2, height=1, width=num_symbols, map_height=1, map_width=num_symbols,
        present_class_ids=[1], downsample_factor=1, compression=gesco_pb2.COMPRESSION_NONE,
        jpeg_quality=75, scale=1.0, num_symbols=num_symbols, payload_bits=num_symbols * 32,
    )
    header = gesco_pb2.TransmissionHeader(transmission_id=TRANSMISSION_ID, semantic=semantic)
    frames = list(transport.symbol_frames(header, symbols, chunk_words * 4))
    assert len(frames) == 1 + -(-num_symbols // chunk_words)
    _, received = transport.assemble_frames(frames, max_symbols=num_symbols)
    np.testing.assert_array_equal(received, symbols)


@pytest.mark.parametrize("name", ["average_power", "paper_psnr"])
def test_snr_definition_round_trip(name):
    assert transport.snr_definition_from_proto(transport.snr_definition_to_proto(name)) == name


def test_bad_snr_definitions():
    with pytest.raises(ValueError, match="snr_definition"):
        transport.snr_definition_to_proto("peak")
    with pytest.raises(ValueError, match="snr_definition"):
        transport.snr_definition_from_proto(gesco_pb2.SNR_DEFINITION_UNSPECIFIED)


# ------------------------------------------------------------------------- the transmission record


def test_the_transmission_record_is_read_from_the_header() -> None:
    header = transmission_header(encoded_maps(factor=2))
    header.image_bits_jpeg, header.image_jpeg_quality = 4096, 75
    request = gesco_pb2.SamplingRequest(guidance=2.0, seed=3, use_fds=True)
    record = TransmissionRecord.from_header(header, request)
    assert record.channel == ChannelRecord() and record.bits.channel_uses is None  # no channel report yet
    # 3 maps of 8x12 values: 144 complex channel uses for a 16x24 RGB source of 1,152 values.
    assert record.bits.model_dump() == {"payload_bits": header.semantic.payload_bits, "num_symbols": 3 * 8 * 12,
                                        "channel_uses": None, "source_values": 16 * 24 * 3,
                                        "bandwidth_ratio": 144 / 1152, "image_bits_jpeg": 4096,
                                        "image_jpeg_quality": 75}
    assert record.semantic.model_dump() == {"num_classes": 12, "height": 16, "width": 24, "map_height": 8,
                                            "map_width": 12, "present_class_ids": [0, 3, 7], "downsample_factor": 2,
                                            "compression": "none", "jpeg_quality": 75}
    assert record.sampling.model_dump() == {"sampler": None, "steps": None, "guidance": 2.0, "seed": 3, "use_fds": True}

    header.channel_report.CopyFrom(gesco_pb2.ChannelReport(
        model="awgn", requested_snr_db=10.0, measured_snr_db=9.5,
        snr_definition=gesco_pb2.SNR_DEFINITION_AVERAGE_POWER, channel_uses=96))
    resolved = SamplingOptions(sampler="ddim", steps=10, guidance=2.0)
    record = TransmissionRecord.from_header(header, request, resolved)
    assert record.channel.model_dump() == {"model": "awgn", "snr_definition": "average_power", "requested_snr_db": 10.0,
                                           "measured_snr_db": 9.5, "channel_uses": 96}
    assert record.bits.channel_uses == 96
    assert (record.sampling.sampler, record.sampling.steps) == ("ddim", 10)
