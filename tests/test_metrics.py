"""Prometheus metrics: the shared middleware and interceptor, then /metrics of the sender and the
receiver in process (the channel's metrics port is tested with its process in
test_channel_service.py)."""
from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sender_service.app import create_app as create_sender_app
from sender_service.settings import SenderSettings
from shared.wire import transport
from shared.wire.imageio import encode_png
from shared.wire.monitoring import HttpMetricsMiddleware, ServiceMetrics, start_metrics_server
from tests.receiver_helpers import make_settings, ready_client, receive, transmission
from tests.sender_helpers import blocky_label_map, photo, serve_fake_channel


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of sample `name` with exactly these labels in a Prometheus exposition (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_http_middleware_counts_by_route_template_and_status() -> None:
    metrics = ServiceMetrics()
    app = FastAPI()
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics, routes=app.router.routes)

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict:
        return {"id": item_id}

    client = TestClient(app)
    assert client.get("/items/1").status_code == 200
    assert client.get("/items/2").status_code == 200
    assert client.get("/items/x").status_code == 422
    assert client.post("/items/1").status_code == 405
    for path in ("/nope", "/other/../nope"):
        assert client.get(path).status_code == 404
    text = metrics.exposition().decode()
    assert sample_value(text, "gesco_http_requests_total", route="/items/{item_id}", method="GET", status="200") == 2
    assert sample_value(text, "gesco_http_requests_total", route="/items/{item_id}", method="GET", status="422") == 1
    assert sample_value(text, "gesco_http_requests_total", route="/items/{item_id}", method="POST", status="405") == 1
    # Unknown paths share one label value, so clients cannot grow the series count.
    assert sample_value(text, "gesco_http_requests_total", route="unmatched", method="GET", status="404") == 2
    assert sample_value(text, "gesco_http_request_duration_seconds_count", route="/items/{item_id}", method="GET") == 3
    assert sample_value(text, "process_resident_memory_bytes") > 0


def test_queue_metrics_only_where_asked() -> None:
    plain, queued = ServiceMetrics(), ServiceMetrics(queue=True)
    assert plain.queue_depth is None and b"gesco_queue_depth" not in plain.exposition()
    assert queued.queue_depth is not None and b"gesco_batch_size" in queued.exposition()
    with queued.time_stage("sample"):
        pass
    assert sample_value(queued.exposition().decode(), "gesco_stage_duration_seconds_count", stage="sample") == 1


# ------------------------------------------------------------------------------- sender


@pytest.fixture(scope="module")
def fake_channel():
    with serve_fake_channel() as channel:
        yield channel


@pytest.fixture(scope="module")
def sender_client(fake_channel):
    settings = SenderSettings(channel_address=f"127.0.0.1:{fake_channel.port}", device="cpu",
                              max_pixels=20_000, max_upload_bytes=300_000)
    with TestClient(create_sender_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the segmenter never loaded"
            time.sleep(0.1)
        yield client


def test_sender_metrics_count_requests_and_time_stages(sender_client, fake_channel) -> None:
    files = {"file": ("labels.png", encode_png(blocky_label_map()))}
    assert sender_client.post("/v1/transmissions", files=files, data={"kind": "label_map"}).status_code == 202
    assert sender_client.post("/v1/transmissions", files={"file": ("p.png", encode_png(photo()))}).status_code == 202
    assert sender_client.post("/v1/transmissions", files={"file": ("x.png", b"not an image")}).status_code == 400
    fake_channel.abort = (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after", "3"),))
    try:
        assert sender_client.post("/v1/transmissions", files=files, data={"kind": "label_map"}).status_code == 429
    finally:
        fake_channel.abort = None

    response = sender_client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    route = {"route": "/v1/transmissions", "method": "POST"}
    assert sample_value(text, "gesco_http_requests_total", **route, status="202") == 2
    assert sample_value(text, "gesco_http_requests_total", **route, status="400") == 1
    assert sample_value(text, "gesco_http_requests_total", **route, status="429") == 1
    assert sample_value(text, "gesco_stage_duration_seconds_count", stage="decode") == 3
    assert sample_value(text, "gesco_stage_duration_seconds_count", stage="segment") == 1
    assert sample_value(text, "gesco_stage_duration_seconds_count", stage="encode") == 3
    assert sample_value(text, "gesco_stage_duration_seconds_count", stage="channel_rpc") == 3
    assert "/metrics" not in sender_client.get("/openapi.json").json()["paths"]


def test_sender_counts_a_413_refused_before_routing(sender_client) -> None:
    before = sample_value(sender_client.get("/metrics").text, "gesco_http_requests_total",
                          route="/v1/transmissions", method="POST", status="413")
    big = {"file": ("big.png", b"x" * 400_000)}
    assert sender_client.post("/v1/transmissions", files=big).status_code == 413
    after = sample_value(sender_client.get("/metrics").text, "gesco_http_requests_total",
                         route="/v1/transmissions", method="POST", status="413")
    assert after == before + 1


# ----------------------------------------------------------------------------- receiver


@pytest.fixture()
def receiver_client(tmp_path, fake_generator):
    with ready_client(make_settings(tmp_path, queue_size=2), fake_generator) as client:
        yield client


def test_receiver_metrics_grpc_codes_queue_batches_and_stages(receiver_client, fake_generator) -> None:
    port = receiver_client.settings.grpc_port
    fake_generator.gate.clear()
    first, second = transmission(), transmission()
    receive(port, transport.symbol_frames(*first))
    deadline = time.monotonic() + 30
    while receiver_client.get(f"/v1/transmissions/{first[0].transmission_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    receive(port, transport.symbol_frames(*second))
    bad = list(transport.symbol_frames(*transmission()))[:-1]
    with pytest.raises(grpc.RpcError) as raised:
        receive(port, bad)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    waiting = receiver_client.get("/metrics").text
    assert sample_value(waiting, "gesco_queue_depth") == 1

    fake_generator.gate.set()
    for header, _ in (first, second):
        while receiver_client.get(f"/v1/transmissions/{header.transmission_id}").json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while sample_value(text := receiver_client.get("/metrics").text, "gesco_batch_size_count") < 2:
        assert time.monotonic() < deadline, text
        time.sleep(0.02)

    method = "/gesco.v1.Receiver/Receive"
    assert sample_value(text, "gesco_grpc_requests_total", method=method, code="OK") == 2
    assert sample_value(text, "gesco_grpc_requests_total", method=method, code="INVALID_ARGUMENT") == 1
    assert sample_value(text, "gesco_grpc_request_duration_seconds_count", method=method) == 3
    assert sample_value(text, "gesco_queue_depth") == 0
    assert sample_value(text, "gesco_batch_size_sum") == 2
    for stage in ("queue_wait", "decode_fds", "sample", "png"):
        assert sample_value(text, "gesco_stage_duration_seconds_count", stage=stage) == 2, stage
    assert sample_value(text, "gesco_stage_duration_seconds_sum", stage="queue_wait") > 0
    assert sample_value(text, "gesco_http_requests_total", route="/v1/transmissions/{transmission_id}",
                        method="GET", status="200") >= 3
    assert sample_value(text, "gesco_http_requests_total", route="/readyz", method="GET", status="200") == 1


def test_receiver_health_checks_are_counted_as_grpc_calls(receiver_client) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{receiver_client.settings.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    text = receiver_client.get("/metrics").text
    method = "/grpc.health.v1.Health/Check"
    assert sample_value(text, "gesco_grpc_requests_total", method=method, code="OK") >= 1
    assert sample_value(text, "gesco_grpc_requests_total", method=method, code="NOT_FOUND") == 1
    assert np.isfinite(sample_value(text, "process_resident_memory_bytes"))


def test_a_metrics_server_on_port_0_takes_any_free_port_and_says_which() -> None:
    port, stop = start_metrics_server(ServiceMetrics(), "127.0.0.1", 0)
    try:
        assert port > 0
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
    finally:
        stop()
