"""Shared job store in Redis: what `store.TransmissionStore` keeps on disk, seen by every replica.

Receiver replicas behind one channel share one Redis, so any of them answers status, image, maps
and cancel for any transmission, and a long poll wakes on whichever replica sees the job finish
(finishes are published on a pub/sub channel and reach every replica's `on_finished`). So does a
watch: the sampling steps are published too, one message per step of a batch (naming its jobs)
sent with the step's write, and reach the other replicas' progress listener. Keys, all under one
prefix:

    tx:{id}        hash: record (the status JSON), status, owner ("" while in `pending`), epoch,
                   input (what redoing the job needs, until it finishes), one field per artifact PNG
    index          sorted set of the stored ids by created_at (the count bound)
    finished       sorted set of the finished ids by created_at (the eviction order)
    lease:{owner}  the owner's lease: expires lease_s after its last renewal
    owned:{owner}  the owner's queued and running ids (its processing set)
    owners         the owners that may hold jobs
    pending        list of the ids handed back, oldest first, for any replica to take

Ownership and hand-over, a reliable queue: the replica that creates a job owns it and stores its
inputs (the received symbols, compressed) with the record before the channel is acknowledged. A
thread renews the replica's lease every lease_s / 3 and sweeps the owners whose lease has expired:
their queued and running jobs go back to `queued`, unowned, at the end of `pending`, in the
transaction that takes them out of the owner's `owned` set. Live replicas `claim` from the head of
`pending` when their queue has room, in one script that pops an id and adds it to their own `owned`
set, so an id is always in `pending` or in exactly one processing set, never in neither; the
claimer rebuilds the job from its inputs and samples it from the start. A replica stopped with
SIGTERM hands its unfinished jobs back the same way, and so does a restart under the same replica
id with what its predecessor left. A job without stored inputs (none was given) ends failed
instead.

Fencing: every hand-over raises the record's `epoch`, and the claimer holds the job at that epoch.
Every write of a job's progress, images and end names the epoch it holds, and is dropped unless it
is still the record's (checked under WATCH, in the same transaction as the write). A replica
presumed dead that finishes anyway (it was starved, or lost Redis for longer than its lease) thus
cannot record a result: each transmission finishes exactly once, by its last holder. A failed or
cancelled record is final.

Bounds as on disk: finished jobs older than max_age_s go first, then the oldest finished beyond
max_items, never an unfinished one; Redis also expires each finished record at the end of its age
should no replica be left to evict it. Redis unreachable (down, too slow, wrong password): every
call raises StoreUnavailableError, answered with 503; the client reconnects by itself once Redis
answers again.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry

from receiver_service.store import (
    ARTIFACTS,
    FINISHED,
    RESTART_ERROR,
    DuplicateTransmissionError,
    HandedOverError,
    JobStatus,
    StoreUnavailableError,
    UnknownTransmissionError,
)
from shared.wire.transport import validate_transmission_id

log = logging.getLogger("receiver_service.redis_store")

LEASE_EXPIRED_ERROR = "receiver replica {owner} stopped renewing its lease before the job finished (it died or lost Redis)"
STOPPED_ERROR = "receiver replica {owner} stopped before the job finished"
LOST_ERROR = "the receiver lost the job: its end could not be stored while Redis was unreachable"
# Statuses after which nothing is written to a record any more (done may still gain artifacts).
FINAL = frozenset({JobStatus.FAILED.value, JobStatus.CANCELLED.value})
MAX_WATCH_RETRIES = 100  # optimistic transactions retried this often before giving up
REPLICA_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Evicts as TransmissionStore.evict does: finished ids older than the cutoff (a prefix of the
# finished set, by created_at), then the next oldest finished ones while the count is above the
# bound. One script, so concurrent replicas never evict more than the bound asks.
# KEYS: index, finished. ARGV: cutoff (exclusive), max_items, record key prefix.
_EVICT_SCRIPT = """
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
local excess = redis.call('ZCARD', KEYS[1]) - #old - tonumber(ARGV[2])
local victims = old
if excess > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], #old, #old + excess - 1)) do
    table.insert(victims, id)
  end
end
for _, id in ipairs(victims) do
  redis.call('DEL', ARGV[3] .. id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return victims
"""

# Sets a field of a record that still exists (never recreates an evicted one as a bare hash).
# KEYS: the record. ARGV: field, value.
_SET_IF_STORED_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
"""

# Takes up to ARGV[3] ids from the head of `pending` into this replica's processing set: each one
# still unfinished and unowned is owned by ARGV[2] at a raised epoch; the others (cancelled or
# evicted while they waited) are dropped from the list. The lease is renewed with the first claim.
# KEYS: pending, owned:{replica}, lease:{replica}, owners. ARGV: record key prefix, replica id,
# limit, lease token, lease ms. Returns [id, input, epoch] for each job taken.
_CLAIM_SCRIPT = """
local claimed = {}
local limit = tonumber(ARGV[3])
while #claimed < limit do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  local key = ARGV[1] .. id
  local fields = redis.call('HMGET', key, 'status', 'owner', 'input')
  if (fields[1] == 'queued' or fields[1] == 'running') and fields[2] == '' and fields[3] then
    local epoch = redis.call('HINCRBY', key, 'epoch', 1)
    redis.call('HSET', key, 'owner', ARGV[2])
    redis.call('SADD', KEYS[2], id)
    table.insert(claimed, {id, fields[3], epoch})
  end
end
if #claimed > 0 then
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
  redis.call('SADD', KEYS[4], ARGV[2])
end
return claimed
"""

T = TypeVar("T")


class RedisStoreSettings(BaseSettings):
    """Where the shared store lives (GESCO_RECEIVER_REDIS_*); no URL: the embedded disk store."""

    model_config = SettingsConfigDict(env_prefix="GESCO_RECEIVER_REDIS_", extra="ignore")

    url: str = ""  # redis://host:6379/0, rediss:// for TLS, unix:///path.sock; empty: no Redis
    # Kept out of the URL, so that logs and manifests never show it (a Secret in Kubernetes).
    password: SecretStr = SecretStr("")
    key_prefix: str = Field("gesco:receiver:", min_length=1, max_length=100)
    # A dead replica's jobs are handed to the others within 4/3 of this; a Redis outage longer
    # than this hands over the jobs of the replicas that could not renew in time (their late
    # results are then dropped: the jobs run again elsewhere).
    lease_s: float = Field(10.0, ge=0.5, le=600.0)
    socket_timeout_s: float = Field(2.0, gt=0, le=60.0)
    # Unique among live replicas; a restart under the same id hands its predecessor's jobs back at
    # once. Empty: hostname-pid (a pod's name and PID 1 in Kubernetes).
    replica_id: str = ""

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {value[:40]!r}")
        return value

    @field_validator("replica_id")
    @classmethod
    def _safe_replica_id(cls, value: str) -> str:
        if value and not REPLICA_ID_PATTERN.fullmatch(value):
            raise ValueError(f"must be 1-128 characters of A-Z a-z 0-9 . _ -, got {value[:40]!r}")
        return value


def connect(settings: RedisStoreSettings) -> redis.Redis:
    """A client that fails fast while Redis is down (a couple of short retries, then an error)."""
    password = settings.password.get_secret_value()
    return redis.Redis.from_url(
        settings.url,
        password=password or None,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        health_check_interval=max(1, int(settings.lease_s)),
    )


@contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except redis.RedisError as error:
        raise StoreUnavailableError(f"Redis: {type(error).__name__}: {error}") from error


class RedisTransmissionStore:
    """TransmissionStore's interface over Redis, with job ownership by lease; thread-safe.

    Differences to the disk store: artifacts are read with `read_artifact` (there is no file
    path); `open` starts the lease and pub/sub threads and `close` stops them; `check` tells
    whether Redis answers; `request_cancel` reaches the replica that runs a job; jobs move between
    replicas (`claim`, `hand_back`) and their writes are fenced by epoch.
    """

    shares_jobs = True  # jobs are stored with their inputs and may move to another replica

    def __init__(
        self,
        client: redis.Redis,
        max_items: int,
        max_age_s: float,
        *,
        key_prefix: str = "gesco:receiver:",
        lease_s: float = 10.0,
        replica_id: str = "",
        clock: Callable[[], float] = time.time,
        on_finished: Callable[[str], None] | None = None,
    ) -> None:
        """`on_finished(transmission_id)` runs each time a job finishes on any replica: on the
        updating thread for this replica's updates, on the pub/sub thread for the others'."""
        if max_items < 1 or max_age_s <= 0 or lease_s <= 0:
            raise ValueError("max_items must be >= 1, max_age_s > 0 and lease_s > 0")
        self.max_items = max_items
        self.max_age_s = max_age_s
        self.lease_s = lease_s
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self._client = client
        self._prefix = key_prefix
        self._clock = clock
        self._on_finished = on_finished
        self._on_cancel: Callable[[str, str], None] | None = None
        self._held_ids: Callable[[], Collection[str]] | None = None
        self._suspects: set[str] = set()  # owned but not held at the last check
        self._token = uuid.uuid4().hex  # marks this process's own pub/sub messages
        self._finished_channel = f"{key_prefix}finished"
        self._cancel_channel = f"{key_prefix}cancel"
        self._progress_channel = f"{key_prefix}progress"
        self._on_progress: Callable[[Collection[str], int, int], None] | None = None
        self._evict_script = client.register_script(_EVICT_SCRIPT)
        self._set_if_stored = client.register_script(_SET_IF_STORED_SCRIPT)
        self._claim_script = client.register_script(_CLAIM_SCRIPT)
        self._unfinished_error = RESTART_ERROR
        self._registered = False
        self._register_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connected_since: float | None = None  # monotonic time of the first renewal after an outage

    @classmethod
    def from_settings(
        cls,
        settings: RedisStoreSettings,
        max_items: int,
        max_age_s: float,
        on_finished: Callable[[str], None] | None = None,
    ) -> RedisTransmissionStore:
        return cls(connect(settings), max_items, max_age_s, key_prefix=settings.key_prefix,
                   lease_s=settings.lease_s, replica_id=settings.replica_id, on_finished=on_finished)

    # ------------------------------------------------------------------------------- lifecycle

    def open(self, unfinished_error: str = RESTART_ERROR) -> list[str]:
        """Hand back what an earlier process with this replica id left unfinished (failing what
        has no stored inputs), take the lease and start the lease and pub/sub threads; return the
        failed ids. With Redis down this returns [] and the lease thread does the same once Redis
        answers (the process still starts)."""
        self._unfinished_error = unfinished_error
        recovered: list[str] = []
        try:
            recovered = self._register()
        except StoreUnavailableError as error:
            log.warning("Redis unavailable at start; retrying in the background", extra={"error": str(error)})
        for target, name in ((self._maintain, "store-lease"), (self._listen, "store-pubsub")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return recovered

    def close(self) -> list[str]:
        """Stop the threads, hand this replica's unfinished jobs to the others (failing those
        without stored inputs) and drop its lease; return the failed ids ([] with Redis down: the
        lease then expires and another replica hands them over)."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        failed: list[str] = []
        try:
            with _redis_errors():
                failed = self._release_owner_jobs(self.replica_id, STOPPED_ERROR.format(owner=self.replica_id),
                                                  only_if_expired=False)
                self._client.delete(self._key("lease", self.replica_id))
        except StoreUnavailableError as error:
            log.warning("Redis unavailable at shutdown; the lease will expire", extra={"error": str(error)})
        self._client.close()
        return failed

    def check(self) -> None:
        """Raise StoreUnavailableError unless Redis answers (readiness)."""
        with _redis_errors():
            self._client.ping()

    def set_job_holder(self, held_ids: Callable[[], Collection[str]]) -> None:
        """`held_ids()` lists the jobs the worker holds in memory (queued or running). A record of
        this replica still unfinished while the worker has held it on no two checks in a row
        (its end was not stored: Redis was down then) ends failed, not running for ever."""
        self._held_ids = held_ids

    def set_progress_listener(self, listener: Callable[[Collection[str], int, int], None]) -> None:
        """`listener(transmission_ids, step, steps)` runs on the pub/sub thread for each sampling
        step of the other replicas' jobs (this replica's queue reports its own)."""
        self._on_progress = listener

    def set_cancel_handler(self, handler: Callable[[str, str], None]) -> None:
        """`handler(transmission_id, reason)` runs on the pub/sub thread when another replica
        asks to cancel a job (the worker's `cancel`, which ignores jobs it does not hold)."""
        self._on_cancel = handler

    # ----------------------------------------------------------------------------- records

    def create(self, record: dict[str, Any], job_input: bytes = b"", shared_queue: bool = False) -> None:
        """Store a new job's record, owned by this replica at epoch 0, with `job_input` (what
        another replica needs to redo it); DuplicateTransmissionError if its id is taken.
        `shared_queue` (a serving replica's job): unowned instead, at the end of `pending`, for
        a sampling replica to claim."""
        transmission_id = validate_transmission_id(record["id"])
        created_at, status = float(record["created_at"]), str(record["status"])
        if shared_queue and not (job_input and status == JobStatus.QUEUED.value):
            raise ValueError("a job for the shared queue must be queued and carry its inputs")
        self._register()
        key = self._record_key(transmission_id)
        owner = "" if shared_queue else self.replica_id

        def put(pipe: Pipeline) -> None:
            if pipe.exists(key):
                raise DuplicateTransmissionError(transmission_id)
            pipe.multi()
            pipe.hset(key, mapping={"owner": owner, "epoch": 0, **({"input": job_input} if job_input else {})})
            pipe.zadd(self._key("index"), {transmission_id: created_at})
            if shared_queue:
                pipe.rpush(self._key("pending"), transmission_id)
            elif status not in FINISHED:  # a live lease and a listed owner, or a sweep would miss it
                pipe.set(self._key("lease", self.replica_id), self._token, px=self._lease_ms)
                pipe.sadd(self._key("owners"), self.replica_id)
                pipe.sadd(self._key("owned", self.replica_id), transmission_id)
            self._queue_write(pipe, transmission_id, record, owner, announce=False)

        with _redis_errors():
            self._transact(put, key)
        self.evict()

    def contains(self, transmission_id: str) -> bool:
        key = self._record_key(transmission_id)
        with _redis_errors():
            return bool(self._client.exists(key))

    def get(self, transmission_id: str) -> dict[str, Any]:
        """The job's record; UnknownTransmissionError if none is stored."""
        key = self._record_key(transmission_id)
        with _redis_errors():
            raw = self._client.hget(key, "record")
        if raw is None:
            raise UnknownTransmissionError(transmission_id)
        return json.loads(raw)

    def update(self, transmission_id: str, epoch: int | None = None, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the record (dicts one level deep) and return the new record; a
        failed or cancelled record stays as it is (and is returned). With `epoch`, the write of a
        replica that holds the job at that epoch: HandedOverError once another one holds it."""
        key = self._record_key(transmission_id)

        def change(pipe: Pipeline) -> tuple[dict[str, Any], bool]:
            raw, owner, stored_epoch = pipe.hmget(key, "record", "owner", "epoch")
            if raw is None:
                raise UnknownTransmissionError(transmission_id)
            self._check_holds(transmission_id, stored_epoch, epoch)
            record = json.loads(raw)
            if record["status"] in FINAL:
                return record, False
            for name, value in changes.items():
                if isinstance(value, dict) and isinstance(record.get(name), dict):
                    record[name] = {**record[name], **value}
                else:
                    record[name] = value
            pipe.multi()
            self._queue_write(pipe, transmission_id, record, owner.decode() if owner else "")
            return record, True

        with _redis_errors():
            record, written = self._transact(change, key)
        if not written:
            log.warning("update of a finished record dropped",
                        extra={"transmission_id": transmission_id, "status": record["status"],
                               "changes": sorted(changes)})
        elif record["status"] in FINISHED:
            self._notify_finished(transmission_id)
        return record

    def request_cancel(self, transmission_id: str, reason: str) -> dict[str, Any]:
        """Cancel a job whichever replica holds it; return its record. A queued job is marked
        cancelled here at once; the owner (reached over pub/sub) drops it from its queue, or
        stops a running one at its next sampling step. A finished job is left alone."""
        key = self._record_key(transmission_id)

        def cancel(pipe: Pipeline) -> tuple[dict[str, Any], bool]:
            raw, owner = pipe.hmget(key, "record", "owner")
            if raw is None:
                raise UnknownTransmissionError(transmission_id)
            record = json.loads(raw)
            if record["status"] in FINISHED:
                return record, False
            pipe.multi()
            if record["status"] == JobStatus.QUEUED.value:
                record.update(status=JobStatus.CANCELLED.value, error=reason, finished_at=self._clock())
                self._queue_write(pipe, transmission_id, record, owner.decode() if owner else "")
            pipe.publish(self._cancel_channel, json.dumps({"id": transmission_id, "reason": reason,
                                                           "from": self._token}))
            return record, record["status"] in FINISHED

        with _redis_errors():
            record, finished = self._transact(cancel, key)
        if finished:
            self._notify_finished(transmission_id)
        return record

    def write_artifact(self, transmission_id: str, name: str, data: bytes, epoch: int | None = None) -> None:
        """Store one of the ARTIFACTS of a stored job (dropped if the job failed or was cancelled;
        `epoch` as in `update`)."""
        key, field = self._record_key(transmission_id), self._artifact_field(name)

        def put(pipe: Pipeline) -> bool:
            status, stored_epoch = pipe.hmget(key, "status", "epoch")
            if status is None:
                raise UnknownTransmissionError(transmission_id)
            self._check_holds(transmission_id, stored_epoch, epoch)
            if status.decode() in FINAL:
                return False
            pipe.multi()
            pipe.hset(key, field, data)
            return True

        with _redis_errors():
            if not self._transact(put, key):
                log.warning("artifact of a failed or cancelled job dropped",
                            extra={"transmission_id": transmission_id, "artifact": name})

    def read_artifact(self, transmission_id: str, name: str) -> bytes | None:
        """The artifact's bytes if it has been written, else None."""
        key, field = self._record_key(transmission_id), self._artifact_field(name)
        with _redis_errors():
            status, data = self._client.hmget(key, "status", field)
        if status is None:
            raise UnknownTransmissionError(transmission_id)
        return data

    def set_progress(self, transmission_ids: Collection[str], step: int, steps: int) -> None:
        """Record the sampling step of running jobs, so that every replica's status shows it, and
        publish it, one message for the jobs of the step, in the same round trip, so that the other
        replicas' watches follow it. Best effort: with Redis down the step is skipped, never the
        sampling."""
        ids = list(transmission_ids)
        keys = [self._record_key(transmission_id) for transmission_id in ids]
        try:
            with _redis_errors():
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    self._set_if_stored(keys=[key], args=["progress", f"{step}/{steps}"], client=pipe)
                if ids:
                    pipe.publish(self._progress_channel, json.dumps({"ids": ids, "step": step, "steps": steps,
                                                                     "from": self._token}))
                pipe.execute()
        except StoreUnavailableError as error:
            log.debug("sampling progress not stored", extra={"error": str(error)})

    def progress(self, transmission_id: str) -> tuple[int, int] | None:
        """(step, steps) last recorded for the job, or None."""
        key = self._record_key(transmission_id)
        with _redis_errors():
            raw = self._client.hget(key, "progress")
        if raw is None:
            return None
        step, steps = raw.decode().split("/")
        return int(step), int(steps)

    def delete(self, transmission_id: str) -> None:
        key = self._record_key(transmission_id)
        with _redis_errors():
            owner = self._client.hget(key, "owner")
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(key)
            pipe.zrem(self._key("index"), transmission_id)
            pipe.zrem(self._key("finished"), transmission_id)
            if owner:
                pipe.srem(self._key("owned", owner.decode()), transmission_id)
            pipe.execute()

    def unfinished_ids(self) -> list[str]:
        with _redis_errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.zrange(self._key("index"), 0, -1)
            pipe.zrange(self._key("finished"), 0, -1)
            stored, finished = pipe.execute()
        done = set(finished)
        return [member.decode() for member in stored if member not in done]

    def evict(self) -> list[str]:
        """Drop finished jobs older than max_age_s, then the oldest finished beyond max_items."""
        cutoff = self._clock() - self.max_age_s
        with _redis_errors():
            evicted = self._evict_script(keys=[self._key("index"), self._key("finished")],
                                         args=[repr(cutoff), self.max_items, self._key("tx", "")])
        return [member.decode() for member in evicted]

    def __len__(self) -> int:
        with _redis_errors():
            return int(self._client.zcard(self._key("index")))

    # ---------------------------------------------------------------------------- leases

    def sweep(self) -> list[str]:
        """Hand the queued and running jobs of every other replica whose lease has expired to the
        shared queue (failing those without stored inputs); return the failed ids."""
        failed: list[str] = []
        with _redis_errors():
            for member in self._client.smembers(self._key("owners")):
                owner = member.decode()
                if owner != self.replica_id:
                    failed += self._release_owner_jobs(owner, LEASE_EXPIRED_ERROR.format(owner=owner),
                                                       only_if_expired=True)
        return failed

    def claim(self, limit: int) -> list[tuple[str, bytes, int]]:
        """Take up to `limit` handed-back jobs, oldest first: (id, inputs, epoch) of each, now
        owned by this replica at that epoch."""
        if limit < 1:
            return []
        self._register()
        with _redis_errors():
            claimed = self._claim_script(
                keys=[self._key("pending"), self._key("owned", self.replica_id), self._key("lease", self.replica_id),
                      self._key("owners")],
                args=[self._key("tx", ""), self.replica_id, limit, self._token, self._lease_ms])
        jobs = [(member.decode(), bytes(data), int(epoch)) for member, data, epoch in claimed]
        if jobs:
            log.info("took over handed-back jobs", extra={"transmission_ids": [job[0] for job in jobs]})
        return jobs

    def shared_queue_depth(self) -> int:
        """Jobs in `pending`, waiting for a sampling replica to claim them."""
        with _redis_errors():
            return int(self._client.llen(self._key("pending")))

    def hand_back(self, transmission_ids: Collection[str]) -> list[str]:
        """Give this replica's jobs back to the shared queue (it stops; they have not started);
        one without stored inputs ends failed. Return the ids handed back."""
        reason = STOPPED_ERROR.format(owner=self.replica_id)
        handed = [transmission_id for transmission_id in transmission_ids
                  if self._release_own(transmission_id, reason) == JobStatus.QUEUED.value]
        if handed:
            log.info("handed jobs back", extra={"transmission_ids": handed})
        return handed

    def _register(self) -> list[str]:
        """Once per process, before its first job: hand back the jobs a predecessor with this
        replica id left, then take the lease."""
        with self._register_lock:
            if self._registered:
                return []
            with _redis_errors():
                recovered = self._release_owner_jobs(self.replica_id, self._unfinished_error, only_if_expired=False)
                self._renew()
            self._registered = True
        if recovered:
            log.warning("marked unfinished jobs of this replica's previous run failed",
                        extra={"transmission_ids": recovered})
        return recovered

    def _renew(self) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._key("lease", self.replica_id), self._token, px=self._lease_ms)
        pipe.sadd(self._key("owners"), self.replica_id)
        pipe.execute()

    def _release_owner_jobs(self, owner: str, reason: str, only_if_expired: bool) -> list[str]:
        """Hand the owner's unfinished jobs back (failing those without inputs) and forget the
        owner, in one transaction that is retried if the owner renews its lease or takes a job
        meanwhile; return the failed ids."""
        lease_key, owned_key = self._key("lease", owner), self._key("owned", owner)

        def release(pipe: Pipeline) -> dict[str, str]:
            if only_if_expired and pipe.exists(lease_key):
                return {}
            ids = sorted(member.decode() for member in pipe.smembers(owned_key))
            keys = [self._record_key(transmission_id) for transmission_id in ids]
            if keys:
                pipe.watch(*keys)
            reads = [(pipe.hget(key, "record"), pipe.hexists(key, "input")) for key in keys]
            pipe.multi()
            ends = {}
            for transmission_id, (raw, has_input) in zip(ids, reads):
                record = json.loads(raw) if raw is not None else None
                if record is None or record["status"] in FINISHED:
                    continue
                ends[transmission_id] = self._queue_release(pipe, transmission_id, record, owner, has_input, reason)
            pipe.delete(owned_key)
            pipe.srem(self._key("owners"), owner)
            return ends

        return self._report_releases(self._transact(release, lease_key, owned_key), owner)

    def _release_own(self, transmission_id: str, reason: str) -> str | None:
        """Hand back (or fail) one unfinished job this replica owns; its new status, else None."""
        key = self._record_key(transmission_id)

        def release(pipe: Pipeline) -> dict[str, str]:
            raw, owner = pipe.hmget(key, "record", "owner")
            record = json.loads(raw) if raw is not None else None
            if record is None or record["status"] in FINISHED or owner != self.replica_id.encode():
                return {}
            has_input = pipe.hexists(key, "input")
            pipe.multi()
            return {transmission_id: self._queue_release(pipe, transmission_id, record, self.replica_id,
                                                         has_input, reason)}

        with _redis_errors():
            ends = self._transact(release, key)
        self._report_releases(ends, self.replica_id)
        return ends.get(transmission_id)

    def _queue_release(self, pipe: Pipeline, transmission_id: str, record: dict[str, Any], owner: str,
                       has_input: bool, reason: str) -> str:
        """Queue (inside MULTI) the hand-back of an unfinished job: queued again, unowned, at a
        raised epoch (fencing its last holder off), at the end of `pending`; without inputs to
        redo it from, it fails with `reason`. Return the new status."""
        key = self._key("tx", transmission_id)
        if not has_input:
            record.update(status=JobStatus.FAILED.value, error=reason, finished_at=self._clock())
            self._queue_write(pipe, transmission_id, record, owner)
            return JobStatus.FAILED.value
        record.update(status=JobStatus.QUEUED.value, started_at=None, timings_ms={},
                      handovers=int(record.get("handovers", 0)) + 1)
        self._queue_write(pipe, transmission_id, record, owner)
        pipe.hset(key, "owner", "")
        pipe.hincrby(key, "epoch", 1)
        pipe.hdel(key, "progress")
        pipe.srem(self._key("owned", owner), transmission_id)
        pipe.rpush(self._key("pending"), transmission_id)
        return JobStatus.QUEUED.value

    def _report_releases(self, ends: dict[str, str], owner: str) -> list[str]:
        """Log the jobs handed back and wake the waiters of those that failed; return the failed."""
        handed = [transmission_id for transmission_id, status in ends.items() if status == JobStatus.QUEUED.value]
        failed = [transmission_id for transmission_id, status in ends.items() if status == JobStatus.FAILED.value]
        if handed:
            log.warning("handed the unfinished jobs of a replica to the shared queue",
                        extra={"owner": owner, "transmission_ids": handed})
        if failed:
            log.warning("failed unfinished jobs that had no stored inputs",
                        extra={"owner": owner, "transmission_ids": failed})
        for transmission_id in failed:
            self._notify_finished(transmission_id)
        return failed

    def _release_lost_jobs(self) -> list[str]:
        """Hand back this replica's unfinished jobs that the worker no longer holds (their end
        could not be stored: see set_job_holder), to be redone; return the ids."""
        if self._held_ids is None:
            return []
        with _redis_errors():
            owned = {member.decode() for member in self._client.smembers(self._key("owned", self.replica_id))}
        lost = owned - set(self._held_ids())  # read after `owned`: a job created since is in neither
        confirmed, self._suspects = lost & self._suspects, lost - self._suspects
        return [transmission_id for transmission_id in sorted(confirmed)
                if self._release_own(transmission_id, LOST_ERROR) is not None]

    @staticmethod
    def _check_holds(transmission_id: str, stored_epoch: bytes | None, epoch: int | None) -> None:
        """HandedOverError unless a write made holding the job at `epoch` (None: not fenced) may go
        to a record at `stored_epoch` (every hand-over raises it)."""
        if epoch is not None and (stored_epoch is None or int(stored_epoch) != epoch):
            raise HandedOverError(f"transmission {transmission_id} is held at epoch "
                                  f"{stored_epoch.decode() if stored_epoch else 'none'}, not {epoch}")

    def _maintain(self) -> None:
        """Renew the lease every lease_s / 3 and sweep expired ones. After an outage a replica
        sweeps only once it has been connected for a whole lease, so that the others have had
        the time to renew theirs before it judges them."""
        outage = False
        while not self._stopping.wait(self.lease_s / 3):
            try:
                self._register()
                with _redis_errors():
                    self._renew()
                now = time.monotonic()
                if self._connected_since is None:
                    self._connected_since = now
                if outage:
                    log.info("Redis answers again")
                    outage = False
                if now - self._connected_since >= self.lease_s:
                    self.sweep()
                self._release_lost_jobs()
            except StoreUnavailableError as error:
                self._connected_since = None
                if not outage:
                    log.warning("Redis unavailable: lease not renewed", extra={"error": str(error)})
                    outage = True
            except Exception:  # noqa: BLE001 - the lease thread must outlive any one bad round
                log.exception("lease maintenance failed")

    # --------------------------------------------------------------------------- pub/sub

    def _listen(self) -> None:
        """Deliver other replicas' finishes, steps and cancel requests; resubscribe after an
        outage (a finish published while unsubscribed wakes no one: the long poll then answers at
        its timeout with the status then, a watch when it next reads the store)."""
        backoff = 0.1
        while not self._stopping.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._finished_channel, self._cancel_channel, self._progress_channel)
                backoff = 0.1
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self._dispatch(message)
            except redis.RedisError as error:
                log.debug("pub/sub connection lost", extra={"error": str(error)})
                self._stopping.wait(backoff)
                backoff = min(2 * backoff, 2.0)
            finally:
                pubsub.close()

    def _dispatch(self, message: dict[str, Any]) -> None:
        try:
            data = json.loads(message["data"])
            if data.get("from") == self._token:
                return  # this replica's own: already handled where it was written
            channel = message["channel"].decode()
            if channel == self._progress_channel:
                if self._on_progress is not None:
                    ids = [validate_transmission_id(transmission_id) for transmission_id in data["ids"]]
                    self._on_progress(ids, int(data["step"]), int(data["steps"]))
                return
            transmission_id = validate_transmission_id(data["id"])
            if channel == self._finished_channel:
                self._notify_finished(transmission_id)
            elif channel == self._cancel_channel and self._on_cancel is not None:
                self._on_cancel(transmission_id, str(data.get("reason", ""))[:300])
        except Exception:  # noqa: BLE001 - one bad message or handler must not stop the listener
            log.exception("handling a pub/sub message failed")

    # --------------------------------------------------------------------------- helpers

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _record_key(self, transmission_id: str) -> str:
        return self._key("tx", validate_transmission_id(transmission_id))

    @staticmethod
    def _artifact_field(name: str) -> str:
        if name not in ARTIFACTS:
            raise ValueError(f"unknown artifact {name!r}; expected one of {sorted(ARTIFACTS)}")
        return f"artifact:{name}"

    def _queue_write(
        self, pipe: Pipeline, transmission_id: str, record: dict[str, Any], owner: str, announce: bool = True
    ) -> None:
        """Queue (inside MULTI) the writes of a record; a finished one leaves its owner's jobs,
        joins the eviction order, expires at the end of its age and, unless it is being created,
        is announced (as the disk store reports finishes of updates only)."""
        key = self._key("tx", transmission_id)
        status = str(record["status"])
        pipe.hset(key, mapping={"record": json.dumps(record), "status": status})
        if status in FINISHED:
            pipe.hdel(key, "input")
            created_at = float(record["created_at"])
            pipe.zadd(self._key("finished"), {transmission_id: created_at})
            if owner:
                pipe.srem(self._key("owned", owner), transmission_id)
            pipe.pexpire(key, max(1, round((created_at + self.max_age_s - self._clock()) * 1000)))
            if announce:
                pipe.publish(self._finished_channel, json.dumps({"id": transmission_id, "from": self._token}))

    def _notify_finished(self, transmission_id: str) -> None:
        if self._on_finished is not None:
            self._on_finished(transmission_id)

    def _transact(self, func: Callable[[Pipeline], T], *watched: str) -> T:
        """Run `func` under WATCH `watched`: it reads, then calls pipe.multi() and queues its
        writes (or returns without writing); retried while a watched key changes under it."""
        with self._client.pipeline(transaction=True) as pipe:
            for _ in range(MAX_WATCH_RETRIES):
                try:
                    pipe.watch(*watched)
                    result = func(pipe)
                    if pipe.explicit_transaction:
                        pipe.execute()
                    else:
                        pipe.reset()
                    return result
                except redis.WatchError:
                    continue
        raise StoreUnavailableError(f"Redis: {MAX_WATCH_RETRIES} conflicting writes in a row on {watched[0]}")
