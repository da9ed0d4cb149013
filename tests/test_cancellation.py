"""A client that goes away cancels its sampling work, in process.

The samplers' step hook can stop sampling; the receiver's worker drops a cancelled queued job at
once and stops a batch whose jobs are all cancelled at the next step; its REST API cancels on
request; a gRPC caller that leaves as its job is queued leaves nothing to sample. The sender's
side (a waiting HTTP client that disconnects) is tested against its process in
test_sender_service.py and end to end in test_end_to_end.py.
"""
from __future__ import annotations

import time

import grpc
import pytest
import torch

from receiver_service.grpc_server import queue_transmission
from receiver_service.app import CANCEL_REASON
from receiver_service.grpc_server import CALLER_GONE_REASON, ReceiverServicer
from shared.limits import SamplingOptions
from shared.wire import transport
from shared.semantic.diffusion.gaussian_diffusion import DiffusionConfig, GaussianDiffusion
from shared.semantic.diffusion.generator import SemanticDiffusionConfig, SemanticImageGenerator
from shared.semantic.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler
from shared.semantic.diffusion.unet import UNetConfig
from tests.receiver_helpers import receive, transmission, wait_for_status
from tests.receiver_helpers import ddim, ddpm, start_worker

FINISHED = {"done", "failed", "cancelled"}


class Stop(Exception):
    """What the tests' step callbacks raise."""


# ------------------------------------------------------------------------------ the sampler hook


@pytest.mark.parametrize("sampler", [DDPMSampler(), DDIMSampler(), DPMSolverPP2MSampler()], ids=lambda s: s.name)
def test_the_step_callback_hears_every_step_and_can_stop_sampling(sampler) -> None:
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=50))
    forwards: list[int] = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        forwards.append(int(t[0]))
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    heard: list[tuple[int, int]] = []
    shape, seeds = (1, 3, 4, 4), [torch.Generator().manual_seed(0)]
    sampler.sample(diffusion, model_fn, shape, seeds, 5, lambda step, total: heard.append((step, total)))
    assert heard == [(step, 5) for step in range(5)] and len(forwards) == 5

    def stop_at_the_third_step(step: int, total: int) -> None:
        if step == 2:
            raise Stop

    forwards.clear()
    with pytest.raises(Stop):
        sampler.sample(diffusion, model_fn, shape, [torch.Generator().manual_seed(0)], 5, stop_at_the_third_step)
    assert len(forwards) == 2  # the third step never ran its network


def test_the_generator_passes_the_step_callback_on() -> None:
    unet = UNetConfig(num_classes=4, image_height=8, image_width=16, model_channels=32, channel_mult=(1, 2),
                      attention_downsample=(2,), head_channels=32, spade_hidden=16)
    generator = SemanticImageGenerator.load(None, "cpu", untrained_config=SemanticDiffusionConfig(
        unet=unet, diffusion=DiffusionConfig(num_timesteps=20)))
    heard: list[tuple[int, int]] = []
    ddim3 = SamplingOptions(sampler="ddim", steps=3, guidance=1.0)
    generator.generate(torch.zeros(1, 4, 8, 16), ddim3, [0], step_callback=lambda *step: heard.append(step))
    assert heard == [(0, 3), (1, 3), (2, 3)]

    def stop(step: int, total: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        generator.generate(torch.zeros(1, 4, 8, 16), ddim3, [0], step_callback=stop)


# ---------------------------------------------------------------------- the worker (fake generator)


def test_a_queued_job_leaves_the_queue_at_once_and_is_never_sampled(running_worker, fake_generator) -> None:
    store = running_worker.store
    fake_generator.gate.clear()
    first, queued = transmission(sampling=ddim(1)), transmission(sampling=ddpm(2))
    queue_transmission(running_worker, *first, "a")
    wait_for_status(store, first[0].transmission_id, {"running"})
    queue_transmission(running_worker, *queued, "b")
    assert running_worker.queue_depth == 1
    running_worker.cancel(queued[0].transmission_id, "the client went away")
    record = store.get(queued[0].transmission_id)
    assert record["status"] == "cancelled" and record["error"] == "the client went away"
    assert record["finished_at"] is not None and running_worker.queue_depth == 0
    fake_generator.gate.set()
    assert wait_for_status(store, first[0].transmission_id, FINISHED)["status"] == "done"
    assert [call["seeds"] for call in fake_generator.calls] == [[1]]
    running_worker.cancel(first[0].transmission_id, "too late")  # a finished job stays as it is
    assert store.get(first[0].transmission_id)["status"] == "done"


def test_a_batch_whose_jobs_are_all_cancelled_stops_at_the_next_step(running_worker, fake_generator) -> None:
    store = running_worker.store
    fake_generator.gate.clear()  # sampling runs "steps" until the gate opens, which it never does here
    header, symbols = transmission()
    queue_transmission(running_worker, header, symbols, "a")
    wait_for_status(store, header.transmission_id, {"running"})
    started = time.monotonic()
    running_worker.cancel(header.transmission_id, "the client went away")
    record = wait_for_status(store, header.transmission_id, FINISHED, timeout=5)
    assert record["status"] == "cancelled" and record["error"] == "the client went away"
    assert time.monotonic() - started < 2
    assert store.artifact_path(header.transmission_id, "image") is None
    fake_generator.gate.set()  # the worker goes on with the next job
    after, symbols = transmission()
    queue_transmission(running_worker, after, symbols, "b")
    assert wait_for_status(store, after.transmission_id, FINISHED)["status"] == "done"


def test_a_batch_goes_on_for_the_jobs_still_wanted(tmp_path, fake_generator) -> None:
    worker = start_worker(tmp_path, max_batch_size=2, max_queue_delay_ms=5000)
    try:
        fake_generator.gate.clear()
        wanted, dropped = transmission(sampling=ddim(1)), transmission(sampling=ddim(2))
        queue_transmission(worker, *wanted, "a")
        queue_transmission(worker, *dropped, "b")
        for header, _ in (wanted, dropped):
            wait_for_status(worker.store, header.transmission_id, {"running"})
        worker.cancel(dropped[0].transmission_id, "the client went away")
        time.sleep(0.2)
        assert worker.store.get(wanted[0].transmission_id)["status"] == "running"
        fake_generator.gate.set()
        assert wait_for_status(worker.store, wanted[0].transmission_id, FINISHED)["status"] == "done"
        assert wait_for_status(worker.store, dropped[0].transmission_id, FINISHED)["status"] == "cancelled"
        assert worker.store.artifact_path(dropped[0].transmission_id, "image") is None
        assert [call["seeds"] for call in fake_generator.calls] == [[1, 2]]
    finally:
        worker.stop(5)


def test_a_job_cancelled_while_its_batch_forms_is_never_sampled(tmp_path, fake_generator) -> None:
    worker = start_worker(tmp_path, max_batch_size=2, max_queue_delay_ms=500)
    try:
        header, symbols = transmission(sampling=ddim(1))
        queue_transmission(worker, header, symbols, "a")
        time.sleep(0.1)  # taken for a batch, which waits for company
        assert worker.queue_depth == 0
        worker.cancel(header.transmission_id, "the client went away")
        assert wait_for_status(worker.store, header.transmission_id, FINISHED)["status"] == "cancelled"
        assert fake_generator.calls == []
    finally:
        worker.stop(5)


# ------------------------------------------------------------------- REST and gRPC (fake generator)


def test_rest_cancel_of_queued_running_done_and_unknown_jobs(app_client, fake_generator) -> None:
    port, store = app_client.settings.grpc_port, app_client.app.state.receiver.store
    fake_generator.gate.clear()
    running, queued = transmission(), transmission()
    receive(port, transport.symbol_frames(*running))
    wait_for_status(store, running[0].transmission_id, {"running"})
    receive(port, transport.symbol_frames(*queued))  # takes the one queue slot

    for _ in range(2):  # cancelling twice is harmless
        response = app_client.post(f"/v1/transmissions/{queued[0].transmission_id}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled" and response.json()["error"] == CANCEL_REASON
    receive(port, transport.symbol_frames(*transmission()))  # the slot is free again

    response = app_client.post(f"/v1/transmissions/{running[0].transmission_id}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "running"
    assert wait_for_status(store, running[0].transmission_id, FINISHED, timeout=5)["status"] == "cancelled"

    fake_generator.gate.set()
    done = transmission()
    receive(port, transport.symbol_frames(*done))
    wait_for_status(store, done[0].transmission_id, {"done"})
    response = app_client.post(f"/v1/transmissions/{done[0].transmission_id}/cancel")
    assert response.status_code == 409 and response.json()["error"]["status"] == "done"
    assert app_client.get(f"/v1/transmissions/{done[0].transmission_id}/image").status_code == 200

    assert app_client.post(f"/v1/transmissions/{transport.new_transmission_id()}/cancel").status_code == 404
    assert app_client.post("/v1/transmissions/not-an-id/cancel").status_code == 422


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class LeavingContext:
    """A servicer context whose caller is there until `left` is set."""

    left = False

    def invocation_metadata(self):
        return ()

    def time_remaining(self) -> None:
        return None

    def is_active(self) -> bool:
        return not self.left

    def set_trailing_metadata(self, metadata) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)


def test_a_grpc_caller_gone_as_its_job_is_queued_leaves_nothing_to_sample(running_worker, fake_generator,
                                                                          monkeypatch) -> None:
    store = running_worker.store
    fake_generator.gate.clear()
    busy = transmission()
    queue_transmission(running_worker, *busy, "busy")
    wait_for_status(store, busy[0].transmission_id, {"running"})
    context = LeavingContext()
    submit = running_worker.submit

    def submit_then_leave(*args):
        position = submit(*args)
        context.left = True  # the caller cancels just after the job was queued
        return position

    monkeypatch.setattr(running_worker, "submit", submit_then_leave)
    header, symbols = transmission()
    with pytest.raises(Aborted) as raised:
        ReceiverServicer(running_worker, 10_000_000).Receive(transport.symbol_frames(header, symbols), context)
    assert raised.value.code == grpc.StatusCode.CANCELLED
    record = store.get(header.transmission_id)
    assert record["status"] == "cancelled" and record["error"] == CALLER_GONE_REASON
    assert running_worker.queue_depth == 0
