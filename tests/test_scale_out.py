"""Scale-out as real processes: one redis-server, three receiver replicas sharing it, the channel
spreading over them with round_robin, the sender in front; the receivers' REST API takes an API
key, which the sender passes on.

- 60 transmissions are spread over all three replicas, and each one's status, image and maps are
  fetched through replicas other than the one that generated it (the status with a long poll, so
  the finish reaches the polled replica over pub/sub);
- redis-server is killed and restarted under light load: 503s with the JSON error body and a
  Retry-After (from the receivers, through the channel and the sender) while it is down, recovery
  without a restart, every transmission done before still done with the same image, every one
  accepted around the outage done;
- one replica is SIGKILLed with jobs in flight under the load client: its jobs are handed to the
  others once its lease expires and finish there, failed = lost = 0 in the load client's count;
- another is stopped with SIGTERM with jobs waiting in its queue: it hands them back at once and
  they finish on the replica left;
- across the whole module no transmission was finished twice (the receivers' logs name each done
  transmission once: a late result of a replica presumed dead is dropped, not stored).

The receivers run the shipped model for 2 sampling steps with one torch thread each, so the whole
module stays within a few minutes on two cores. Each test leaves the cluster usable for the next
(the replica kill and stop come last).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from gesco.stack import Ports, RunningStack, services
from shared.paths import REPO_ROOT
from tests.redis_helpers import PASSWORD, PREFIX, REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (Debian: apt-get install redis-server)"
)

LEASE_S = 2.0
RECEIVER_KEY = "receiver-key-for-the-scale-out-test"
HEADERS = {"X-API-Key": RECEIVER_KEY}
STEPS = "2"
LABEL_MAP = (REPO_ROOT / "examples" / "street_labels.png").read_bytes()
PNG = b"\x89PNG\r\n\x1a\n"
FINISHED = {"done", "failed", "cancelled"}


@dataclass
class Cluster:
    redis: RedisServer
    replicas: dict[str, str]  # replica id -> its REST URL
    receiver_procs: dict[str, subprocess.Popen]
    channel_port: int
    sender_url: str
    stack: RunningStack
    done_before: list[str] = field(default_factory=list)  # transmissions done in the first test

    def owner(self, transmission_id: str) -> str:
        """The replica that generated the transmission (read from Redis)."""
        owner = self.redis.client().hget(f"{PREFIX}tx:{transmission_id}", "owner")
        assert owner is not None, transmission_id
        return owner.decode()

    def others(self, replica_id: str) -> list[str]:
        return [url for name, url in self.replicas.items() if name != replica_id]

    def record(self, transmission_id: str) -> dict:
        return json.loads(self.redis.client().hget(f"{PREFIX}tx:{transmission_id}", "record"))

    def finishes(self) -> Counter:
        """How often each transmission was recorded done, by any replica (from their JSON logs)."""
        done: Counter = Counter()
        for name in self.replicas:
            for line in self.stack.log(name).splitlines():
                if line.startswith("{"):
                    entry = json.loads(line)
                    if entry.get("msg") == "job finished" and entry.get("status") == "done":
                        done[entry["transmission_id"]] += 1
        return done


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("scale-out")
    redis_server = RedisServer(tmp)
    redis_server.start()
    ports = Ports.free(receivers=3)
    try:
        stack = RunningStack(services(ports, settings={
            "receiver": {
                "GESCO_RECEIVER_STORE_DIR": str(tmp / "unused-store"),
                "GESCO_RECEIVER_DEVICE": "cpu",
                "GESCO_RECEIVER_TORCH_THREADS": "1",
                "GESCO_RECEIVER_OUTPUT_HEIGHT": "96",
                "GESCO_RECEIVER_OUTPUT_WIDTH": "128",
                "GESCO_RECEIVER_SHUTDOWN_GRACE_S": "1",
                "GESCO_RECEIVER_QUEUE_SIZE": "16",
                "GESCO_RECEIVER_API_KEY": RECEIVER_KEY,
                "GESCO_RECEIVER_REDIS_URL": redis_server.url,
                "GESCO_RECEIVER_REDIS_PASSWORD": PASSWORD,
                "GESCO_RECEIVER_REDIS_LEASE_S": str(LEASE_S),
            },
            "channel": {"GESCO_CHANNEL_METRICS_PORT": "0"},
            "sender": {"GESCO_SENDER_RECEIVER_API_KEY": RECEIVER_KEY, "GESCO_SENDER_DEVICE": "cpu"},
        }), tmp / "logs", timeout_s=240)
    except BaseException:
        redis_server.kill()
        raise
    try:
        replicas = {name: stack.url(name) for name in stack.services if name.startswith("receiver-")}
        yield Cluster(redis_server, replicas, {name: stack.procs[name] for name in replicas}, ports.channel,
                      stack.url("sender"), stack)
    finally:
        stack.stop()
        redis_server.kill()


def send(http: httpx.Client, cluster: Cluster, seed: int, wait: bool = False) -> httpx.Response:
    return http.post(f"{cluster.sender_url}/v1/transmissions", files={"file": ("labels.png", LABEL_MAP)},
                     data={"kind": "label_map", "steps": STEPS, "seed": str(seed), "wait": str(wait).lower()},
                     timeout=120)


def wait_finished(http: httpx.Client, url: str, transmission_id: str, timeout_s: float = 120) -> dict:
    """Long-poll the status at `url` until the transmission has finished."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = http.get(f"{url}/v1/transmissions/{transmission_id}", params={"wait_s": 20}, headers=HEADERS,
                            timeout=40)
        assert response.status_code == 200, response.text
        record = response.json()
        if record["status"] in FINISHED:
            return record
        assert time.monotonic() < deadline, record


def test_transmissions_spread_over_the_replicas_and_any_replica_answers_for_each(cluster) -> None:
    accepted: list[str] = []
    with httpx.Client() as http:
        for seed in range(60):
            while (response := send(http, cluster, seed)).status_code == 429:  # back-pressure: as told, later
                time.sleep(min(1.0, float(response.headers.get("retry-after", 1))))
            assert response.status_code == 202, response.text
            accepted.append(response.json()["id"])
        owners = {transmission_id: cluster.owner(transmission_id) for transmission_id in accepted}
        assert set(Counter(owners.values())) == set(cluster.replicas), Counter(owners.values())

        long_polls = []
        for index, transmission_id in enumerate(accepted):
            status_url, image_url = cluster.others(owners[transmission_id])
            started = time.monotonic()
            record = wait_finished(http, status_url, transmission_id)
            long_polls.append(time.monotonic() - started)
            assert record["status"] == "done", record
            image = http.get(f"{image_url}/v1/transmissions/{transmission_id}/image", headers=HEADERS)
            assert image.status_code == 200 and image.content.startswith(PNG)
            if index % 10 == 0:
                labels = http.get(f"{status_url}/v1/transmissions/{transmission_id}/maps/fds_labels.png",
                                  headers=HEADERS)
                assert labels.status_code == 200 and labels.content.startswith(PNG)
        # A finish published by the owner wakes the long poll on another replica: no poll waited
        # out its whole 20 s.
        assert max(long_polls) < 15, max(long_polls)

        # The key is needed, and the sender passes it on (its wait=true and its relay).
        assert http.get(f"{cluster.replicas['receiver-2']}/v1/transmissions/{accepted[0]}").status_code == 401
        waited = send(http, cluster, 1000, wait=True)
        assert waited.status_code == 200 and waited.content.startswith(PNG), waited.text
        relayed = http.get(f"{cluster.sender_url}/receiver/v1/transmissions/{accepted[1]}")
        assert relayed.status_code == 200 and relayed.json()["status"] == "done"
    cluster.done_before = accepted[:10]


def test_a_redis_restart_under_light_load_is_503_then_recovery(cluster) -> None:
    with httpx.Client() as http:
        images_before = {transmission_id: http.get(
            f"{cluster.replicas['receiver-3']}/v1/transmissions/{transmission_id}/image", headers=HEADERS).content
            for transmission_id in cluster.done_before}
        assert all(image.startswith(PNG) for image in images_before.values())
        answers: list[tuple[int, str | None]] = []  # the light load: (status code, transmission id)
        retry_afters: list[str | None] = []  # of the 503s
        stop = threading.Event()

        def light_load() -> None:
            with httpx.Client() as client:
                seed = 2000
                while not stop.is_set():
                    response = send(client, cluster, seed)
                    answers.append((response.status_code,
                                    response.json().get("id") if response.status_code == 202 else None))
                    if response.status_code not in (202, 429):
                        assert response.json()["error"]["message"], response.text  # the JSON error body
                    if response.status_code == 503:
                        retry_afters.append(response.headers.get("retry-after"))
                    seed += 1
                    stop.wait(0.4)

        loader = threading.Thread(target=light_load, daemon=True)
        loader.start()
        try:
            time.sleep(2.0)
            cluster.redis.kill()
            time.sleep(0.5)
            for url in cluster.replicas.values():
                status = http.get(f"{url}/v1/transmissions/{cluster.done_before[0]}", headers=HEADERS)
                assert status.status_code == 503, status.text
                assert "unavailable" in status.json()["error"]["message"]
                assert http.get(f"{url}/readyz").status_code == 503
                assert http.get(f"{url}/healthz").status_code == 200  # alive: nothing restarts it
            time.sleep(2.5)
            cluster.redis.start()
            deadline = time.monotonic() + 20
            while not all(http.get(f"{url}/readyz").status_code == 200 for url in cluster.replicas.values()):
                assert time.monotonic() < deadline, "a replica did not recover"
                time.sleep(0.2)
            time.sleep(2.0)
        finally:
            stop.set()
            loader.join(timeout=150)
        codes = Counter(code for code, _ in answers)
        assert codes[503] >= 1 and codes[202] >= 2, codes  # refused while down, accepted around it
        assert set(codes) <= {202, 429, 503}, codes  # never a 500, never a wrong answer
        assert "2" in retry_afters, retry_afters  # the receivers' Retry-After, passed on by the sender

        for transmission_id, image in images_before.items():  # done before: still done, same image
            record = wait_finished(http, cluster.replicas["receiver-2"], transmission_id, timeout_s=5)
            assert record["status"] == "done"
            again = http.get(f"{cluster.replicas['receiver-1']}/v1/transmissions/{transmission_id}/image", headers=HEADERS)
            assert again.content == image
        for transmission_id in [tid for code, tid in answers if code == 202]:  # accepted: finished after it
            record = wait_finished(http, cluster.replicas["receiver-1"], transmission_id, timeout_s=90)
            assert record["status"] == "done", record
        assert send(http, cluster, 3000, wait=True).status_code == 200


def run_load(cluster: Cluster, report_path, rate: int, duration_s: int, max_requests: int) -> subprocess.Popen:
    """load/grpc_load.py through the channel, following the statuses on receiver-1 (which stays)."""
    return subprocess.Popen(
        [sys.executable, "-m", "load.grpc_load", "--channel", f"127.0.0.1:{cluster.channel_port}",
         "--receiver-url", cluster.replicas["receiver-1"], "--rate", str(rate), "--duration-s", str(duration_s),
         "--max-requests", str(max_requests), "--steps", "4", "--drain-s", "150", "--report", str(report_path)],
        cwd=REPO_ROOT, env={**os.environ, "GESCO_LOAD_RECEIVER_API_KEY": RECEIVER_KEY},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def held_by(cluster: Cluster, replica_id: str, least: int, statuses: set[str], timeout_s: float = 30) -> set[str]:
    """At least `least` unfinished jobs of the replica whose records are in `statuses`."""
    client, deadline = cluster.redis.client(), time.monotonic() + timeout_s
    while True:
        owned = {member.decode() for member in client.smembers(f"{PREFIX}owned:{replica_id}")}
        matching = {tid for tid in owned if cluster.record(tid)["status"] in statuses}
        if len(matching) >= least:
            return owned
        assert time.monotonic() < deadline, f"{replica_id} never held {least} jobs {statuses}"
        time.sleep(0.05)


def finish_load(load: subprocess.Popen, report_path) -> dict:
    try:
        output, _ = load.communicate(timeout=300)
    finally:
        if load.poll() is None:
            load.kill()
    report = json.loads(report_path.read_text())
    assert report["lost"] == 0 and report["failed"] == 0, output
    assert report["completed"] == report["accepted"] > 0, output
    return report


def test_a_replica_killed_under_load_hands_its_jobs_to_the_others(cluster, tmp_path) -> None:
    victim, report_path = "receiver-3", tmp_path / "load.json"
    load = run_load(cluster, report_path, rate=8, duration_s=6, max_requests=48)
    try:
        in_flight = held_by(cluster, victim, 2, {"queued", "running"})
        cluster.receiver_procs[victim].send_signal(signal.SIGKILL)
        cluster.receiver_procs[victim].wait(timeout=10)
    finally:
        report = finish_load(load, report_path)
    moved = []
    with httpx.Client() as http:
        for transmission_id in in_flight:
            record = wait_finished(http, cluster.replicas["receiver-1"], transmission_id)
            assert record["status"] == "done", record
            if cluster.owner(transmission_id) != victim:  # else it finished just before the kill
                assert cluster.record(transmission_id)["handovers"] >= 1
                moved.append(transmission_id)
        assert moved, "the victim's jobs in flight should have moved to the others"
        print(f"{len(moved)} jobs of the killed replica finished on the others; load: {report['accepted']} "
              f"accepted, {report['completed']} completed, {report['rejected']} rejected")
        for seed in (4000, 4001):  # new requests succeed, on the replicas left
            response = send(http, cluster, seed, wait=True)
            assert response.status_code == 200 and response.content.startswith(PNG), response.text


def test_a_replica_stopped_with_sigterm_hands_its_waiting_jobs_back(cluster, tmp_path) -> None:
    leaving, report_path = "receiver-2", tmp_path / "load.json"
    load = run_load(cluster, report_path, rate=8, duration_s=4, max_requests=32)
    try:
        waiting = held_by(cluster, leaving, 3, {"queued"})
        cluster.receiver_procs[leaving].send_signal(signal.SIGTERM)
        assert cluster.receiver_procs[leaving].wait(timeout=30) == 0
    finally:
        finish_load(load, report_path)
    with httpx.Client() as http:
        for transmission_id in waiting:
            assert wait_finished(http, cluster.replicas["receiver-1"], transmission_id)["status"] == "done"
    assert "handed jobs back" in cluster.stack.log(leaving)
    assert {cluster.owner(transmission_id) for transmission_id in waiting} <= {leaving, "receiver-1"}
    assert any(cluster.owner(transmission_id) == "receiver-1" for transmission_id in waiting)

    finishes = cluster.finishes()  # the whole module's: each transmission's image was stored once
    assert finishes and max(finishes.values()) == 1, [tid for tid, count in finishes.items() if count > 1]
