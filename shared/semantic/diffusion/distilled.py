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
fingerprint: a student is never served beside a base it was not distilled from.
"""
from __future__ import annotations

from pathlib import Path

from shared.semantic.checkpoints import load_checkpoint, weights_fingerprint
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticImageGenerator


def student_path(checkpoint: str | Path) -> Path:
    """Where the student of `checkpoint` lives: beside it, <stem>.distilled.pt."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.distilled.pt")


def teacher_fingerprint(checkpoint: str | Path) -> str:
    """The fingerprint of every weight in a generator checkpoint, as its file holds them."""
    return weights_fingerprint(load_checkpoint(checkpoint, CHECKPOINT_KIND)["state_dict"])


def load_student(teacher: SemanticImageGenerator, path: str | Path | None = None) -> SemanticImageGenerator | None:
    """The student beside `teacher`'s checkpoint (or at `path`), on the teacher's device; None when
    there is none. ValueError, naming the file, for a file that is no student of these weights."""
    if teacher.info.checkpoint is None:
        return None
    path = Path(path) if path is not None else student_path(teacher.info.checkpoint)
    if not path.is_file():
        return None
    student = SemanticImageGenerator.load(path, device=str(teacher.device))
    if not student.is_student:
        raise ValueError(f"{path} is a generator checkpoint without a distillation record")
    if student.config != teacher.config:
        raise ValueError(f"{path} has another network configuration than {teacher.info.name}")
    recorded = load_checkpoint(path, CHECKPOINT_KIND)["meta"]["distillation"].get("teacher_fingerprint")
    if recorded != teacher_fingerprint(teacher.info.checkpoint):
        raise ValueError(f"{path} was distilled from other weights than {teacher.info.checkpoint}")
    return student
