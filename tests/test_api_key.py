"""The sender's optional API key: 401 in the API's error shape without it, open health, metrics and
docs, checked before the body is read, never logged."""
from __future__ import annotations

import logging
import time

import pytest
from fastapi.testclient import TestClient

from sender_service.app import create_app
from sender_service.auth import ApiKeyGuard
from sender_service.settings import SenderSettings
from shared.wire.imageio import encode_png
from shared.wire.logging_setup import JsonFormatter
from tests.sender_helpers import blocky_label_map, serve_fake_channel

API_KEY = "s3cret-key-for-tests-0123456789"


@pytest.fixture(scope="module")
def fake_channel():
    with serve_fake_channel() as channel:
        yield channel


def sender_client(fake_channel, **settings) -> TestClient:
    return TestClient(create_app(SenderSettings(
        channel_address=f"127.0.0.1:{fake_channel.port}", device="cpu", max_upload_bytes=300_000, **settings)))


@pytest.fixture(scope="module")
def guarded(fake_channel):
    with sender_client(fake_channel, api_key=API_KEY) as client:
        yield client


def send(client: TestClient, headers: dict[str, str] | None = None, data: bytes | None = None):
    data = encode_png(blocky_label_map()) if data is None else data
    return client.post("/v1/transmissions", files={"file": ("labels.png", data)},
                       data={"kind": "label_map"}, headers=headers or {})


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"X-API-Key": "wrong"},
                                     {"X-API-Key": API_KEY[:-1]}, {"X-API-Key": API_KEY + "x"},
                                     {"Authorization": f"Bearer {API_KEY}"}],
                         ids=["missing", "empty", "wrong", "prefix", "longer", "other-header"])
def test_missing_or_wrong_key_is_401_naming_the_header(guarded, headers) -> None:
    response = send(guarded, headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["field"] == "X-API-Key" and "API key" in error["message"]
    assert API_KEY not in response.text
    assert "X-API-Key" in response.headers["www-authenticate"]


def test_the_right_key_is_let_through(guarded, fake_channel) -> None:
    response = send(guarded, {"X-API-Key": API_KEY})
    assert response.status_code == 202, response.text
    assert fake_channel.calls[-1]["header"].transmission_id == response.json()["id"]


def test_a_repeated_key_header_is_refused(guarded) -> None:
    response = guarded.post("/v1/transmissions", headers=[("X-API-Key", API_KEY), ("X-API-Key", API_KEY)],
                            files={"file": ("labels.png", encode_png(blocky_label_map()))})
    assert response.status_code == 401


def test_the_key_is_checked_before_the_body(guarded) -> None:
    """An unauthenticated client cannot make the sender read (or even size up) an upload."""
    response = send(guarded, data=b"x" * 1_000_000)
    assert response.status_code == 401


def test_health_metrics_and_docs_stay_open(guarded) -> None:
    for path in ("/healthz", "/metrics", "/docs", "/openapi.json"):
        assert guarded.get(path).status_code == 200, path
    deadline = time.monotonic() + 60
    while guarded.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert guarded.get("/v1/unknown").status_code == 401  # every other path needs the key
    assert "401" in guarded.get("/openapi.json").json()["paths"]["/v1/transmissions"]["post"]["responses"]
    metrics = guarded.get("/metrics").text
    assert 'route="/v1/transmissions",status="401"' in metrics


def test_no_key_configured_means_no_check(fake_channel) -> None:
    with sender_client(fake_channel) as client:
        assert send(client).status_code == 202


def test_the_guard_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError, match="empty"):
        ApiKeyGuard(app=None, api_key="")


def test_the_key_is_never_logged_or_shown(fake_channel, caplog) -> None:
    settings = SenderSettings(api_key=API_KEY)
    assert API_KEY not in repr(settings) and API_KEY not in str(settings)
    assert API_KEY not in settings.model_dump_json()
    caplog.set_level(logging.DEBUG)
    with sender_client(fake_channel, api_key=API_KEY) as client:
        send(client, {"X-API-Key": API_KEY})
        send(client, {"X-API-Key": "wrong"})
        send(client, {"X-API-Key": API_KEY}, data=b"not an image")
    formatter = JsonFormatter("sender")
    assert caplog.records
    for record in caplog.records:
        assert API_KEY not in formatter.format(record)


def test_the_key_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("GESCO_SENDER_API_KEY", API_KEY)
    assert SenderSettings().api_key.get_secret_value() == API_KEY
    monkeypatch.setenv("GESCO_SENDER_API_KEY", "")
    assert SenderSettings().api_key.get_secret_value() == ""


# The receiver's REST API takes the same optional key (GESCO_RECEIVER_API_KEY).

from tests.receiver_helpers import make_settings, ready_client


def test_the_receiver_needs_the_key_for_status_images_maps_and_cancel(tmp_path, fake_generator) -> None:
    transmission_id = "ab" * 16
    paths = [("GET", f"/v1/transmissions/{transmission_id}"), ("GET", f"/v1/transmissions/{transmission_id}/image"),
             ("GET", f"/v1/transmissions/{transmission_id}/maps/fds.png"),
             ("POST", f"/v1/transmissions/{transmission_id}/cancel")]
    with ready_client(make_settings(tmp_path, api_key=API_KEY), fake_generator) as client:
        for method, path in paths:
            refused = client.request(method, path)
            assert refused.status_code == 401 and refused.json()["error"]["field"] == "X-API-Key", path
            assert client.request(method, path, headers={"X-API-Key": "wrong"}).status_code == 401, path
            assert client.request(method, path, headers={"X-API-Key": API_KEY}).status_code == 404, path  # let in
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        schema = client.get("/openapi.json").json()
        assert schema["security"] and schema["paths"]["/readyz"]["get"]["security"] == []  # documented


def test_the_receiver_without_a_key_checks_none(tmp_path, fake_generator) -> None:
    with ready_client(make_settings(tmp_path), fake_generator) as client:
        assert client.get(f"/v1/transmissions/{'ab' * 16}").status_code == 404
