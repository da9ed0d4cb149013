"""Sender test helpers: label maps and photos built in the test, and fakes of the channel (gRPC)
and of the receiver's REST API served by the test process."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

import grpc
import numpy as np

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from shared.wire import transport
from shared.wire.imageio import encode_png

MAP_HEIGHT, MAP_WIDTH = 96, 128  # the sender's default semantic size


def blocky_label_map(height: int = MAP_HEIGHT, width: int = MAP_WIDTH) -> np.ndarray:
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[: height // 2] = 3
    labels[height // 2 :, : width // 2] = 5
    labels[height // 4 : height // 2, width // 4 : width // 2] = 8
    return labels


def photo(height: int = 60, width: int = 80) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


class FakeChannel(gesco_pb2_grpc.ChannelServicer):
    """Assembles what the sender streams; answers an ack, or the error/delay set on it."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.abort: tuple[grpc.StatusCode, str, tuple] | None = None
        self.delay_s = 0.0

    def Transmit(self, request_iterator, context):
        header, symbols = transport.assemble_frames(request_iterator, max_symbols=10_000_000)
        self.calls.append({"header": header, "symbols": symbols, "metadata": dict(context.invocation_metadata())})
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.abort is not None:
            code, details, trailing = self.abort
            context.set_trailing_metadata(trailing)
            context.abort(code, details)
        report = gesco_pb2.ChannelReport(
            model=header.channel.model,
            requested_snr_db=header.channel.snr_db,
            measured_snr_db=header.channel.snr_db,
            snr_definition=header.channel.snr_definition,
            channel_uses=(len(symbols) + 1) // 2,
        )
        return gesco_pb2.TransmissionAck(
            transmission_id=header.transmission_id, queue_position=1, channel_report=report
        )


class FakeReceiverRest(BaseHTTPRequestHandler):
    """GET /v1/transmissions/{id} -> {"status": ...}; .../image -> a PNG; POST .../cancel is noted."""

    status = "done"
    png = encode_png(np.zeros((MAP_HEIGHT, MAP_WIDTH, 3), dtype=np.uint8))
    cancelled: list[str] = []  # ids of the cancel requests received

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.cancelled.append(self.path.split("/")[-2])
        self._answer(200, "application/json", json.dumps({"status": "cancelled"}).encode())

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.endswith("/image"):
            self._answer(200, "image/png", self.png)
        else:
            self._answer(200, "application/json", json.dumps({"status": self.status, "error": "boom"}).encode())

    def _answer(self, code: int, media_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve_fake_channel() -> Iterator[FakeChannel]:
    """A FakeChannel on a free loopback port (its `.port`), for tests of the sender."""
    channel = FakeChannel()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gesco_pb2_grpc.add_ChannelServicer_to_server(channel, server)
    channel.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield channel
    finally:
        server.stop(0)
