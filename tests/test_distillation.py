"""Distillation (issue: one- and two-step generation): the student's sampler, its file beside
the teacher, its guards, and the whole recipe run small."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gesco.options import DISTILLATION_TEACHER
from gesco.v1 import gesco_pb2
from receiver_service.grpc_server import queue_transmission
from receiver_service.jobs import Job, decode_job_input, encode_job_input
from receiver_service.model_host import ModelHost
from receiver_service.store import TransmissionStore
from receiver_service.worker import GenerationWorker
from shared.limits import LimitError, SamplingOptions
from shared.semantic.diffusion.adapters import adapted_generators
from shared.semantic.diffusion.distilled import load_student, load_students, student_path
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic.diffusion.samplers import spaced_timesteps, student_timesteps
from shared.wire import transport
from tests.receiver_helpers import make_settings, transmission, wait_for_status
from tests.training_helpers import train_args
from training import distill_generator, train_diffusion


def test_student_timesteps_are_points_of_the_teachers_trajectory() -> None:
    teacher = spaced_timesteps(1000, 10)
    assert student_timesteps(1000, 1).tolist() == [999]
    assert student_timesteps(1000, 2).tolist() == [444, 999]
    assert set(student_timesteps(1000, 5)) <= set(teacher)
    with pytest.raises(ValueError, match="divisor of 10"):
        student_timesteps(1000, 3)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """A tiny teacher (two training steps) and its student, distilled by the recipe's one command."""
    tmp_path = tmp_path_factory.mktemp("distil")
    assert train_diffusion.main(train_args(tmp_path, "base", "--max-steps", "2")) == "max_steps"
    teacher = tmp_path / "base" / "export.pt"
    argv = ["--data-root", str(tmp_path / "camvid"), "--teacher", str(teacher), "--out-dir", str(tmp_path / "student"),
            "--train-trajectories", "6", "--val-trajectories", "3", "--chunk-size", "4", "--link-height", "32",
            "--link-width", "32", "--batch-size", "2", "--max-steps", "4", "--eval-every", "2", "--log-every", "1",
            "--device", "cpu"]
    assert distill_generator.main(argv) == "max_steps"
    log = [json.loads(line) for line in (tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    return teacher, student_path(teacher), log


def test_the_recipe_generates_trains_validates_and_exports(distilled) -> None:
    teacher_path, path, log = distilled
    assert path.name == "export.distilled.pt" and path.is_file()
    data = next(r for r in log if r.get("event") == "data")
    assert (data["train"], data["val"]) == (6, 3)
    evals = [r for r in log if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["val_mse_2"]) for r in evals)
    teacher = SemanticImageGenerator.load(teacher_path, "cpu")
    student = load_student(teacher)
    assert student is not None and student.is_student and student.info.distilled_guidance == 2.0


def test_a_student_runs_the_distilled_sampler_only_with_its_guidance(distilled) -> None:
    teacher_path, _, _ = distilled
    teacher = SemanticImageGenerator.load(teacher_path, "cpu")
    student = load_student(teacher)
    assert student.resolve(SamplingOptions(guidance=2.0)) == SamplingOptions(sampler="distilled", steps=1, guidance=2.0)
    for options, field in ((SamplingOptions(sampler="ddim", guidance=2.0), "sampler"),
                           (SamplingOptions(guidance=1.0), "guidance"),
                           (SamplingOptions(sampler="distilled", steps=3, guidance=2.0), "steps")):
        with pytest.raises(LimitError) as raised:
            student.resolve(options)
        assert raised.value.field == field
    with pytest.raises(LimitError, match="none is loaded"):
        teacher.resolve(SamplingOptions(sampler="distilled", guidance=2.0))
    # the default sampler is the student's: a teacher runs the trajectory it imitates, or the steps asked for
    assert teacher.resolve(SamplingOptions(guidance=2.0)) == SamplingOptions(sampler="ddim", steps=10, guidance=2.0)
    assert teacher.resolve(SamplingOptions(steps=1, guidance=2.0)) == SamplingOptions(sampler="ddim", steps=1, guidance=2.0)
    assert teacher.resolve(SamplingOptions(steps=30, guidance=2.0)) == SamplingOptions(sampler="ddim", steps=30, guidance=2.0)
    assert student.resolve(SamplingOptions(guidance=2.0)).sampler == "distilled"
    size = (teacher.info.image_height, teacher.info.image_width)
    conditions = torch.rand(2, teacher.info.num_classes, *size)
    for steps in (1, 2):
        calls = []
        images = student.generate(conditions, SamplingOptions(sampler="distilled", steps=steps, guidance=2.0), [0, 1],
                                  step_callback=lambda step, total: calls.append((step, total)))
        assert images.shape == (2, *size, 3) and calls == [(s, steps) for s in range(steps)]


def test_a_student_of_other_weights_is_refused(distilled, tmp_path: Path) -> None:
    teacher_path, path, _ = distilled
    other = tmp_path / "export.pt"
    payload = torch.load(teacher_path, weights_only=True)
    payload["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    torch.save(payload, other)
    student_path(other).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="other weights"):
        load_student(SemanticImageGenerator.load(other, "cpu"))


# ------------------------------------------------------------------ the receiver serves it


def test_the_host_plans_the_student_where_it_serves_and_falls_back_elsewhere(distilled, tmp_path: Path) -> None:
    teacher_path, _, _ = distilled
    host = ModelHost(make_settings(tmp_path, checkpoint=teacher_path))
    assert host.load(), host.load_error
    student = SamplingOptions(sampler="distilled", guidance=2.0)
    generator, sampling = host.plan(student, 1)
    assert generator is host.students[1] and (sampling.sampler, sampling.steps) == ("distilled", 1)
    generator, sampling = host.plan(dataclasses.replace(student, steps=2), 1)
    assert generator is host.students[1] and sampling.steps == 2
    for options, factor in ((student, 2), (dataclasses.replace(student, guidance=1.0), 1)):
        generator, sampling = host.plan(options, factor)  # the trajectory the student imitates
        assert generator is host.base() and (sampling.sampler, sampling.steps) == DISTILLATION_TEACHER
        assert sampling.guidance == options.guidance
    with pytest.raises(LimitError) as raised:
        host.plan(dataclasses.replace(student, steps=3), 1)
    assert raised.value.field == "steps"
    assert host.plan(SamplingOptions(sampler="ddim", steps=4, guidance=2.0), 1)[0] is host.base()
    without = ModelHost(make_settings(tmp_path, checkpoint=teacher_path, distilled=False))
    assert without.load() and without.students == {}
    assert without.plan(student, 1)[1].sampler == DISTILLATION_TEACHER[0]
    # a request naming no sampler gets the default, the student where it serves, else DDIM at its steps
    assert host.plan(SamplingOptions(steps=1, guidance=2.0), 1)[0] is host.students[1]
    assert host.plan(SamplingOptions(steps=1, guidance=0.0), 1)[1] == SamplingOptions(sampler="ddim", steps=1, guidance=0.0)
    assert host.plan(SamplingOptions(guidance=0.0), 1)[1] == SamplingOptions(sampler="ddim", steps=10, guidance=0.0)


@pytest.mark.parametrize("batching", ["request", "continuous"])
def test_the_receiver_samples_with_the_student_and_says_so(distilled, tmp_path: Path, batching: str) -> None:
    teacher_path, _, _ = distilled
    store = TransmissionStore(tmp_path / "store", max_items=50, max_age_s=3600)
    store.open()
    worker = GenerationWorker(make_settings(tmp_path, queue_size=8, checkpoint=teacher_path, batching=batching,
                                            max_batch_size=3), store)
    worker.load_model()
    assert worker.ready, worker.load_error
    request = gesco_pb2.SamplingRequest(sampler="distilled", guidance=2.0, seed=3, use_fds=True)
    jobs = [transmission(sampling=request, factor=factor) for factor in (1, 2, 1)]
    try:
        for header, symbols in jobs:
            queue_transmission(worker, header, symbols, "req")
        records = [wait_for_status(store, header.transmission_id, {"done", "failed"}) for header, _ in jobs]
    finally:
        worker.stop(5)
    for record, factor in zip(records, (1, 2, 1)):
        assert record["status"] == "done", record
        sampling = record["sampling"]
        if factor == 1:
            assert record["model"]["name"].endswith("-distilled") and (sampling["sampler"], sampling["steps"]) == ("distilled", 1)
        else:
            assert not record["model"]["name"].endswith("-distilled")
            assert (sampling["sampler"], sampling["steps"]) == DISTILLATION_TEACHER


# ------------------------------------------------------------------ a student per downsample factor


@pytest.fixture(scope="module")
def factor_student(distilled, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A copy of the tiny teacher and its student with a factor-2 adapter trained beside them, and
    the factor-2 student, started from the full-resolution one by the recipe's --downsample-factor
    and --init-from."""
    tmp_path = tmp_path_factory.mktemp("factor")
    (tmp_path / "models").mkdir()
    teacher, full_student = (tmp_path / "models" / p.name for p in distilled[:2])
    teacher.write_bytes(distilled[0].read_bytes())
    full_student.write_bytes(distilled[1].read_bytes())
    adapter = teacher.with_name("export.f2.adapter.pt")
    assert train_diffusion.main(train_args(tmp_path, "adapter", "--init-from", str(teacher), "--trainable", "spade",
                                           "--downsample-factor", "2", "--export-path", str(adapter),
                                           "--max-steps", "4")) == "max_steps"  # from the base's step 2
    argv = ["--data-root", str(tmp_path / "camvid"), "--teacher", str(teacher), "--out-dir", str(tmp_path / "student"),
            "--downsample-factor", "2", "--init-from", str(full_student), "--train-trajectories", "4",
            "--val-trajectories", "2", "--chunk-size", "4", "--link-height", "32", "--link-width", "32",
            "--batch-size", "2", "--max-steps", "2", "--eval-every", "2", "--log-every", "1", "--device", "cpu"]
    assert distill_generator.main(argv) == "max_steps"
    return teacher, adapter, student_path(teacher, 2)


def test_a_factor_student_learns_the_adapted_teacher_and_is_tied_to_its_adapter(factor_student) -> None:
    teacher_path, adapter, path = factor_student
    assert path.name == "export.f2.distilled.pt" and path.is_file()
    record = torch.load(path, weights_only=True)["meta"]["distillation"]
    assert (record["downsample_factor"], record["adapter"]) == (2, adapter.name)
    base = SemanticImageGenerator.load(teacher_path, "cpu")
    adapted = adapted_generators(base)
    students = load_students(base, adapted)
    assert sorted(students) == [1, 2] and all(s.is_student for s in students.values())
    with pytest.raises(ValueError, match="other weights"):  # the base alone is not its teacher
        load_student(base, 2)
    with pytest.raises(ValueError, match="downsample factor 2, not 1"):
        load_student(adapted[2], 1, path)


def test_the_host_runs_each_factors_student_and_falls_back_where_there_is_none(factor_student, tmp_path: Path) -> None:
    teacher_path, _, _ = factor_student
    host = ModelHost(make_settings(tmp_path, checkpoint=teacher_path))
    assert host.load(), host.load_error
    options = SamplingOptions(sampler="distilled", guidance=2.0)
    for factor in (1, 2):
        generator, sampling = host.plan(options, factor)
        assert generator is host.students[factor] and sampling.sampler == "distilled"
    generator, sampling = host.plan(options, 4)  # no student (nor adapter) for factor 4
    assert generator is host.base() and (sampling.sampler, sampling.steps) == DISTILLATION_TEACHER


def test_a_distilled_job_handed_to_another_replica_runs_on_its_factors_student(factor_student, tmp_path: Path) -> None:
    """A job's stored inputs (what a shared store hands over) name its sampler: the replica that
    takes it rebuilds it on the student `plan` chose, and one without that student says so."""
    teacher_path, _, _ = factor_student
    host = ModelHost(make_settings(tmp_path, checkpoint=teacher_path))
    assert host.load(), host.load_error
    for factor in (1, 2):
        generator, sampling = host.plan(SamplingOptions(sampler="distilled", guidance=2.0), factor)
        header, symbols = transmission(sampling=gesco_pb2.SamplingRequest(sampler="distilled", guidance=2.0),
                                       factor=factor)
        job = Job(header.transmission_id, "req", transport.semantic_header_from_proto(header.semantic), symbols, sampling,
                  seed=0, use_fds=True, generator=generator)
        rebuilt = decode_job_input(job.transmission_id, encode_job_input(job), 1, host.generator_for)
        assert rebuilt.generator is host.students[factor] and rebuilt.sampling == sampling
    without = ModelHost(make_settings(tmp_path, checkpoint=teacher_path, distilled=False))
    assert without.load()
    with pytest.raises(ValueError, match="distilled student for downsample factor 2"):
        decode_job_input(job.transmission_id, encode_job_input(job), 1, without.generator_for)
