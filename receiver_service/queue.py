"""The receiver's job queue: admission, capacity and Retry-After, cancel, and taking jobs.

The frontends admit jobs; a scheduler (schedulers.py) takes them, either as request batches of
one sampling setting (`take_batch`, Triton's dynamic batcher) or one by one into a running step
batch (`take`). Jobs stay held (`held_ids`) from admission until `release`, so a status can show
a running job's sampling step and the shared store can tell a replica's lost jobs from its own.
Each step is also pushed to the progress listeners (the watches' hub) and written to the store
(which a shared store publishes to the other replicas).

With a shared store the queue also takes part in the replicas' common queue: it stores each job's
inputs at admission, takes jobs that other replicas handed back (or left behind dying) whenever a
place is free, ahead of its own (they are older), and hands its waiting jobs back when it closes.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence

from receiver_service.jobs import Job, QueueFullError, decode_job_input, encode_job_input
from receiver_service.store import DuplicateTransmissionError, HandedOverError, JobStatus, StoreUnavailableError
from receiver_service.store_factory import JobStore
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.wire.logging_setup import request_context

log = logging.getLogger("receiver_service.queue")

# Until a job has been timed, a full queue asks clients to come back after this long.
INITIAL_JOB_SECONDS = 5.0
# An idle scheduler applies the store's age limit this often (creating a job applies it too).
EVICT_INTERVAL_S = 60.0
# How long a scheduler with nothing to do waits for a job before it looks again.
IDLE_WAIT_S = 0.2


class JobQueue:
    """Queued jobs, oldest first, bounded by `capacity`, and the jobs held until released."""

    def __init__(self, store: JobStore, capacity: int,
                 generator_for: Callable[[int, str], SemanticImageGenerator] | None = None,
                 forwards: bool = False) -> None:
        """`generator_for(downsample_factor, sampler)` rebuilds the jobs taken from a shared store.
        `forwards`: a serving replica's queue, whose jobs all go to the shared queue (`forward`),
        which `capacity` then bounds."""
        self.store = store
        self.capacity = capacity
        self.forwards = forwards
        self._generator_for = generator_for
        # Guards the collections below; notified when a job arrives or the queue closes.
        self._changed = threading.Condition()
        # A batch takes the oldest and later compatible ones; the others stay in order, so the
        # next batch starts with the oldest left (FIFO, no starvation).
        self._waiting: deque[Job] = deque()
        self._held: dict[str, Job] = {}  # queued or running, by transmission id
        # (step, steps) of the jobs being sampled, by transmission id: the status shows progress.
        self._progress: dict[str, tuple[int, int]] = {}
        self._job_seconds = INITIAL_JOB_SECONDS
        self._closed = threading.Event()
        self._last_evicted = time.monotonic()
        self._progress_listeners: list[Callable[[Collection[str], int, int], None]] = []

    @property
    def depth(self) -> int:
        """Jobs waiting behind the batch being generated (including those left for a later batch)."""
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> list[Job]:
        """Admit no more jobs, take the waiting ones out (no longer held: a shared store hands
        them to the other replicas) and wake the scheduler so that it can finish."""
        self._closed.set()
        with self._changed:
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in waiting:
                self._held.pop(job.transmission_id, None)
            self._changed.notify_all()
        return waiting

    # --- admission ------------------------------------------------------------------------------
    def check_capacity(self) -> int:
        """Raise QueueFullError now, so a full receiver need not read a stream it will refuse; else
        return the jobs waiting (a serving replica's: those in the shared queue)."""
        waiting = self.store.shared_queue_depth() if self.forwards else self.depth
        if waiting >= self.capacity:
            raise QueueFullError(self.retry_after_s())
        return waiting

    def retry_after_s(self) -> int:
        """Seconds until a queue slot is likely free: the recent time per job, at least 1."""
        return max(1, math.ceil(self._job_seconds))

    def job_done(self, seconds: float) -> None:
        """One more job took `seconds` of the sampler's time: what `retry_after_s` tells clients."""
        self._job_seconds = 0.7 * self._job_seconds + 0.3 * seconds

    def admit(self, job: Job, record: dict) -> int:
        """Store the job's record and queue it; return the jobs ahead of it.
        Raises DuplicateTransmissionError or QueueFullError. A shared store keeps the job's
        inputs with its record, before the caller acknowledges the transmission."""
        job_input = encode_job_input(job) if self.store.shares_jobs else b""
        with self._changed:
            if self.store.contains(job.transmission_id):
                raise DuplicateTransmissionError(job.transmission_id)
            self.check_capacity()
            self.store.create(record, job_input)
            ahead = len(self._held)
            self._waiting.append(job)
            self._held[job.transmission_id] = job
            self._changed.notify_all()
        return ahead

    def forward(self, job: Job, record: dict) -> int:
        """A serving replica's admission: store the job, unowned and with its inputs, at the end
        of the shared queue for a sampling replica to claim; return the jobs ahead of it there.
        Raises DuplicateTransmissionError or QueueFullError."""
        ahead = self.check_capacity()
        self.store.create(record, encode_job_input(job), shared_queue=True)
        return ahead

    def cancel(self, transmission_id: str, reason: str) -> None:
        """Cancel a queued or running job (a finished or unknown one is left alone).

        A queued job leaves the queue and is marked cancelled at once; a running one is marked, and
        its scheduler finishes it at its next step (schedulers.py says how each policy does).
        """
        with self._changed:
            job = self._held.get(transmission_id)
            if job is None or job.cancelled:
                return
            job.cancel_reason = reason
            queued = job in self._waiting
            if queued:
                self._waiting.remove(job)
                del self._held[transmission_id]
                try:
                    self.store.update(transmission_id, epoch=job.epoch, status=JobStatus.CANCELLED.value,
                                      error=reason, finished_at=time.time())
                except HandedOverError:  # another replica holds it now: the store's cancel reaches it
                    pass
        with request_context(job.request_id):
            log.info("job cancelled" if queued else "job cancellation requested",
                     extra={"transmission_id": transmission_id, "reason": reason})

    # --- taking ---------------------------------------------------------------------------------
    def take(self, limit: int, block: bool) -> list[Job]:
        """Up to `limit` queued jobs, oldest first, whatever their sampling options (step
        batching); when `block` and none is queued, wait a moment for one."""
        with self._changed:
            self._adopt()
            if block and not self._waiting and not self.closed:
                self._changed.wait(timeout=IDLE_WAIT_S)
            return [self._waiting.popleft() for _ in range(min(limit, len(self._waiting)))]

    def take_batch(self, limit: int, max_delay_s: float) -> list[Job]:
        """The oldest job and up to `limit` - 1 later ones with its sampling options and generator
        (empty when idle).

        As Triton's dynamic batcher: compatible jobs may join until `max_delay_s` after the oldest
        job arrived, so under load (jobs queued while the last batch ran) nobody waits, and alone a
        job waits at most that delay. A full batch leaves at once. Jobs of other settings are held
        back, in order, to open the next batches.
        """
        with self._changed:
            if not self._waiting:
                self._adopt()
            if not self._waiting:
                self._changed.wait(timeout=IDLE_WAIT_S)
                if not self._waiting:
                    return []
            first = self._waiting.popleft()
            batch = [first]
            deadline = first.enqueued_at + max_delay_s
            while True:
                for job in [job for job in self._waiting
                            if job.sampling == first.sampling and job.generator is first.generator]:
                    if len(batch) == limit:
                        break
                    self._waiting.remove(job)
                    batch.append(job)
                remaining = deadline - time.monotonic()
                if len(batch) == limit or remaining <= 0 or self.closed:
                    self._adopt()  # the places this batch freed go to handed-back jobs first
                    return batch
                self._changed.wait(remaining)

    def _adopt(self) -> None:
        """Take handed-back jobs from a shared store into the free places, ahead of the waiting
        ones (called with the lock held). Best effort: with the store unreachable, later."""
        room = self.capacity - len(self._waiting)
        if not self.store.shares_jobs or self._generator_for is None or self.closed or room < 1:
            return
        try:
            claimed = self.store.claim(room)
        except StoreUnavailableError as error:
            log.debug("handed-back jobs not taken", extra={"error": str(error)})
            return
        adopted = []
        for transmission_id, data, epoch in claimed:
            try:
                job = decode_job_input(transmission_id, data, epoch, self._generator_for)
            except ValueError as error:
                log.error("a handed-back job cannot be rebuilt", extra={"transmission_id": transmission_id,
                                                                         "error": str(error)})
                try:
                    self.store.update(transmission_id, epoch=epoch, status=JobStatus.FAILED.value,
                                      error=f"the job's stored inputs are unreadable: {error}",
                                      finished_at=time.time())
                except (StoreUnavailableError, HandedOverError):  # still owned here, or taken on: not ours
                    pass
                continue
            adopted.append(job)
            self._held[transmission_id] = job
        self._waiting.extendleft(reversed(adopted))

    def idle(self) -> None:
        """Nothing to sample: apply the store's age limit now and then."""
        if time.monotonic() - self._last_evicted > EVICT_INTERVAL_S:
            self.store.evict()
            self._last_evicted = time.monotonic()

    # --- held jobs ------------------------------------------------------------------------------
    def add_progress_listener(self, listener: Callable[[Collection[str], int, int], None]) -> None:
        """`listener(transmission_ids, step, steps)` runs on the sampling thread at every step: it
        must return at once (the watches' hub hands the step to its event loop)."""
        self._progress_listeners.append(listener)

    def set_progress(self, jobs: Sequence[Job], step: int, steps: int) -> None:
        """Jobs that have started sampling step `step` (1-based) of `steps`."""
        transmission_ids = [job.transmission_id for job in jobs]
        for transmission_id in transmission_ids:
            self._progress[transmission_id] = (step, steps)
        for listener in self._progress_listeners:
            try:
                listener(transmission_ids, step, steps)
            except Exception:  # noqa: BLE001 - a listener never stops the sampling
                log.exception("a progress listener failed")
        self.store.set_progress(transmission_ids, step, steps)  # for the other replicas

    def progress(self, transmission_id: str) -> tuple[int, int] | None:
        """(step, steps) of a job this process is sampling now, else None."""
        return self._progress.get(transmission_id)

    def held_ids(self) -> set[str]:
        """The ids of the jobs held in memory (queued or running): the shared store fails a job
        of this replica that is unfinished there but no longer held here."""
        with self._changed:
            return set(self._held)

    def release(self, job: Job) -> None:
        """The job has finished: it is no longer held."""
        with self._changed:
            self._held.pop(job.transmission_id, None)
            self._progress.pop(job.transmission_id, None)
