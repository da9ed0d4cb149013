"""Scheduling: which queued jobs the network samples together, and when (GESCO_RECEIVER_BATCHING).

Two policies behind one interface, each run by the worker thread until the queue closes:
- `RequestBatching` ("request"): a batch of jobs with one sampling setting and generator samples
  from its first step to its last (the queue's `take_batch`, Triton's dynamic batcher). A batch
  whose jobs are all cancelled stops at its next step.
- `StepBatching` ("continuous", step_batching.py): jobs of any setting join and leave one running
  batch at every sampling step.
Both take jobs from the `JobQueue`, sample through the `ModelHost`'s generators and hand every
outcome to `Completion`; neither knows the protocol a job came in by.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from receiver_service.completion import Completion
from receiver_service.jobs import Job, JobResult, decode_failure, elapsed_ms
from receiver_service.model_host import ModelHost, prepare_job
from receiver_service.queue import JobQueue
from receiver_service.settings import ReceiverSettings
from receiver_service.step_batching import StepBatching
from shared.semantic import link

log = logging.getLogger("receiver_service.schedulers")


class Scheduler(Protocol):
    """Takes jobs from the queue and samples them until the queue closes and its jobs are done."""

    def run(self) -> None: ...


class BatchCancelled(Exception):
    """Every job of the batch being sampled was cancelled: stop sampling."""


def run_batch(
    jobs: Sequence[Job],
    host: ModelHost | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[JobResult]:
    """Decode and sample a batch of jobs that share sampler, steps, guidance and generator; with a
    `host`, finish each image (stages and PNGs), else each result keeps its image and views.

    A job whose maps fail to decode fails alone; a sampling error fails the whole batch.
    `should_stop` is asked before every sampling step; once it says yes, sampling stops there and
    every job gets an error instead of an image. `on_step(step, total)` hears of each step
    (1-based) as it starts.
    """
    results = [JobResult() for _ in jobs]
    prepared: list[tuple[int, link.ReceivedViews, np.ndarray]] = []
    for index, job in enumerate(jobs):
        started = time.perf_counter()
        try:
            received, condition = prepare_job(job)
        except ValueError as error:
            results[index].error = decode_failure(error)
            continue
        results[index].timings_ms["decode_fds"] = elapsed_ms(started)
        prepared.append((index, received, condition))
    if not prepared:
        return results

    def stop_if_asked(step: int, total: int) -> None:
        if on_step is not None:
            on_step(step + 1, total)
        if should_stop is not None and should_stop():
            raise BatchCancelled(f"sampling stopped before step {step + 1} of {total}")

    first = jobs[prepared[0][0]]
    started = time.perf_counter()
    try:
        images = first.generator.generate(
            torch.from_numpy(np.stack([condition for _, _, condition in prepared])),
            first.sampling,
            seeds=[jobs[index].seed for index, _, _ in prepared],
            step_callback=stop_if_asked,
        )
    except BatchCancelled as stopped:
        log.info("every job of the batch was cancelled", extra={"detail": str(stopped)})
        for index, _, _ in prepared:
            results[index].error = f"cancelled: {stopped}"
        return results
    except Exception as error:  # noqa: BLE001 - the job records any sampling failure
        log.exception("sampling failed")
        for index, _, _ in prepared:
            results[index].error = f"sampling failed: {error}"
        return results
    sample_ms = elapsed_ms(started)
    for (index, received, _), image in zip(prepared, images):
        result = results[index]
        result.timings_ms["sample"] = sample_ms
        result.image, result.received = image, received
        if host is not None:
            host.finish_image(result)
    return results


class RequestBatching:
    """Sample each batch the queue forms from its first step to its last."""

    def __init__(self, settings: ReceiverSettings, queue: JobQueue, host: ModelHost, completion: Completion) -> None:
        self.settings, self.queue, self.host, self.completion = settings, queue, host, completion

    def run(self) -> None:
        while not self.queue.closed:
            batch = self.queue.take_batch(self.settings.max_batch_size, self.settings.max_queue_delay_ms / 1000.0)
            if not batch:
                self.queue.idle()
                continue
            try:
                self._process(batch)
            except Exception:  # noqa: BLE001 - e.g. a full disk; keep serving the next jobs
                log.exception("processing a batch failed")
                for job in batch:
                    self.queue.release(job)

    def _process(self, batch: list[Job]) -> None:
        """Sample the batch's wanted jobs; jobs cancelled while it formed are only marked so."""
        started = time.monotonic()
        wanted = [job for job in batch if not job.cancelled]
        for job in wanted:
            self.completion.begin(job, started)
        results: list[JobResult] = []
        if wanted:
            try:
                results = run_batch(wanted, self.host if self.completion.in_line else None,
                                    should_stop=lambda: all(job.cancelled for job in wanted),
                                    on_step=lambda step, total: self.queue.set_progress(wanted, step, total))
            except Exception as error:  # noqa: BLE001 - never lose a job to an unexpected error
                log.exception("generation failed")
                results = [JobResult(error=f"{type(error).__name__}: {error}") for _ in wanted]
            self.completion.observe_batch(len(wanted))
        outcomes = dict(zip(map(id, wanted), results))
        for job in batch:
            self.completion.complete(job, outcomes.get(id(job), JobResult()), started)
        if wanted:
            self.queue.job_done((time.monotonic() - started) / len(wanted))


SCHEDULERS: dict[str, Callable[[ReceiverSettings, JobQueue, ModelHost, Completion], Scheduler]] = {
    "request": RequestBatching,
    "continuous": StepBatching,
}


def create_scheduler(settings: ReceiverSettings, queue: JobQueue, host: ModelHost, completion: Completion) -> Scheduler:
    """The scheduler the `batching` setting names."""
    return SCHEDULERS[settings.batching](settings, queue, host, completion)
