"""Step batching, the "continuous" scheduler (GESCO_RECEIVER_BATCHING=continuous; schedulers.py).

Request batching samples a batch from its first step to its last: a job that arrives meanwhile
waits for the whole batch, and a job alone waits max_queue_delay_ms for company. Here the worker
thread runs one loop of sampling steps instead. Before each step it admits queued jobs, oldest
first and whatever their sampler, steps or guidance, up to max_batch_size jobs held, and drops the
jobs cancelled since the last step. Each step is one guided network call for every job held, each
at its own step of its own chain (shared.semantic.diffusion.stepper.StepBatch). A job whose chain
ends leaves at once and its PNGs are encoded off this thread, so under load a new job waits at
most one step to start and the network always runs on as many jobs as there are. Jobs of another
generator (a condition adapter for their downsample factor) are held in a step batch of their own,
stepped in the same pass: one network call per generator.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from receiver_service.completion import Completion
from receiver_service.jobs import Job, JobResult, decode_failure
from receiver_service.model_host import ModelHost, prepare_job
from receiver_service.queue import JobQueue
from receiver_service.settings import ReceiverSettings
from shared.semantic import link
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic.diffusion.stepper import StepBatch
from shared.wire.logging_setup import request_context

log = logging.getLogger("receiver_service.step_batching")


@dataclass
class _Running:
    """A job in the batch: its received views (for the debug PNGs) and when it started."""

    job: Job
    batch: StepBatch  # the step batch of the job's generator
    received: link.ReceivedViews
    started: float  # monotonic: when it left the queue
    timings_ms: dict[str, float]
    sampling_from: float  # perf_counter: when it joined the batch


class StepBatching:
    """The worker thread's loop with continuous batching: admit, drop, step, retire."""

    def __init__(self, settings: ReceiverSettings, queue: JobQueue, host: ModelHost, completion: Completion) -> None:
        self.settings, self.queue, self.host, self.completion = settings, queue, host, completion
        self.batches: dict[SemanticImageGenerator, StepBatch] = {}
        self.running: dict[str, _Running] = {}

    def run(self) -> None:
        """Step until the queue closes and the jobs it holds have finished."""
        queue = self.queue
        while not (queue.closed and not self.running):
            if not queue.closed:
                free = self.settings.max_batch_size - len(self.running)
                for job in queue.take(free, block=not self.running):
                    self._admit(job)
            self._drop_cancelled()
            if not self.running:
                queue.idle()
                continue
            self._step()

    def _admit(self, job: Job) -> None:
        """Decode the job's maps and put it at the start of its chain; a job that cannot start
        (cancelled meanwhile, maps that do not decode) finishes here."""
        completion, started = self.completion, time.monotonic()
        if job.cancelled:
            completion.complete(job, JobResult(), started)
            return
        completion.begin(job, started)
        decoding = time.perf_counter()
        try:
            received, condition = prepare_job(job)
        except ValueError as error:
            completion.complete(job, JobResult(error=decode_failure(error)), started)
            return
        timings = {"decode_fds": round((time.perf_counter() - decoding) * 1000.0, 2)}
        batch = self.batches.setdefault(job.generator, StepBatch(job.generator))
        try:
            batch.add(job.transmission_id, torch.from_numpy(condition), job.sampling, job.seed)
        except ValueError as error:
            completion.complete(job, JobResult(timings_ms=timings, error=f"sampling failed: {error}"), started)
            return
        self.running[job.transmission_id] = _Running(job, batch, received, started, timings, time.perf_counter())

    def _drop_cancelled(self) -> None:
        for transmission_id, running in list(self.running.items()):
            if running.job.cancelled:
                step, steps = running.batch.progress(transmission_id)
                running.batch.remove(transmission_id)
                del self.running[transmission_id]
                with request_context(running.job.request_id):
                    log.info("cancelled job left the batch", extra={"transmission_id": transmission_id,
                                                                    "step": step, "steps": steps})
                self.completion.complete(running.job, JobResult(timings_ms=running.timings_ms,
                                                            error=f"cancelled before step {step + 1} of {steps}"),
                                     running.started)

    def _step(self) -> None:
        """One step of every job held, a network call per generator; the finished ones leave for encoding."""
        batches = [batch for batch in self.batches.values() if len(batch)]
        by_step: dict[tuple[int, int], list[Job]] = defaultdict(list)
        for batch in batches:
            for transmission_id, (step, steps) in batch.progress_all().items():
                by_step[(step + 1, steps)].append(self.running[transmission_id].job)
        for (step, steps), jobs in by_step.items():
            self.queue.set_progress(jobs, step, steps)
        self.completion.observe_batch(len(self.running))
        for batch in batches:
            self._retire(self._step_batch(batch))

    def _step_batch(self, batch: StepBatch) -> list[tuple[str, np.ndarray]]:
        """One step of one generator's jobs; if it fails, each of them records the failure."""
        try:
            return batch.step()
        except Exception as error:  # noqa: BLE001 - every job of the batch records the failure
            log.exception("sampling failed")
            for transmission_id, running in list(self.running.items()):
                if running.batch is batch:
                    batch.remove(transmission_id)
                    del self.running[transmission_id]
                    self.completion.complete(running.job, JobResult(timings_ms=running.timings_ms,
                                                                error=f"sampling failed: {error}"), running.started)
            return []

    def _retire(self, finished: list[tuple[str, np.ndarray]]) -> None:
        """Finished jobs leave the batch for encoding."""
        for transmission_id, image in finished:
            running = self.running.pop(transmission_id)
            sample_ms = round((time.perf_counter() - running.sampling_from) * 1000.0, 2)
            result = JobResult(timings_ms={**running.timings_ms, "sample": sample_ms}, image=image,
                               received=running.received)
            # The sampler's time per job: this job's time in the batch shared by those it ran with.
            self.queue.job_done(sample_ms / 1000.0 / (len(self.running) + 1))
            self.completion.complete(running.job, result, running.started)
