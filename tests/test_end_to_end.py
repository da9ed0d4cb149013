"""sender -> channel -> receiver as three real processes on free loopback ports.

Sampling uses one or two steps of whatever diffusion model is the default (untrained when no
checkpoint is shipped): these tests check the plumbing and the lossless path, not image quality.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from shared.imageio import encode_png
from tests.service_procs import free_port, open_post, service_log, start_service, stop_service

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_HEIGHT, OUTPUT_WIDTH = 72, 96  # the receiver's configured output size
FAST = {"steps": "2", "guidance": "0", "seed": "3", "wait": "true"}


def blocky_label_map(seed: int = 0, block: int = 8) -> np.ndarray:
    """96x128 map of random classes in 8x8 blocks: every region is >= 8 px wide, so FDS's 3x3
    pools cannot remove or move any of it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 12, size=(96 // block, 128 // block), dtype=np.uint8)
    return np.kron(blocks, np.ones((block, block), dtype=np.uint8))


class Pipeline:
    """The three processes and their addresses; the receiver can be stopped and restarted."""

    def __init__(self, tmp: Path) -> None:
        self.sender_port, self.channel_port = free_port(), free_port()
        self.receiver_http, self.receiver_grpc = free_port(), free_port()
        self.receiver_url = f"http://127.0.0.1:{self.receiver_http}"
        self.sender_url = f"http://127.0.0.1:{self.sender_port}"
        self.receiver_env = {
            "GESCO_RECEIVER_HTTP_PORT": str(self.receiver_http),
            "GESCO_RECEIVER_GRPC_PORT": str(self.receiver_grpc),
            "GESCO_RECEIVER_PUBLIC_URL": self.receiver_url,
            "GESCO_RECEIVER_STORE_DIR": str(tmp / "store"),
            "GESCO_RECEIVER_OUTPUT_HEIGHT": str(OUTPUT_HEIGHT),
            "GESCO_RECEIVER_OUTPUT_WIDTH": str(OUTPUT_WIDTH),
            "GESCO_RECEIVER_DEVICE": "cpu",
            "GESCO_RECEIVER_SHUTDOWN_GRACE_S": "1",
            "GESCO_RECEIVER_TORCH_THREADS": "1",
        }
        self.receiver = None
        self.start_receiver()
        self.channel = start_service(
            "channel_sim",
            {
                "GESCO_CHANNEL_PORT": str(self.channel_port),
                "GESCO_CHANNEL_RECEIVER_ADDRESS": f"127.0.0.1:{self.receiver_grpc}",
                "GESCO_CHANNEL_FORWARD_TIMEOUT_S": "20",
                "GESCO_CHANNEL_METRICS_PORT": "0",
            },
            grpc_port=self.channel_port,
            timeout=120,
        )
        self.sender = start_service(
            "sender_service",
            {
                "GESCO_SENDER_PORT": str(self.sender_port),
                "GESCO_SENDER_CHANNEL_ADDRESS": f"127.0.0.1:{self.channel_port}",
                "GESCO_SENDER_RECEIVER_PUBLIC_URL": self.receiver_url,
                "GESCO_SENDER_POLL_INTERVAL_S": "0.2",
                "GESCO_SENDER_WAIT_TIMEOUT_S": "240",
                "GESCO_SENDER_DEVICE": "cpu",
            },
            ready_url=f"{self.sender_url}/readyz",
            timeout=120,
        )

    def start_receiver(self) -> None:
        self.receiver = start_service(
            "receiver_service",
            self.receiver_env,
            ready_url=f"{self.receiver_url}/readyz",
            grpc_port=self.receiver_grpc,
            timeout=180,
        )

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
        for proc in (self.sender, self.channel, self.receiver):
            if proc is not None:
                stop_service(proc)


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
    response = pipeline.post(REPO_ROOT / "examples" / "street_photo.jpg", kind="photo", psnr_db=20, **FAST)
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
        data=encode_png(labels), kind="label_map", psnr_db=100, downsample_factor=1,
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
        transmission_id = _wait_until_running(pipeline)
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
    outcome: dict = {}

    def slow_request() -> None:
        started = time.monotonic()
        try:
            outcome["response"] = pipeline.post(
                data=encode_png(blocky_label_map(1)), kind="label_map", steps=200, guidance=2,
                wait="true", timeout=120,
            )
        except httpx.HTTPError as error:  # the test fails below with this
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=slow_request)
    thread.start()
    _wait_until_running(pipeline)
    stop_service(pipeline.receiver, timeout=10)
    thread.join(timeout=90)
    assert not thread.is_alive(), "the sender hung after the receiver stopped"
    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    assert response.status_code in (502, 503), response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["message"]
    assert pipeline.sender.poll() is None, service_log(pipeline.sender)

    # While the receiver is down the channel cannot forward: a clear 503 at once.
    down = pipeline.post(data=encode_png(blocky_label_map(2)), kind="label_map", timeout=60)
    assert down.status_code == 503, down.text

    pipeline.start_receiver()
    # The channel reconnects with gRPC's backoff; a client retries a 503 until it has.
    deadline = time.monotonic() + 60
    while True:
        again = pipeline.post(data=encode_png(blocky_label_map(3)), kind="label_map", **FAST)
        if again.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert again.status_code == 200, again.text
    assert _png_size(again.content) == (OUTPUT_HEIGHT, OUTPUT_WIDTH)


def _wait_until_running(pipeline: Pipeline, timeout: float = 60) -> str:
    """Block until the receiver has a job in the running state (found through its store); its id."""
    store = Path(pipeline.receiver_env["GESCO_RECEIVER_STORE_DIR"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for status_file in store.glob("*/status.json"):
            if '"running"' in status_file.read_text(errors="replace"):
                return status_file.parent.name
        time.sleep(0.1)
    raise TimeoutError("no job reached the running state")
