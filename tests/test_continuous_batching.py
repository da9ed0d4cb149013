"""Continuous batching: images join and leave a running batch between sampling steps.

The stepper (shared/semantic/diffusion/stepper.py) must give every image what sampling it alone
gives with the same seed, whoever it shared its steps with and whenever it joined; the receiver's
worker runs it with GESCO_RECEIVER_BATCHING=continuous. Also the forward buckets that a GPU
replays as CUDA graphs (their selection and warm-up on the CPU) and the receiver's GPU preset.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gesco.v1 import gesco_pb2
from receiver_service.grpc_server import queue_transmission
from receiver_service.model_host import forward_buckets
from receiver_service.settings import ReceiverSettings
from shared.limits import SamplingOptions
from shared.semantic.diffusion.forward_buckets import BucketedForward
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic.diffusion.stepper import StepBatch
from tests.receiver_helpers import (
    NUM_CLASSES,
    conditions,
    decode_png,
    make_settings,
    start_worker,
    street_label_map,
    tiny_generator,
    transmission,
    wait_for_status,
)


class CountingNetwork(torch.nn.Module):
    """Wraps the network and records the rows of every call."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(x))
        return self.network(x, t, condition)


def alone(generator: SemanticImageGenerator, condition: torch.Tensor, sampling: SamplingOptions, seed: int) -> np.ndarray:
    return generator.generate(condition[None], sampling, [seed])[0]


JOBS = [  # (joins before step, sampling, seed); DPM-Solver++ keeps each job's own history
    (0, SamplingOptions(sampler="ddim", steps=5, guidance=1.5), 1),
    (0, SamplingOptions(sampler="ddpm", steps=4, guidance=2.0), 2),
    (1, SamplingOptions(sampler="ddim", steps=5, guidance=1.5), 3),  # same chain as job 0, one step behind
    (2, SamplingOptions(sampler="dpmpp2m", steps=4, guidance=1.5), 4),
    (2, SamplingOptions(sampler="ddim", steps=3, guidance=0.0), 5),  # unguided: no unconditional rows
    (3, SamplingOptions(sampler="dpmpp2m", steps=4, guidance=1.5), 6),
    (4, SamplingOptions(sampler="ddpm", steps=4, guidance=2.0), 7),
    (4, SamplingOptions(sampler="ddim", steps=1, guidance=1.0), 8),  # joins and leaves in one step
]


def run_staggered(generator: SemanticImageGenerator, cancel: dict[int, int] | None = None) -> dict[int, np.ndarray]:
    """Sample JOBS through one StepBatch, each joining at its step; `cancel` maps a job to the
    step before which it is removed."""
    batch, images, step = StepBatch(generator), {}, 0
    conds = conditions(len(JOBS))
    while step == 0 or len(batch) or any(joins >= step for joins, _, _ in JOBS):
        for index, (joins, sampling, seed) in enumerate(JOBS):
            if joins == step:
                batch.add(index, conds[index], sampling, seed)
        for index, before in (cancel or {}).items():
            if before == step:
                assert batch.remove(index)
        images.update(batch.step())
        step += 1
    return images


def test_every_image_is_the_one_it_gets_alone_whoever_shares_its_steps() -> None:
    generator = tiny_generator()
    counting = CountingNetwork(generator.network)
    generator.network = counting
    images = run_staggered(generator)
    steps_run = len(counting.rows)
    conds = conditions(len(JOBS))
    for index, (_, sampling, seed) in enumerate(JOBS):
        expected = alone(generator, conds[index], sampling, seed)
        # Float rounding differs with the batch's size, so a pixel may land on the next level.
        assert np.abs(images[index].astype(int) - expected.astype(int)).max() <= 1, JOBS[index]
    assert not np.array_equal(images[0], images[2])  # same sampler and condition source, other seed
    # One network call per step for everything held: rows = jobs + guided jobs.
    assert steps_run == 8 and counting.rows[0] == 2 + 2 and counting.rows[2] == 5 + 4


def test_a_cancelled_image_leaves_at_the_step_boundary_and_the_others_are_unchanged() -> None:
    generator = tiny_generator()
    full = run_staggered(generator)
    cut = run_staggered(generator, cancel={1: 2, 3: 3})
    assert set(cut) == set(full) - {1, 3}
    for index in cut:
        assert np.abs(cut[index].astype(int) - full[index].astype(int)).max() <= 1


def test_the_batch_tells_progress_and_refuses_bad_input() -> None:
    generator = tiny_generator()
    batch = StepBatch(generator)
    condition = conditions(1)[0]
    batch.add("a", condition, SamplingOptions(sampler="ddim", steps=3, guidance=1.0), 0)
    assert batch.progress("a") == (0, 3) and "a" in batch and len(batch) == 1
    batch.add("b", condition, SamplingOptions(sampler="ddpm", steps=2, guidance=0.0), 1)
    batch.step()
    assert batch.progress("a") == (1, 3) and batch.progress_all() == {"a": (1, 3), "b": (1, 2)}
    assert batch.remove("b")
    with pytest.raises(ValueError, match="in the batch"):
        batch.add("a", condition, SamplingOptions(sampler="ddim", steps=3, guidance=1.0), 0)
    with pytest.raises(ValueError, match="NaN"):
        batch.add("b", torch.full_like(condition, float("nan")), SamplingOptions(guidance=1.0), 0)
    with pytest.raises(ValueError, match="shape"):
        batch.add("b", condition[:2], SamplingOptions(guidance=1.0), 0)
    with pytest.raises(ValueError, match="sampler"):
        batch.add("b", condition, SamplingOptions(sampler="euler", guidance=1.0), 0)
    assert not batch.remove("b") and batch.remove("a") and len(batch) == 0 and batch.step() == []


# --------------------------------------------------------------------------------- forward buckets


def test_buckets_pad_to_the_smallest_that_holds_the_rows_and_chunk_beyond_the_largest() -> None:
    generator = tiny_generator()
    counting = CountingNetwork(generator.network)
    buckets = BucketedForward(counting, [8, 2, 4, 2], (3, 8, 16), (NUM_CLASSES, 8, 16), torch.device("cpu"))
    assert buckets.buckets == (2, 4, 8)
    assert [buckets.bucket_for(rows) for rows in (1, 2, 3, 5, 8, 9)] == [2, 2, 4, 8, 8, 8]
    assert buckets.chunks(19) == [(0, 8, 8), (8, 8, 8), (16, 3, 4)]
    with pytest.raises(ValueError):
        buckets.bucket_for(0)
    assert set(buckets.warm_up()) == {2, 4, 8} and counting.rows == [8, 4, 2]  # largest first
    counting.rows.clear()
    x, t, condition = torch.randn(11, 3, 8, 16), torch.randint(0, 50, (11,)), conditions(11)
    with torch.inference_mode():
        padded, direct = buckets(x, t, condition), generator.network(x, t, condition)
    assert counting.rows == [8, 4] and padded.shape == direct.shape
    torch.testing.assert_close(padded, direct, atol=1e-5, rtol=1e-4)  # padding rows never touch the others
    with pytest.raises(ValueError, match="CUDA"):
        BucketedForward(counting, [2], (3, 8, 16), (NUM_CLASSES, 8, 16), torch.device("cpu"), cuda_graphs=True)


def test_images_through_buckets_are_the_images_without() -> None:
    generator = tiny_generator()
    condition, sampling = conditions(3), SamplingOptions(sampler="ddim", steps=3, guidance=2.0)
    plain = generator.generate(condition, sampling, [1, 2, 3])
    generator.use_buckets([4, 16])
    assert np.abs(generator.generate(condition, sampling, [1, 2, 3]).astype(int) - plain.astype(int)).max() <= 1


def test_cuda_graphs_are_for_cuda_only_and_bring_their_own_buckets(tmp_path) -> None:
    settings = make_settings(tmp_path, cuda_graphs=True, max_batch_size=4)
    assert forward_buckets(settings, torch.device("cpu")) == ([], False)
    assert forward_buckets(settings, torch.device("cuda")) == ([1, 2, 4, 8], True)
    assert forward_buckets(make_settings(tmp_path, batch_buckets=[4, 2]), torch.device("cpu")) == ([4, 2], False)


# ------------------------------------------------------------------------------------- settings


def test_the_gpu_preset_fills_in_what_is_not_set(monkeypatch) -> None:
    for key in ("PRESET", "MAX_BATCH_SIZE", "QUEUE_SIZE", "BATCHING", "DEVICE", "CUDA_GRAPHS", "BATCH_BUCKETS"):
        monkeypatch.delenv(f"GESCO_RECEIVER_{key}", raising=False)
    plain = ReceiverSettings()
    assert (plain.batching, plain.queue_size, plain.max_batch_size, plain.cuda_graphs) == ("request", 8, 4, False)
    monkeypatch.setenv("GESCO_RECEIVER_PRESET", "gpu")
    gpu = ReceiverSettings()
    assert (gpu.device, gpu.batching, gpu.max_batch_size, gpu.queue_size, gpu.cuda_graphs) == ("cuda", "continuous", 128, 256, True)
    assert gpu.batch_buckets[-1] == 2 * gpu.max_batch_size  # a full batch of guided jobs fits one bucket
    monkeypatch.setenv("GESCO_RECEIVER_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("GESCO_RECEIVER_DEVICE", "cpu")
    mine = ReceiverSettings()
    assert (mine.max_batch_size, mine.queue_size, mine.device, mine.batching) == (16, 32, "cpu", "continuous")
    monkeypatch.setenv("GESCO_RECEIVER_QUEUE_SIZE", "5")
    assert ReceiverSettings().queue_size == 5
    monkeypatch.setenv("GESCO_RECEIVER_PRESET", "tpu")
    with pytest.raises(ValueError, match="preset"):
        ReceiverSettings()


# ------------------------------------------------------------------ the worker, continuous batching


def requests() -> list[tuple[gesco_pb2.TransmissionHeader, np.ndarray]]:
    samplings = [gesco_pb2.SamplingRequest(sampler="ddim", steps=4, guidance=1.5, seed=1, use_fds=True),
                 gesco_pb2.SamplingRequest(sampler="ddpm", steps=3, guidance=2.0, seed=2, use_fds=True),
                 gesco_pb2.SamplingRequest(sampler="dpmpp2m", steps=5, guidance=1.0, seed=3, use_fds=False),
                 gesco_pb2.SamplingRequest(sampler="ddim", steps=4, guidance=1.5, seed=4, use_fds=True)]
    jobs = []
    for index, sampling in enumerate(samplings):
        label_map = street_label_map()
        label_map[: 4 + 4 * index] = 3 + index
        jobs.append(transmission(label_map, sampling=sampling))
    return jobs


@pytest.mark.parametrize("encode_workers", [0, 2])
def test_the_worker_batches_continuously_with_the_images_of_request_batching(tmp_path, tiny_model, encode_workers) -> None:
    images, jobs = {}, requests()
    for batching in ("request", "continuous"):
        worker = start_worker(tmp_path / batching, batching=batching, max_batch_size=3, encode_workers=encode_workers)
        try:
            for header, symbols in jobs:
                queue_transmission(worker, header, symbols, "req")
            for header, _ in jobs:
                record = wait_for_status(worker.store, header.transmission_id, {"done", "failed"})
                assert record["status"] == "done", record
                assert set(record["timings_ms"]) >= {"queue_wait", "decode_fds", "sample", "png", "total"}
                images[batching, header.transmission_id] = decode_png(
                    worker.store.artifact_path(header.transmission_id, "image").read_bytes())
            assert worker.held_ids() == set()
        finally:
            worker.stop(5)
    for header, _ in jobs:
        request, continuous = images["request", header.transmission_id], images["continuous", header.transmission_id]
        assert np.abs(request.astype(int) - continuous.astype(int)).max() <= 1
    assert not np.array_equal(images["continuous", jobs[0][0].transmission_id],
                              images["continuous", jobs[3][0].transmission_id])


def test_a_cancelled_job_leaves_the_continuous_batch_and_the_others_finish(tmp_path, tiny_model) -> None:
    worker = start_worker(tmp_path, batching="continuous", max_batch_size=4)
    long_steps = gesco_pb2.SamplingRequest(sampler="ddpm", steps=50, guidance=1.0, seed=1, use_fds=True)
    doomed, survivor = transmission(sampling=long_steps), transmission(sampling=long_steps)
    try:
        queue_transmission(worker, *doomed, "a")
        queue_transmission(worker, *survivor, "b")
        wait_for_status(worker.store, doomed[0].transmission_id, {"running"})
        worker.cancel(doomed[0].transmission_id, "the client went away")
        record = wait_for_status(worker.store, doomed[0].transmission_id, {"cancelled", "done", "failed"})
        assert record["status"] == "cancelled" and record["error"] == "the client went away"
        assert worker.store.artifact_path(doomed[0].transmission_id, "image") is None
        assert wait_for_status(worker.store, survivor[0].transmission_id, {"cancelled", "done", "failed"})["status"] == "done"
    finally:
        worker.stop(5)
