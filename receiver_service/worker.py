"""The receiver's core: the model host, the job queue and the scheduler's thread, put together.

Entry points (gRPC, REST) never run the model: a frontend turns a message into a `Job` and its
record (grpc_server.py) and `submit`s it. The parts, each in its own module, as Triton keeps them:
- model_host.py: the generators (checkpoint, condition adapters, batch buckets and CUDA graphs),
  loaded in the background so the process answers health checks while it loads, and the stages
  after sampling, then the PNGs;
- queue.py: admission, capacity and Retry-After, cancel, and taking jobs;
- schedulers.py: request batching or step batching (GESCO_RECEIVER_BATCHING), run by one thread;
- completion.py: marking jobs running, then finishing, storing and metering them.
"""
from __future__ import annotations

import logging
import threading
import time

from receiver_service.completion import Completion
from receiver_service.jobs import Job, NotReadyError
from receiver_service.model_host import ModelHost
from receiver_service.queue import JobQueue
from receiver_service.schedulers import create_scheduler
from receiver_service.settings import ReceiverSettings
from receiver_service.store import StoreUnavailableError
from receiver_service.store_factory import JobStore
from shared.wire.monitoring import ServiceMetrics

log = logging.getLogger("receiver_service.worker")


class GenerationWorker:
    """Owns the model host, the bounded queue and the worker thread; the frontends call `submit`."""

    def __init__(self, settings: ReceiverSettings, store: JobStore, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.host = ModelHost(settings)
        assert settings.queue_size is not None  # sized by the batch when unset (settings.py)
        self.queue = JobQueue(store, settings.queue_size, self.host.generator_for, forwards=not settings.sampling)
        self.completion = Completion(self.queue, self.host, settings.encode_workers, metrics)
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)

    @property
    def ready(self) -> bool:
        return self.host.ready

    @property
    def load_error(self) -> str | None:
        return self.host.load_error

    @property
    def queue_depth(self) -> int:
        return self.queue.depth

    @property
    def busy(self) -> bool:
        """The worker thread is alive (after `stop`: still inside a batch)."""
        return self._thread.is_alive()

    def load_model(self) -> None:
        """Load the generators (blocking; run it in a thread) and start the worker thread."""
        if not self.host.load():
            return
        if self.settings.queue_size < self.settings.max_batch_size:
            log.warning("the queue is smaller than the batch: batches stay smaller than max_batch_size",
                        extra={"queue_size": self.settings.queue_size, "max_batch_size": self.settings.max_batch_size})
        if self.settings.sampling and not self.queue.closed:
            self._thread.start()

    def submit(self, job: Job, record: dict) -> int:
        """Queue a validated job with its status record (a serving replica: in the shared queue);
        return the jobs ahead of it. Raises NotReadyError, DuplicateTransmissionError, QueueFullError."""
        if not self.ready or self.queue.closed:
            raise NotReadyError(self.load_error or "the model is still loading")
        return self.queue.admit(job, record) if self.settings.sampling else self.queue.forward(job, record)

    def cancel(self, transmission_id: str, reason: str) -> None:
        self.queue.cancel(transmission_id, reason)

    def progress(self, transmission_id: str) -> tuple[int, int] | None:
        return self.queue.progress(transmission_id)

    def held_ids(self) -> set[str]:
        return self.queue.held_ids()

    def hand_back_waiting(self) -> None:
        """Take no more jobs and hand the waiting ones back: a shared store gives them to the other
        replicas at once (idempotent)."""
        waiting = self.queue.close()
        try:
            self.store.hand_back([job.transmission_id for job in waiting])
        except StoreUnavailableError as error:  # their owner's lease expires; another replica takes them
            log.warning("waiting jobs not handed back", extra={"error": str(error)})

    def stop(self, timeout: float) -> None:
        """Take no more jobs, hand the waiting ones back (`hand_back_waiting`) and wait up to
        `timeout` s for the ones in progress (and their PNGs).

        With the disk store, jobs still queued or running stay so; the next start marks them
        failed. A shared store hands back what is left when it closes.
        """
        deadline = time.monotonic() + timeout
        self.hand_back_waiting()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.completion.stop(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        create_scheduler(self.settings, self.queue, self.host, self.completion).run()
