"""Shared Redis store against a real redis-server: the disk store's behaviour, two replicas, leases,
pub/sub wake-ups, cancel across replicas, Redis restarts and outages.

Each test starts its own redis-server (Debian's `redis-server`) on a free loopback port, with a
password and append-only persistence in a temporary folder. Replicas that must die for real run as
subprocesses and get SIGKILL.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from receiver_service.grpc_server import job_from_header, queue_transmission
from receiver_service.jobs import decode_job_input, encode_job_input
from receiver_service.long_poll import FinishWaiters
from receiver_service.redis_store import (
    LEASE_EXPIRED_ERROR,
    LOST_ERROR,
    STOPPED_ERROR,
    RedisStoreSettings,
    RedisTransmissionStore,
    StoreUnavailableError,
    connect,
)
from receiver_service.settings import ReceiverSettings
from receiver_service.store import (
    RESTART_ERROR,
    DuplicateTransmissionError,
    HandedOverError,
    TransmissionStore,
    UnknownTransmissionError,
)
from receiver_service.store_factory import create_store
from receiver_service.worker import GenerationWorker
from shared.paths import REPO_ROOT
from shared.wire import transport
from tests.receiver_helpers import decode_png, make_settings, ready_client, receive, transmission, wait_for_status
from tests.receiver_helpers import FakeClock, ddim, record
from tests.redis_helpers import PASSWORD, PREFIX, REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (Debian: apt-get install redis-server)"
)

IDS = [f"{i:032x}" for i in range(1, 20)]
LEASE_S = 1.0
# The lease of the tests that time replicas against each other: long enough that a replica starved
# of CPU on a loaded two-core machine still renews in time.
SLOW_LEASE_S = 2.0


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def make_store(redis_server) -> Iterator[Callable[..., RedisTransmissionStore]]:
    """Opened stores on the test's Redis (each one a replica), closed at the end."""
    stores: list[RedisTransmissionStore] = []

    def make(replica_id: str = "a", max_items: int = 100, max_age_s: float = 1e12,
             clock: Callable[[], float] = time.time, on_finished: Callable[[str], None] | None = None,
             lease_s: float = LEASE_S) -> RedisTransmissionStore:
        settings = RedisStoreSettings(url=redis_server.url, password=PASSWORD, lease_s=lease_s)
        store = RedisTransmissionStore(connect(settings), max_items, max_age_s, lease_s=lease_s,
                                       replica_id=replica_id, clock=clock, on_finished=on_finished)
        store.open()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# Runs a replica in its own process (settings from the GESCO_RECEIVER_REDIS_* environment), creates
# the records given as JSON, prints "ready" and waits to be killed.
REPLICA_SCRIPT = """
import json, sys, time
from receiver_service.redis_store import RedisStoreSettings, RedisTransmissionStore
store = RedisTransmissionStore.from_settings(RedisStoreSettings(), 100, 1e12)
store.open()
for record in json.loads(sys.argv[1]):
    status = record.pop("then", None)
    store.create(record)
    if status:
        store.update(record["id"], status=status)
print("ready", flush=True)
time.sleep(120)
"""


def run_replica(redis_server: RedisServer, replica_id: str, records: list[dict],
                lease_s: float = LEASE_S) -> subprocess.Popen:
    """A replica process holding `records` (a record's "then" status is applied after create)."""
    env = {**os.environ, "GESCO_RECEIVER_REDIS_URL": redis_server.url, "GESCO_RECEIVER_REDIS_PASSWORD": PASSWORD,
           "GESCO_RECEIVER_REDIS_LEASE_S": str(lease_s), "GESCO_RECEIVER_REDIS_REPLICA_ID": replica_id}
    proc = subprocess.Popen([sys.executable, "-c", REPLICA_SCRIPT, json.dumps(records)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


# ------------------------------------------------------------------------ the disk store's behaviour


def test_create_get_update(make_store, redis_server):
    store = make_store()
    store.create(record(IDS[0], 1.0))
    assert store.get(IDS[0])["status"] == "queued"
    store.update(IDS[0], status="running", timings_ms={"queue_wait": 3.0})
    updated = store.update(IDS[0], timings_ms={"sample": 4.0})
    assert updated["timings_ms"] == {"queue_wait": 3.0, "sample": 4.0}
    assert json.loads(redis_server.client().hget(f"{PREFIX}tx:{IDS[0]}", "record")) == updated
    with pytest.raises(DuplicateTransmissionError):
        store.create(record(IDS[0], 2.0))
    with pytest.raises(UnknownTransmissionError):
        store.get(IDS[1])
    with pytest.raises(UnknownTransmissionError):
        store.update(IDS[1], status="done")
    assert store.contains(IDS[0]) and not store.contains(IDS[1]) and len(store) == 1


def test_reports_finished_jobs_once(make_store):
    finished: list[str] = []
    store = make_store(on_finished=finished.append)
    store.create(record(IDS[0], 1.0))
    store.update(IDS[0], status="running")
    assert finished == []
    store.update(IDS[0], status="done")
    time.sleep(0.3)  # its own pub/sub message must not count twice
    assert finished == [IDS[0]]


def test_artifacts(make_store):
    store = make_store()
    store.create(record(IDS[0], 1.0))
    assert store.read_artifact(IDS[0], "image") is None
    store.write_artifact(IDS[0], "image", b"\x89PNG fake")
    assert store.read_artifact(IDS[0], "image") == b"\x89PNG fake"
    with pytest.raises(ValueError, match="unknown artifact"):
        store.write_artifact(IDS[0], "../status.json", b"x")
    with pytest.raises(UnknownTransmissionError):
        store.write_artifact(IDS[1], "image", b"x")
    with pytest.raises(UnknownTransmissionError):
        store.read_artifact(IDS[1], "image")


@pytest.mark.parametrize("bad_id", ["..", "../" + IDS[0][3:], "ABCDEF0123456789ABCDEF0123456789", IDS[0] + "/x", ""])
def test_never_builds_a_key_from_a_bad_id(make_store, redis_server, bad_id):
    store = make_store()
    with pytest.raises(ValueError, match="transmission_id"):
        store.create(record(bad_id, 1.0))
    for call in (store.get, store.contains, store.delete):
        with pytest.raises(ValueError, match="transmission_id"):
            call(bad_id)
    for call in (store.read_artifact, store.request_cancel):
        with pytest.raises(ValueError, match="transmission_id"):
            call(bad_id, "image")
    with pytest.raises(ValueError, match="transmission_id"):
        store.update(bad_id, status="done")
    assert sorted(redis_server.client().keys(f"{PREFIX}*")) == [f"{PREFIX}lease:a".encode(), f"{PREFIX}owners".encode()]


def test_evicts_oldest_finished_first_by_count(make_store):
    store = make_store(max_items=3, clock=FakeClock())
    store.create(record(IDS[0], 1.0, "running"))  # oldest, but unfinished: kept
    store.create(record(IDS[1], 2.0, "done"))
    store.create(record(IDS[2], 3.0, "failed"))
    store.create(record(IDS[3], 4.0, "done"))
    assert not store.contains(IDS[1])
    assert all(store.contains(i) for i in (IDS[0], IDS[2], IDS[3]))
    store.create(record(IDS[4], 5.0))
    assert [i for i in IDS[:5] if store.contains(i)] == [IDS[0], IDS[3], IDS[4]]
    assert len(store) == 3


def test_never_evicts_unfinished_jobs(make_store):
    store = make_store(max_items=1)
    store.create(record(IDS[0], 1.0))
    store.create(record(IDS[1], 2.0))
    assert len(store) == 2 and store.unfinished_ids() == [IDS[0], IDS[1]]


def test_evicts_by_age_and_redis_expires_finished_records(make_store, redis_server):
    clock = FakeClock(now=1000.0)
    store = make_store(max_age_s=60, clock=clock)
    store.create(record(IDS[0], 900.0, "done"))
    store.create(record(IDS[1], 900.0, "queued"))
    store.create(record(IDS[2], 990.0, "done"))
    assert not store.contains(IDS[0])
    assert store.contains(IDS[1]) and store.contains(IDS[2])
    client = redis_server.client()
    assert 49_000 < client.pttl(f"{PREFIX}tx:{IDS[2]}") <= 50_000  # created 990 + 60 s, now 1000
    assert client.pttl(f"{PREFIX}tx:{IDS[1]}") == -1  # unfinished: no expiry
    clock.now = 1100.0
    assert store.evict() == [IDS[2]]
    assert store.unfinished_ids() == [IDS[1]] and len(store) == 1


def test_restart_with_the_same_replica_id_fails_its_predecessors_jobs_and_keeps_the_rest(make_store, redis_server):
    proc = run_replica(redis_server, "r1", [record(IDS[0], 1.0), {**record(IDS[1], 2.0), "then": "running"},
                                            record(IDS[2], 3.0, "done")])
    kill(proc)
    restarted = make_store("r1")  # opened at once, well within the dead process's lease
    for transmission_id in (IDS[0], IDS[1]):
        assert restarted.get(transmission_id)["status"] == "failed"
        assert restarted.get(transmission_id)["error"] == RESTART_ERROR
    assert restarted.get(IDS[2])["status"] == "done"
    assert restarted.unfinished_ids() == []


def test_concurrent_updates_from_two_replicas_are_all_kept(make_store):
    replicas = [make_store("a"), make_store("b")]
    replicas[0].create(record(IDS[0], 1.0))

    def bump(worker: int) -> None:
        for step in range(20):
            replicas[worker % 2].update(IDS[0], timings_ms={f"w{worker}-{step}": 1.0})

    threads = [threading.Thread(target=bump, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(replicas[1].get(IDS[0])["timings_ms"]) == 80


# ------------------------------------------------------------------------------- replicas together


def test_two_replicas_see_each_others_records_and_images(make_store):
    a, b = make_store("a"), make_store("b")
    a.create(record(IDS[0], 1.0))
    assert b.get(IDS[0])["status"] == "queued"
    with pytest.raises(DuplicateTransmissionError):
        b.create(record(IDS[0], 1.0))
    a.write_artifact(IDS[0], "maps_fds", b"png bytes")
    a.update(IDS[0], status="done")
    assert b.get(IDS[0])["status"] == "done"
    assert b.read_artifact(IDS[0], "maps_fds") == b"png bytes"
    b.delete(IDS[0])
    assert not a.contains(IDS[0]) and len(a) == 0


def test_sampling_progress_is_seen_by_every_replica(make_store, redis_server):
    a, b = make_store("a"), make_store("b")
    a.create(record(IDS[0], 1.0))
    a.create(record(IDS[1], 2.0))
    assert b.progress(IDS[0]) is None
    a.set_progress([IDS[0], IDS[1], IDS[2]], 3, 10)  # IDS[2] is not stored: no key appears for it
    assert b.progress(IDS[0]) == b.progress(IDS[1]) == (3, 10)
    assert not redis_server.client().exists(f"{PREFIX}tx:{IDS[2]}")
    redis_server.kill()
    a.set_progress([IDS[0]], 4, 10)  # best effort: no error while Redis is down


def test_a_finish_on_one_replica_wakes_a_long_poll_on_another(make_store):
    async def long_poll() -> bool:
        waiters = FinishWaiters()
        waiters.bind(asyncio.get_running_loop())
        make_store("b", on_finished=waiters.notify_finished)
        event = waiters.register(IDS[0])
        await asyncio.to_thread(a.update, IDS[0], status="done")
        return await waiters.wait(event, 5.0)

    a = make_store("a")
    a.create(record(IDS[0], 1.0))
    started = time.monotonic()
    assert asyncio.run(long_poll())
    assert time.monotonic() - started < 3.0  # woken, not timed out at 5 s


def test_cancel_reaches_the_replica_that_holds_the_job(make_store):
    cancelled: list[tuple[str, str]] = []
    a, b = make_store("a"), make_store("b")
    a.set_cancel_handler(lambda transmission_id, reason: cancelled.append((transmission_id, reason)))
    a.create(record(IDS[0], 1.0))
    a.create(record(IDS[1], 2.0))
    a.update(IDS[1], status="running")
    a.create(record(IDS[2], 3.0, "done"))

    queued = b.request_cancel(IDS[0], "nobody waits")
    assert (queued["status"], queued["error"]) == ("cancelled", "nobody waits")
    running = b.request_cancel(IDS[1], "nobody waits")
    assert running["status"] == "running"  # the owner stops it at its next sampling step
    assert b.request_cancel(IDS[2], "nobody waits")["status"] == "done"
    assert wait_until(lambda: len(cancelled) == 2, 5.0)
    time.sleep(0.2)
    assert cancelled == [(IDS[0], "nobody waits"), (IDS[1], "nobody waits")]
    # The owner's own late update of the cancelled job changes nothing.
    assert a.update(IDS[0], status="running")["status"] == "cancelled"
    assert a.unfinished_ids() == [IDS[1]]


def test_the_worker_generates_on_one_replica_for_another_and_a_cancel_crosses_over(make_store, fake_generator,
                                                                                  tmp_path):
    a, b = make_store("a"), make_store("b")
    worker = GenerationWorker(make_settings(tmp_path), a)
    a.set_cancel_handler(worker.cancel)
    worker.load_model()
    try:
        header, symbols = transmission(sampling=ddim(1))
        queue_transmission(worker, header, symbols, "req-1")
        record = wait_for_status(b, header.transmission_id, {"done", "failed"})
        assert record["status"] == "done", record["error"]
        assert decode_png(b.read_artifact(header.transmission_id, "image")).shape == (30, 40, 3)
        assert b.read_artifact(header.transmission_id, "fds_labels") is not None

        fake_generator.gate.clear()  # hold the first job in sampling
        first, queued = transmission(sampling=ddim(2)), transmission(sampling=ddim(3))
        queue_transmission(worker, *first, "req-2")
        wait_for_status(b, first[0].transmission_id, {"running"})
        queue_transmission(worker, *queued, "req-3")
        assert b.request_cancel(queued[0].transmission_id, "nobody waits")["status"] == "cancelled"
        assert wait_until(lambda: worker.queue_depth == 0, 5.0)  # dropped from a's queue over pub/sub
        fake_generator.gate.set()
        assert wait_for_status(b, first[0].transmission_id, {"done", "failed"})["status"] == "done"
        assert b.get(queued[0].transmission_id)["status"] == "cancelled"
        assert b.read_artifact(queued[0].transmission_id, "image") is None
    finally:
        fake_generator.gate.set()
        worker.stop(5)


# ----------------------------------------------------------------------------------------- leases


def test_a_killed_replicas_jobs_fail_within_the_lease(make_store, redis_server):
    finished: list[str] = []
    survivor = make_store("survivor", on_finished=finished.append, lease_s=SLOW_LEASE_S)
    survivor.create(record(IDS[5], 0.5))
    time.sleep(SLOW_LEASE_S)  # past the survivor's own start-up grace
    proc = run_replica(redis_server, "doomed", [record(IDS[0], 1.0), {**record(IDS[1], 2.0), "then": "running"},
                                                record(IDS[2], 3.0, "done")], lease_s=SLOW_LEASE_S)
    time.sleep(1.5 * SLOW_LEASE_S)
    assert survivor.get(IDS[0])["status"] == "queued"  # alive: renewed, never swept
    killed = time.monotonic()
    kill(proc)
    assert wait_until(lambda: survivor.get(IDS[1])["status"] == "failed", 4 / 3 * SLOW_LEASE_S + 1.0)
    elapsed = time.monotonic() - killed
    for transmission_id in (IDS[0], IDS[1]):
        failed = survivor.get(transmission_id)
        assert failed["status"] == "failed"
        assert failed["error"] == LEASE_EXPIRED_ERROR.format(owner="doomed")
    assert sorted(finished) == [IDS[0], IDS[1]]
    assert survivor.get(IDS[2])["status"] == "done" and survivor.get(IDS[5])["status"] == "queued"
    assert redis_server.client().smembers(f"{PREFIX}owners") == {b"survivor"}
    # The failure is final: a late "done" with its image from the lost replica changes nothing.
    survivor.write_artifact(IDS[1], "image", b"late")
    assert survivor.update(IDS[1], status="done")["status"] == "failed"
    assert survivor.read_artifact(IDS[1], "image") is None
    print(f"jobs of the killed replica failed {elapsed:.2f} s after SIGKILL (lease {SLOW_LEASE_S} s)")


def test_close_fails_own_unfinished_jobs_at_once(make_store):
    a, b = make_store("a"), make_store("b")
    a.create(record(IDS[0], 1.0))
    a.create(record(IDS[1], 2.0, "done"))
    assert a.close() == [IDS[0]]
    assert b.get(IDS[0])["error"] == STOPPED_ERROR.format(owner="a")
    assert b.get(IDS[1])["status"] == "done"


def test_jobs_the_worker_no_longer_holds_end_failed(make_store):
    held = {IDS[0]}
    store = make_store()
    store.set_job_holder(lambda: set(held))
    store.create(record(IDS[0], 1.0))
    store.create(record(IDS[1], 2.0))  # e.g. its "done" could not be stored while Redis was down
    assert wait_until(lambda: store.get(IDS[1])["status"] == "failed", 3 * LEASE_S)
    assert store.get(IDS[1])["error"] == LOST_ERROR
    assert store.get(IDS[0])["status"] == "queued"
    held.clear()
    store.update(IDS[0], status="done")
    time.sleep(LEASE_S)
    assert store.get(IDS[0])["status"] == "done"


# ------------------------------------------------------------------ hand-over between replicas


def test_a_jobs_stored_inputs_rebuild_it(fake_generator, tmp_path):
    worker = GenerationWorker(make_settings(tmp_path), create_store(make_settings(tmp_path)))
    worker.load_model()
    header, symbols = transmission(sampling=ddim(5), factor=2)
    job, _ = job_from_header(header, symbols, "req-1", worker)
    rebuilt = decode_job_input(job.transmission_id, encode_job_input(job), 3, worker.host.generator_for)
    assert (rebuilt.semantic, rebuilt.sampling, rebuilt.seed, rebuilt.use_fds, rebuilt.request_id, rebuilt.epoch) == (
        job.semantic, job.sampling, 5, job.use_fds, "req-1", 3)
    assert rebuilt.generator is job.generator
    assert rebuilt.symbols.dtype == np.float32 and np.array_equal(rebuilt.symbols, job.symbols)
    with pytest.raises(ValueError, match="unreadable job input"):
        decode_job_input(job.transmission_id, encode_job_input(job)[:-9], 1, worker.host.generator_for)
    worker.stop(1)


def test_an_expired_replicas_jobs_go_to_the_shared_queue_and_its_late_result_is_dropped(make_store, redis_server):
    survivor = make_store("survivor", lease_s=SLOW_LEASE_S)
    time.sleep(SLOW_LEASE_S)  # past the survivor's own start-up grace
    doomed = make_store("doomed", lease_s=SLOW_LEASE_S)
    doomed.create(record(IDS[0], 1.0), b"inputs-0")
    doomed.create(record(IDS[1], 2.0), b"inputs-1")
    doomed.update(IDS[1], epoch=0, status="running", started_at=5.0)
    doomed.create(record(IDS[2], 3.0))  # no inputs: it cannot be redone
    doomed._stopping.set()  # it stops renewing its lease, as a starved or cut-off replica does
    for thread in doomed._threads:
        thread.join()
    assert wait_until(lambda: survivor.get(IDS[2])["status"] == "failed", 4 / 3 * SLOW_LEASE_S + 1.0)
    assert survivor.get(IDS[2])["error"] == LEASE_EXPIRED_ERROR.format(owner="doomed")
    client = redis_server.client()
    assert client.lrange(f"{PREFIX}pending", 0, -1) == [IDS[0].encode(), IDS[1].encode()]  # oldest first
    handed = survivor.get(IDS[1])
    assert (handed["status"], handed["started_at"], handed["handovers"]) == ("queued", None, 1)

    assert survivor.claim(1) == [(IDS[0], b"inputs-0", 2)]  # raised at the hand-over, then at the claim
    assert survivor.claim(5) == [(IDS[1], b"inputs-1", 2)]
    assert survivor.claim(5) == [] and client.smembers(f"{PREFIX}owned:survivor") == {IDS[0].encode(), IDS[1].encode()}

    # The replica presumed dead finishes anyway: its image and end are fenced off and dropped.
    with pytest.raises(HandedOverError):
        doomed.write_artifact(IDS[1], "image", b"late", epoch=0)
    with pytest.raises(HandedOverError):
        doomed.update(IDS[1], epoch=0, status="done", finished_at=9.0)
    survivor.write_artifact(IDS[1], "image", b"mine", epoch=2)
    assert survivor.update(IDS[1], epoch=2, status="done")["status"] == "done"
    assert survivor.read_artifact(IDS[1], "image") == b"mine"
    assert client.hget(f"{PREFIX}tx:{IDS[1]}", "input") is None  # a finished job's inputs are dropped
    with pytest.raises(HandedOverError):  # also after the new holder's end
        doomed.update(IDS[1], epoch=0, status="failed", error="late")
    assert survivor.get(IDS[1])["status"] == "done"


def test_a_cancelled_job_waiting_in_the_shared_queue_is_not_taken(make_store):
    a, b = make_store("a"), make_store("b")
    a.create(record(IDS[0], 1.0), b"inputs-0")
    a.create(record(IDS[1], 2.0), b"inputs-1")
    assert a.hand_back([IDS[0], IDS[1]]) == [IDS[0], IDS[1]]
    assert b.request_cancel(IDS[0], "nobody waits")["status"] == "cancelled"
    assert b.claim(5) == [(IDS[1], b"inputs-1", 2)]


def test_a_serving_replicas_job_goes_unowned_to_the_shared_queue(make_store):
    serving, sampling = make_store("serving"), make_store("sampling")
    serving.create(record(IDS[0], 1.0), b"inputs-0", shared_queue=True)
    serving.create(record(IDS[1], 2.0), b"inputs-1", shared_queue=True)
    assert serving.shared_queue_depth() == sampling.shared_queue_depth() == 2
    with pytest.raises(DuplicateTransmissionError):
        serving.create(record(IDS[0], 1.0), b"inputs-0", shared_queue=True)
    with pytest.raises(ValueError, match="inputs"):
        serving.create(record(IDS[2], 3.0), b"", shared_queue=True)
    assert serving.close() == []  # it owns none of them: nothing to fail or hand back
    assert sampling.claim(1) == [(IDS[0], b"inputs-0", 1)]
    assert sampling.shared_queue_depth() == 1 and sampling.get(IDS[1])["status"] == "queued"


def test_close_hands_own_unfinished_jobs_back_at_once(make_store):
    a, b = make_store("a"), make_store("b")
    a.create(record(IDS[0], 1.0), b"inputs-0")
    a.create(record(IDS[1], 2.0, "done"))
    a.create(record(IDS[3], 3.0))  # no inputs
    assert a.close() == [IDS[3]]
    assert b.get(IDS[0])["status"] == "queued" and b.get(IDS[1])["status"] == "done"
    assert b.get(IDS[3])["error"] == STOPPED_ERROR.format(owner="a")
    assert [job[0] for job in b.claim(5)] == [IDS[0]]


def test_a_stopped_workers_jobs_finish_on_another_and_its_late_result_is_dropped(make_store, redis_server,
                                                                                 fake_generator, tmp_path, caplog):
    a, b = make_store("a"), make_store("b")
    first = GenerationWorker(make_settings(tmp_path, queue_size=4, max_batch_size=1), a)
    first.load_model()
    fake_generator.gate.clear()  # the first worker's first job stays in sampling
    headers = [transmission(sampling=ddim(seed))[0] for seed in range(3)]
    for header in headers:
        queue_transmission(first, header, transmission(sampling=ddim(0))[1], "req")
    ids = [header.transmission_id for header in headers]
    wait_for_status(b, ids[0], {"running"})
    first.stop(0.5)  # SIGTERM: the waiting jobs go back at once, the running one when the store closes
    assert {b.get(transmission_id)["status"] for transmission_id in ids[1:]} == {"queued"}
    a.close()
    second = GenerationWorker(make_settings(tmp_path, queue_size=4), b)
    second.load_model()
    try:
        fake_generator.gate.set()  # both go on: the first worker's late result must be dropped
        for transmission_id in ids:
            assert wait_for_status(b, transmission_id, {"done", "failed"})["status"] == "done"
            assert redis_server.client().hget(f"{PREFIX}tx:{transmission_id}", "owner") == b"b"
            assert b.read_artifact(transmission_id, "image") is not None
        assert wait_until(lambda: "result dropped: the job was handed to another replica" in caplog.text, 10)
        assert b.get(ids[0])["handovers"] == 1
    finally:
        fake_generator.gate.set()
        second.stop(5)


# -------------------------------------------------------------------------- Redis restarts, outages


def test_done_records_survive_a_redis_restart_and_the_same_client_recovers(make_store, redis_server):
    store = make_store()
    store.create(record(IDS[0], 1.0))
    store.write_artifact(IDS[0], "image", b"image bytes")
    store.update(IDS[0], status="done")
    redis_server.kill()
    started = time.monotonic()
    for call in (lambda: store.get(IDS[0]), lambda: store.create(record(IDS[1], 2.0)), store.check,
                 lambda: store.read_artifact(IDS[0], "image"), lambda: store.update(IDS[0], error=None), store.evict):
        with pytest.raises(StoreUnavailableError, match="Redis"):
            call()
    assert time.monotonic() - started < 5.0  # every call fails fast
    redis_server.start()
    store.check()
    assert store.get(IDS[0])["status"] == "done"
    assert store.read_artifact(IDS[0], "image") == b"image bytes"
    store.create(record(IDS[1], 2.0))
    assert store.unfinished_ids() == [IDS[1]]


def test_after_an_outage_a_replica_waits_a_lease_before_judging_the_others(make_store, redis_server):
    """Every lease expires in an outage longer than the lease. Replica a is frozen (SIGSTOP) across
    the outage and thawed half a lease after Redis is back; b, which reconnects at once, must give
    it that time to renew instead of failing its job on its first sweep."""
    b = make_store("b", lease_s=SLOW_LEASE_S)
    b.create(record(IDS[1], 2.0))
    proc = run_replica(redis_server, "a", [record(IDS[0], 1.0)], lease_s=SLOW_LEASE_S)
    try:
        redis_server.kill()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(1.5 * SLOW_LEASE_S)
        redis_server.start()
        time.sleep(0.5 * SLOW_LEASE_S)  # b has reconnected (it retries every lease / 3)
        proc.send_signal(signal.SIGCONT)
        time.sleep(1.5 * SLOW_LEASE_S)  # b's grace is over and it has swept
        assert b.get(IDS[0])["status"] == "queued" and b.get(IDS[1])["status"] == "queued"
        assert redis_server.client().exists(f"{PREFIX}lease:a")
    finally:
        proc.send_signal(signal.SIGCONT)
        kill(proc)


def test_the_receiver_answers_503_while_redis_is_down_and_recovers_without_a_restart(
        redis_server, fake_generator, tmp_path, monkeypatch):
    """The receiver process on Redis: status, image, maps and cancel answer 503 with the JSON error
    body and /readyz fails while Redis is down, a stream gets UNAVAILABLE; once Redis is back, the
    same process answers again and a done transmission is still done, with its image."""
    monkeypatch.setenv("GESCO_RECEIVER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("GESCO_RECEIVER_REDIS_PASSWORD", PASSWORD)
    monkeypatch.setenv("GESCO_RECEIVER_REDIS_LEASE_S", str(SLOW_LEASE_S))
    with ready_client(make_settings(tmp_path), fake_generator) as client:
        assert isinstance(client.app.state.receiver.store, RedisTransmissionStore)
        header, symbols = transmission(sampling=ddim(1))
        receive(client.settings.grpc_port, transport.symbol_frames(header, symbols))
        url = f"/v1/transmissions/{header.transmission_id}"
        assert client.get(url, params={"wait_s": 20}).json()["status"] == "done"

        redis_server.kill()
        for method, path in (("GET", url), ("GET", f"{url}/image"), ("GET", f"{url}/maps/fds.png"),
                             ("POST", f"{url}/cancel")):
            response = client.request(method, path)
            assert response.status_code == 503, (path, response.text)
            assert "store is unavailable" in response.json()["error"]["message"] and response.headers["retry-after"]
            assert str(redis_server.port) not in response.text  # Redis's address stays in the log
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
        late, late_symbols = transmission(sampling=ddim(1))
        with pytest.raises(grpc.RpcError) as refused:
            receive(client.settings.grpc_port, transport.symbol_frames(late, late_symbols))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

        redis_server.start()
        assert wait_until(lambda: client.get("/readyz").status_code == 200, 10.0)
        assert client.get(url).json()["status"] == "done"
        assert decode_png(client.get(f"{url}/image").content).shape == (30, 40, 3)
        again, again_symbols = transmission(sampling=ddim(1))
        receive(client.settings.grpc_port, transport.symbol_frames(again, again_symbols))
        assert client.get(f"/v1/transmissions/{again.transmission_id}", params={"wait_s": 20}).json()["status"] == "done"


def test_wrong_password_is_unavailable(redis_server):
    settings = RedisStoreSettings(url=redis_server.url, password="wrong", lease_s=LEASE_S)
    store = RedisTransmissionStore.from_settings(settings, 10, 100)
    with pytest.raises(StoreUnavailableError, match="Authentication|WRONGPASS|invalid"):
        store.check()
    with pytest.raises(StoreUnavailableError):
        store.get(IDS[0])


# -------------------------------------------------------------------------------- settings, factory


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("GESCO_RECEIVER_REDIS_URL", "redis://redis.example.test:6379/2")
    monkeypatch.setenv("GESCO_RECEIVER_REDIS_PASSWORD", "s3cret")
    monkeypatch.setenv("GESCO_RECEIVER_REDIS_LEASE_S", "15")
    settings = RedisStoreSettings()
    assert (settings.url, settings.password.get_secret_value(), settings.lease_s) == (
        "redis://redis.example.test:6379/2", "s3cret", 15.0)
    assert "s3cret" not in repr(settings)
    monkeypatch.setenv("GESCO_RECEIVER_REDIS_URL", "http://redis:6379")
    with pytest.raises(ValueError, match="url"):
        RedisStoreSettings()
    with pytest.raises(ValueError, match="replica_id"):
        RedisStoreSettings(url="redis://x", replica_id="a/b")


def test_factory_picks_the_disk_store_unless_a_redis_url_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("GESCO_RECEIVER_REDIS_URL", raising=False)
    settings = ReceiverSettings(store_dir=tmp_path, store_max_items=7)
    disk = create_store(settings)
    assert isinstance(disk, TransmissionStore) and disk.root == tmp_path and disk.max_items == 7
    shared = create_store(settings, redis_settings=RedisStoreSettings(url="redis://127.0.0.1:1/0"))
    assert isinstance(shared, RedisTransmissionStore) and shared.max_items == 7
