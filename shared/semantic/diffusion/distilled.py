"""Distilled students: the teacher's guided trajectory in one or two network calls.

A student is a copy of a generator's network fine-tuned (training/distill_generator.py) so that
from a point x_t of its teacher's sampling trajectory (gesco.options.DISTILLATION_TEACHER: DDIM
over 10 steps, classifier-free guidance at a fixed scale) its x_0 prediction is where that
trajectory ends: trajectory distillation (Luhman & Luhman 2021) sampled the way consistency models
take several steps. The guidance is in its weights, so a step is one unguided forward instead of
the teacher's conditional and unconditional pair, and the `distilled` sampler
(samplers.DistilledSampler) needs one or two steps instead of ten.

A student file sits beside its teacher (<stem>.distilled.pt), is an ordinary generator checkpoint
whose meta records what it was distilled from, and is tied to the teacher's weights by their
fingerprint: a student is never served beside a base it was not distilled from. A student for maps
sent at a downsample factor F > 1 (<stem>.fF.distilled.pt) learned the trajectories of the base
with its factor-F condition adapter (adapters.py) where there is one: its fingerprint covers the
adapter's weights too.
"""
from __future__ import annotations

from pathlib import Path

from shared.semantic.checkpoints import beside_by_factor, load_checkpoint, weights_fingerprint
from shared.semantic.diffusion.adapters import ADAPTER_KIND
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticImageGenerator


def student_path(checkpoint: str | Path, downsample_factor: int = 1) -> Path:
    """Where the student of `checkpoint` for maps sent at `downsample_factor` lives: beside it,
    <stem>.distilled.pt for full-resolution maps, <stem>.f<factor>.distilled.pt otherwise."""
    checkpoint = Path(checkpoint)
    factor = f".f{downsample_factor}" if downsample_factor > 1 else ""
    return checkpoint.with_name(f"{checkpoint.stem}{factor}.distilled.pt")


def student_paths(checkpoint: str | Path) -> dict[int, Path]:
    """The students found beside `checkpoint`, by downsample factor."""
    full = student_path(checkpoint)
    return {**({1: full} if full.is_file() else {}), **beside_by_factor(checkpoint, "distilled.pt")}


def teacher_fingerprint(checkpoint: str | Path, adapter: str | Path | None = None) -> str:
    """The fingerprint of every weight of a teacher as its files hold them: the generator
    checkpoint's, with the SPADE weights of its condition adapter where it has one."""
    weights = dict(load_checkpoint(checkpoint, CHECKPOINT_KIND)["state_dict"])
    if adapter is not None:
        weights.update(load_checkpoint(adapter, ADAPTER_KIND)["state_dict"])
    return weights_fingerprint(weights)


def load_student(teacher: SemanticImageGenerator, downsample_factor: int = 1,
                 path: str | Path | None = None) -> SemanticImageGenerator | None:
    """The student of `teacher` (the base, or the base with its adapter for `downsample_factor`) for
    maps sent at that factor, from beside the base's checkpoint (or at `path`), on the teacher's
    device; None when there is none. ValueError, naming the file, for a file that is no student of
    these weights or of this factor."""
    if teacher.info.checkpoint is None:
        return None
    path = Path(path) if path is not None else student_path(teacher.info.checkpoint, downsample_factor)
    if not path.is_file():
        return None
    student = SemanticImageGenerator.load(path, device=str(teacher.device))
    if not student.is_student:
        raise ValueError(f"{path} is a generator checkpoint without a distillation record")
    if student.config != teacher.config:
        raise ValueError(f"{path} has another network configuration than {teacher.info.name}")
    record = load_checkpoint(path, CHECKPOINT_KIND)["meta"]["distillation"]
    if record.get("downsample_factor", 1) != downsample_factor:
        raise ValueError(f"{path} was distilled for maps sent at downsample factor {record.get('downsample_factor', 1)}, "
                         f"not {downsample_factor}")
    if record.get("teacher_fingerprint") != teacher_fingerprint(teacher.info.checkpoint, teacher.info.adapter):
        raise ValueError(f"{path} was distilled from other weights than {teacher.info.checkpoint}"
                         + (f" with {teacher.info.adapter}" if teacher.info.adapter else ""))
    return student


def load_students(base: SemanticImageGenerator,
                  adapted: dict[int, SemanticImageGenerator]) -> dict[int, SemanticImageGenerator]:
    """Every student beside the base's checkpoint, by downsample factor, each checked against its
    teacher (the factor's adapted generator in `adapted`, else the base)."""
    if base.info.checkpoint is None:
        return {}
    students = {}
    for factor, path in student_paths(base.info.checkpoint).items():
        student = load_student(adapted.get(factor, base), factor, path)
        if student is not None:
            students[factor] = student
    return students
