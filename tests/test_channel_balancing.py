"""The channel spreads transmissions over receiver replicas: gRPC round_robin with health checking
(NOT_SERVING and dead replicas are skipped), and a replica with a full queue hands the
transmission on to the next before the caller hears RESOURCE_EXHAUSTED.

Fake receivers (with the standard health service) run in this process; the channel runs in
process too (build_channel_server), with its receiver address a list of the fakes or a DNS name.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2_grpc

from channel_sim.server import build_channel_server
from channel_sim.settings import ChannelSettings
from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from shared.semantic import codec
from shared.wire import transport
from shared.wire.grpc_service import Health
from shared.wire.load_balancing import balancing_options, grpc_target
from tests.service_procs import free_port

RECEIVER = "gesco.v1.Receiver"


class Replica(gesco_pb2_grpc.ReceiverServicer):
    """A fake receiver replica: counts what it accepts, or refuses with a full queue."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted: list[str] = []
        self.refused = 0
        self.full = False
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        gesco_pb2_grpc.add_ReceiverServicer_to_server(self, self.server)
        self.health = Health(RECEIVER)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.health.set_serving(True)

    def Receive(self, request_iterator, context):
        header, _ = transport.assemble_frames(request_iterator, max_symbols=1_000_000)
        with self.lock:
            if self.full:
                self.refused += 1
                context.set_trailing_metadata(((transport.RETRY_AFTER_METADATA_KEY, "4"),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name}'s queue is full")
            self.accepted.append(header.transmission_id)
        return gesco_pb2.TransmissionAck(transmission_id=header.transmission_id)


@pytest.fixture()
def replicas() -> Iterator[list[Replica]]:
    started = [Replica(name) for name in "abc"]
    yield started
    for replica in started:
        replica.server.stop(0)


@contextmanager
def channel(receiver_address: str, **settings) -> Iterator[gesco_pb2_grpc.ChannelStub]:
    config = ChannelSettings(port=free_port(), receiver_address=receiver_address, metrics_port=0, **settings)
    server, receiver_channel, health = build_channel_server(config)
    server.start()
    health.set_serving(True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{config.port}") as client:
            yield gesco_pb2_grpc.ChannelStub(client)
    finally:
        server.stop(0)
        receiver_channel.close()


def address_list(replicas: list[Replica]) -> str:
    return ",".join(f"127.0.0.1:{replica.port}" for replica in replicas)


def transmit(stub: gesco_pb2_grpc.ChannelStub) -> gesco_pb2.TransmissionAck:
    labels = np.zeros((16, 24), dtype=np.int64)
    labels[8:] = 3
    encoded = codec.encode_label_map(labels, codec.CodecConfig(num_classes=12))
    header = gesco_pb2.TransmissionHeader(
        transmission_id=transport.new_transmission_id(),
        semantic=transport.semantic_header_to_proto(encoded.header),
        channel=gesco_pb2.ChannelRequest(model="awgn", snr_db=20.0, equalize=True,
                                         snr_definition=gesco_pb2.SNR_DEFINITION_PAPER_PSNR),
    )
    return stub.Transmit(transport.symbol_frames(header, encoded.symbols), timeout=20)


def spread(replicas: list[Replica]) -> dict[str, int]:
    return {replica.name: len(replica.accepted) for replica in replicas}


def until_every_replica_serves(stub: gesco_pb2_grpc.ChannelStub, replicas: list[Replica]) -> None:
    """Transmit until each replica has accepted one: the channel has connected to all of them and
    heard their health (a fresh channel starts with the first replica that answers)."""
    deadline = time.monotonic() + 20
    while not all(replica.accepted for replica in replicas):
        assert time.monotonic() < deadline, spread(replicas)
        transmit(stub)


# ------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(("address", "target"), [
    ("127.0.0.1:50052", "127.0.0.1:50052"),
    ("receiver:50052", "receiver:50052"),
    ("dns:///receiver-grpc.gesco.svc:50052", "dns:///receiver-grpc.gesco.svc:50052"),
    ("127.0.0.1:50052, 127.0.0.1:50053,10.0.0.7:50052", "ipv4:127.0.0.1:50052,127.0.0.1:50053,10.0.0.7:50052"),
    ("[::1]:50052,[::1]:50053", "ipv6:[::1]:50052,[::1]:50053"),
])
def test_addresses_become_grpc_targets(address, target) -> None:
    assert grpc_target(address) == target


@pytest.mark.parametrize(("address", "message"), [
    ("receiver-1:50052,receiver-2:50052", "IP addresses with ports"),
    ("127.0.0.1:50052,127.0.0.1", "IP addresses with ports"),
    ("127.0.0.1:50052,127.0.0.1:99999", "IP addresses with ports"),
    ("127.0.0.1:50052,", "IP addresses with ports"),
    ("::1:50052,::1:50053", "IP addresses with ports"),
    ("127.0.0.1:50052,[::1]:50052", "not both"),
])
def test_a_malformed_list_is_refused_naming_the_setting(address, message, monkeypatch) -> None:
    monkeypatch.setenv("GESCO_CHANNEL_RECEIVER_ADDRESS", address)
    with pytest.raises(ValueError, match=message) as raised:
        ChannelSettings()
    assert "receiver_address" in str(raised.value)


def test_the_service_config_asks_for_round_robin_and_health_checks() -> None:
    import json

    options = dict(balancing_options(RECEIVER))
    config = json.loads(options["grpc.service_config"])
    assert config == {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": RECEIVER}}


# ------------------------------------------------------------------------------------- balancing


def test_transmissions_are_spread_over_every_replica(replicas) -> None:
    with channel(address_list(replicas)) as stub:
        until_every_replica_serves(stub, replicas)
        before = spread(replicas)
        for _ in range(12):
            transmit(stub)
    gained = {name: count - before[name] for name, count in spread(replicas).items()}
    assert sum(gained.values()) == 12 and all(count >= 3 for count in gained.values()), gained  # in turn


def test_a_dns_name_reaches_every_address_it_resolves_to(replicas) -> None:
    """localhost resolves to 127.0.0.1 only here, so one replica: the dns:/// form is accepted and
    served by the same policy."""
    with channel(f"dns:///localhost:{replicas[0].port}") as stub:
        for _ in range(3):
            transmit(stub)
    assert len(replicas[0].accepted) == 3


def test_a_not_serving_replica_is_skipped_until_it_serves_again(replicas) -> None:
    replicas[1].health.set_serving(False)
    with channel(address_list(replicas)) as stub:
        for _ in range(9):
            transmit(stub)
        assert replicas[1].accepted == [] and sum(spread(replicas).values()) == 9
        replicas[1].health.set_serving(True)
        deadline = time.monotonic() + 10
        while not replicas[1].accepted:  # the Watch stream tells the channel at once
            assert time.monotonic() < deadline, spread(replicas)
            transmit(stub)


def test_a_dead_replica_is_skipped(replicas) -> None:
    with channel(address_list(replicas)) as stub:
        for _ in range(3):
            transmit(stub)
        replicas[2].server.stop(0).wait()
        before = spread(replicas)
        for _ in range(9):
            transmit(stub)  # none fails
    after = spread(replicas)
    assert after["c"] == before["c"]
    assert after["a"] + after["b"] == before["a"] + before["b"] + 9


def test_a_full_replica_hands_the_transmission_to_the_next(replicas) -> None:
    with channel(address_list(replicas)) as stub:
        until_every_replica_serves(stub, replicas)
        before = spread(replicas)
        replicas[0].full = True
        for _ in range(9):
            transmit(stub)  # none is refused
    after = spread(replicas)
    assert after["a"] == before["a"] and replicas[0].refused >= 2  # offered every third call
    assert after["b"] + after["c"] == before["b"] + before["c"] + 9


def test_when_every_replica_is_full_the_caller_hears_it_after_the_bounded_attempts(replicas) -> None:
    with channel(address_list(replicas), forward_attempts=3) as stub:
        until_every_replica_serves(stub, replicas)
        for replica in replicas:
            replica.full = True
        with pytest.raises(grpc.RpcError) as raised:
            transmit(stub)
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (transport.RETRY_AFTER_METADATA_KEY, "4") in tuple(raised.value.trailing_metadata())
    assert sum(replica.refused for replica in replicas) == 3
    assert all(replica.refused == 1 for replica in replicas)  # each attempt went to the next replica


def test_one_attempt_means_no_second_offer(replicas) -> None:
    replicas[0].full = True
    with channel(f"127.0.0.1:{replicas[0].port}", forward_attempts=1) as stub:
        with pytest.raises(grpc.RpcError) as raised:
            transmit(stub)
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and replicas[0].refused == 1
