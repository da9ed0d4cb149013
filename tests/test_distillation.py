"""Distillation (issue: one- and two-step generation): the student's sampler, its file beside
the teacher, its guards, and the whole recipe run small."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.limits import LimitError, SamplingOptions
from shared.semantic.diffusion.distilled import load_student, student_path
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic.diffusion.samplers import spaced_timesteps, student_timesteps
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
    assert student.resolve(SamplingOptions(guidance=2.0)) == SamplingOptions(sampler="distilled", steps=2, guidance=2.0)
    for options, field in ((SamplingOptions(sampler="ddim", guidance=2.0), "sampler"),
                           (SamplingOptions(guidance=1.0), "guidance"),
                           (SamplingOptions(sampler="distilled", steps=3, guidance=2.0), "steps")):
        with pytest.raises(LimitError) as raised:
            student.resolve(options)
        assert raised.value.field == field
    with pytest.raises(LimitError, match="none is loaded"):
        teacher.resolve(SamplingOptions(sampler="distilled", guidance=2.0))
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
