"""Channel simulator as a real process, forwarding to a fake receiver served by this test process."""
from __future__ import annotations

import json
import math
import threading
from concurrent import futures

import grpc
import httpx
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from shared.semantic import codec
from shared.wire import transport
from tests.service_procs import free_port, service_log, start_service, stop_service


class FakeReceiver(gesco_pb2_grpc.ReceiverServicer):
    """Records what arrives; answers with an ack or with the error set in `reject`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[dict] = []
        self.reject: tuple[grpc.StatusCode, str, tuple] | None = None

    def Receive(self, request_iterator, context):
        header, symbols = transport.assemble_frames(request_iterator, max_symbols=10_000_000)
        with self.lock:
            self.calls.append({
                "header": header,
                "symbols": symbols,
                "metadata": dict(context.invocation_metadata()),
                "time_remaining": context.time_remaining(),
            })
            reject = self.reject
        if reject is not None:
            code, details, trailing = reject
            context.set_trailing_metadata(trailing)
            context.abort(code, details)
        return gesco_pb2.TransmissionAck(transmission_id=header.transmission_id, queue_position=2)


@pytest.fixture(scope="module")
def fake_receiver():
    receiver = FakeReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gesco_pb2_grpc.add_ReceiverServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.port = port
    yield receiver
    server.stop(0)


@pytest.fixture(scope="module")
def channel_proc(fake_receiver):
    port = free_port()
    env = {
        "GESCO_CHANNEL_PORT": str(port),
        "GESCO_CHANNEL_RECEIVER_ADDRESS": f"127.0.0.1:{fake_receiver.port}",
        "GESCO_CHANNEL_FORWARD_TIMEOUT_S": "20",
        "GESCO_CHANNEL_METRICS_PORT": str(metrics_port := free_port()),
    }
    proc = start_service("channel_sim", env, grpc_port=port, timeout=120)
    proc.port = port
    proc.metrics_port = metrics_port
    yield proc
    assert stop_service(proc) == 0, service_log(proc)


@pytest.fixture(scope="module")
def channel_port(channel_proc):
    return channel_proc.port


@pytest.fixture()
def receiver(fake_receiver):
    fake_receiver.reject = None
    with fake_receiver.lock:
        fake_receiver.calls.clear()
    return fake_receiver


def encoded() -> codec.EncodedMaps:
    label_map = np.zeros((32, 48), dtype=np.int64)
    label_map[:16] = 2
    label_map[16:, :20] = 5
    return codec.encode_label_map(label_map, codec.CodecConfig(num_classes=12))


def make_header(maps: codec.EncodedMaps, **channel) -> gesco_pb2.TransmissionHeader:
    request = dict(model="awgn", snr_db=20.0, snr_definition=gesco_pb2.SNR_DEFINITION_AVERAGE_POWER,
                   equalize=True, seed=7, rician_k_db=6.0)
    request.update(channel)
    return gesco_pb2.TransmissionHeader(
        transmission_id=transport.new_transmission_id(),
        semantic=transport.semantic_header_to_proto(maps.header),
        channel=gesco_pb2.ChannelRequest(**request),
        sampling=gesco_pb2.SamplingRequest(sampler="ddim", steps=2, seed=1, use_fds=True),
    )


def transmit(port: int, frames, request_id: str = "req-42", timeout: float = 30.0):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gesco_pb2_grpc.ChannelStub(channel)
        return stub.Transmit.with_call(
            iter(list(frames)), metadata=((transport.REQUEST_ID_METADATA_KEY, request_id),), timeout=timeout
        )


def test_valid_transmission_is_corrupted_and_forwarded(channel_port, receiver):
    maps = encoded()
    header = make_header(maps)
    ack, _ = transmit(channel_port, transport.symbol_frames(header, maps.symbols, chunk_bytes=1024), timeout=25)
    assert ack.transmission_id == header.transmission_id
    assert ack.queue_position == 2
    uses = math.ceil(maps.symbols.size / 2)
    assert ack.channel_report.model == "awgn"
    assert ack.channel_report.requested_snr_db == 20.0
    assert ack.channel_report.snr_definition == gesco_pb2.SNR_DEFINITION_AVERAGE_POWER
    assert abs(ack.channel_report.measured_snr_db - 20.0) < 1.0
    assert ack.channel_report.channel_uses == uses

    (call,) = receiver.calls
    assert call["metadata"][transport.REQUEST_ID_METADATA_KEY] == "req-42"
    assert 0 < call["time_remaining"] <= 25
    forwarded = call["header"]
    assert forwarded.transmission_id == header.transmission_id
    assert forwarded.semantic == header.semantic
    assert forwarded.sampling == header.sampling
    assert forwarded.channel_report == ack.channel_report
    noise = call["symbols"] - maps.symbols
    assert call["symbols"].shape == maps.symbols.shape
    assert 0 < np.mean(noise**2) < 0.05  # 20 dB below unit power


def test_same_seed_gives_the_same_noise(channel_port, receiver):
    maps = encoded()
    for _ in range(2):
        transmit(channel_port, transport.symbol_frames(make_header(maps, seed=3), maps.symbols))
    first, second = receiver.calls
    np.testing.assert_array_equal(first["symbols"], second["symbols"])


def test_request_id_defaults_to_the_transmission_id(channel_port, receiver):
    maps = encoded()
    header = make_header(maps)
    with grpc.insecure_channel(f"127.0.0.1:{channel_port}") as channel:
        gesco_pb2_grpc.ChannelStub(channel).Transmit(transport.symbol_frames(header, maps.symbols), timeout=30)
    assert receiver.calls[0]["metadata"][transport.REQUEST_ID_METADATA_KEY] == header.transmission_id


def bad_streams():
    maps = encoded()
    good = list(transport.symbol_frames(make_header(maps), maps.symbols, chunk_bytes=1024))
    nan_symbols = maps.symbols.copy()
    nan_symbols[3] = np.nan
    extra = gesco_pb2.Frame(chunk=gesco_pb2.SymbolChunk(float32_le=b"\x00" * 8))
    return {
        "no header": (good[1:], "first frame"),
        "missing chunk": (good[:-1], "ended after"),
        "extra chunk": ([*good, extra], "more symbols"),
        "odd chunk": ([good[0], gesco_pb2.Frame(chunk=gesco_pb2.SymbolChunk(float32_le=b"\x00" * 5))], "whole number"),
        "nan": (list(transport.symbol_frames(make_header(maps), nan_symbols)), "NaN"),
        "bad id": ([_with(good[0], transmission_id="../x")] + good[1:], "transmission_id"),
        "unknown model": ([_channel(good[0], model="carrier-pigeon")] + good[1:], "channel.model"),
        "snr too high": ([_channel(good[0], snr_db=1000.0)] + good[1:], "snr_db"),
        "snr definition": ([_channel(good[0], snr_definition=0)] + good[1:], "snr_definition"),
        "empty": ([], "empty"),
    }


def _with(frame: gesco_pb2.Frame, **fields) -> gesco_pb2.Frame:
    copy = gesco_pb2.Frame()
    copy.CopyFrom(frame)
    for name, value in fields.items():
        setattr(copy.header, name, value)
    return copy


def _channel(frame: gesco_pb2.Frame, **fields) -> gesco_pb2.Frame:
    copy = _with(frame)
    for name, value in fields.items():
        setattr(copy.header.channel, name, value)
    return copy


@pytest.mark.parametrize("case", sorted(bad_streams()))
def test_bad_input_is_invalid_argument_and_the_next_request_works(channel_port, receiver, case):
    frames, message = bad_streams()[case]
    with pytest.raises(grpc.RpcError) as raised:
        transmit(channel_port, frames)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    assert receiver.calls == []
    maps = encoded()
    ack, _ = transmit(channel_port, transport.symbol_frames(make_header(maps), maps.symbols))
    assert ack.channel_report.model == "awgn"


def test_receiver_resource_exhausted_passes_through_with_retry_after(channel_port, receiver):
    receiver.reject = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full", (("retry-after", "7"),))
    maps = encoded()
    with pytest.raises(grpc.RpcError) as raised:
        transmit(channel_port, transport.symbol_frames(make_header(maps), maps.symbols))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raised.value.details() == "queue is full"
    assert ("retry-after", "7") in tuple(raised.value.trailing_metadata())


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT),
        (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ALREADY_EXISTS),
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL),
    ],
)
def test_receiver_errors_are_mapped(channel_port, receiver, code, expected):
    receiver.reject = (code, "receiver said no", ())
    maps = encoded()
    with pytest.raises(grpc.RpcError) as raised:
        transmit(channel_port, transport.symbol_frames(make_header(maps), maps.symbols))
    assert raised.value.code() == expected
    assert "receiver said no" in raised.value.details()


def test_reflection_lists_the_services(channel_port):
    with grpc.insecure_channel(f"127.0.0.1:{channel_port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {service.name for service in response.list_services_response.service}
    assert {"gesco.v1.Channel", "grpc.health.v1.Health"} <= names


@pytest.mark.processes
def test_receiver_down_is_unavailable():
    port = free_port()
    env = {"GESCO_CHANNEL_PORT": str(port), "GESCO_CHANNEL_RECEIVER_ADDRESS": f"127.0.0.1:{free_port()}",
           "GESCO_CHANNEL_METRICS_PORT": "0"}
    proc = start_service("channel_sim", env, grpc_port=port, timeout=120)
    try:
        maps = encoded()
        with pytest.raises(grpc.RpcError) as raised:
            transmit(port, transport.symbol_frames(make_header(maps), maps.symbols), timeout=20)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert raised.value.details().startswith("receiver unavailable")
    finally:
        assert stop_service(proc) == 0


def test_one_structured_log_line_per_call(channel_proc, receiver):
    maps = encoded()
    header = make_header(maps)
    transmit(channel_proc.port, transport.symbol_frames(header, maps.symbols), request_id="req-log-1")
    with pytest.raises(grpc.RpcError):
        transmit(channel_proc.port, [], request_id="req-log-2")
    lines = [json.loads(line) for line in service_log(channel_proc).splitlines() if line.startswith("{")]
    calls = {line.get("request_id"): line for line in lines if line["msg"] == "transmit"}
    ok, bad = calls["req-log-1"], calls["req-log-2"]
    assert ok["code"] == "OK" and ok["transmission_id"] == header.transmission_id
    assert ok["model"] == "awgn" and ok["num_symbols"] == maps.symbols.size and ok["duration_ms"] > 0
    assert bad["code"] == "INVALID_ARGUMENT" and "empty" in bad["details"]


def test_metrics_port_counts_calls_by_code_and_times_stages(channel_proc, receiver):
    def value(text: str, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    url = f"http://127.0.0.1:{channel_proc.metrics_port}/metrics"
    before = httpx.get(url, timeout=5).text
    maps = encoded()
    transmit(channel_proc.port, transport.symbol_frames(make_header(maps), maps.symbols))
    with pytest.raises(grpc.RpcError):
        transmit(channel_proc.port, [])
    after = httpx.get(url, timeout=5).text
    method = "/gesco.v1.Channel/Transmit"
    for code in ("OK", "INVALID_ARGUMENT"):
        assert value(after, "gesco_grpc_requests_total", method=method, code=code) == \
            value(before, "gesco_grpc_requests_total", method=method, code=code) + 1
    for stage in ("assemble", "channel", "forward"):
        assert value(after, "gesco_stage_duration_seconds_count", stage=stage) > \
            value(before, "gesco_stage_duration_seconds_count", stage=stage)
    assert value(after, "process_resident_memory_bytes") > 0
