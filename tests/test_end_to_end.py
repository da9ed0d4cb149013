"""sender -> channel -> receiver as three real processes on free loopback ports.

Sampling uses one or two steps of whatever diffusion model is the default (untrained when no
checkpoint is shipped): these tests check the plumbing and the lossless path, not image quality.
The fault tests stop or kill (SIGKILL) a service with requests in flight: each must end with a
clear error status, none may hang, the jobs a killed receiver had accepted are failed after its
restart, and new requests work once it is back.
"""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import grpc
import httpx
import numpy as np
import pytest

from gesco.stack import Ports, RunningStack, services
from gesco.v1 import gesco_pb2_grpc
from receiver_service.store import RESTART_ERROR
from shared.wire import transport
from shared.wire.imageio import encode_png
from shared.paths import REPO_ROOT
from tests.receiver_helpers import transmission
from tests.service_procs import open_post, stop_service

OUTPUT_HEIGHT, OUTPUT_WIDTH = 72, 96  # the receiver's configured output size
FAST = {"steps": "2", "guidance": "0", "seed": "3", "wait": "true"}
# What a gRPC caller may see when the server it streams to dies.
CALLER_SEES_GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


def blocky_label_map(seed: int = 0, block: int = 8) -> np.ndarray:
    """96x128 map of random classes in 8x8 blocks: every region is >= 8 px wide, so FDS's 3x3
    pools cannot remove or move any of it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 12, size=(96 // block, 128 // block), dtype=np.uint8)
    return np.kron(blocks, np.ones((block, block), dtype=np.uint8))


class Pipeline:
    """The three processes and their addresses; the receiver and the channel can be restarted."""

    def __init__(self, tmp: Path) -> None:
        ports, self.store_dir = Ports.free(), tmp / "store"
        self.channel_port, self.receiver_grpc = ports.channel, ports.receiver_grpc
        self.stack = RunningStack(services(ports, settings={
            "receiver": {
                "GESCO_RECEIVER_STORE_DIR": str(self.store_dir),
                "GESCO_RECEIVER_OUTPUT_HEIGHT": str(OUTPUT_HEIGHT),
                "GESCO_RECEIVER_OUTPUT_WIDTH": str(OUTPUT_WIDTH),
                "GESCO_RECEIVER_DEVICE": "cpu",
                "GESCO_RECEIVER_SHUTDOWN_GRACE_S": "1",
                "GESCO_RECEIVER_TORCH_THREADS": "1",
            },
            "channel": {"GESCO_CHANNEL_FORWARD_TIMEOUT_S": "20", "GESCO_CHANNEL_METRICS_PORT": "0"},
            "sender": {
                "GESCO_SENDER_POLL_INTERVAL_S": "0.2",
                "GESCO_SENDER_WAIT_TIMEOUT_S": "240",
                "GESCO_SENDER_DEVICE": "cpu",
            },
        }), tmp / "logs")
        self.receiver_url, self.sender_url = self.stack.url("receiver"), self.stack.url("sender")

    @property
    def receiver(self) -> subprocess.Popen:
        return self.stack.procs["receiver"]

    @property
    def channel(self) -> subprocess.Popen:
        return self.stack.procs["channel"]

    @property
    def sender(self) -> subprocess.Popen:
        return self.stack.procs["sender"]

    def start_receiver(self) -> None:
        self.stack.start("receiver")

    def start_channel(self) -> None:
        self.stack.start("channel")

    def post(self, path: Path | None = None, data: bytes | None = None, timeout: float = 300, **fields) -> httpx.Response:
        payload = data if data is not None else path.read_bytes()
        name = path.name if path is not None else "upload.png"
        return httpx.post(
            f"{self.sender_url}/v1/transmissions",
            files={"file": (name, payload)},
            data={key: str(value) for key, value in fields.items()},
            timeout=timeout,
        )

    def stop(self) -> None:
        self.stack.stop()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    services = Pipeline(tmp_path_factory.mktemp("e2e"))
    yield services
    services.stop()


def _png_size(data: bytes) -> tuple[int, int]:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, "not a PNG"
    return image.shape[:2]


def test_photo_comes_back_as_a_png_of_the_configured_size(pipeline) -> None:
    response = pipeline.post(REPO_ROOT / "examples" / "street_photo.jpg", kind="photo", snr_db=20, **FAST)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert _png_size(response.content) == (OUTPUT_HEIGHT, OUTPUT_WIDTH)
    transmission_id = response.headers["x-transmission-id"]
    status = httpx.get(f"{pipeline.receiver_url}/v1/transmissions/{transmission_id}", timeout=10).json()
    assert status["status"] == "done"
    assert status["bits"]["image_bits_jpeg"] > 0


def test_lossless_label_map_survives_fds_exactly(pipeline) -> None:
    labels = blocky_label_map()
    response = pipeline.post(
        data=encode_png(labels), kind="label_map", snr_db=100, downsample_factor=1,
        compression="none", use_fds="true", **FAST,
    )
    assert response.status_code == 200, response.text
    assert _png_size(response.content) == (OUTPUT_HEIGHT, OUTPUT_WIDTH)
    transmission_id = response.headers["x-transmission-id"]
    fds = httpx.get(
        f"{pipeline.receiver_url}/v1/transmissions/{transmission_id}/maps/fds_labels.png", timeout=10
    )
    assert fds.status_code == 200
    received = cv2.imdecode(np.frombuffer(fds.content, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    assert received.shape == labels.shape
    assert np.array_equal(received, labels), f"{np.mean(received != labels):.2%} of pixels differ"


def test_a_waiting_client_that_leaves_stops_its_sampling(pipeline) -> None:
    sock = open_post(f"{pipeline.sender_url}/v1/transmissions",
                     {"file": ("labels.png", encode_png(blocky_label_map(4)))},
                     {"kind": "label_map", "steps": "1000", "guidance": "2", "wait": "true"})
    try:
        (transmission_id,) = _wait_for_jobs(pipeline, {"running"})
    finally:
        sock.close()
    left = time.monotonic()
    status_url = f"{pipeline.receiver_url}/v1/transmissions/{transmission_id}"
    while (status := httpx.get(status_url, timeout=10).json())["status"] == "running":
        assert time.monotonic() - left < 30, "sampling went on after the client left"
        time.sleep(0.1)
    assert status["status"] == "cancelled", status
    assert time.monotonic() - left < 10  # stopped at the next of its 1000 steps, not at the end
    assert httpx.get(f"{status_url}/image", timeout=10).status_code == 409
    # A client without wait=true owns its job: it is made although nobody waits on the connection.
    accepted = pipeline.post(data=encode_png(blocky_label_map(5)), kind="label_map", steps=2, guidance=0)
    assert accepted.status_code == 202, accepted.text
    again = pipeline.post(data=encode_png(blocky_label_map(6)), kind="label_map", **FAST)
    assert again.status_code == 200, again.text
    status = httpx.get(accepted.json()["status_url"], timeout=10).json()
    assert status["status"] == "done", status


def test_receiver_stopping_mid_request_gives_a_clear_error_then_recovers(pipeline) -> None:
    request = InFlight(pipeline, blocky_label_map(1), steps=200, guidance=2, wait="true")
    _wait_for_jobs(pipeline, {"running"})
    stop_service(pipeline.receiver, timeout=10)
    response = request.response(timeout=90)
    assert response.status_code in (502, 503), response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["message"]
    assert pipeline.sender.poll() is None, pipeline.stack.log("sender")

    # While the receiver is down the channel cannot forward: a clear 503 at once.
    down = pipeline.post(data=encode_png(blocky_label_map(2)), kind="label_map", timeout=60)
    assert down.status_code == 503, down.text

    pipeline.start_receiver()
    again = _post_once_up(pipeline, blocky_label_map(3))
    assert again.status_code == 200, again.text
    assert _png_size(again.content) == (OUTPUT_HEIGHT, OUTPUT_WIDTH)


def test_killing_the_receiver_under_load_ends_every_request_clearly_and_fails_its_jobs(pipeline) -> None:
    # Four waiting clients whose jobs cannot share a batch (their steps differ): one samples, three
    # queue; two more callers are halfway through streaming to the receiver itself.
    requests = [InFlight(pipeline, blocky_label_map(20 + i), steps=200 + i, guidance=2, wait="true")
                for i in range(4)]
    accepted = _wait_for_jobs(pipeline, {"queued", "running"}, count=4)
    with held_streams(f"127.0.0.1:{pipeline.receiver_grpc}", gesco_pb2_grpc.ReceiverStub, "Receive") as streams:
        pipeline.receiver.send_signal(signal.SIGKILL)
        pipeline.receiver.wait(10)
        killed = time.monotonic()
        for call in streams:
            assert call.exception(timeout=15).code() in CALLER_SEES_GONE
    failed_ids = []
    for request in requests:
        response = request.response(timeout=15)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert "cannot be reached" in error["message"]
        failed_ids.append(error["id"])
    assert time.monotonic() - killed < 15, "requests in flight took too long to end"
    assert sorted(failed_ids) == sorted(accepted)
    assert pipeline.sender.poll() is None and pipeline.channel.poll() is None
    with pytest.raises(grpc.RpcError) as raised:  # nothing to forward to: UNAVAILABLE at once
        _transmit_via_channel(pipeline, timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    pipeline.start_receiver()
    for transmission_id in accepted:  # accepted, unfinished: failed after the restart, not lost
        status = httpx.get(f"{pipeline.receiver_url}/v1/transmissions/{transmission_id}", timeout=10).json()
        assert (status["status"], status["error"]) == ("failed", RESTART_ERROR), status
    again = _post_once_up(pipeline, blocky_label_map(24))
    assert again.status_code == 200, again.text


def test_killing_the_channel_under_load_ends_calls_in_flight_then_recovers(pipeline) -> None:
    # Two waiting clients whose jobs are already at the receiver, and three callers halfway
    # through streaming to the channel.
    requests = [InFlight(pipeline, blocky_label_map(30 + i), steps=20, guidance=0, seed=i, wait="true")
                for i in range(2)]
    _wait_for_jobs(pipeline, {"queued", "running"}, count=2)
    with held_streams(f"127.0.0.1:{pipeline.channel_port}", gesco_pb2_grpc.ChannelStub, "Transmit") as streams:
        pipeline.channel.send_signal(signal.SIGKILL)
        pipeline.channel.wait(10)
        killed = time.monotonic()
        for call in streams:
            assert call.exception(timeout=15).code() in CALLER_SEES_GONE
    assert time.monotonic() - killed < 15
    down = pipeline.post(data=encode_png(blocky_label_map(32)), kind="label_map", timeout=60)
    assert down.status_code == 503 and down.json()["error"]["grpc_code"] == "UNAVAILABLE", down.text
    for request in requests:  # past the channel already: their images come
        response = request.response(timeout=120)
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG"), response.text
    assert pipeline.sender.poll() is None and pipeline.receiver.poll() is None

    pipeline.start_channel()
    again = _post_once_up(pipeline, blocky_label_map(33))
    assert again.status_code == 200, again.text


class InFlight:
    """A label map posted through the sender on a thread of its own."""

    def __init__(self, pipeline: Pipeline, labels: np.ndarray, **fields) -> None:
        self._outcome: httpx.Response | httpx.HTTPError | None = None
        self._thread = threading.Thread(
            target=self._post, args=(pipeline, labels, fields), daemon=True)
        self._thread.start()

    def _post(self, pipeline: Pipeline, labels: np.ndarray, fields: dict) -> None:
        try:
            self._outcome = pipeline.post(data=encode_png(labels), kind="label_map", timeout=120, **fields)
        except httpx.HTTPError as error:  # the test fails with it in `response`
            self._outcome = error

    def response(self, timeout: float) -> httpx.Response:
        """The response, which must come within `timeout` seconds."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the request hung"
        assert isinstance(self._outcome, httpx.Response), self._outcome
        return self._outcome


@contextmanager
def held_streams(target: str, stub_class, method: str, count: int = 2) -> Iterator[list[grpc.Future]]:
    """`count` calls to `method` whose streams stop halfway, in flight until the server goes away."""
    release = threading.Event()

    def halfway(header, symbols):
        frames = list(transport.symbol_frames(header, symbols, chunk_bytes=4096))
        yield from frames[: len(frames) // 2]
        release.wait(60)

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        call = getattr(stub_class(channel), method)
        calls = [call.future(halfway(*transmission()), timeout=30) for _ in range(count)]
        time.sleep(0.5)  # the first halves are on the server
        assert not any(future.done() for future in calls)
        try:
            yield calls
        finally:
            release.set()


def _transmit_via_channel(pipeline: Pipeline, timeout: float) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{pipeline.channel_port}") as channel:
        gesco_pb2_grpc.ChannelStub(channel).Transmit(transport.symbol_frames(*transmission()), timeout=timeout)


def _post_once_up(pipeline: Pipeline, labels: np.ndarray, timeout: float = 60) -> httpx.Response:
    """Post (wait=true, fast) until the answer is not a 503: a restarted peer is reconnected to
    with gRPC's backoff, and a client retries a 503 until then."""
    deadline = time.monotonic() + timeout
    while True:
        response = pipeline.post(data=encode_png(labels), kind="label_map", **FAST)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(1)


def _store_statuses(pipeline: Pipeline) -> dict[str, str]:
    """The status of every job in the receiver's store folder, by id."""
    statuses = {}
    for status_file in pipeline.store_dir.glob("*/status.json"):
        try:
            statuses[status_file.parent.name] = json.loads(status_file.read_text())["status"]
        except (OSError, ValueError, KeyError):
            continue  # evicted meanwhile
    return statuses


def _wait_for_jobs(pipeline: Pipeline, statuses: set[str], count: int = 1, timeout: float = 60) -> list[str]:
    """Block until at least `count` stored jobs have one of `statuses`; their ids."""
    deadline = time.monotonic() + timeout
    while True:
        ids = [tid for tid, status in _store_statuses(pipeline).items() if status in statuses]
        if len(ids) >= count:
            return ids
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} jobs reached {sorted(statuses)}")
        time.sleep(0.1)


def _status(pipeline, transmission_id: str, wait_s: int = 60) -> dict:
    return httpx.get(f"{pipeline.receiver_url}/v1/transmissions/{transmission_id}?wait_s={wait_s}",
                     timeout=wait_s + 10).json()


def test_the_digital_link_delivers_the_exact_label_map_above_its_snr(pipeline) -> None:
    labels = blocky_label_map(seed=1)
    response = pipeline.post(data=encode_png(labels), kind="label_map", link="digital", snr_db=20,
                             snr_definition="average_power", **FAST)
    assert response.status_code == 200, response.text
    status = _status(pipeline, response.headers["x-transmission-id"])
    assert status["status"] == "done"
    link = status["link"]
    assert link["name"] == "digital" and link["scheme"] == "64-QAM r=5/6, labels 96x128"  # the table's 20 dB scheme
    assert link["channel_uses"] == status["bits"]["channel_uses"] and link["code_blocks"] >= 1
    assert link["bandwidth_ratio"] == pytest.approx(link["channel_uses"] / (96 * 128 * 3))
    fds = httpx.get(status["urls"]["maps_fds_labels"], timeout=10)
    received = cv2.imdecode(np.frombuffer(fds.content, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(received, labels)


def test_a_digital_transmission_below_its_snr_fails_its_crc_and_says_so(pipeline) -> None:
    response = pipeline.post(data=encode_png(blocky_label_map(seed=2)), kind="label_map", link="digital",
                             scheme="64-QAM r=5/6", snr_db=0, snr_definition="average_power",
                             **(FAST | {"wait": "false"}))
    assert response.status_code == 202, response.text
    assert response.json()["link"]["scheme"].startswith("64-QAM r=5/6")
    status = _status(pipeline, response.json()["id"])
    assert status["status"] == "failed"
    assert status["error"].startswith("crc_failed: the digital link's CRC failed"), status["error"]
    assert httpx.get(status["urls"]["image"], timeout=10).status_code != 200  # no image, never a wrong one


def test_the_learned_link_sends_the_map_encoders_symbols(pipeline) -> None:
    response = pipeline.post(data=encode_png(blocky_label_map(seed=3)), kind="label_map", link="learned",
                             snr_db=10, snr_definition="average_power", **FAST)
    assert response.status_code == 200, response.text
    link = _status(pipeline, response.headers["x-transmission-id"])["link"]
    assert link["name"] == "learned" and link["model"] == "map-jscc-1-24"
    assert link["bandwidth_ratio"] == pytest.approx(1 / 24)


def test_auto_picks_the_reports_frontier_for_a_budget_and_says_why(pipeline) -> None:
    response = pipeline.post(data=encode_png(blocky_label_map(seed=4)), kind="label_map", link="auto",
                             budget="1/12", snr_db=10, snr_definition="average_power",
                             **(FAST | {"wait": "false"}))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["budget"]["chosen"]["link"] == "digital" and body["link"]["name"] == "digital"
    assert "16-QAM r=1/2" in body["link"]["scheme"] and body["link"]["bandwidth_ratio"] <= 1 / 12
    assert "expected mIoU" in body["budget"]["why"]
    assert _status(pipeline, body["id"])["status"] == "done"


@pytest.mark.parametrize(("fields", "field"), [
    ({"link": "auto"}, "link"),  # auto picks for a budget
    ({"link": "maps", "scheme": "QPSK r=1/2"}, "scheme"),
    ({"link": "digital", "scheme": "QPSK r=9/10"}, "scheme"),
    ({"link": "carrier-pigeon"}, "link"),
])
def test_a_bad_link_request_names_its_field(pipeline, fields: dict, field: str) -> None:
    response = pipeline.post(data=encode_png(blocky_label_map()), kind="label_map", **(FAST | fields))
    assert 400 <= response.status_code < 500, response.text
    assert field in json.dumps(response.json()), response.text
