"""The sender as a real process: input validation, error mapping, and the happy path against a fake
channel (gRPC) and a fake receiver (REST) served by this test process."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import grpc
import httpx
import numpy as np
import pytest

from gesco.v1 import gesco_pb2
from sender_service import receiver_client
from shared.wire import transport
from shared.wire.imageio import encode_png
from shared.paths import REPO_ROOT
from tests.sender_helpers import MAP_HEIGHT, MAP_WIDTH, FakeReceiverRest, blocky_label_map, photo, serve_fake_channel
from tests.service_procs import free_port, open_post, service_log, start_service, stop_service

MAX_PIXELS = 20_000
MAX_UPLOAD_BYTES = 300_000


def post(base: str, data: bytes, filename: str = "upload.png", **fields) -> httpx.Response:
    form = {key: str(value) for key, value in fields.items()}
    return httpx.post(
        f"{base}/v1/transmissions", files={"file": (filename, data)}, data=form, timeout=60
    )


def assert_error(response: httpx.Response, status: int, field: str | None, text: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["field"] == field, error
    assert text.lower() in error["message"].lower(), error
    return error


def wait_ready(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
            return
        time.sleep(0.2)
    raise TimeoutError("the sender's segmenter never became ready")


def test_importing_the_sender_app_loads_no_torch() -> None:
    """The sender's process starts without torch: only its segmenter loader thread imports it."""
    code = "import sys, sender_service.app; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def lone_sender():
    """A sender whose channel address is a closed port."""
    port, closed = free_port(), free_port()
    env = {
        "GESCO_SENDER_PORT": str(port),
        "GESCO_SENDER_CHANNEL_ADDRESS": f"127.0.0.1:{closed}",
        "GESCO_SENDER_MAX_PIXELS": str(MAX_PIXELS),
        "GESCO_SENDER_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "GESCO_SENDER_DEVICE": "cpu",
    }
    base = f"http://127.0.0.1:{port}"
    proc = start_service("sender_service", env, ready_url=f"{base}/healthz")
    proc.base = base  # type: ignore[attr-defined]
    yield proc
    assert stop_service(proc) == 0, service_log(proc)  # SIGTERM is a clean exit, not a kill


@pytest.mark.parametrize(
    ("data", "fields", "status", "field", "text"),
    [
        (b"this is not an image", {}, 400, "file", "not a recognised image"),
        (encode_png(photo())[:300], {}, 400, "file", "truncated"),
        (b"", {}, 400, "file", "empty"),
        (encode_png(photo(200, 200)), {}, 400, "file", "pixels"),
        (encode_png(np.full((8, 8), 12, dtype=np.uint8)), {"kind": "label_map"}, 400, "file", "class id 12"),
        (encode_png(photo(8, 8)), {"kind": "label_map"}, 400, "file", "single-channel"),
        (encode_png(blocky_label_map()), {"kind": "label_map", "downsample_factor": 5}, 400,
         "downsample_factor", "must divide"),
        (b"x" * (MAX_UPLOAD_BYTES + 100_000), {}, 413, "file", "upload limit"),
        (b"x" * (MAX_UPLOAD_BYTES + 10), {}, 413, "file", "limit"),
        (encode_png(photo()), {"kind": "sketch"}, 422, "kind", "photo"),
        (encode_png(photo()), {"snr_db": 100.5}, 422, "snr_db", "less than or equal to 100"),
        (encode_png(photo()), {"snr_db": -11}, 422, "snr_db", "greater than or equal to -10"),
        (encode_png(photo()), {"snr_db": "loud"}, 422, "snr_db", "number"),
        (encode_png(photo()), {"psnr_db": -11}, 422, "psnr_db", "greater than or equal to -10"),
        (encode_png(photo()), {"snr_db": 10, "psnr_db": 20}, 422, "psnr_db", "deprecated alias of snr_db"),
        (encode_png(photo()), {"steps": 0}, 422, "steps", "greater than or equal to 1"),
        (encode_png(photo()), {"steps": 1001}, 422, "steps", "less than or equal to 1000"),
        (encode_png(photo()), {"guidance": 20.5}, 422, "guidance", "less than or equal to 20"),
        (encode_png(photo()), {"seed": -1}, 422, "seed", "greater than or equal to 0"),
        (encode_png(photo()), {"channel": "fiber"}, 422, "channel", "awgn"),
        (encode_png(photo()), {"snr_definition": "peak"}, 422, "snr_definition", "paper_psnr"),
        (encode_png(photo()), {"compression": "zip"}, 422, "compression", "jpeg"),
        (encode_png(photo()), {"sampler": "no spaces"}, 422, "sampler", "pattern"),
    ],
    ids=[
        "not-an-image", "truncated-png", "empty", "too-many-pixels", "label-id-too-big",
        "rgb-label-map", "factor-not-dividing", "body-too-large", "file-too-large", "bad-kind",
        "snr-high", "snr-low", "snr-text", "psnr-alias-low", "psnr-alias-differs", "steps-zero", "steps-high", "guidance-high",
        "seed-negative", "bad-channel", "bad-snr-definition", "bad-compression", "bad-sampler",
    ],
)
def test_bad_input_is_a_json_4xx_naming_the_field(lone_sender, data, fields, status, field, text) -> None:
    assert_error(post(lone_sender.base, data, **fields), status, field, text)


def test_missing_file_is_a_422_naming_file(lone_sender) -> None:
    response = httpx.post(f"{lone_sender.base}/v1/transmissions", data={"kind": "photo"}, timeout=30)
    assert_error(response, 422, "file")


def test_channel_down_is_503_and_the_process_survives(lone_sender) -> None:
    for kind, data in (
        ("label_map", encode_png(blocky_label_map())),
        ("label_map", encode_png(blocky_label_map(48, 64))),
    ):
        error = assert_error(post(lone_sender.base, data, kind=kind, snr_db=20), 503, None, "unavailable")
        assert error["grpc_code"] == "UNAVAILABLE" and len(error["id"]) == 32
    wait_ready(lone_sender.base)
    # A valid photo after all the bad requests still gets through decoding and segmentation.
    assert_error(post(lone_sender.base, encode_png(photo())), 503, None, "unavailable")
    assert lone_sender.poll() is None, service_log(lone_sender)
    assert httpx.get(f"{lone_sender.base}/healthz", timeout=5).json() == {"status": "ok"}


def test_readyz_reports_the_segmenter(lone_sender) -> None:
    wait_ready(lone_sender.base)
    body = httpx.get(f"{lone_sender.base}/readyz", timeout=5).json()
    assert body["ready"] is True and isinstance(body["segmenter"]["trained"], bool)


def test_docs_are_local_and_openapi_lists_the_form(lone_sender) -> None:
    page = httpx.get(f"{lone_sender.base}/docs", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text
    assert "/openapi.json" in page.text
    redoc = httpx.get(f"{lone_sender.base}/redoc", timeout=5)
    assert redoc.status_code == 200 and "https://" not in redoc.text
    spec = httpx.get(f"{lone_sender.base}/openapi.json", timeout=5).json()
    operation = spec["paths"]["/v1/transmissions"]["post"]
    assert "202" in operation["responses"]


# --- against fakes: a gRPC channel and the receiver's REST API, both in this process -------------


@pytest.fixture(scope="module")
def fakes():
    with serve_fake_channel() as channel:
        rest = ThreadingHTTPServer(("127.0.0.1", 0), FakeReceiverRest)
        threading.Thread(target=rest.serve_forever, daemon=True).start()
        channel.rest_port = rest.server_address[1]
        yield channel
        rest.shutdown()


# The rate-quality table of the budget tests: within 1/12, factor 4 (1/24 for 4 maps) is best.
BUDGET_TABLE = {
    "version": 1, "snr_definition": "average_power", "snrs_db": [1.0, 10.0], "tolerance_miou": 0.01,
    "made_by": "a test", "images": 2, "split": "val",
    "entries": [{"representation": "ours", "downsample_factor": factor, "compression": compression, "jpeg_quality": 75,
                 "bandwidth_ratio": 2 / factor**2, "miou": miou}
                for factor, compression, miou in ((1, "none", [0.56, 0.56]), (2, "none", [0.55, 0.555]),
                                                  (4, "none", [0.45, 0.53]), (4, "jpeg", [0.40, 0.50]),
                                                  (8, "none", [0.30, 0.45]))],
}


@pytest.fixture(scope="module")
def sender(fakes, tmp_path_factory):
    port = free_port()
    table = tmp_path_factory.mktemp("sender") / "rate-quality-table.json"
    table.write_text(json.dumps(BUDGET_TABLE))
    env = {
        "GESCO_SENDER_RATE_QUALITY_TABLE": str(table),
        "GESCO_SENDER_PORT": str(port),
        "GESCO_SENDER_CHANNEL_ADDRESS": f"127.0.0.1:{fakes.port}",
        "GESCO_SENDER_RECEIVER_PUBLIC_URL": "http://receiver.example:8001",
        "GESCO_SENDER_RECEIVER_INTERNAL_URL": f"http://127.0.0.1:{fakes.rest_port}",
        "GESCO_SENDER_RPC_TIMEOUT_S": "1.5",
        "GESCO_SENDER_POLL_INTERVAL_S": "0.05",
        "GESCO_SENDER_DEVICE": "cpu",
    }
    base = f"http://127.0.0.1:{port}"
    proc = start_service("sender_service", env, ready_url=f"{base}/readyz")
    proc.base = base  # type: ignore[attr-defined]
    yield proc
    assert stop_service(proc) == 0, service_log(proc)  # SIGTERM is a clean exit, not a kill


@pytest.fixture
def channel(fakes):
    fakes.calls.clear()
    fakes.abort, fakes.delay_s = None, 0.0
    FakeReceiverRest.status = "done"
    FakeReceiverRest.cancelled.clear()
    yield fakes
    fakes.abort, fakes.delay_s = None, 0.0


def test_label_map_is_sent_as_present_class_symbols(sender, channel) -> None:
    labels = blocky_label_map()
    response = post(sender.base, encode_png(labels), kind="label_map", snr_db=30, seed=7,
                    channel="rician", rician_k_db=3, steps=5, guidance=1.5, sampler="ddim", use_fds="false")
    assert response.status_code == 202, response.text
    body = response.json()
    call = channel.calls[-1]
    header = call["header"]
    assert call["metadata"]["x-request-id"] == body["id"] == header.transmission_id
    assert body["status_url"] == f"http://receiver.example:8001/v1/transmissions/{body['id']}"
    assert body["image_url"] == body["status_url"] + "/image"
    assert response.headers["location"] == body["status_url"]
    assert body["queue_position"] == 1 and body["seed"] == 7
    assert list(header.semantic.present_class_ids) == [0, 3, 5, 8]
    assert (header.semantic.height, header.semantic.width) == (MAP_HEIGHT, MAP_WIDTH)
    assert header.channel.model == "rician" and header.channel.snr_db == 30
    assert header.channel.rician_k_db == 3 and header.channel.seed == 7
    assert header.channel.snr_definition == gesco_pb2.SNR_DEFINITION_PAPER_PSNR
    assert header.sampling.steps == 5 and header.sampling.guidance == 1.5
    assert header.sampling.sampler == "ddim" and header.sampling.use_fds is False
    assert header.image_bits_jpeg == 0
    # The default downsampling factor 2: 4 maps of H/2 x W/2 values, still 0/1 (the regions are
    # aligned to 2x2 blocks), so one bit a value.
    assert header.semantic.downsample_factor == 2
    assert len(call["symbols"]) == MAP_HEIGHT * MAP_WIDTH
    assert np.mean(call["symbols"].astype(np.float64) ** 2) == pytest.approx(1.0, rel=1e-5)
    assert body["bits"] == {
        "payload_bits": MAP_HEIGHT * MAP_WIDTH,
        "num_symbols": MAP_HEIGHT * MAP_WIDTH,
        "channel_uses": MAP_HEIGHT * MAP_WIDTH // 2,
        "source_values": 3 * MAP_HEIGHT * MAP_WIDTH,
        "bandwidth_ratio": 1 / 6,  # H W / 2 channel uses per H x W x 3 source values
        "image_bits_jpeg": 0,
        "image_jpeg_quality": 0,
    }
    assert body["channel"]["model"] == "rician" and body["channel"]["snr_definition"] == "paper_psnr"
    assert body["sampling"] == {"sampler": "ddim", "steps": 5, "guidance": 1.5, "seed": 7, "use_fds": False}
    assert body["semantic"]["present_class_ids"] == [0, 3, 5, 8] and body["semantic"]["num_classes"] == 12
    assert body["segmenter"]["used"] is False


@pytest.mark.parametrize(("fields", "snr_db"), [
    ({}, 100.0), ({"psnr_db": 12}, 12.0), ({"snr_db": 12, "psnr_db": 12}, 12.0),
    ({"snr_db": 7, "snr_definition": "average_power"}, 7.0),
])
def test_snr_db_and_its_deprecated_alias_psnr_db(sender, channel, fields, snr_db) -> None:
    response = post(sender.base, encode_png(blocky_label_map()), kind="label_map", **fields)
    assert response.status_code == 202, response.text
    request = channel.calls[-1]["header"].channel
    assert request.snr_db == snr_db and response.json()["channel"]["requested_snr_db"] == snr_db
    expected = fields.get("snr_definition", "paper_psnr")
    assert request.snr_definition == transport.snr_definition_to_proto(expected)


def test_a_budget_picks_the_map_coding_and_the_answer_says_which(sender, channel) -> None:
    response = post(sender.base, encode_png(blocky_label_map()), kind="label_map", snr_db=10,
                    snr_definition="average_power", budget="1/12")
    assert response.status_code == 202, response.text
    body = response.json()
    # 4 present maps: factor f takes a ratio of 4 / (6 f^2); within 1/12 fit factors 4 (1/24) and 8 (1/96),
    # and factor 4 without JPEG maps is the table's best of them at 10 dB.
    assert channel.calls[-1]["header"].semantic.downsample_factor == 4
    assert body["semantic"]["downsample_factor"] == 4 and body["semantic"]["compression"] == "none"
    assert body["bits"]["bandwidth_ratio"] == pytest.approx(1 / 24)
    budget = body["budget"]
    assert budget["requested"] == "1/12" and budget["channel_uses"] == 3072
    assert budget["table"].endswith("rate-quality-table.json") and budget["table_made_by"] == "a test"
    assert budget["chosen"] == {"representation": "ours", "link": "maps", "model": None, "downsample_factor": 4,
                                "compression": "none",
                                "jpeg_quality": 75, "channel_uses": 4 * 24 * 32 // 2, "bandwidth_ratio": 1 / 24,
                                "snr_db_average_power": 10.0, "expected_miou": 0.53}
    assert [c["fits"] for c in budget["candidates"]] == [False, False, True, True, True]
    without = post(sender.base, encode_png(blocky_label_map()), kind="label_map")
    assert without.status_code == 202 and without.json()["budget"] is None


def test_a_budget_too_small_unreadable_or_beside_the_coding_fields_is_refused(sender, channel) -> None:
    labels = encode_png(blocky_label_map())
    # Factor 8, the smallest coding: 4 maps of 12x16 values in 384 channel uses.
    assert_error(post(sender.base, labels, kind="label_map", budget="100"), 400, "budget",
                 "the smallest that works is 384 channel uses")
    assert_error(post(sender.base, labels, kind="label_map", budget="1/12", downsample_factor=2), 422, "budget",
                 "either budget or those fields")
    assert_error(post(sender.base, labels, kind="label_map", budget="lots"), 422, "budget", "1/12")
    assert not channel.calls


def test_label_maps_of_another_size_are_resized_nearest(sender, channel) -> None:
    small = blocky_label_map(48, 64)
    response = post(sender.base, encode_png(small), kind="label_map", downsample_factor=4, compression="jpeg")
    assert response.status_code == 202, response.text
    semantic = channel.calls[-1]["header"].semantic
    assert (semantic.height, semantic.width, semantic.map_height, semantic.map_width) == (96, 128, 24, 32)
    assert semantic.compression == gesco_pb2.COMPRESSION_JPEG
    assert list(semantic.present_class_ids) == [0, 3, 5, 8]


def test_photo_is_segmented_and_sized_as_jpeg(sender, channel) -> None:
    response = post(sender.base, encode_png(photo(120, 160)), filename="photo.png")
    assert response.status_code == 202, response.text
    body = response.json()
    header = channel.calls[-1]["header"]
    assert header.image_bits_jpeg > 0 and header.image_jpeg_quality == 75
    assert body["bits"]["image_bits_jpeg"] == header.image_bits_jpeg
    assert body["segmenter"]["used"] is True and isinstance(body["segmenter"]["trained"], bool)
    assert header.sampling.steps == 0 and header.sampling.sampler == ""
    assert body["sampling"]["sampler"] is None and body["sampling"]["steps"] is None  # the receiver's defaults


@pytest.mark.parametrize(
    ("code", "status", "retry_after"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, None),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "7"),
        (grpc.StatusCode.UNAVAILABLE, 503, "7"),  # e.g. the receivers' job store is down
        (grpc.StatusCode.INTERNAL, 502, None),
    ],
)
def test_channel_errors_map_to_http(sender, channel, code, status, retry_after) -> None:
    channel.abort = (code, "nope", (("retry-after", "7"),))
    response = post(sender.base, encode_png(blocky_label_map()), kind="label_map")
    error = assert_error(response, status, None, "nope")
    assert error["grpc_code"] == code.name
    assert response.headers.get("retry-after") == retry_after


def test_a_refused_sampling_option_names_its_form_field(sender, channel) -> None:
    channel.abort = (grpc.StatusCode.INVALID_ARGUMENT, "sampling.sampler must be one of ['ddim'], got 'euler'", ())
    error = assert_error(post(sender.base, encode_png(blocky_label_map()), kind="label_map", sampler="euler"),
                         400, "sampler", "must be one of")
    assert error["grpc_code"] == "INVALID_ARGUMENT"


def test_channel_deadline_is_504(sender, channel) -> None:
    channel.delay_s = 2.5
    response = post(sender.base, encode_png(blocky_label_map()), kind="label_map")
    assert_error(response, 504, None, "deadline")


def test_wait_returns_the_png(sender, channel) -> None:
    response = post(sender.base, encode_png(blocky_label_map()), kind="label_map", wait="true")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-transmission-id"] == channel.calls[-1]["header"].transmission_id
    assert response.content == FakeReceiverRest.png


def test_wait_on_a_failed_generation_is_502(sender, channel) -> None:
    FakeReceiverRest.status = "failed"
    response = post(sender.base, encode_png(blocky_label_map()), kind="label_map", wait="true")
    error = assert_error(response, 502, None, "boom")
    assert error["id"] == channel.calls[-1]["header"].transmission_id


def leave_after_the_channel_call(sender, channel, **fields) -> str:
    """Post a label map, close the connection once the channel has the transmission; its id."""
    sock = open_post(f"{sender.base}/v1/transmissions", {"file": ("labels.png", encode_png(blocky_label_map()))},
                     {"kind": "label_map", **fields})
    deadline = time.monotonic() + 10
    while not channel.calls:
        assert time.monotonic() < deadline, "the transmission never reached the channel"
        time.sleep(0.02)
    time.sleep(0.2)
    sock.close()
    return channel.calls[-1]["header"].transmission_id


def wait_for_cancel(transmission_id: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while transmission_id not in FakeReceiverRest.cancelled:
        assert time.monotonic() < deadline, "the sender never asked the receiver to cancel"
        time.sleep(0.02)


def test_a_waiting_client_that_leaves_cancels_the_transmission(sender, channel) -> None:
    FakeReceiverRest.status = "running"  # the image never comes
    transmission_id = leave_after_the_channel_call(sender, channel, wait="true")
    wait_for_cancel(transmission_id)
    assert FakeReceiverRest.cancelled == [transmission_id]


def test_a_waiting_client_that_leaves_during_the_channel_call_cancels_it(sender, channel) -> None:
    channel.delay_s = 1.0  # the channel answers after the client has gone
    transmission_id = leave_after_the_channel_call(sender, channel, wait="true")
    wait_for_cancel(transmission_id)


def test_a_client_that_leaves_without_waiting_cancels_nothing(sender, channel) -> None:
    channel.delay_s = 1.0
    transmission_id = leave_after_the_channel_call(sender, channel, wait="false")
    deadline = time.monotonic() + 10
    while not any(line.get("msg") == "transmission sent" and line.get("request_id") == transmission_id
                  for line in log_lines(sender)):
        assert time.monotonic() < deadline, "the sender did not finish sending"
        time.sleep(0.05)
    time.sleep(0.5)
    assert FakeReceiverRest.cancelled == []


def log_lines(proc) -> list[dict]:
    return [json.loads(line) for line in service_log(proc).splitlines() if line.startswith("{")]


# --- the polling client against httpx's mock transport --------------------------------------------


def _poll(handler, timeout_s: float = 2.0) -> bytes:
    async def run() -> bytes:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await receiver_client.wait_for_image(client, "http://r", "a" * 32, timeout_s, 0.01)

    return asyncio.run(run())


def test_polling_waits_through_queued_and_running() -> None:
    states = iter(["queued", "running", "done"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/image"):
            return httpx.Response(200, content=b"\x89PNG fake")
        return httpx.Response(200, json={"status": next(states)})

    assert _poll(handler) == b"\x89PNG fake"


def test_polling_asks_for_a_long_poll_within_the_wait() -> None:
    asked: list[str | None] = []
    states = iter(["running", "done"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/image"):
            return httpx.Response(200, content=b"\x89PNG fake")
        asked.append(request.url.params.get("wait_s"))
        return httpx.Response(200, json={"status": next(states)})

    async def run() -> bytes:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await receiver_client.wait_for_image(client, "http://r", "a" * 32, 5.0, 0.01, long_poll_s=20.0)

    assert asyncio.run(run()) == b"\x89PNG fake"
    assert len(asked) == 2 and all(4.0 < float(wait) <= 5.0 for wait in asked)  # capped by the time left


def test_polling_a_refused_connection_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(receiver_client.ReceiverUnavailableError, match="cannot be reached"):
        _poll(handler)


def test_polling_times_out() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"status": "running"})

    with pytest.raises(receiver_client.WaitTimeoutError):
        _poll(handler, timeout_s=0.2)


def test_polling_a_forgotten_transmission_fails() -> None:
    with pytest.raises(receiver_client.GenerationFailedError, match="does not know"):
        _poll(lambda request: httpx.Response(404, json={"error": "unknown"}))
