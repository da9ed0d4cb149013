"""The `gesco` command line client against the three services as processes (the sender with an
API key), run as a script would run it: `python -m gesco ...`, reading stdout, stderr and the exit
code; over REST, and with `--via grpc` over the gRPC APIs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from gesco import cli, grid
from shared.paths import REPO_ROOT
from tests.link_services import LinkServices
from tests.service_procs import free_port

API_KEY = "cli-test-key"
LABELS = REPO_ROOT / "examples" / "street_labels.png"
PHOTO = REPO_ROOT / "examples" / "street_photo.jpg"
FAST = ("--steps", "1", "--guidance", "0")
# Long enough to be watched and interrupted, even where status requests are slow (a loaded machine)
# and the traced network samples a step in tens of milliseconds.
SLOW = ("--sampler", "ddim", "--steps", "1000", "--guidance", "0")


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[LinkServices]:
    link = LinkServices(tmp_path_factory.mktemp("cli"), sender_env={"GESCO_SENDER_API_KEY": API_KEY},
                        output_size=(48, 64))
    yield link
    link.stop()


def gesco_command(services: LinkServices | None, *args: str, api_key: str | None = API_KEY) -> list[str]:
    command = [sys.executable, "-m", "gesco"]
    if services is not None:
        command += ["--url", services.sender_url]
    if api_key:
        command += ["--api-key", api_key]
    return command + list(args)


# The client's own variables ($GESCO_URL, $GESCO_API_KEY) must not leak in from the caller.
CLIENT_ENV = {name: value for name, value in os.environ.items() if not name.startswith("GESCO_")}


def gesco(services: LinkServices | None, *args: str, api_key: str | None = API_KEY,
          timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(gesco_command(services, *args, api_key=api_key), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=CLIENT_ENV)


def receiver_status(services: LinkServices, transmission_id: str, wait_s: float = 0) -> dict:
    return httpx.get(f"{services.receiver_url}/v1/transmissions/{transmission_id}", params={"wait_s": wait_s},
                     timeout=wait_s + 30).json()


def via_grpc(services: LinkServices) -> tuple[str, ...]:
    return ("--via", "grpc", "--grpc-sender", f"127.0.0.1:{services.sender_grpc}",
            "--grpc-receiver", f"127.0.0.1:{services.receiver_grpc}")


def png_shape(path: Path) -> tuple[int, ...]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} is not an image"
    return image.shape


def test_send_saves_the_image_and_prints_the_id(services, tmp_path) -> None:
    out = tmp_path / "out.png"
    done = gesco(services, "send", str(PHOTO), "--snr-db", "5", "--channel", "rayleigh", "-o", str(out),
                 "--progress", *FAST)
    assert done.returncode == 0, done.stderr
    transmission_id = done.stdout.strip()
    assert len(transmission_id) == 32 and png_shape(out) == (48, 64, 3)
    assert "] done" in done.stderr  # the progress bar's last state
    status = json.loads(gesco(services, "status", transmission_id).stdout)
    assert status["status"] == "done" and status["channel"]["model"] == "rayleigh"
    assert status["channel"]["requested_snr_db"] == 5 and status["sampling"]["steps"] == 1


def test_send_guesses_a_label_map_and_prints_json_on_request(services) -> None:
    done = gesco(services, "send", str(LABELS), "--json", "--no-progress", "--seed", "3", *FAST)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["status"] == "done" and status["sampling"]["seed"] == 3
    assert status["bits"]["image_bits_jpeg"] == 0  # sent as a label map: no photo to compare with
    assert done.stderr == ""


def test_send_and_status_via_grpc_answer_what_rest_answers(services, tmp_path) -> None:
    out = tmp_path / "out.png"
    done = gesco(services, *via_grpc(services), "send", str(LABELS), "--snr-db", "8", "--seed", "5", "-o", str(out),
                 "--json", "--progress", *FAST)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["status"] == "done" and status["sampling"]["seed"] == 5 and png_shape(out) == (48, 64, 3)
    assert status["channel"]["requested_snr_db"] == 8 and isinstance(status["bits"]["payload_bits"], int)
    assert "] done" in done.stderr
    over_grpc = json.loads(gesco(services, *via_grpc(services), "status", status["id"], "--wait", "5").stdout)
    over_rest = json.loads(gesco(services, "status", status["id"]).stdout)
    assert over_grpc == over_rest == status


@pytest.mark.parametrize("transport", [(), ("grpc",)])
def test_a_budget_lets_the_sender_pick_a_coding_that_fits(services, transport) -> None:
    via = via_grpc(services) if transport else ()
    done = gesco(services, *via, "send", str(LABELS), "--budget", "1/12", "--snr-db", "10", "--json", "--no-progress",
                 *FAST)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert 0 < status["bits"]["bandwidth_ratio"] <= 1 / 12 and status["semantic"]["downsample_factor"] > 1
    assert status["budget"]["chosen"]["downsample_factor"] == status["semantic"]["downsample_factor"]
    done = gesco(services, *via, "send", str(LABELS), "--budget", "10", *FAST)
    assert done.returncode == cli.EXIT_REFUSED and "budget" in done.stderr and "smallest" in done.stderr


@pytest.mark.parametrize("transport", [(), ("grpc",)])
def test_ctrl_c_cancels_the_transmission_at_the_receiver(services, transport) -> None:
    via = via_grpc(services) if transport else ()
    command = gesco_command(services, *via, "send", str(LABELS), "--no-progress", *SLOW)
    # A suite run as a background job (`make test &`, nohup) hands its children SIGINT ignored, and
    # Python keeps an ignored SIGINT: the client gets the default back, as at a terminal.
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=CLIENT_ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        transmission_id = process.stdout.readline().strip()  # printed as soon as the sender accepted it
        assert len(transmission_id) == 32, process.communicate(timeout=30)
        deadline = time.monotonic() + 120
        while (status := receiver_status(services, transmission_id)["status"]) != "running":
            assert status == "queued" and time.monotonic() < deadline, f"never seen running: {status}"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == cli.EXIT_FAILED, stderr
    assert stderr == f"gesco: error: interrupted; transmission {transmission_id} cancelled\n"
    assert receiver_status(services, transmission_id, wait_s=30)["status"] == "cancelled"
    again = gesco(services, *via, "cancel", transmission_id)  # cancelled already: its status, unchanged
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "cancelled", again.stderr


def test_timeout_cancels_and_cancel_cancels(services) -> None:
    done = gesco(services, "send", str(LABELS), "--timeout", "2", *SLOW)
    transmission_id = done.stdout.strip()
    assert done.returncode == cli.EXIT_TIMEOUT and len(transmission_id) == 32, done.stderr
    assert done.stderr == (f"gesco: error: transmission {transmission_id} had not finished after 2 s; "
                           f"transmission {transmission_id} cancelled\n")
    assert receiver_status(services, transmission_id, wait_s=30)["status"] == "cancelled"
    queued = httpx.post(f"{services.sender_url}/v1/transmissions", files={"file": ("l.png", LABELS.read_bytes())},
                        data={"kind": "label_map", "steps": "400", "guidance": "0"}, headers={"X-API-Key": API_KEY},
                        timeout=60).json()
    cancelled = gesco(services, "cancel", queued["id"])
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] in ("running", "cancelled")
    assert receiver_status(services, queued["id"], wait_s=30)["status"] == "cancelled"
    finished = gesco(services, "send", str(LABELS), "--no-progress", *FAST)
    refused = gesco(services, "cancel", finished.stdout.strip())
    assert refused.returncode == cli.EXIT_FAILED and "HTTP 409: " in refused.stderr and "already done" in refused.stderr


def test_send_takes_the_forms_coding_and_fading_options(services) -> None:
    done = gesco(services, "send", str(LABELS), "--compression", "jpeg", "--jpeg-quality", "40", "--channel", "rician",
                 "--rician-k-db", "3", "--no-equalize", "--json", "--no-progress", *FAST)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["semantic"]["compression"] == "jpeg" and status["semantic"]["jpeg_quality"] == 40
    assert status["channel"]["model"] == "rician" and "budget" not in status


@pytest.mark.parametrize(("args", "code", "text"), [
    (("send", str(LABELS), "--steps", "5000"), cli.EXIT_REFUSED, "gRPC INVALID_ARGUMENT: Input should be less than or "
                                                                 "equal to 1000 (field: steps)"),
    (("send", str(REPO_ROOT / "README.md"), "--kind", "photo"), cli.EXIT_REFUSED, "(field: image)"),
    (("status", "0" * 32), cli.EXIT_NOT_FOUND, "gRPC NOT_FOUND: no transmission"),
    (("status", "not-an-id"), cli.EXIT_REFUSED, "(field: transmission_id)"),
    (("sweep", str(LABELS), "-o", "strip.png"), cli.EXIT_USAGE, "use --via rest"),
    (("send", str(LABELS), "--sampler", "euler", *FAST), cli.EXIT_REFUSED, "the receiver refused the sampling: "
                                                                          "sampler must be one of"),
])
def test_grpc_errors_are_one_line_with_the_apis_details_and_an_exit_code(services, args, code, text) -> None:
    done = gesco(services, *via_grpc(services), *args)
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stderr.startswith("gesco: error: ") and text in done.stderr and done.stdout == ""
    assert done.stderr.count("\n") == 1


def test_grpc_without_the_api_key_is_exit_4_and_an_unreachable_sender_exit_6(services) -> None:
    done = gesco(services, *via_grpc(services), "send", str(LABELS), *FAST, api_key=None)
    assert done.returncode == cli.EXIT_AUTH and "gRPC UNAUTHENTICATED" in done.stderr
    done = gesco(None, "--via", "grpc", "--grpc-sender", f"127.0.0.1:{free_port()}", "send", str(LABELS), *FAST)
    assert done.returncode == cli.EXIT_UNAVAILABLE and "gRPC UNAVAILABLE from the sender" in done.stderr


def test_sweep_writes_a_grid_of_the_stages_per_snr(services, tmp_path) -> None:
    out = tmp_path / "strip.png"
    done = gesco(services, "sweep", str(LABELS), "--snrs", "1,20", "-o", str(out), "--json", *FAST)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert set(answer["ids"]) == {"1", "20"} and isinstance(answer["seed"], int)
    width = grid.LABEL_WIDTH + len(grid.COLUMNS) * (grid.CELL_WIDTH + grid.GAP)
    height = grid.HEADER_HEIGHT + 2 * (grid.CELL_HEIGHT + grid.GAP)
    assert png_shape(out) == (height, width, 3)
    image = cv2.imread(str(out))
    row = grid.HEADER_HEIGHT + grid.CELL_HEIGHT // 2
    cells = [image[row, grid.LABEL_WIDTH + c * (grid.CELL_WIDTH + grid.GAP) + grid.CELL_WIDTH // 2] for c in range(5)]
    assert all(np.any(cell != 255) for cell in cells)  # every stage drew something


@pytest.mark.parametrize(("args", "code", "text"), [
    (("send", str(REPO_ROOT / "README.md"), "--kind", "photo"), cli.EXIT_REFUSED, "(field: file)"),
    (("send", str(LABELS), "--steps", "5000"), cli.EXIT_REFUSED, "(field: steps)"),
    (("status", "0" * 32), cli.EXIT_NOT_FOUND, "HTTP 404: no transmission"),
    (("status", "not-an-id"), cli.EXIT_REFUSED, "(field: transmission_id)"),
    (("send", "missing.png"), cli.EXIT_USAGE, "cannot read missing.png"),
    (("send", str(LABELS), "--compression", "zip"), cli.EXIT_REFUSED, "(field: compression)"),
    (("send", str(LABELS), "--sampler", "euler", *FAST), cli.EXIT_REFUSED, "the receiver refused the sampling"),
    # The output is checked before anything is sent: no id on stdout.
    (("send", str(LABELS), "-o", "no/such/folder/out.png"), cli.EXIT_USAGE, "cannot write no/such/folder/out.png"),
    (("sweep", str(LABELS), "-o", "examples"), cli.EXIT_USAGE, "it is a directory"),
])
def test_errors_are_one_line_with_the_apis_message_and_an_exit_code(services, args, code, text) -> None:
    done = gesco(services, *args)
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stderr.startswith("gesco: error: ") and text in done.stderr and done.stdout == ""
    assert done.stderr.count("\n") == 1


def test_a_missing_api_key_is_exit_4(services) -> None:
    done = gesco(services, "send", str(LABELS), *FAST, api_key=None)
    assert done.returncode == cli.EXIT_AUTH
    assert "HTTP 401" in done.stderr and "(field: X-API-Key)" in done.stderr


def test_an_unreachable_sender_is_exit_6() -> None:
    done = subprocess.run([sys.executable, "-m", "gesco", "--url", f"http://127.0.0.1:{free_port()}",
                           "status", "a" * 32], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == cli.EXIT_UNAVAILABLE and "cannot be reached" in done.stderr


def test_only_known_transports_are_accepted() -> None:
    done = gesco(None, "--via", "carrier-pigeon", "status", "a" * 32)
    assert done.returncode == cli.EXIT_USAGE and "invalid choice" in done.stderr


@pytest.mark.parametrize(("status", "code"), [(400, cli.EXIT_REFUSED), (401, cli.EXIT_AUTH), (409, cli.EXIT_FAILED),
                                              (429, cli.EXIT_BUSY), (503, cli.EXIT_UNAVAILABLE),
                                              (504, cli.EXIT_TIMEOUT), (502, cli.EXIT_SERVER), (418, cli.EXIT_REFUSED)])
def test_http_statuses_map_to_exit_codes(status, code) -> None:
    response = httpx.Response(status, json={"error": {"field": None, "message": "why"}}, headers={"Retry-After": "4"})
    error = cli.api_error(response)
    assert error.exit_code == code and error.message == f"HTTP {status}: why; retry after 4 s"


def test_label_maps_are_told_from_photos_by_their_png_header() -> None:
    assert cli.guess_kind(LABELS.read_bytes()) == "label_map"
    assert cli.guess_kind(PHOTO.read_bytes()) == "photo"
    rgb = cv2.imencode(".png", np.zeros((4, 4, 3), dtype=np.uint8))[1].tobytes()
    assert cli.guess_kind(rgb) == "photo"


def test_the_console_script_is_declared_for_cli_main() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"gesco": "gesco.cli:main"}
    help_text = subprocess.run([sys.executable, "-m", "gesco", "--help"], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=60)
    assert help_text.returncode == 0 and "Exit codes: 0 ok" in help_text.stdout
