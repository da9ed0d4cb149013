"""CPU inference paths of the generator: int8 quantization and its checkpoints, on a tiny model."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from shared.limits import SamplingOptions
from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticDiffusionConfig, SemanticImageGenerator
from shared.semantic.diffusion.quantization import INT8, QuantizedConv, keeps_fp32, prepare_int8, quantize_generator
from shared.semantic.diffusion.unet import UNetConfig

TINY = UNetConfig(num_classes=4, image_height=8, image_width=16, model_channels=32, channel_mult=(1, 2),
                  attention_downsample=(2,), head_channels=32, spade_hidden=16)


def _conditions(count: int) -> torch.Tensor:
    labels = torch.randint(0, TINY.num_classes, (count, TINY.image_height, TINY.image_width),
                           generator=torch.Generator().manual_seed(count))
    return torch.nn.functional.one_hot(labels, TINY.num_classes).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def fp32() -> SemanticImageGenerator:
    """A tiny generator whose zero-initialised layers are perturbed, so every layer shapes the output."""
    generator = SemanticImageGenerator.load(None, "cpu", untrained_config=SemanticDiffusionConfig(unet=TINY))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in generator.network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return generator


@pytest.fixture(scope="module")
def int8(fp32: SemanticImageGenerator) -> SemanticImageGenerator:
    return quantize_generator(fp32, _conditions(2), [0, 1], "ddim", 4, 2.0)


def test_int8_generator_quantizes_the_inner_convolutions_and_makes_images(int8: SemanticImageGenerator) -> None:
    wrapped = {name for name, module in int8.network.named_modules() if isinstance(module, QuantizedConv)}
    assert wrapped and not any(keeps_fp32(name) for name in wrapped)
    assert "down.0.res.in_conv" in wrapped and "input_conv" not in wrapped
    assert int8.info.quantization == INT8 and int8.info.name.endswith("-int8")
    images = int8.generate(_conditions(3), SamplingOptions(sampler="ddim", steps=3, guidance=2.0), [0, 1, 2])
    assert images.shape == (3, TINY.image_height, TINY.image_width, 3) and images.dtype.name == "uint8"


def test_int8_network_stays_close_to_fp32(fp32: SemanticImageGenerator, int8: SemanticImageGenerator) -> None:
    x = torch.randn(2, 3, TINY.image_height, TINY.image_width, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([900, 100]), _conditions(2)
    with torch.inference_mode():
        reference, quantized = fp32.network(x, t, y), int8.network(x, t, y)
    relative_rms = ((quantized - reference).pow(2).mean() / reference.pow(2).mean()).sqrt()
    assert relative_rms < 0.1


def test_int8_checkpoint_loads_into_the_same_model(tmp_path, fp32: SemanticImageGenerator,
                                                   int8: SemanticImageGenerator) -> None:
    path = tmp_path / "int8.pt"
    meta = {"name": int8.info.name, "step": 7, "quantization": int8.info.quantization}
    save_checkpoint(path, CHECKPOINT_KIND, int8.config, int8.network.state_dict(), meta, half=False)
    loaded = SemanticImageGenerator.load(path, "cpu")
    assert loaded.info.quantization == INT8 and loaded.info.parameters == fp32.info.parameters
    conditions = _conditions(2)
    ddpm3 = SamplingOptions(sampler="ddpm", steps=3, guidance=2.0)
    assert (loaded.generate(conditions, ddpm3, [4, 5]) == int8.generate(conditions, ddpm3, [4, 5])).all()


def test_unknown_quantization_is_rejected(tmp_path, fp32: SemanticImageGenerator) -> None:
    path = tmp_path / "odd.pt"
    save_checkpoint(path, CHECKPOINT_KIND, fp32.config, fp32.network.state_dict(), {"quantization": "int4"})
    with pytest.raises(ValueError, match="unknown quantization"):
        SemanticImageGenerator.load(path, "cpu")


def test_channels_last_gives_the_same_images(fp32: SemanticImageGenerator) -> None:
    conditions = _conditions(2)
    reference = fp32.generate(conditions, SamplingOptions(sampler="ddpm", steps=4, guidance=2.0), [0, 1])
    nhwc = SemanticImageGenerator(copy.deepcopy(fp32.network), fp32.config, fp32.info, fp32.device)
    nhwc.use_channels_last()
    assert nhwc.network.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = nhwc.generate(conditions, SamplingOptions(sampler="ddpm", steps=4, guidance=2.0), [0, 1])
    assert images.shape == reference.shape
    assert np.abs(images.astype(int) - reference.astype(int)).max() <= 1


def test_a_traced_network_gives_the_same_images_at_any_batch_size(fp32: SemanticImageGenerator) -> None:
    traced = SemanticImageGenerator(copy.deepcopy(fp32.network), fp32.config, fp32.info, fp32.device)
    traced.use_channels_last()
    traced.trace()  # at batch 2
    assert isinstance(traced.network, torch.jit.ScriptModule)
    for count in (1, 3):
        conditions, seeds = _conditions(count), list(range(count))
        options = SamplingOptions(sampler="ddim", steps=4, guidance=2.0)
        reference = fp32.generate(conditions, options, seeds)
        assert np.abs(traced.generate(conditions, options, seeds).astype(int) - reference.astype(int)).max() <= 1


def test_int8_models_are_not_compiled_or_traced(int8: SemanticImageGenerator) -> None:
    with pytest.raises(ValueError, match="fp32"):
        int8.compile()
    with pytest.raises(ValueError, match="fp32"):
        int8.trace()


def test_compile_warms_up_every_batch_size_and_guidance(monkeypatch, fp32: SemanticImageGenerator) -> None:
    """After `compile`, requests of any batch size, guided or not, reuse the warmed-up graphs
    (dynamo's guards, checked with the eager backend; inductor would compile for minutes)."""
    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    generator = SemanticImageGenerator(copy.deepcopy(fp32.network), fp32.config, fp32.info, fp32.device)
    reference = fp32.generate(_conditions(3), SamplingOptions(sampler="ddpm", steps=2, guidance=2.0), [0, 1, 2])
    torch._dynamo.reset()
    try:
        generator.compile()
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        assert (generator.generate(_conditions(3), SamplingOptions(sampler="ddpm", steps=2, guidance=2.0), [0, 1, 2]) == reference).all()
        generator.generate(_conditions(1), SamplingOptions(sampler="ddim", steps=2, guidance=0.0), [0])
        generator.generate(_conditions(4), SamplingOptions(sampler="dpmpp2m", steps=2, guidance=0.0), [0, 1, 2, 3])
    finally:
        torch._dynamo.reset()


def test_measurement_options_change_the_recipe(fp32: SemanticImageGenerator) -> None:
    """--all-convolutions and --reduce-range of scripts.models.quantize_model reach the observers they name."""
    every = prepare_int8(fp32.network, all_convolutions=True)
    wrapped = {name for name, module in every.named_modules() if isinstance(module, QuantizedConv)}
    assert "input_conv" in wrapped and any(keeps_fp32(name) for name in wrapped)
    reduced = prepare_int8(fp32.network, reduce_range=True)
    observers = [m.quant.activation_post_process for m in reduced.modules() if isinstance(m, QuantizedConv)]
    assert observers and all(o.reduce_range for o in observers)
    assert not any(m.quant.activation_post_process.reduce_range
                   for m in prepare_int8(fp32.network).modules() if isinstance(m, QuantizedConv))
