"""Request limits that every layer checks: one place, so the sender's form, the receiver's
validation and the generator can never disagree. Plain constants: importing this loads nothing."""
from __future__ import annotations

MIN_SNR_DB = -10.0
MAX_SNR_DB = 100.0
MIN_STEPS = 1
MAX_STEPS = 1000
MAX_GUIDANCE = 20.0
MAX_STATUS_WAIT_S = 60.0
