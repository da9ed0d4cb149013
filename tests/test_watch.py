"""WatchTransmission pushed, not polled: every step and the end reach every watcher, many watches
cost no thread each, the bound and the API key hold, the steps travel between replicas, and the
load tool counts what each watcher received."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from gesco.v1 import gesco_pb2, gesco_pb2_grpc
from load import watch_load
from receiver_service import watch_hub
from receiver_service.grpc_server import WATCH_RETRY_AFTER_S, build_grpc_server
from receiver_service.redis_store import RedisTransmissionStore
from receiver_service.settings import ReceiverSettings
from receiver_service.store import TransmissionStore
from receiver_service.watch_hub import WatchHub
from receiver_service.worker import GenerationWorker
from shared.wire import transport
from tests.receiver_helpers import (FakeGenerator, make_settings, ready_client, receive, serve_as_the_model,
                                   transmission)
from tests.redis_helpers import PASSWORD, REDIS_SERVER, RedisServer

API_KEY = "watch-test-key"
KEY = (("x-api-key", API_KEY),)
STEPS = 12
FINISHED = {"done", "failed", "cancelled"}


class SteppingGenerator(FakeGenerator):
    """FakeGenerator that takes `step_s` per sampling step, reporting each, once `gate` is set."""

    def __init__(self, step_s: float = 0.02) -> None:
        super().__init__()
        self.step_s = step_s

    def generate(self, conditions, sampling, seeds, step_callback=None):
        assert self.gate.wait(30)
        for step in range(sampling.steps):
            if step_callback is not None:
                step_callback(step, sampling.steps)
            time.sleep(self.step_s)
        self.gate.set()
        return super().generate(conditions, sampling, seeds)


@pytest.fixture()
def stepping_generator(monkeypatch) -> SteppingGenerator:
    generator = SteppingGenerator()
    serve_as_the_model(monkeypatch, generator)
    return generator


def send(port: int, steps: int = STEPS) -> str:
    header, symbols = transmission(sampling=gesco_pb2.SamplingRequest(sampler="ddim", steps=steps, seed=1))
    receive(port, transport.symbol_frames(header, symbols))
    return header.transmission_id


async def watch_all(address: str, transmission_id: str, count: int, metadata=()) -> list[list]:
    """`count` watches of one transmission over one connection: what each received, as
    (status, step, image bytes) per message."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gesco_pb2_grpc.ReceiverStub(channel)

        async def one() -> list:
            received = []
            request = gesco_pb2.WatchTransmissionRequest(transmission_id=transmission_id)
            async for message in stub.WatchTransmission(request, metadata=metadata, timeout=60):
                progress = message.status.progress.step if message.status.HasField("progress") else None
                received.append((message.status.status, progress, len(message.image_png)))
            return received

        return await asyncio.gather(*(one() for _ in range(count)))


def assert_every_step_then_the_image(received: list, first_step: int = 1, steps: int = STEPS) -> None:
    statuses = [status for status, _, _ in received]
    assert statuses[0] in {"queued", "running"} and statuses[-1] == "done", statuses
    assert received[-1][2] > 0, "the last message carries the PNG"
    seen = [step for status, step, _ in received if status == "running" and step is not None]
    assert seen == list(range(first_step, steps + 1)), seen


def test_every_watcher_gets_every_step_and_the_image_without_a_thread_each(tmp_path, stepping_generator) -> None:
    settings = make_settings(tmp_path, max_watches=500)
    with ready_client(settings, stepping_generator):
        stepping_generator.gate.clear()  # no step until the watches are open
        transmission_id = send(settings.grpc_port)
        threads_before = threading.active_count()
        peak_threads = []

        async def run() -> list[list]:
            watching = asyncio.create_task(watch_all(f"127.0.0.1:{settings.grpc_port}", transmission_id, 200))
            await asyncio.sleep(1.0)
            peak_threads.append(threading.active_count())
            stepping_generator.gate.set()
            return await watching

        everyone = asyncio.run(run())
    assert len(everyone) == 200
    for received in everyone:  # all open before the first step
        assert_every_step_then_the_image(received)
    assert peak_threads[0] - threads_before < 10, (threads_before, peak_threads)


def test_a_watch_of_a_finished_transmission_gets_its_end_at_once(tmp_path, stepping_generator) -> None:
    settings = make_settings(tmp_path)
    with ready_client(settings, stepping_generator) as client:
        transmission_id = send(settings.grpc_port, steps=2)
        deadline = time.monotonic() + 30
        while client.get(f"/v1/transmissions/{transmission_id}").json()["status"] not in FINISHED:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [received] = asyncio.run(watch_all(f"127.0.0.1:{settings.grpc_port}", transmission_id, 1))
    assert [status for status, _, _ in received] == ["done"] and received[0][2] > 0


@pytest.fixture()
def limited_server(tmp_path):
    """The gRPC server alone over a store holding one queued transmission, without a model
    (reading a status needs none): two watches at most, an API key."""
    settings = make_settings(tmp_path, max_watches=2, api_key=API_KEY)
    store = TransmissionStore(settings.store_dir, 10, 3600)
    store.open()
    store.create({"id": "a" * 32, "status": "queued", "created_at": time.time(), "timings_ms": {}})
    server, _ = build_grpc_server(settings, GenerationWorker(settings, store))
    server.start()
    yield f"127.0.0.1:{settings.grpc_port}"
    server.stop(0).wait(5)


def test_watches_beyond_the_limit_are_resource_exhausted_until_one_ends(limited_server) -> None:
    request = gesco_pb2.WatchTransmissionRequest(transmission_id="a" * 32)
    with grpc.insecure_channel(limited_server) as channel:
        stub = gesco_pb2_grpc.ReceiverStub(channel)
        open_watches = [stub.WatchTransmission(request, metadata=KEY, timeout=30) for _ in range(2)]
        assert [next(watch).status.status for watch in open_watches] == ["queued", "queued"]
        refused = stub.WatchTransmission(request, metadata=KEY, timeout=30)
        with pytest.raises(grpc.RpcError) as raised:
            next(refused)
        error = raised.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == ("2 watches are open, the most this receiver serves; "
                                   f"retry after {WATCH_RETRY_AFTER_S} s")
        assert (transport.RETRY_AFTER_METADATA_KEY, str(WATCH_RETRY_AFTER_S)) in error.trailing_metadata()
        open_watches[0].cancel()  # its slot is free again
        deadline = time.monotonic() + 10
        while True:
            again = stub.WatchTransmission(request, metadata=KEY, timeout=30)
            try:
                assert next(again).status.id == "a" * 32
                break
            except grpc.RpcError as refused_again:
                assert refused_again.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline
                time.sleep(0.05)
        again.cancel()
        open_watches[1].cancel()


def test_the_receivers_api_key_is_required_to_read_or_watch(limited_server) -> None:
    get = gesco_pb2.GetTransmissionRequest(transmission_id="a" * 32)
    watch = gesco_pb2.WatchTransmissionRequest(transmission_id="a" * 32)
    with grpc.insecure_channel(limited_server) as channel:
        stub = gesco_pb2_grpc.ReceiverStub(channel)
        assert stub.GetTransmission(get, metadata=KEY, timeout=10).status.status == "queued"
        for metadata in ((), (("x-api-key", "wrong"),)):
            for call in (lambda: stub.GetTransmission(get, metadata=metadata, timeout=10),
                         lambda: next(stub.WatchTransmission(watch, metadata=metadata, timeout=10))):
                with pytest.raises(grpc.RpcError) as raised:
                    call()
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert raised.value.details().startswith("x-api-key: ")


def test_the_load_tool_reports_what_each_watcher_received(tmp_path, stepping_generator) -> None:
    settings = make_settings(tmp_path, queue_size=4)
    with ready_client(settings, stepping_generator):
        args = watch_load.parse_args(["--receiver", f"127.0.0.1:{settings.grpc_port}", "--transmissions", "2",
                                      "--watchers", "5", "--steps", str(STEPS), "--warmup", "0", "--drain-s", "60"])
        result = asyncio.run(watch_load.run(args))
    assert result["watches"] == 10 and result["outcomes"] == {"complete": 10}
    assert result["jobs"] == {"done": 4}  # a baseline round and a watched one
    assert [len(values) for values in result["steps_per_s"].values()] == [1, 1]
    watched = result["rounds"][1]
    assert watched["kind"] == "watched" and watched["watcher_outcomes"] == {"complete": 10}


class FakeStatuses:
    """A store's statuses as the hub reads them, changed by the test."""

    def __init__(self) -> None:
        self.statuses = {"b" * 32: {"id": "b" * 32, "status": "running", "progress": None}}
        self.reads = 0

    def read(self, transmission_id: str) -> dict:
        self.reads += 1
        return dict(self.statuses[transmission_id])

    def finish(self, transmission_id: str) -> None:
        self.statuses[transmission_id] = {"id": transmission_id, "status": "done", "progress": None}


def bound_hub(statuses: FakeStatuses) -> tuple[WatchHub, futures.ThreadPoolExecutor]:
    hub, executor = WatchHub(), futures.ThreadPoolExecutor(1)
    hub.bind(asyncio.get_running_loop(), executor, statuses.read, lambda _: b"png",
             lambda status, image: (status["status"], (status["progress"] or {}).get("step"), image))
    return hub, executor


def test_a_slow_watcher_keeps_the_latest_steps_and_always_the_end() -> None:
    async def run() -> tuple[list, int]:
        statuses = FakeStatuses()
        hub, executor = bound_hub(statuses)
        watch = hub.watch("b" * 32)
        first = await anext(watch)  # subscribed; then it reads nothing while 200 steps go by
        for step in range(1, 201):
            hub.notify_progress(["b" * 32], step, 200)
            for _ in range(5):  # the report, then the topic's broadcast
                await asyncio.sleep(0)
        statuses.finish("b" * 32)
        hub.notify_finished("b" * 32)
        await asyncio.sleep(0.5)  # the end is read and handed over before the watcher reads on
        rest = [message async for message in watch]
        executor.shutdown()
        return [first, *rest], statuses.reads

    received, reads = asyncio.run(run())
    assert received[0] == ("running", None, b"")
    assert received[-1] == ("done", None, b"png")
    steps = [step for _, step, _ in received[1:-1]]
    assert len(steps) == watch_hub.MAX_PENDING - 1 and steps == list(range(201 - len(steps), 201))
    assert reads == 2  # the first status and the end: the steps come from the reports alone


def test_an_end_nobody_reported_is_found_by_reading_again(monkeypatch) -> None:
    monkeypatch.setattr(watch_hub, "REFRESH_S", 0.05)

    async def run() -> list:
        statuses = FakeStatuses()
        hub, executor = bound_hub(statuses)
        watch = hub.watch("b" * 32)
        first = await anext(watch)
        statuses.finish("b" * 32)  # and no notify_finished: a lost pub/sub message
        rest = await asyncio.wait_for(asyncio.gather(*[anext(watch)]), 5)
        executor.shutdown()
        return [first, *rest]

    assert [status for status, _, _ in asyncio.run(run())] == ["running", "done"]


@pytest.fixture()
def redis_url(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def test_the_steps_of_one_replicas_jobs_reach_the_others_listeners(redis_url) -> None:
    stores = [RedisTransmissionStore(redis_url.client(), 10, 3600, lease_s=5.0, replica_id=f"replica-{index}")
              for index in range(2)]
    heard: list[list] = [[], []]
    for store, log in zip(stores, heard):
        store.set_progress_listener(lambda ids, step, steps, log=log: log.append((list(ids), step, steps)))
        store.open()
    try:
        ids = ["c" * 32, "d" * 32]
        for transmission_id in ids:
            stores[0].create({"id": transmission_id, "status": "running", "created_at": time.time(),
                              "timings_ms": {}})
        time.sleep(0.3)  # both listeners subscribed
        for step in range(1, 4):
            stores[0].set_progress(ids, step, 3)
        deadline = time.monotonic() + 5
        while len(heard[1]) < 3:
            assert time.monotonic() < deadline, heard
            time.sleep(0.02)
        assert heard[1] == [(ids, step, 3) for step in range(1, 4)]
        assert heard[0] == []  # a replica's own steps reach its watches from its queue
        assert stores[1].progress("c" * 32) == (3, 3)
    finally:
        for store in stores:
            store.close()


@contextlib.contextmanager
def replicas_on_redis(monkeypatch, redis_url, generator, replicas: dict[str, ReceiverSettings]) -> Iterator[None]:
    """In-process receiver apps sharing the test's Redis, one per replica id."""
    monkeypatch.setenv("GESCO_RECEIVER_REDIS_URL", redis_url.url)
    monkeypatch.setenv("GESCO_RECEIVER_REDIS_PASSWORD", PASSWORD)
    with contextlib.ExitStack() as running:
        for name, settings in replicas.items():
            monkeypatch.setenv("GESCO_RECEIVER_REDIS_REPLICA_ID", name)  # read as the app is made
            running.enter_context(ready_client(settings, generator))
        yield


def watch_from_the_first_step(generator: SteppingGenerator, port: int, transmission_id: str, count: int) -> list[list]:
    """`count` watches opened while the job waits at its first step, then the job let go: what each received."""

    async def run() -> list[list]:
        watching = asyncio.create_task(watch_all(f"127.0.0.1:{port}", transmission_id, count))
        await asyncio.sleep(1.0)
        generator.gate.set()
        return await watching

    return asyncio.run(run())


def test_a_watch_on_one_replica_follows_a_job_sampled_on_another(tmp_path, stepping_generator, redis_url,
                                                                  monkeypatch) -> None:
    sampling, watched = make_settings(tmp_path / "sampling"), make_settings(tmp_path / "watched")
    with replicas_on_redis(monkeypatch, redis_url, stepping_generator, {"sampling": sampling, "watched": watched}):
        stepping_generator.gate.clear()
        transmission_id = send(sampling.grpc_port)
        everyone = watch_from_the_first_step(stepping_generator, watched.grpc_port, transmission_id, 50)
    for received in everyone:
        assert_every_step_then_the_image(received)


def test_a_serving_replica_queues_its_jobs_for_the_sampling_ones_and_serves_their_watches(
        tmp_path, stepping_generator, redis_url, monkeypatch) -> None:
    sampling, serving = make_settings(tmp_path / "sampling"), make_settings(tmp_path / "serving", sampling=False)
    with replicas_on_redis(monkeypatch, redis_url, stepping_generator, {"sampling": sampling, "serving": serving}):
        stepping_generator.gate.clear()
        transmission_id = send(serving.grpc_port)
        everyone = watch_from_the_first_step(stepping_generator, serving.grpc_port, transmission_id, 50)
        samplers = [thread for thread in threading.enumerate() if thread.name == "generation-worker"]
        owner = redis_url.client().hget(next(redis_url.client().scan_iter(f"*tx:{transmission_id}")), "owner")
    assert len(everyone) == 50
    for received in everyone:
        assert_every_step_then_the_image(received)
    assert owner == b"sampling"  # claimed from the shared queue by the sampling replica
    assert len(samplers) == 1  # the serving replica never started its sampling thread


def test_a_serving_replica_needs_the_shared_store(tmp_path, monkeypatch) -> None:
    from receiver_service.app import create_app

    monkeypatch.delenv("GESCO_RECEIVER_REDIS_URL", raising=False)
    with pytest.raises(ValueError, match="GESCO_RECEIVER_REDIS_URL"):
        create_app(make_settings(tmp_path, sampling=False))
