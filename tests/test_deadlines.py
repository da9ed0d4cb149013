"""Deadlines and cancellation across the gRPC hops, in process.

The sender's RPC deadline bounds the channel's call to the receiver; a caller that cancels or runs
out of time makes the channel cancel its forward; a receiver queues no job for a caller that went
away while streaming. Nothing waits for more than the deadline plus a little slack.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
import pytest
from fastapi.testclient import TestClient

from channel_sim.server import build_channel_server
from channel_sim.settings import ChannelSettings
from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service.grpc_server import build_grpc_server
from receiver_service.store import TransmissionStore, UnknownTransmissionError
from receiver_service.worker import GenerationWorker
from sender_service.app import create_app
from sender_service.settings import SenderSettings
from shared.wire import transport
from shared.wire.imageio import encode_png
from shared.wire.monitoring import ServiceMetrics
from tests.service_procs import free_port
from tests.receiver_helpers import make_settings, transmission
from tests.sender_helpers import blocky_label_map

SLACK_S = 2.0


class StallingReceiver(gesco_pb2_grpc.ReceiverServicer):
    """Reads the stream, then holds the call (up to 20 s) until its caller goes away."""

    def __init__(self) -> None:
        self.time_remaining: list[float | None] = []
        self.arrived = threading.Event()
        self.gone = threading.Event()

    def Receive(self, request_iterator, context):
        header, _ = transport.assemble_frames(request_iterator, max_symbols=10_000_000)
        self.time_remaining.append(context.time_remaining())
        self.arrived.set()
        deadline = time.monotonic() + 20
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not context.is_active():
            self.gone.set()
        return gesco_pb2.TransmissionAck(transmission_id=header.transmission_id)


@pytest.fixture()
def stalling_chain():
    """An in-process channel (forward timeout 30 s) in front of a receiver that never answers."""
    receiver = StallingReceiver()
    receiver_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gesco_pb2_grpc.add_ReceiverServicer_to_server(receiver, receiver_server)
    receiver_port = receiver_server.add_insecure_port("127.0.0.1:0")
    receiver_server.start()
    settings = ChannelSettings(port=free_port(), receiver_address=f"127.0.0.1:{receiver_port}",
                               forward_timeout_s=30, metrics_port=0)
    metrics = ServiceMetrics()
    server, receiver_channel, health = build_channel_server(settings, metrics)
    server.start()
    health.set_serving(True)
    yield receiver, settings.port, metrics
    server.stop(0)
    receiver_channel.close()
    receiver_server.stop(0)


def test_the_senders_deadline_is_a_504_and_reaches_the_receiver(stalling_chain) -> None:
    receiver, channel_port, _ = stalling_chain
    settings = SenderSettings(channel_address=f"127.0.0.1:{channel_port}", device="cpu", rpc_timeout_s=1.0)
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        response = client.post("/v1/transmissions", data={"kind": "label_map"},
                               files={"file": ("labels.png", encode_png(blocky_label_map()))})
        elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json()["error"]["grpc_code"] == "DEADLINE_EXCEEDED"
    assert elapsed < 1.0 + SLACK_S
    # The channel called the receiver with what was left of the sender's second, not its own 30 s,
    # and that call ended with the sender's deadline.
    (remaining,) = receiver.time_remaining
    assert remaining is not None and remaining <= 1.0
    assert receiver.gone.wait(SLACK_S)


def test_a_caller_cancelling_cancels_the_forward(stalling_chain) -> None:
    receiver, channel_port, metrics = stalling_chain
    header, symbols = transmission()
    with grpc.insecure_channel(f"127.0.0.1:{channel_port}") as channel:
        call = gesco_pb2_grpc.ChannelStub(channel).Transmit.future(
            transport.symbol_frames(header, symbols), timeout=30)
        assert receiver.arrived.wait(10)
        started = time.monotonic()
        call.cancel()
        assert receiver.gone.wait(SLACK_S), "the channel kept its call to the receiver open"
        assert time.monotonic() - started < SLACK_S
    with pytest.raises(grpc.FutureCancelledError):
        call.result()


def calls(metrics: ServiceMetrics, method: str, code: str) -> float:
    return metrics.registry.get_sample_value("gesco_grpc_requests_total", {"method": method, "code": code}) or 0.0


def slow_stream(header, symbols, pause_s: float):
    """The header and half the symbols, a pause, then the rest."""
    frames = list(transport.symbol_frames(header, symbols, chunk_bytes=256))
    half = len(frames) // 2
    yield from frames[:half]
    time.sleep(pause_s)
    yield from frames[half:]


def test_a_caller_out_of_time_mid_stream_is_cancelled_not_an_internal_error(stalling_chain, caplog) -> None:
    receiver, channel_port, metrics = stalling_chain
    caplog.set_level(logging.INFO)
    header, symbols = transmission()
    with grpc.insecure_channel(f"127.0.0.1:{channel_port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            gesco_pb2_grpc.ChannelStub(channel).Transmit(slow_stream(header, symbols, 1.0), timeout=0.4)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + SLACK_S
    while not calls(metrics, "/gesco.v1.Channel/Transmit", "CANCELLED"):
        assert time.monotonic() < deadline, metrics.exposition().decode()
        time.sleep(0.02)
    assert not receiver.arrived.is_set()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.fixture()
def receiver(tmp_path, fake_generator):
    settings = make_settings(tmp_path)
    store = TransmissionStore(settings.store_dir, max_items=50, max_age_s=3600)
    store.open()
    metrics = ServiceMetrics(queue=True)
    worker = GenerationWorker(settings, store, metrics)
    worker.load_model()
    server, health = build_grpc_server(settings, worker, metrics)
    server.start()
    health.set_serving(True)
    yield settings.grpc_port, store, metrics
    server.stop(0)
    worker.stop(5)


def test_the_receiver_queues_nothing_for_a_caller_gone_mid_stream(receiver, caplog) -> None:
    port, store, metrics = receiver
    caplog.set_level(logging.INFO)
    header, symbols = transmission()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            gesco_pb2_grpc.ReceiverStub(channel).Receive(slow_stream(header, symbols, 1.0), timeout=0.4)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + SLACK_S
    while not calls(metrics, "/gesco.v1.Receiver/Receive", "CANCELLED"):
        assert time.monotonic() < deadline, metrics.exposition().decode()
        time.sleep(0.02)
    with pytest.raises(UnknownTransmissionError):
        store.get(header.transmission_id)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
