"""Finishing jobs: mark them running, then encode, store and meter what sampling produced.

The schedulers hand every job they take to `begin` and, once it has an outcome, to `complete`.
A sampled image is finished (stages after sampling, PNGs) and stored by a small thread pool while
the sampling thread goes on (`encode_workers`; 0 does it in line). A job leaves the queue's held
jobs only once its final status is stored.

Every write names the epoch at which this replica holds the job, so a shared store drops it once
the job has been handed to another replica. While the store is unreachable a job's end is retried
for a while, so a short Redis outage costs no job its result.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict

from receiver_service.jobs import Job, JobResult
from receiver_service.model_host import ModelHost
from receiver_service.queue import JobQueue
from receiver_service.store import HandedOverError, JobStatus, StoreUnavailableError
from shared.wire.logging_setup import request_context
from shared.wire.monitoring import ServiceMetrics

log = logging.getLogger("receiver_service.completion")

# How long a job's end is retried while the store is unreachable, and how often; beyond that the
# shared store hands the job back once it answers (it is redone), the disk store keeps it running.
STORE_RETRY_S = 60.0
STORE_RETRY_INTERVAL_S = 0.5


class Completion:
    """Records each job's start and end in the store and the metrics."""

    def __init__(self, queue: JobQueue, host: ModelHost, encode_workers: int,
                 metrics: ServiceMetrics | None = None) -> None:
        self.queue = queue
        self.store = queue.store
        self.host = host
        self.metrics = metrics
        self._encoder = ThreadPoolExecutor(encode_workers, thread_name_prefix="png-encoder") if encode_workers else None
        self._lock = threading.Lock()
        self._encoding: set[Future] = set()

    @property
    def in_line(self) -> bool:
        """Whether results are finished on the sampling thread (no encoder threads)."""
        return self._encoder is None

    def begin(self, job: Job, started: float) -> None:
        """Mark a job running: its queue wait ends at `started` (monotonic)."""
        with request_context(job.request_id):
            try:
                self.store.update(job.transmission_id, epoch=job.epoch, status=JobStatus.RUNNING.value,
                                  started_at=time.time(),
                                  timings_ms={"queue_wait": round((started - job.enqueued_at) * 1000.0, 2)})
            except (StoreUnavailableError, HandedOverError) as error:  # the status only: its end is fenced too
                log.warning("the job's start was not stored", extra={"error": str(error)})
            log.info("job started", extra={"transmission_id": job.transmission_id, **asdict(job.sampling),
                                           "seed": job.seed, "use_fds": job.use_fds})

    def complete(self, job: Job, result: JobResult, started: float) -> None:
        """Finish (if sampled), store and end a job, on the encoder threads when there are some."""
        future = None
        if self._encoder is not None:
            with self._lock:
                try:
                    future = self._encoder.submit(self._complete, job, result, started)
                except RuntimeError:  # `stop` shut the encoders down while this batch ran: finish here
                    future = None
                else:
                    self._encoding.add(future)
        if future is None:
            self._complete(job, result, started)
        else:
            future.add_done_callback(self._encoded)

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` s for the results being encoded, then take no more."""
        if self._encoder is None:
            return
        with self._lock:
            encoding = set(self._encoding)
        wait(encoding, timeout=timeout)
        self._encoder.shutdown(wait=False)

    def _encoded(self, future: Future) -> None:
        with self._lock:
            self._encoding.discard(future)

    def _complete(self, job: Job, result: JobResult, started: float) -> None:
        try:
            with request_context(job.request_id):
                if result.image is not None and not job.cancelled:
                    try:
                        self.host.finish_image(result)
                    except Exception as error:  # noqa: BLE001 - the job records the failure
                        log.exception("finishing the image failed")
                        result.error = f"encoding the images failed: {error}"
                try:
                    self._store_retrying(job, result, started)
                except HandedOverError as error:
                    log.warning("result dropped: the job was handed to another replica",
                                extra={"transmission_id": job.transmission_id, "error": str(error)})
                    return
                self._observe(job, result, started)
        except Exception:  # noqa: BLE001 - e.g. a full disk; keep serving the next jobs
            log.exception("finishing a job failed")
        finally:
            self.queue.release(job)

    def _store_retrying(self, job: Job, result: JobResult, started: float) -> None:
        """`_store`, retried while the store is unreachable, for at most STORE_RETRY_S."""
        deadline = time.monotonic() + STORE_RETRY_S
        while True:
            try:
                self._store(job, result, started)
                return
            except StoreUnavailableError as error:
                if time.monotonic() > deadline:
                    raise
                log.warning("the job's end not stored yet; retrying", extra={"error": str(error)})
                time.sleep(STORE_RETRY_INTERVAL_S)

    def _store(self, job: Job, result: JobResult, started: float) -> None:
        """Store the job's images and final status; a cancelled job keeps no images."""
        timings = {**result.timings_ms, "total": round((time.monotonic() - started) * 1000.0, 2)}
        if job.cancelled:
            status, error = JobStatus.CANCELLED, job.cancel_reason
        else:
            try:
                for name, data in result.artifacts.items():
                    self.store.write_artifact(job.transmission_id, name, data, epoch=job.epoch)
            except OSError as store_error:
                result.error = f"storing the results failed: {store_error}"
            status, error = (JobStatus.FAILED if result.error else JobStatus.DONE), result.error
        stages = self.host.stage_records(job.generator, timings) if status is JobStatus.DONE else []
        self.store.update(job.transmission_id, epoch=job.epoch, status=status.value, error=error,
                          finished_at=time.time(), timings_ms=timings, stages=stages)
        log.info("job finished", extra={"transmission_id": job.transmission_id, "status": status.value,
                                        "error": error, "timings_ms": timings})

    def _observe(self, job: Job, result: JobResult, started: float) -> None:
        """A finished job's stage latencies (a batch's sampling time counts per job)."""
        if self.metrics is None or not result.timings_ms:  # never started: nothing to observe
            return
        self.metrics.observe_stage("queue_wait", max(0.0, started - job.enqueued_at))
        for stage, milliseconds in result.timings_ms.items():
            self.metrics.observe_stage(stage, milliseconds / 1000.0)

    def observe_batch(self, size: int) -> None:
        """A sampling call (or step) ran on `size` jobs."""
        if self.metrics is not None and self.metrics.batch_size is not None:
            self.metrics.batch_size.observe(size)
