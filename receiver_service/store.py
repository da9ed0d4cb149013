"""On-disk job store: one folder per transmission with status.json and the PNGs it produced.

Paths are only ever built from ids that passed `validate_transmission_id`, status.json is replaced
atomically (a reader sees the old or the new record, never half of one), and the store is bounded
by count and age, evicting the oldest finished jobs first. Jobs a previous process left queued or
running are marked failed on open: their symbols lived in that process's memory only.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from shared.wire.transport import TRANSMISSION_ID_PATTERN, validate_transmission_id

log = logging.getLogger("receiver_service.store")

STATUS_FILE = "status.json"
# Artifact name -> file name; nothing else is ever read or written inside a job folder.
ARTIFACTS = {
    "image": "image.png",
    "maps_received": "maps_received.png",
    "maps_fds": "maps_fds.png",
    "fds_labels": "fds_labels.png",
    "received_labels": "received_labels.png",
}
RESTART_ERROR = "receiver restarted before the job finished"
# Retry-After of a 503 (REST) or UNAVAILABLE (gRPC) while the store is unreachable (the Redis
# client retries for about a second before it gives up).
STORE_RETRY_AFTER_S = 2


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # nobody waited for it any more: dropped from the queue or stopped mid-sampling


FINISHED = frozenset({JobStatus.DONE.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value})


class DuplicateTransmissionError(Exception):
    """A job with this transmission id is already stored."""


class UnknownTransmissionError(KeyError):
    """No job with this transmission id is stored (never was, or was evicted)."""


class HandedOverError(Exception):
    """The job was handed to another replica since this one took it (its epoch was raised): this
    replica's write about it was dropped."""


class StoreUnavailableError(Exception):
    """The store cannot be reached: Redis is down, too slow, or refuses the password (or the
    disk store's folder is gone); answered with 503."""


class TransmissionStore:
    """Thread-safe store of job records (dicts with at least id, status, created_at) and PNGs."""

    shares_jobs = False  # one process holds every job: no inputs kept, nothing moves elsewhere

    def __init__(
        self,
        root: Path,
        max_items: int,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
        on_finished: Callable[[str], None] | None = None,
    ) -> None:
        """`on_finished(transmission_id)` runs, on the updating thread, each time a job's record is
        written with a finished status (long polls wake on it)."""
        if max_items < 1 or max_age_s <= 0:
            raise ValueError("max_items must be >= 1 and max_age_s > 0")
        self.root = Path(root)
        self.max_items = max_items
        self.max_age_s = max_age_s
        self._clock = clock
        self._on_finished = on_finished
        self._lock = threading.RLock()
        self._index: dict[str, tuple[float, str]] = {}  # id -> (created_at, status)

    def open(self, unfinished_error: str = RESTART_ERROR) -> list[str]:
        """Load the folder, fail what a previous process left unfinished, evict; return those ids."""
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            self._index.clear()
            recovered = []
            for entry in sorted(self.root.iterdir()):
                if not (entry.is_dir() and TRANSMISSION_ID_PATTERN.fullmatch(entry.name)):
                    continue  # not ours: leave it alone
                try:
                    record = json.loads((entry / STATUS_FILE).read_text())
                    created_at, status = float(record["created_at"]), str(record["status"])
                except (OSError, ValueError, KeyError, TypeError):
                    log.warning("removing a job folder without a readable status", extra={"transmission_id": entry.name})
                    shutil.rmtree(entry, ignore_errors=True)
                    continue
                self._index[entry.name] = (created_at, status)
                if status not in FINISHED:
                    self.update(entry.name, status=JobStatus.FAILED.value, error=unfinished_error,
                                finished_at=self._clock())
                    recovered.append(entry.name)
            self.evict()
            return recovered

    def create(self, record: dict[str, Any], job_input: bytes = b"", shared_queue: bool = False) -> None:
        """Store a new job's record; DuplicateTransmissionError if its id is taken. No other
        process could redo the job, so `job_input` is not kept (the Redis store keeps it), and
        there is no shared queue to put it in."""
        if shared_queue:
            raise ValueError("the disk store has no shared queue: a serving replica needs the Redis store")
        transmission_id = validate_transmission_id(record["id"])
        with self._lock:
            if transmission_id in self._index:
                raise DuplicateTransmissionError(transmission_id)
            try:
                self._folder(transmission_id).mkdir(parents=True)
            except FileExistsError:
                raise DuplicateTransmissionError(transmission_id) from None
            self._write_record(transmission_id, record)
            self.evict()

    def contains(self, transmission_id: str) -> bool:
        with self._lock:
            return validate_transmission_id(transmission_id) in self._index

    def get(self, transmission_id: str) -> dict[str, Any]:
        """The job's record; UnknownTransmissionError if none is stored."""
        transmission_id = validate_transmission_id(transmission_id)
        with self._lock:
            if transmission_id not in self._index:
                raise UnknownTransmissionError(transmission_id)
            return json.loads((self._folder(transmission_id) / STATUS_FILE).read_text())

    def update(self, transmission_id: str, epoch: int | None = None, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the record (dicts one level deep) and return the new record. No
        job moves to another process, so `epoch` fences nothing here (see the Redis store)."""
        with self._lock:
            record = self.get(transmission_id)
            for key, value in changes.items():
                if isinstance(value, dict) and isinstance(record.get(key), dict):
                    record[key] = {**record[key], **value}
                else:
                    record[key] = value
            self._write_record(transmission_id, record)
        if self._on_finished is not None and record["status"] in FINISHED:
            self._on_finished(transmission_id)
        return record

    def write_artifact(self, transmission_id: str, name: str, data: bytes, epoch: int | None = None) -> None:
        """Atomically write one of the ARTIFACTS of a stored job (`epoch`: as in `update`)."""
        path = self._artifact(transmission_id, name)
        with self._lock:
            if transmission_id not in self._index:
                raise UnknownTransmissionError(transmission_id)
            _write_atomic(path, data)

    def artifact_path(self, transmission_id: str, name: str) -> Path | None:
        """The artifact's file if it has been written, else None."""
        path = self._artifact(transmission_id, name)
        with self._lock:
            if transmission_id not in self._index:
                raise UnknownTransmissionError(transmission_id)
            return path if path.is_file() else None

    def read_artifact(self, transmission_id: str, name: str) -> bytes | None:
        """The artifact's bytes if it has been written, else None (as the Redis store reads it)."""
        path = self.artifact_path(transmission_id, name)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:  # evicted since the lookup
            raise UnknownTransmissionError(transmission_id) from None

    def request_cancel(self, transmission_id: str, reason: str) -> dict[str, Any]:
        """The record after a cancel: one process holds every job, so the worker's `cancel` has
        already done what the Redis store asks of the replica that holds the job."""
        return self.get(transmission_id)

    def claim(self, limit: int) -> list[tuple[str, bytes, int]]:
        """Nothing to take over: no other process hands jobs back here."""
        return []

    def hand_back(self, transmission_ids: Collection[str]) -> list[str]:
        """Nobody to hand jobs to: they stay queued, and the next open fails them."""
        return []

    def shared_queue_depth(self) -> int:
        """No shared queue: none of its jobs wait in one."""
        return 0

    def set_progress(self, transmission_ids: Collection[str], step: int, steps: int) -> None:
        """Nothing to share: the worker of this one process answers for the step it samples."""

    def set_job_holder(self, held_ids: Callable[[], Collection[str]]) -> None:
        """Nothing to watch: one process holds every job, and the next open fails what it left."""

    def set_progress_listener(self, listener: Callable[[Collection[str], int, int], None]) -> None:
        """Nothing to relay: this one process's queue reports its steps itself."""

    def set_cancel_handler(self, handler: Callable[[str, str], None]) -> None:
        """Nothing to relay: cancels reach this one process's worker directly."""

    def progress(self, transmission_id: str) -> tuple[int, int] | None:
        """Never known here (see set_progress); the status asks the worker."""
        return None

    def check(self) -> None:
        """Readiness: the folder is still there (the Redis store pings Redis)."""
        if not self.root.is_dir():
            raise StoreUnavailableError(f"the store folder {self.root} is gone")

    def close(self) -> list[str]:
        """Nothing to stop (the Redis store stops its threads and fails its unfinished jobs);
        the next open fails what is left unfinished."""
        return []

    def delete(self, transmission_id: str) -> None:
        transmission_id = validate_transmission_id(transmission_id)
        with self._lock:
            self._index.pop(transmission_id, None)
            shutil.rmtree(self._folder(transmission_id), ignore_errors=True)

    def unfinished_ids(self) -> list[str]:
        with self._lock:
            return [tid for tid, (_, status) in self._index.items() if status not in FINISHED]

    def evict(self) -> list[str]:
        """Drop finished jobs older than max_age_s, then the oldest finished beyond max_items."""
        with self._lock:
            oldest_allowed = self._clock() - self.max_age_s
            finished = sorted(
                (created_at, tid) for tid, (created_at, status) in self._index.items() if status in FINISHED
            )
            excess = len(self._index) - self.max_items
            evicted = []
            for created_at, tid in finished:
                if created_at < oldest_allowed or excess > 0:
                    self.delete(tid)
                    evicted.append(tid)
                    excess -= 1
            return evicted

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def _write_record(self, transmission_id: str, record: dict[str, Any]) -> None:
        _write_atomic(self._folder(transmission_id) / STATUS_FILE, json.dumps(record).encode())
        self._index[transmission_id] = (float(record["created_at"]), str(record["status"]))

    def _folder(self, transmission_id: str) -> Path:
        return self.root / validate_transmission_id(transmission_id)

    def _artifact(self, transmission_id: str, name: str) -> Path:
        if name not in ARTIFACTS:
            raise ValueError(f"unknown artifact {name!r}; expected one of {sorted(ARTIFACTS)}")
        return self._folder(transmission_id) / ARTIFACTS[name]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
