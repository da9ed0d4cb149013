"""Int8 post-training quantization of the semantic U-Net for CPU inference.

Convolutions hold 94% of the weights, so they are what int8 shrinks: each gets int8 weights (one
scale per output channel) and an int8 input whose range was observed while the fp32 model sampled
real conditions. GroupNorm, SPADE's modulation, SiLU, attention and upsampling stay fp32, so every
convolution quantizes its input and dequantizes its output (eager-mode static quantization; FX
tracing fails on SPADE's shape test). The Linear layers of the timestep path stay fp32: dynamic
int8 gained nothing there (docs/benchmarks.md). Quantized kernels run on the CPU only.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from torch.ao import quantization as tq

if TYPE_CHECKING:
    from shared.diffusion.generator import SemanticImageGenerator

INT8 = "int8-static-conv"  # the `quantization` entry of an int8 checkpoint's meta

# torch's x86 default, but with all 8 bits for activations: its reduce_range (7 bits, a guard
# against int16 saturation on CPUs without VNNI) doubled the images' distance from fp32 here, on
# an AVX2 CPU without VNNI (mean |difference| about 10 vs 5 / 255 at DDIM 10, as scripts.quantize_model
# reports it with either setting).
QCONFIG = tq.QConfig(
    activation=tq.HistogramObserver.with_args(reduce_range=False),
    weight=tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
)


class QuantizedConv(nn.Module):
    """One convolution between a quantize and a dequantize step, so fp32 layers surround it."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = conv
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.conv(self.quant(x)))


def keeps_fp32(name: str) -> bool:
    """The convolutions that carry the signal itself: the image input, the output and the residual
    skips. In int8 they caused most of the output error (relative RMS 0.050 with every convolution
    in int8, 0.015 with these in fp32), for 3% of the weights."""
    return name in ("input_conv", "out.2") or name.endswith(".skip")


def _wrap_convolutions(module: nn.Module, qconfig: tq.QConfig, prefix: str = "") -> None:
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, (nn.Conv1d, nn.Conv2d)):
            if not keeps_fp32(path):
                wrapper = QuantizedConv(child)
                wrapper.qconfig = qconfig
                setattr(module, name, wrapper)
        else:
            _wrap_convolutions(child, qconfig, f"{path}.")


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization is deprecated in favour of torchao but still the CPU int8 path in torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|must run observer|quantize_per).*")
        yield


def prepare_int8(network: nn.Module) -> nn.Module:
    """A CPU copy of `network` whose convolutions observe their inputs, ready for calibration."""
    prepared = copy.deepcopy(network).cpu().eval()
    _wrap_convolutions(prepared, QCONFIG)
    with _quiet():
        return tq.prepare(prepared)


def convert_int8(prepared: nn.Module) -> nn.Module:
    """Replace the observed convolutions of a calibrated `prepare_int8` copy by int8 kernels."""
    with _quiet():
        return tq.convert(prepared)


def int8_skeleton(network: nn.Module) -> nn.Module:
    """The int8 module structure of `network`, for loading a saved int8 state dict into."""
    return convert_int8(prepare_int8(network))


@contextmanager
def observing(network: nn.Module, prepared: nn.Module) -> Iterator[None]:
    """While open, every forward of `network` also runs `prepared` on the same inputs.

    Calibrating inside real sampling gives the observers what the int8 model will see: every noise
    level of the chain, conditional and unconditional passes, and the receiver's maps.
    """
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        prepared(*(a.cpu() for a in args))

    handle = network.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def quantize_generator(generator: SemanticImageGenerator, conditions: torch.Tensor, seeds: Sequence[int],
                       sampler: str, steps: int, guidance: float) -> SemanticImageGenerator:
    """An int8 CPU copy of `generator`, calibrated while the fp32 model samples `conditions`."""
    prepared = prepare_int8(generator.network)
    with observing(generator.network, prepared):
        generator.generate(conditions, sampler, steps, guidance, seeds)
    info = dataclasses.replace(generator.info, name=f"{generator.info.name}-int8", quantization=INT8)
    return type(generator)(convert_int8(prepared), generator.config, info, torch.device("cpu"))
