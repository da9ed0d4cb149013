"""Receiver defaults for a kind of machine, chosen with GESCO_RECEIVER_PRESET.

The field defaults of ReceiverSettings suit the small CPU this project is developed on
(docs/benchmarks.md). A GPU wants others: batches as large as the jobs waiting (continuous
batching, up to 128 jobs of 2 rows each for guidance), a queue sized by that batch, the network
replayed as CUDA graphs at fixed batch sizes, PNG encoding on several threads. A preset fills in
only what the environment (or the caller) leaves unset, so GESCO_RECEIVER_PRESET=gpu with
GESCO_RECEIVER_MAX_BATCH_SIZE=64 keeps the 64. docker-compose.yml's gpu profile uses it.
"""
from __future__ import annotations

from typing import Any

# Rows of one guided forward: each job's conditional pass, and its unconditional one when guided.
GPU_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {
        "device": "cuda",
        "batching": "continuous",
        "max_batch_size": 128,
        "batch_buckets": GPU_BATCH_BUCKETS,
        "cuda_graphs": True,
        "encode_workers": 4,
        "max_grpc_workers": 32,
    },
}


def queue_size_for(max_batch_size: int) -> int:
    """The queue a batch size wants: room for the next full batch while one runs, at least 8."""
    return max(8, 2 * max_batch_size)


def apply_preset(values: Any) -> Any:
    """Settings input with the named preset's values added where nothing was set."""
    if not isinstance(values, dict) or not values.get("preset"):
        return values
    name = values["preset"]
    if name not in PRESETS:  # the field's own validation names the allowed presets
        return values
    return {**PRESETS[name], **values}
