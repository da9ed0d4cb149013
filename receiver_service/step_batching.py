"""Continuous batching in the receiver's worker thread (GESCO_RECEIVER_BATCHING=continuous).

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

from receiver_service.worker import GenerationWorker, Job, JobResult, prepare_job
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic import link
from shared.semantic.diffusion.stepper import StepBatch
from shared.wire.logging_setup import request_context

log = logging.getLogger("receiver_service.step_scheduler")


@dataclass
class _Running:
    """A job in the batch: its received views (for the debug PNGs) and when it started."""

    job: Job
    batch: StepBatch  # the step batch of the job's generator
    received: link.ReceivedViews
    started: float  # monotonic: when it left the queue
    timings_ms: dict[str, float]
    sampling_from: float  # perf_counter: when it joined the batch


class StepScheduler:
    """The worker thread's loop with continuous batching: admit, drop, step, retire."""

    def __init__(self, worker: GenerationWorker) -> None:
        assert worker.generator is not None
        self.worker = worker
        self.batches: dict[SemanticImageGenerator, StepBatch] = {}
        self.running: dict[str, _Running] = {}

    def run(self) -> None:
        """Step until the worker stops and the jobs it holds have finished."""
        worker = self.worker
        while not (worker.stopping and not self.running):
            if not worker.stopping:
                free = worker.settings.max_batch_size - len(self.running)
                for job in worker.take_waiting(free, block=not self.running):
                    self._admit(job)
            self._drop_cancelled()
            if not self.running:
                worker.idle()
                continue
            self._step()

    def _admit(self, job: Job) -> None:
        """Decode the job's maps and put it at the start of its chain; a job that cannot start
        (cancelled meanwhile, maps that do not decode) finishes here."""
        worker, started = self.worker, time.monotonic()
        if job.cancelled:
            worker.complete(job, JobResult(), started)
            return
        worker.begin(job, started)
        decoding = time.perf_counter()
        try:
            received, condition = prepare_job(job)
        except ValueError as error:
            worker.complete(job, JobResult(error=f"decoding the received maps failed: {error}"), started)
            return
        timings = {"decode_fds": round((time.perf_counter() - decoding) * 1000.0, 2)}
        batch = self.batches.setdefault(job.generator, StepBatch(job.generator))
        try:
            batch.add(job.transmission_id, torch.from_numpy(condition), job.sampling, job.seed)
        except ValueError as error:
            worker.complete(job, JobResult(timings_ms=timings, error=f"sampling failed: {error}"), started)
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
                self.worker.complete(running.job, JobResult(timings_ms=running.timings_ms,
                                                            error=f"cancelled before step {step + 1} of {steps}"),
                                     running.started)

    def _step(self) -> None:
        """One step of every job held, a network call per generator; the finished ones leave for encoding."""
        worker = self.worker
        batches = [batch for batch in self.batches.values() if len(batch)]
        by_step: dict[tuple[int, int], list[Job]] = defaultdict(list)
        for batch in batches:
            for transmission_id, (step, steps) in batch.progress_all().items():
                by_step[(step + 1, steps)].append(self.running[transmission_id].job)
        for (step, steps), jobs in by_step.items():
            worker.set_progress(jobs, step, steps)
        if worker.metrics is not None and worker.metrics.batch_size is not None:
            worker.metrics.batch_size.observe(len(self.running))
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
                    self.worker.complete(running.job, JobResult(timings_ms=running.timings_ms,
                                                                error=f"sampling failed: {error}"), running.started)
            return []

    def _retire(self, finished: list[tuple[str, np.ndarray]]) -> None:
        """Finished jobs leave the batch for encoding."""
        worker = self.worker
        for transmission_id, image in finished:
            running = self.running.pop(transmission_id)
            sample_ms = round((time.perf_counter() - running.sampling_from) * 1000.0, 2)
            result = JobResult(timings_ms={**running.timings_ms, "sample": sample_ms}, image=image,
                               received=running.received)
            # The sampler's time per job: this job's time in the batch shared by those it ran with.
            worker.job_done(sample_ms / 1000.0 / (len(self.running) + 1))
            worker.complete(running.job, result, running.started)
