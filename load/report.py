"""What the load generators share: the fate of each request, the warm-up before a run, the final
drain of accepted jobs, resident memory from /metrics, and the summary they print.

Standard library only, so it runs inside locust's environment as well as the project's.

Outcomes of one request: `rejected` (HTTP 429 / RESOURCE_EXHAUSTED: the system said "later"),
`failed` (any other error, or a job the receiver finished as failed or cancelled), `completed` (a
job the receiver finished as done), `lost` (accepted, but not finished when the drain ended, or
unknown to the receiver). The target is lost = 0.
"""
from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

FINISHED = ("done", "failed", "cancelled")


@dataclass
class LoadRecord:
    """Thread-safe tally of one run."""

    started_at: float = field(default_factory=time.time)
    sent: int = 0
    rejected: int = 0
    request_failures: Counter = field(default_factory=Counter)  # reason -> count
    accepted: dict[str, float] = field(default_factory=dict)  # transmission id -> wall time sent
    request_latencies_s: list[float] = field(default_factory=list)  # accepted requests only
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_sent(self) -> None:
        with self._lock:
            self.sent += 1

    def record_accepted(self, transmission_id: str, sent_at: float, latency_s: float) -> None:
        with self._lock:
            self.accepted[transmission_id] = sent_at
            self.request_latencies_s.append(latency_s)

    def record_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def record_failure(self, reason: str) -> None:
        with self._lock:
            self.request_failures[reason[:80]] += 1


def fetch_status(receiver_url: str, transmission_id: str, timeout_s: float = 5.0, api_key: str = "") -> dict | None:
    """The receiver's status JSON of one transmission (with the receiver's API key, if it has
    one); None if unknown (404), unavailable (503) or unreachable."""
    url = f"{receiver_url.rstrip('/')}/v1/transmissions/{transmission_id}"
    request = urllib.request.Request(url, headers={"X-API-Key": api_key} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def drain(receiver_url: str, ids: list[str], drain_s: float, interval_s: float = 1.0,
          api_key: str = "") -> dict[str, dict | None]:
    """Poll until every id is finished (FINISHED), or `drain_s` has passed; the last status of each."""
    statuses: dict[str, dict | None] = {transmission_id: None for transmission_id in ids}
    deadline = time.monotonic() + drain_s
    pending = list(ids)
    while pending:
        for transmission_id in pending:
            statuses[transmission_id] = fetch_status(receiver_url, transmission_id, api_key=api_key)
        pending = [i for i in pending if not (statuses[i] and statuses[i].get("status") in FINISHED)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
    return statuses


def parse_warmup(value: str | None, name: str = "GESCO_LOAD_WARMUP") -> int:
    """A warm-up count from a setting: a whole number >= 0; empty or unset means 0 (no warm-up)."""
    text = (value or "").strip()
    try:
        count = int(text) if text else 0
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
    return count


def warm_up(send: Callable[[int], str | None], count: int, receiver_url: str, drain_s: float, *,
            users: int = 1, wait_each: bool = False, api_key: str = "") -> list[str]:
    """Send requests before a run, so that first-use allocations (model buffers, thread pools, the
    batches of the run's concurrency) happen before the first memory reading; they count in no total.

    `users` workers at once (threads; greenlets under locust) each send `count` requests, one at a
    time, through send(index), which returns the transmission id if the request was accepted, else
    None. The indices are -1, -2, ...: apart from the run's (0, 1, ...), so are the seeds made of
    them. With `wait_each`, a worker waits for each accepted job to finish (at most `drain_s`)
    before it sends the next; without, all the accepted jobs are waited for at the end. Returns
    the accepted ids.
    """
    accepted: list[str] = []
    lock = threading.Lock()

    def worker(first_index: int) -> None:
        for index in range(first_index, first_index - count, -1):
            transmission_id = send(index)
            if transmission_id is None:
                continue
            with lock:
                accepted.append(transmission_id)
            if wait_each:
                drain(receiver_url, [transmission_id], drain_s, api_key=api_key)

    if count <= 0 or users <= 0:
        return accepted
    workers = [threading.Thread(target=worker, args=(-1 - user * count,), daemon=True) for user in range(users)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if not wait_each:
        drain(receiver_url, list(accepted), drain_s, api_key=api_key)
    return accepted


def resident_memory_bytes(metrics_url: str, timeout_s: float = 5.0) -> float | None:
    """process_resident_memory_bytes from a Prometheus /metrics page; None if unavailable."""
    return process_metric(metrics_url, "process_resident_memory_bytes", timeout_s)


def process_metric(metrics_url: str, name: str, timeout_s: float = 5.0) -> float | None:
    """An unlabelled sample (process_cpu_seconds_total...) of a Prometheus /metrics page; None if
    unavailable."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def memory_snapshot(metrics_urls: list[str]) -> dict[str, float | None]:
    return {url: resident_memory_bytes(url) for url in metrics_urls}


def percentiles(values: list[float], quantiles=(50, 90, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles (seconds, 3 decimals) and the maximum; None without values."""
    ordered = sorted(values)
    result: dict[str, float | None] = {}
    for q in quantiles:
        result[f"p{q}"] = round(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)], 3) if ordered else None
    result["max"] = round(ordered[-1], 3) if ordered else None
    return result


def summarise(record: LoadRecord, statuses: dict[str, dict | None], memory_before: dict[str, float | None],
              memory_after: dict[str, float | None], config: dict) -> dict:
    """The run's report: counts, latency percentiles, resident memory growth per service."""
    completed, job_failures, lost = 0, Counter(), 0
    completion_s = []
    for transmission_id, sent_at in record.accepted.items():
        status = statuses.get(transmission_id)
        state = status.get("status") if status else None
        if state == "done":
            completed += 1
            finished = _timestamp(status.get("finished_at"))
            if finished is not None:
                completion_s.append(max(0.0, finished - sent_at))
        elif state in FINISHED:  # failed, or cancelled
            job_failures[str(status.get("error") or "failed")[:80]] += 1
        else:
            lost += 1
    memory = {}
    for url, before in memory_before.items():
        after = memory_after.get(url)
        growth = None if not (before and after) else round(100.0 * (after - before) / before, 2)
        memory[url] = {"rss_before_mb": _mb(before), "rss_after_mb": _mb(after), "growth_percent": growth}
    failures = record.request_failures + job_failures
    return {
        "config": config,
        "started_at": datetime.fromtimestamp(record.started_at).isoformat(timespec="seconds"),
        "sent": record.sent,
        "accepted": len(record.accepted),
        "completed": completed,
        "rejected": record.rejected,
        "failed": sum(failures.values()),
        "lost": lost,
        "failure_reasons": dict(failures.most_common(10)),
        "request_latency_s": percentiles(record.request_latencies_s),
        "completion_latency_s": percentiles(completion_s),
        "resident_memory": memory,
    }


def format_summary(report: dict) -> str:
    lines = [
        f"sent {report['sent']}  accepted {report['accepted']}  completed {report['completed']}  "
        f"rejected {report['rejected']}  failed {report['failed']}  lost {report['lost']}",
        "request latency (s):    " + _format_percentiles(report["request_latency_s"]),
        "completion latency (s): " + _format_percentiles(report["completion_latency_s"]),
    ]
    for reason, count in report["failure_reasons"].items():
        lines.append(f"  failed x{count}: {reason}")
    for url, memory in report["resident_memory"].items():
        lines.append(f"RSS {url}: {memory['rss_before_mb']} -> {memory['rss_after_mb']} MB "
                     f"({memory['growth_percent']}%)")
    return "\n".join(lines)


def _format_percentiles(values: dict[str, float | None]) -> str:
    return "  ".join(f"{name} {value}" for name, value in values.items())


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)
