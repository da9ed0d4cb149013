"""Int8 post-training quantization of the semantic U-Net for CPU inference.

Convolutions hold 94% of the weights (scripts.models.quantize_model prints the share), so they are what
int8 shrinks: each gets int8 weights (one
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

from shared.limits import SamplingOptions

if TYPE_CHECKING:
    from shared.semantic.diffusion.generator import SemanticImageGenerator

INT8 = "int8-static-conv"  # the `quantization` entry of an int8 checkpoint's meta



def qconfig(reduce_range: bool = False) -> tq.QConfig:
    """torch's x86 default, but by default with all 8 bits for activations: reduce_range (7 bits)
    guards against int16 saturation on CPUs without VNNI, and on the shipped model it doubles the
    images' distance from fp32 (11.0 vs 5.6 / 255, `scripts.models.quantize_model --reduce-range`;
    docs/benchmarks.md)."""
    return tq.QConfig(
        activation=tq.HistogramObserver.with_args(reduce_range=reduce_range),
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
    skips, 2.6% of the weights. In int8 they triple a forward's error (relative RMS 0.107 vs 0.034,
    `scripts.models.quantize_model --all-convolutions`; docs/benchmarks.md)."""
    return name in ("input_conv", "out.2") or name.endswith(".skip")


def _wrap_convolutions(module: nn.Module, config: tq.QConfig, all_convolutions: bool, prefix: str = "") -> None:
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, (nn.Conv1d, nn.Conv2d)):
            if all_convolutions or not keeps_fp32(path):
                wrapper = QuantizedConv(child)
                wrapper.qconfig = config
                setattr(module, name, wrapper)
        else:
            _wrap_convolutions(child, config, all_convolutions, f"{path}.")


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization is deprecated in favour of torchao but still the CPU int8 path in torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|must run observer|quantize_per).*")
        yield


def prepare_int8(network: nn.Module, reduce_range: bool = False, all_convolutions: bool = False) -> nn.Module:
    """A CPU copy of `network` whose convolutions observe their inputs, ready for calibration.
    The defaults are the recipe that checkpoints store; the options exist to measure its choices."""
    prepared = copy.deepcopy(network).cpu().eval()
    _wrap_convolutions(prepared, qconfig(reduce_range), all_convolutions)
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
                       sampler: str, steps: int, guidance: float, reduce_range: bool = False,
                       all_convolutions: bool = False) -> SemanticImageGenerator:
    """An int8 CPU copy of `generator`, calibrated while the fp32 model samples `conditions`."""
    prepared = prepare_int8(generator.network, reduce_range, all_convolutions)
    with observing(generator.network, prepared):
        generator.generate(conditions, SamplingOptions(sampler=sampler, steps=steps, guidance=guidance), seeds)
    info = dataclasses.replace(generator.info, name=f"{generator.info.name}-int8", quantization=INT8)
    return type(generator)(convert_int8(prepared), generator.config, info, torch.device("cpu"))
