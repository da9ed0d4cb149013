"""Locust load test of the sender's REST path: POST /v1/transmissions at a fixed rate.

Each user sends the bundled label map at GESCO_LOAD_RATE_PER_USER requests per second
(locust's constant_throughput), so the total rate is users x that rate. Bounded in time by
locust's --run-time and in count by GESCO_LOAD_MAX_REQUESTS. When the run stops, every accepted
transmission is polled on the receiver until done or failed (at most GESCO_LOAD_DRAIN_S), and the
summary shows sent, accepted, completed, rejected (429), failed and lost (accepted but never
finished), latency percentiles, and the resident memory growth of each GESCO_LOAD_METRICS_URLS.

Before anything is measured (the run's start, the first memory reading), each of the -u users
sends GESCO_LOAD_WARMUP requests, one at a time, each waited for until its job has finished, so
that first-use allocations are not counted as memory growth; the warm-up counts in no total (nor
in locust's statistics) and happens before locust's --run-time starts.

    pip install -r load/requirements.txt
    GESCO_LOAD_RATE_PER_USER=0.25 GESCO_LOAD_MAX_REQUESTS=600 GESCO_LOAD_WARMUP=3 \\
    GESCO_LOAD_METRICS_URLS=http://127.0.0.1:8000/metrics,http://127.0.0.1:9051/metrics,http://127.0.0.1:8001/metrics \\
        locust -f load/locustfile.py --headless -u 4 -r 4 --run-time 5m --host http://127.0.0.1:8000

Other settings: GESCO_LOAD_STEPS (sampling steps, 5), GESCO_LOAD_RECEIVER_URL (the receiver's
REST base, http://127.0.0.1:8001; any replica when several share Redis), GESCO_LOAD_API_KEY (the
sender's X-API-Key, if it has one), GESCO_LOAD_RECEIVER_API_KEY (the receiver's, if it has one),
GESCO_LOAD_REPORT (also write the summary as JSON to this file), GESCO_LOAD_WARMUP (warm-up
requests per user, 0: none; each waited for at most GESCO_LOAD_DRAIN_S).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import gevent
import requests
from locust import HttpUser, constant_throughput, events, task
from locust.exception import StopUser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # locust imports this file by path

from load import report  # noqa: E402
from shared.paths import REPO_ROOT  # noqa: E402

RATE_PER_USER = float(os.environ.get("GESCO_LOAD_RATE_PER_USER", "0.5"))
MAX_REQUESTS = int(os.environ.get("GESCO_LOAD_MAX_REQUESTS", "100"))
STEPS = int(os.environ.get("GESCO_LOAD_STEPS", "5"))
RECEIVER_URL = os.environ.get("GESCO_LOAD_RECEIVER_URL", "http://127.0.0.1:8001")
DRAIN_S = float(os.environ.get("GESCO_LOAD_DRAIN_S", "120"))
METRICS_URLS = [url for url in os.environ.get("GESCO_LOAD_METRICS_URLS", "").split(",") if url]
API_KEY = os.environ.get("GESCO_LOAD_API_KEY", "")
RECEIVER_API_KEY = os.environ.get("GESCO_LOAD_RECEIVER_API_KEY", "")
REPORT_PATH = os.environ.get("GESCO_LOAD_REPORT", "")
WARMUP = report.parse_warmup(os.environ.get("GESCO_LOAD_WARMUP"))
WARMUP_TIMEOUT_S = 60.0
LABEL_MAP = (REPO_ROOT / "examples" / "street_labels.png").read_bytes()

RECORD = report.LoadRecord()
_memory_before: dict[str, float | None] = {}
_count_lock = threading.Lock()
_issued = 0


def _take_a_ticket() -> bool:
    """Count one more request; False once GESCO_LOAD_MAX_REQUESTS have been issued."""
    global _issued
    with _count_lock:
        if _issued >= MAX_REQUESTS:
            return False
        _issued += 1
        return True


def _transmission_request(seed: int) -> dict:
    """The form and headers of one POST /v1/transmissions, the measured run's and the warm-up's."""
    return {
        "files": {"file": ("street_labels.png", LABEL_MAP, "image/png")},
        "data": {"kind": "label_map", "snr_db": "20", "steps": str(STEPS), "seed": str(seed % 2**64)},
        "headers": {"X-API-Key": API_KEY} if API_KEY else {},
    }


class SenderUser(HttpUser):
    wait_time = constant_throughput(RATE_PER_USER)

    @task
    def transmit(self) -> None:
        if not _take_a_ticket():
            if self.environment.runner is not None:
                # Not from this greenlet: stopping the run kills every user's greenlet, this one too.
                gevent.spawn(self.environment.runner.quit)
            raise StopUser()
        RECORD.record_sent()
        sent_at, started = time.time(), time.monotonic()
        with self.client.post(
            "/v1/transmissions", **_transmission_request(_issued),
            name="POST /v1/transmissions", catch_response=True,
        ) as response:
            if response.status_code == 202:
                RECORD.record_accepted(response.json()["id"], sent_at, time.monotonic() - started)
                response.success()
            elif response.status_code == 429:
                RECORD.record_rejected()
                response.success()  # back-pressure working as designed, counted apart
            else:
                RECORD.record_failure(f"HTTP {response.status_code}: {response.text[:60]}")
                response.failure(f"HTTP {response.status_code}")


@events.init.add_listener
def _warm_up(environment, **_) -> None:
    """GESCO_LOAD_WARMUP requests per user, at the run's concurrency (-u), before the run starts:
    locust fires init before it starts the users and the --run-time clock."""
    if not WARMUP:
        return
    if not environment.host:
        raise ValueError("GESCO_LOAD_WARMUP needs the sender's address: --host")
    url = environment.host.rstrip("/") + "/v1/transmissions"
    users = getattr(environment.parsed_options, "num_users", None) or 1

    def send(index: int) -> str | None:
        try:
            response = requests.post(url, timeout=WARMUP_TIMEOUT_S, **_transmission_request(index))
            return response.json()["id"] if response.status_code == 202 else None
        except (requests.RequestException, ValueError, KeyError):
            return None

    started = time.monotonic()
    accepted = report.warm_up(send, WARMUP, RECEIVER_URL, DRAIN_S, users=users, wait_each=True,
                              api_key=RECEIVER_API_KEY)
    print(f"warm-up: {users} users x {WARMUP} requests, {len(accepted)} accepted and waited for, "
          f"{time.monotonic() - started:.1f} s", flush=True)


@events.test_start.add_listener
def _on_start(environment, **_) -> None:
    RECORD.started_at = time.time()
    _memory_before.update(report.memory_snapshot(METRICS_URLS))


@events.quitting.add_listener
def _on_quitting(environment, **_) -> None:
    """At shutdown (however the run ended): drain the accepted jobs and print the summary."""
    statuses = report.drain(RECEIVER_URL, list(RECORD.accepted), DRAIN_S, api_key=RECEIVER_API_KEY)
    config = {"host": environment.host, "rate_per_user": RATE_PER_USER, "max_requests": MAX_REQUESTS,
              "steps": STEPS, "receiver_url": RECEIVER_URL, "drain_s": DRAIN_S, "warmup": WARMUP}
    result = report.summarise(RECORD, statuses, dict(_memory_before), report.memory_snapshot(METRICS_URLS), config)
    print(report.format_summary(result), flush=True)
    if REPORT_PATH:
        Path(REPORT_PATH).parent.mkdir(parents=True, exist_ok=True)
        Path(REPORT_PATH).write_text(json.dumps(result, indent=2) + "\n")
    if result["lost"]:
        environment.process_exit_code = 1
