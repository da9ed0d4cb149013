"""The clients' gRPC API against the three services as processes: Sender.Transmit on the sender's
gRPC port, Receiver.GetTransmission and WatchTransmission on the receiver's, reached with the
generated stubs and with the real grpcurl through reflection alone (the README's round trip)."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from receiver_service.status import TransmissionStatus
from sender_service.grpc_api import PARAMETER_FIELDS
from sender_service.transmissions import TransmissionAccepted, TransmissionParameters
from shared.paths import REPO_ROOT
from tests.link_services import LinkServices
from tests.service_procs import free_port

API_KEY = "grpc-test-key"
KEY = (("x-api-key", API_KEY),)
LABELS = (REPO_ROOT / "examples" / "street_labels.png").read_bytes()
OUTPUT_SIZE = (48, 64)
GRPCURL = Path(sys.executable).with_name("grpcurl")


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[LinkServices]:
    link = LinkServices(tmp_path_factory.mktemp("grpc-api"), sender_env={"GESCO_SENDER_API_KEY": API_KEY},
                        output_size=OUTPUT_SIZE)
    yield link
    link.stop()


@pytest.fixture(scope="module")
def sender(services) -> Iterator[gesco_pb2_grpc.SenderStub]:
    with grpc.insecure_channel(f"127.0.0.1:{services.sender_grpc}") as channel:
        yield gesco_pb2_grpc.SenderStub(channel)


@pytest.fixture(scope="module")
def receiver(services) -> Iterator[gesco_pb2_grpc.ReceiverStub]:
    with grpc.insecure_channel(f"127.0.0.1:{services.receiver_grpc}") as channel:
        yield gesco_pb2_grpc.ReceiverStub(channel)


def label_map_request(**fields: Any) -> gesco_pb2.TransmitRequest:
    return gesco_pb2.TransmitRequest(image=LABELS, kind="label_map", guidance=0, **fields)


def rejection(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value


def decoded_shape(png: bytes) -> tuple[int, ...]:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, "not a PNG"
    return image.shape


def test_a_label_map_transmitted_and_watched_until_done_gives_its_png(services, sender, receiver) -> None:
    sent = sender.Transmit(label_map_request(snr_db=10, steps=10, seed=3), metadata=KEY, timeout=60)
    assert len(sent.id) == 32 and sent.status_url == f"{services.receiver_url}/v1/transmissions/{sent.id}"
    assert sent.image_url == f"{sent.status_url}/image" and sent.seed == 3
    assert sent.channel.model == "awgn" and sent.channel.requested_snr_db == 10
    assert sent.semantic.present_class_ids and sent.bits.payload_bits > 0 and sent.bits.image_bits_jpeg == 0
    assert sent.sampling.steps == 10 and sent.sampling.seed == 3 and not sent.segmenter["used"]

    messages = list(receiver.WatchTransmission(gesco_pb2.WatchTransmissionRequest(transmission_id=sent.id),
                                               timeout=120))
    states = [message.status.status for message in messages]
    assert states[-1] == "done" and set(states) <= {"queued", "running", "done"}, states
    steps = [message.status.progress.steps for message in messages if message.status.HasField("progress")]
    assert set(steps) <= {10}
    assert all(not message.image_png for message in messages[:-1])
    assert decoded_shape(messages[-1].image_png) == (*OUTPUT_SIZE, 3)
    # The last message is the report: the REST API's status, field for field.
    final = messages[-1].status
    rest = httpx.get(sent.status_url, timeout=30).json()
    assert final.id == rest["id"] == sent.id and final.finished_at == rest["finished_at"]
    assert final.channel.measured_snr_db == rest["channel"]["measured_snr_db"]
    assert dict(final.timings_ms) == rest["timings_ms"] and final.output.height == OUTPUT_SIZE[0]
    assert final.model["trained"] == rest["model"]["trained"]

    got = receiver.GetTransmission(gesco_pb2.GetTransmissionRequest(transmission_id=sent.id, include_image=True))
    assert got.status == final and got.image_png == messages[-1].image_png
    assert not receiver.GetTransmission(gesco_pb2.GetTransmissionRequest(transmission_id=sent.id)).image_png

    metrics = httpx.get(f"{services.sender_url}/metrics", timeout=30).text
    assert 'gesco_grpc_requests_total{code="OK",method="/gesco.v1.Sender/Transmit"}' in metrics


@pytest.mark.parametrize(("fields", "field"), [
    ({"snr_db": 500}, "snr_db"),
    ({"steps": 0}, "steps"),
    ({"channel": "carrier-pigeon"}, "channel"),
    ({"compression": "zip"}, "compression"),
    ({"sampler": "nope"}, "sampler"),  # refused by the receiver, through the channel
    ({"image": b"not an image"}, "image"),
    ({"image": b"", "kind": "photo"}, "image"),
    ({"downsample_factor": 5}, "downsample_factor"),  # does not divide the map size
])
def test_bad_input_is_invalid_argument_naming_the_field_and_the_next_request_works(
        sender, fields, field) -> None:
    request = label_map_request(steps=1)
    for name, value in fields.items():
        setattr(request, name, value)
    error = rejection(sender.Transmit, request, metadata=KEY, timeout=60)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(f"{field}: "), (
        error.code(), error.details())
    assert len(sender.Transmit(label_map_request(steps=1), metadata=KEY, timeout=60).id) == 32


def test_the_api_key_is_required_in_the_metadata(sender) -> None:
    for metadata in ((), (("x-api-key", "wrong"),)):
        error = rejection(sender.Transmit, label_map_request(steps=1), metadata=metadata, timeout=30)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and error.details().startswith("x-api-key: ")


def test_an_unknown_transmission_is_not_found_and_a_malformed_id_invalid(receiver) -> None:
    get = rejection(receiver.GetTransmission, gesco_pb2.GetTransmissionRequest(transmission_id="0" * 32), timeout=30)
    watch = rejection(lambda: list(receiver.WatchTransmission(
        gesco_pb2.WatchTransmissionRequest(transmission_id="0" * 32), timeout=30)))
    for error in (get, watch):
        assert error.code() == grpc.StatusCode.NOT_FOUND and error.details().startswith("transmission_id: ")
    error = rejection(receiver.GetTransmission, gesco_pb2.GetTransmissionRequest(transmission_id="../etc"), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("transmission_id: ")


def test_cancelling_a_watch_stops_the_watch_not_the_job(sender, receiver) -> None:
    sent = sender.Transmit(label_map_request(steps=30), metadata=KEY, timeout=60)
    watch = receiver.WatchTransmission(gesco_pb2.WatchTransmissionRequest(transmission_id=sent.id), timeout=120)
    first = next(watch)
    assert first.status.status in {"queued", "running"}
    watch.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        list(watch)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    request = gesco_pb2.GetTransmissionRequest(transmission_id=sent.id)
    deadline = time.monotonic() + 120
    while (status := receiver.GetTransmission(request, timeout=30).status).status not in {"done", "failed", "cancelled"}:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status.status == "done"


def test_the_senders_grpc_port_serves_health_and_reflection(services) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{services.sender_grpc}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gesco.v1.Sender"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    listed = grpcurl(services.sender_grpc, "list").split()
    assert {"gesco.v1.Sender", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(listed)


def test_the_round_trip_with_grpcurl_and_reflection_alone(services) -> None:
    """The README's commands: no .proto files, the image as base64 in the JSON request."""
    described = grpcurl(services.sender_grpc, "describe", "gesco.v1.TransmitRequest")
    assert "bytes image = 1;" in described and "optional double snr_db = 3;" in described
    request = {"image": base64.b64encode(LABELS).decode(), "kind": "label_map", "snr_db": 10, "steps": 2,
               "guidance": 0}
    sent = json.loads(grpcurl(services.sender_grpc, "gesco.v1.Sender/Transmit",
                              options=("-H", f"x-api-key: {API_KEY}", "-d", json.dumps(request))))
    assert sent["status_url"].endswith(sent["id"]) and sent["channel"]["model"] == "awgn"
    watched = grpcurl(services.receiver_grpc, "gesco.v1.Receiver/WatchTransmission",
                      options=("-d", json.dumps({"transmission_id": sent["id"]})))
    messages = list(json_stream(watched))
    assert messages[-1]["status"]["status"] == "done"
    assert decoded_shape(base64.b64decode(messages[-1]["image_png"])) == (*OUTPUT_SIZE, 3)
    assert json.loads(grpcurl(services.sender_grpc, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}


def test_the_senders_grpc_api_speaks_mutual_tls_when_configured(pki) -> None:
    """In process; the channel's certificate (it names 127.0.0.1) stands in for the sender's."""
    from fastapi.testclient import TestClient

    from sender_service.app import create_app
    from sender_service.settings import SenderSettings
    from shared.wire import health_probe

    settings = SenderSettings(grpc_port=free_port(), device="cpu", grpc_tls_cert_file=pki.channel.cert,
                              grpc_tls_key_file=pki.channel.key, grpc_tls_client_ca_file=pki.ca.ca_file)
    target = f"127.0.0.1:{settings.grpc_port}"
    env = {"GESCO_SENDER_GRPC_TLS_CERT_FILE": pki.channel.cert, "GESCO_GRPC_CA_FILE": pki.ca.ca_file}
    client_files = {"GESCO_GRPC_CERT_FILE": pki.sender_client.cert, "GESCO_GRPC_KEY_FILE": pki.sender_client.key}
    with TestClient(create_app(settings, grpc_api=True)):
        deadline = time.monotonic() + 60
        while not health_probe.grpc_serving(target, health_probe.probe_for("sender", {**env, **client_files})):
            assert time.monotonic() < deadline, "the sender's gRPC API never said SERVING over mutual TLS"
            time.sleep(0.2)
        assert not health_probe.grpc_serving(target, health_probe.Probe())  # plaintext
        assert not health_probe.grpc_serving(target, health_probe.probe_for("sender", env))  # no client certificate
    with pytest.raises(ValueError, match="GESCO_SENDER_GRPC_TLS_KEY_FILE"):
        create_app(SenderSettings(grpc_tls_cert_file=pki.channel.cert), grpc_api=True)


def test_the_messages_carry_every_field_of_the_rest_answers() -> None:
    """A field added to the REST answers (or the form) and not to the proto would be dropped on
    the way to a gRPC client: the proto must name each one."""
    assert set(PARAMETER_FIELDS) == {field for field in TransmissionParameters.__dataclass_fields__}
    for model, message in ((TransmissionAccepted, gesco_pb2.TransmitResponse),
                           (TransmissionStatus, gesco_pb2.TransmissionStatus)):
        assert_covers(model, message.DESCRIPTOR)


def assert_covers(model, descriptor) -> None:
    fields = descriptor.fields_by_name
    for name, info in model.model_fields.items():
        assert name in fields, f"{descriptor.full_name} has no field {name}"
        nested = info.annotation
        if isinstance(nested, type) and hasattr(nested, "model_fields"):
            assert_covers(nested, fields[name].message_type)


def grpcurl(port: int, *call: str, options: tuple[str, ...] = ()) -> str:
    """`grpcurl -plaintext OPTIONS 127.0.0.1:PORT CALL...`'s output; it must succeed."""
    done = subprocess.run([str(GRPCURL), "-plaintext", "-max-time", "120", *options, f"127.0.0.1:{port}", *call],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout


def json_stream(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects grpcurl prints one after the other for a stream."""
    decoder, position = json.JSONDecoder(), 0
    while position < len(text.rstrip()):
        value, end = decoder.raw_decode(text, position)
        yield value
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
