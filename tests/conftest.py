"""Suite-wide settings and shared fixtures.

One torch thread, so tests and the service processes they start do not oversubscribe a small
machine's cores (torch's spinning worker threads slow everything down). The fixtures any module
may use by name: a fake generator loaded by the receiver's model host, a running worker on it,
and a test PKI.

Tests that start a service process, a redis-server or a browser are marked `processes`, so that
`pytest -m "not processes"` runs the fast rest alone: those using a fixture of PROCESS_FIXTURES
are marked here, the few that start one in their body carry the mark themselves.
"""
from __future__ import annotations

import pytest
import torch

from tests.receiver_helpers import FakeGenerator, make_settings, ready_client, serve_as_the_model, start_worker, tiny_generator
from tests.tls_certs import Authority, Pki

torch.set_num_threads(1)

# Fixtures (of any test module) that start service processes, Redis or a browser.
PROCESS_FIXTURES = frozenset({"services", "pipeline", "cluster", "lone_sender", "sender", "channel_proc",
                              "redis_server", "browser"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)


@pytest.fixture()
def fake_generator(monkeypatch) -> FakeGenerator:
    generator = FakeGenerator()
    serve_as_the_model(monkeypatch, generator)
    return generator


@pytest.fixture()
def tiny_model(monkeypatch):
    """A small random real generator (tests/receiver_helpers.tiny_generator) as the receiver's model."""
    generator = tiny_generator()
    serve_as_the_model(monkeypatch, generator)
    return generator


@pytest.fixture()
def running_worker(tmp_path, fake_generator):
    worker = start_worker(tmp_path, queue_size=2)
    yield worker
    fake_generator.gate.set()
    worker.stop(5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = Authority.create(folder / "ca"), Authority.create(folder / "other", "other CA")
    return Pki(ca, other, ca.issue("receiver", server=True), ca.issue("channel", server=True),
               ca.issue("channel-client", server=False), ca.issue("sender-client", server=False),
               other.issue("rogue-client", server=False))


@pytest.fixture()
def app_client(tmp_path, fake_generator):
    with ready_client(make_settings(tmp_path, public_url="http://receiver.test:8001", queue_size=1), fake_generator) as client:
        yield client
