"""The load generators' bookkeeping, against fakes in this process: a gRPC channel that rejects
every third call and a receiver REST API on which one accepted job never finishes."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent import futures
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from load import grpc_load, report
from shared.wire import transport


class RationedChannel(gesco_pb2_grpc.ChannelServicer):
    """Accepts calls, except every third one (RESOURCE_EXHAUSTED); the 2nd accepted never finishes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.accepted: list[str] = []

    def Transmit(self, request_iterator, context):
        header, _ = transport.assemble_frames(request_iterator, max_symbols=10_000_000)
        with self.lock:
            self.calls += 1
            if self.calls % 3 == 0:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
            self.accepted.append(header.transmission_id)
        return gesco_pb2.TransmissionAck(transmission_id=header.transmission_id)


@pytest.fixture()
def fakes():
    channel = RationedChannel()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gesco_pb2_grpc.add_ChannelServicer_to_server(channel, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    class Receiver(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/metrics":
                self._answer(200, b"# HELP x\nprocess_resident_memory_bytes 1.048576e+08\n")
                return
            transmission_id = self.path.rsplit("/", 1)[-1]
            if transmission_id not in channel.accepted:
                self._answer(404, b'{"detail": "unknown"}')
                return
            stuck = channel.accepted.index(transmission_id) == 1
            finished = datetime.now(timezone.utc).isoformat()
            body = {"status": "running"} if stuck else {"status": "done", "finished_at": finished}
            self._answer(200, json.dumps(body).encode())

        def _answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield port, f"http://127.0.0.1:{http.server_port}"
    http.shutdown()
    server.stop(0)


def test_grpc_load_counts_every_outcome_within_its_bounds(fakes) -> None:
    channel_port, receiver_url = fakes
    args = grpc_load.parse_args([
        "--channel", f"127.0.0.1:{channel_port}", "--receiver-url", receiver_url, "--rate", "20",
        "--duration-s", "5", "--max-requests", "9", "--drain-s", "0.5", "--timeout-s", "5",
        "--metrics-url", f"{receiver_url}/metrics",
    ])
    started = time.monotonic()
    result = asyncio.run(grpc_load.run(args))
    assert time.monotonic() - started < 5  # 9 requests at 20/s, then a 0.5 s drain
    assert result["sent"] == 9 and result["rejected"] == 3 and result["accepted"] == 6
    assert result["completed"] == 5 and result["lost"] == 1 and result["failed"] == 0
    assert result["request_latency_s"]["p50"] is not None and result["completion_latency_s"]["max"] is not None
    memory = result["resident_memory"][f"{receiver_url}/metrics"]
    assert memory == {"rss_before_mb": 100.0, "rss_after_mb": 100.0, "growth_percent": 0.0}
    assert "lost 1" in report.format_summary(result)


def test_warmup_requests_count_in_no_total(fakes) -> None:
    channel_port, receiver_url = fakes
    args = grpc_load.parse_args(["--channel", f"127.0.0.1:{channel_port}", "--receiver-url", receiver_url,
                                 "--rate", "50", "--max-requests", "2", "--warmup", "2", "--drain-s", "0"])
    result = asyncio.run(grpc_load.run(args))
    assert result["sent"] == 2 and result["accepted"] + result["rejected"] == 2


def test_the_duration_bounds_the_count(fakes) -> None:
    channel_port, receiver_url = fakes
    args = grpc_load.parse_args(["--channel", f"127.0.0.1:{channel_port}", "--receiver-url", receiver_url,
                                 "--rate", "10", "--duration-s", "0.35", "--max-requests", "1000",
                                 "--drain-s", "0"])
    result = asyncio.run(grpc_load.run(args))
    assert result["sent"] == 4  # at 0, 0.1, 0.2 and 0.3 s


def test_an_unreachable_channel_is_failed_not_lost() -> None:
    args = grpc_load.parse_args(["--channel", "127.0.0.1:1", "--receiver-url", "http://127.0.0.1:1",
                                 "--rate", "50", "--max-requests", "3", "--drain-s", "0", "--timeout-s", "2"])
    result = asyncio.run(grpc_load.run(args))
    assert result["sent"] == 3 and result["failed"] == 3 and result["lost"] == 0
    assert all(reason.startswith("UNAVAILABLE") for reason in result["failure_reasons"])


def test_percentiles_are_nearest_rank() -> None:
    assert report.percentiles([]) == {"p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    values = [float(v) for v in range(1, 101)]
    assert report.percentiles(values) == {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "max": 100.0}


def test_bad_arguments_are_refused() -> None:
    for argv in (["--rate", "0"], ["--max-requests", "0"], ["--duration-s", "-1"]):
        with pytest.raises(SystemExit):
            grpc_load.parse_args(argv)


def test_the_warmup_setting_is_a_count_of_zero_or_more() -> None:
    assert report.parse_warmup(None) == 0 and report.parse_warmup("") == 0 and report.parse_warmup(" ") == 0
    assert report.parse_warmup("3") == 3 and report.parse_warmup(" 2 ") == 2
    for value in ("-1", "x", "1.5"):
        with pytest.raises(ValueError, match="GESCO_LOAD_WARMUP"):
            report.parse_warmup(value)


def test_warm_up_waits_for_each_job_of_each_user(monkeypatch) -> None:
    """The locust file's warm-up: each user sends its requests one at a time, each waited for."""
    lock, events = threading.Lock(), []

    def send(index: int) -> str | None:
        with lock:
            events.append(("send", index))
        return None if index == -2 else f"id{index}"  # one of them rejected: not waited for

    def drain(receiver_url: str, ids: list[str], drain_s: float, api_key: str = "") -> dict:
        assert receiver_url == "http://receiver" and drain_s == 7.0 and api_key == "receiver-key"
        with lock:
            events.append(("wait", *ids))
        return {}

    monkeypatch.setattr(report, "drain", drain)
    accepted = report.warm_up(send, 3, "http://receiver", 7.0, users=2, wait_each=True, api_key="receiver-key")
    assert sorted(index for kind, index in events if kind == "send") == [-6, -5, -4, -3, -2, -1]
    assert sorted(accepted) == sorted(f"id{index}" for index in (-1, -3, -4, -5, -6))
    first_user = [event for event in events if event[1] in (-1, -2, -3, "id-1", "id-3")]
    second_user = [event for event in events if event not in first_user]
    assert first_user == [("send", -1), ("wait", "id-1"), ("send", -2), ("send", -3), ("wait", "id-3")]
    assert second_user == [("send", -4), ("wait", "id-4"), ("send", -5), ("wait", "id-5"),
                           ("send", -6), ("wait", "id-6")]


def test_warm_up_without_waiting_for_each_waits_for_all_at_the_end(monkeypatch) -> None:
    """grpc_load's warm-up: sent one by one, then waited for together (so they can share a batch)."""
    events = []
    monkeypatch.setattr(report, "drain", lambda url, ids, drain_s, api_key: events.append(("wait", *ids)) or {})
    accepted = report.warm_up(lambda index: events.append(("send", index)) or f"id{index}", 2, "http://r", 1.0)
    assert accepted == ["id-1", "id-2"]
    assert events == [("send", -1), ("send", -2), ("wait", "id-1", "id-2")]
    events.clear()
    assert report.warm_up(lambda index: events.append(index) or "id", 0, "http://r", 1.0, users=4) == []
    assert events == []
