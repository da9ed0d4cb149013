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

from receiver_service import model_host
from receiver_service.store import TransmissionStore
from receiver_service.worker import GenerationWorker
from tests.receiver_helpers import FakeGenerator, make_settings, ready_client
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
def fake_generator(monkeypatch):
    generator = FakeGenerator()

    class Loader:
        @staticmethod
        def load(checkpoint_path, device="auto"):
            generator.loaded_from = (checkpoint_path, device)
            return generator

    monkeypatch.setattr(model_host, "SemanticImageGenerator", Loader)
    return generator


@pytest.fixture()
def running_worker(tmp_path, fake_generator):
    store = TransmissionStore(tmp_path / "store", max_items=50, max_age_s=3600)
    store.open()
    worker = GenerationWorker(make_settings(tmp_path), store)
    worker.load_model()
    assert worker.ready
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
