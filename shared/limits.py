"""Request limits that every layer checks, and the sampling options checked against them.

One place, so the sender's form, the receiver's validation and the generator can never disagree.
Standard library only: the torch-free sender imports it as the models do.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

MIN_SNR_DB = -10.0
MAX_SNR_DB = 100.0
MIN_STEPS = 1
MAX_STEPS = 1000
MAX_GUIDANCE = 20.0
MIN_RICIAN_K_DB = -30.0
MAX_RICIAN_K_DB = 40.0
MAX_DOWNSAMPLE_FACTOR = 64
MAX_STATUS_WAIT_S = 60.0
# What a sampler name may look like; which names exist only the receiver's registry knows.
SAMPLER_NAME_PATTERN = r"^[A-Za-z0-9_+\-]{1,32}$"


class InvalidRequestError(ValueError):
    """A request the client got wrong: a bad field, header or stream. Servers answer it as the
    client's fault (gRPC INVALID_ARGUMENT, HTTP 4xx); any other exception is theirs (INTERNAL)."""


class LimitError(InvalidRequestError):
    """A request value outside its limits; `field` names it and starts the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """How to sample an image, checked against the limits when made: every layer that holds one
    holds a valid one, and equal options can share a sampling batch.

    An empty `sampler` and 0 `steps` stand for the defaults (the receiver's sampler, that
    sampler's steps); `shared.semantic.diffusion.samplers.resolve` fills them in.
    """

    sampler: str = ""
    steps: int = 0
    guidance: float

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, str) or (self.sampler and not re.fullmatch(SAMPLER_NAME_PATTERN, self.sampler)):
            raise LimitError("sampler", f"must match {SAMPLER_NAME_PATTERN}, got {str(self.sampler)[:40]!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not (
            self.steps == 0 or MIN_STEPS <= self.steps <= MAX_STEPS
        ):
            raise LimitError("steps", f"must be in {MIN_STEPS}..{MAX_STEPS} (0: the sampler's default), got {self.steps!r}")
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance)
                and 0.0 <= self.guidance <= MAX_GUIDANCE):
            raise LimitError("guidance", f"must be in [0, {MAX_GUIDANCE:g}], got {self.guidance!r}")
        object.__setattr__(self, "guidance", float(self.guidance))
