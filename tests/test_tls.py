"""TLS and mutual TLS on both gRPC hops, with certificates made by the tests.

The chain runs in this process: the sender's ChannelSimClient -> the channel simulator's server ->
the receiver's gRPC server with a fake generator. Every refused handshake must end the call with
UNAVAILABLE, never a hang.
"""
from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from channel_sim.server import build_channel_server
from channel_sim.settings import ChannelSettings
from gesco.v1 import gesco_pb2_grpc
from receiver_service.grpc_server import build_grpc_server
from receiver_service.store import TransmissionStore
from receiver_service.worker import GenerationWorker
from sender_service.app import create_app
from sender_service.channel_sim_client import ChannelSimCallError, ChannelSimClient
from sender_service.settings import SenderSettings
from shared.paths import REPO_ROOT
from shared.wire import grpc_security
from tests.service_procs import free_port
from tests.receiver_helpers import make_settings, transmission, wait_for_status


@pytest.fixture()
def receiver(tmp_path, fake_generator, pki):
    """The receiver's gRPC server over mutual TLS, with a fake generator behind it."""
    settings = make_settings(tmp_path, tls_cert_file=pki.receiver.cert, tls_key_file=pki.receiver.key,
                             tls_client_ca_file=pki.ca.ca_file)
    store = TransmissionStore(settings.store_dir, max_items=50, max_age_s=3600)
    store.open()
    worker = GenerationWorker(settings, store)
    worker.load_model()
    server, health = build_grpc_server(settings, worker)
    server.start()
    health.set_serving(True)
    yield settings, store
    server.stop(0)
    worker.stop(5)


def start_channel(receiver_port: int, **tls: str):
    settings = ChannelSettings(port=free_port(), receiver_address=f"127.0.0.1:{receiver_port}",
                               metrics_port=0, forward_timeout_s=10, **tls)
    server, receiver_channel, health = build_channel_server(settings)
    server.start()
    health.set_serving(True)
    return settings, server, receiver_channel


@pytest.fixture()
def mtls_channel(receiver, pki):
    """The channel over mutual TLS, forwarding over mutual TLS to the receiver."""
    receiver_settings, _ = receiver
    settings, server, receiver_channel = start_channel(
        receiver_settings.grpc_port,
        tls_cert_file=pki.channel.cert, tls_key_file=pki.channel.key, tls_client_ca_file=pki.ca.ca_file,
        receiver_tls_ca_file=pki.ca.ca_file, receiver_tls_cert_file=pki.channel_client.cert,
        receiver_tls_key_file=pki.channel_client.key,
    )
    yield settings
    server.stop(0)
    receiver_channel.close()


def sender_transmit(port: int, credentials: grpc.ChannelCredentials | None):
    """One transmission through the sender's own asyncio client."""
    header, symbols = transmission()

    async def run():
        client = ChannelSimClient(f"127.0.0.1:{port}", credentials)
        try:
            return await client.transmit(header, header.channel, symbols, timeout_s=15)
        finally:
            await client.close()

    return header, asyncio.run(run())


def refused_code(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(ChannelSimCallError) as raised:
        sender_transmit(port, credentials)
    return raised.value.code


def test_the_whole_chain_over_mutual_tls(mtls_channel, receiver, pki) -> None:
    credentials = grpc_security.channel_credentials(pki.ca.ca_file, pki.sender_client.cert, pki.sender_client.key)
    header, ack = sender_transmit(mtls_channel.port, credentials)
    assert ack.transmission_id == header.transmission_id and ack.channel_report.model == "awgn"
    _, store = receiver
    assert wait_for_status(store, header.transmission_id, {"done", "failed"})["status"] == "done"


def test_mutual_tls_refuses_clients_without_a_valid_certificate(mtls_channel, pki) -> None:
    port = mtls_channel.port
    assert refused_code(port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert refused_code(port, grpc_security.channel_credentials(pki.ca.ca_file)) == grpc.StatusCode.UNAVAILABLE
    rogue = grpc_security.channel_credentials(pki.ca.ca_file, pki.rogue_client.cert, pki.rogue_client.key)
    assert refused_code(port, rogue) == grpc.StatusCode.UNAVAILABLE


def test_a_client_refuses_a_server_its_ca_did_not_sign(mtls_channel, pki) -> None:
    credentials = grpc_security.channel_credentials(pki.other_ca.ca_file, pki.sender_client.cert,
                                                    pki.sender_client.key)
    assert refused_code(mtls_channel.port, credentials) == grpc.StatusCode.UNAVAILABLE


def test_the_receiver_refuses_a_channel_without_a_client_certificate(receiver, pki) -> None:
    receiver_settings, _ = receiver
    settings, server, receiver_channel = start_channel(
        receiver_settings.grpc_port, tls_cert_file=pki.channel.cert, tls_key_file=pki.channel.key,
        receiver_tls_ca_file=pki.ca.ca_file)
    try:
        with pytest.raises(ChannelSimCallError) as raised:
            sender_transmit(settings.port, grpc_security.channel_credentials(pki.ca.ca_file))
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        assert "receiver unavailable" in raised.value.details
    finally:
        server.stop(0)
        receiver_channel.close()


def test_tls_without_client_authentication(pki) -> None:
    """Server-only TLS: any client trusting the CA gets in; a plaintext client does not."""
    settings, server, receiver_channel = start_channel(
        free_port(), tls_cert_file=pki.channel.cert, tls_key_file=pki.channel.key)
    try:
        target = f"127.0.0.1:{settings.port}"
        with grpc_security.open_channel(target, grpc_security.channel_credentials(pki.ca.ca_file)) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            with pytest.raises(grpc.RpcError) as raised:  # TLS is up; the empty stream is refused
                gesco_pb2_grpc.ChannelStub(channel).Transmit(iter([]), timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with grpc_security.open_channel(target, None) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                gesco_pb2_grpc.ChannelStub(channel).Transmit(iter([]), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)
        receiver_channel.close()


def test_bad_tls_settings_fail_at_startup_naming_the_setting(tmp_path, pki) -> None:
    with pytest.raises(ValueError, match="GESCO_CHANNEL_TLS_CERT_FILE and GESCO_CHANNEL_TLS_KEY_FILE"):
        build_channel_server(ChannelSettings(port=free_port(), metrics_port=0, tls_cert_file=pki.channel.cert))
    with pytest.raises(ValueError, match="GESCO_CHANNEL_RECEIVER_TLS_CA_FILE must be set"):
        build_channel_server(ChannelSettings(port=free_port(), metrics_port=0, receiver_tls_cert_file=pki.channel_client.cert,
                                     receiver_tls_key_file=pki.channel_client.key))
    with pytest.raises(ValueError, match="GESCO_SENDER_CHANNEL_TLS_CA_FILE: cannot read"):
        create_app(SenderSettings(channel_tls_ca_file=str(tmp_path / "missing.pem")))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="GESCO_RECEIVER_TLS_KEY_FILE: .* is not a PEM file"):
        grpc_security.server_credentials(pki.receiver.cert, str(not_pem), prefix="GESCO_RECEIVER_TLS_")
    relative = re.escape(f"X_CA_FILE: cannot read {REPO_ROOT / 'no' / 'such.pem'}")
    with pytest.raises(ValueError, match=relative):
        grpc_security.channel_credentials("no/such.pem", prefix="X_")
    assert grpc_security.server_credentials("", "") is None
    assert grpc_security.channel_credentials("") is None


def test_plaintext_stays_the_default() -> None:
    for settings in (ChannelSettings(), SenderSettings()):
        assert not any(value for name, value in settings.model_dump().items() if "tls" in name)
