"""The network called at a few fixed batch sizes (buckets), optionally replayed as CUDA graphs.

On a GPU, replaying a forward as a CUDA graph saves its kernel launches (not yet measured here:
`python -m scripts.gpu.gpu_serving_check run` times a batch-2 forward both ways and would write
docs/benchmarks-gpu.md). A
graph has fixed shapes, so the rows of a call are padded up to the smallest bucket that holds them
(a larger call runs in chunks of the largest bucket), and every bucket is captured once, at start,
before requests arrive. The padded rows are zeros or an earlier call's inputs; the network treats
every row on its own (GroupNorm and attention are per image), so they never touch the real rows,
and their outputs are dropped. Without CUDA graphs the buckets still bound the shapes a compiled
network (torch.compile without dynamic shapes) sees. On a CPU neither is worth it (the buckets only
add padded rows), so the receiver uses buckets only where its settings ask for them.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def normalise_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Distinct positive bucket sizes, ascending; ValueError for an empty list or a size < 1."""
    sizes = tuple(sorted(set(int(size) for size in buckets)))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch buckets must be positive sizes, got {list(buckets)}")
    return sizes


@dataclass
class _Captured:
    """One bucket's CUDA graph and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    t: torch.Tensor
    condition: torch.Tensor
    output: torch.Tensor


class BucketedForward:
    """`network(x, t, condition)` at the bucket sizes only; rows beyond a bucket are padding."""

    def __init__(self, network: Network, buckets: Sequence[int], input_shape: tuple[int, int, int],
                 condition_shape: tuple[int, int, int], device: torch.device, cuda_graphs: bool = False) -> None:
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.network = network
        self.buckets = normalise_buckets(buckets)
        self.input_shape = input_shape
        self.condition_shape = condition_shape
        self.device = device
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, _Captured] = {}

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket that holds `rows`; the largest for more (the call then runs in chunks)."""
        if rows < 1:
            raise ValueError(f"a forward needs at least one row, got {rows}")
        return next((size for size in self.buckets if size >= rows), self.buckets[-1])

    def chunks(self, rows: int) -> list[tuple[int, int, int]]:
        """(first row, rows, bucket) of each call that `rows` rows take."""
        largest, calls, first = self.buckets[-1], [], 0
        while first < rows:
            count = min(largest, rows - first)
            calls.append((first, count, self.bucket_for(count)))
            first += count
        return calls

    @torch.inference_mode()
    def warm_up(self) -> dict[int, float]:
        """Run (and with CUDA graphs capture) every bucket once, largest first, so no request pays
        for it; returns the seconds each took."""
        seconds = {}
        for size in reversed(self.buckets):
            started = time.perf_counter()
            if self.cuda_graphs:
                self._graphs[size] = self._capture(size)
            else:
                self.network(*self._zeros(size))
            seconds[size] = time.perf_counter() - started
        log.info("forward buckets warmed up", extra={"buckets": list(self.buckets), "cuda_graphs": self.cuda_graphs,
                                                     "seconds": {str(k): round(v, 3) for k, v in seconds.items()}})
        return seconds

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        outputs = [self._padded(x[first:first + count], t[first:first + count], condition[first:first + count], bucket)
                   for first, count, bucket in self.chunks(len(x))]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _padded(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, bucket: int) -> torch.Tensor:
        rows = len(x)
        captured = self._graphs.get(bucket)
        if captured is not None:
            captured.x[:rows].copy_(x)
            captured.t[:rows].copy_(t)
            captured.condition[:rows].copy_(condition)
            captured.graph.replay()
            return captured.output[:rows].clone()  # the next replay overwrites the static output
        if rows == bucket:
            return self.network(x, t, condition)
        padded_x, padded_t, padded_condition = self._zeros(bucket)
        padded_x[:rows], padded_t[:rows], padded_condition[:rows] = x, t, condition
        return self.network(padded_x, padded_t, padded_condition)[:rows]

    def _zeros(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.zeros(rows, *self.input_shape, device=self.device),
                torch.zeros(rows, dtype=torch.long, device=self.device),
                torch.zeros(rows, *self.condition_shape, device=self.device))

    def _capture(self, size: int) -> _Captured:
        """Warm the bucket up on a side stream (cuDNN picks its kernels, the allocator its blocks),
        then record one forward into a CUDA graph (PyTorch's documented recipe)."""
        x, t, condition = self._zeros(size)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.network(x, t, condition)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.network(x, t, condition)
        return _Captured(graph, x, t, condition, output)
