"""Condition adapters: a generator's SPADE layers retrained for one link setting.

A downsampled link (the sender's `downsample_factor`) delivers blurred maps that the generator,
trained on full-resolution conditions, never saw. The condition enters the U-Net only through its
SPADE layers, so an adapter retrains just those (about a quarter of the weights, 3 MiB in fp16)
and leaves the image prior untouched. An adapter is tied to the base weights it was trained on by
a fingerprint of every other weight, so it can never be applied to another base model.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from shared.semantic.checkpoints import beside_by_factor, load_checkpoint, save_checkpoint, weights_fingerprint
from shared.semantic.diffusion.generator import SemanticDiffusionConfig, SemanticImageGenerator
from shared.semantic.diffusion.unet import SpadeGroupNorm

ADAPTER_KIND = "semantic-diffusion-adapter"


def adapter_parameter_names(network: nn.Module) -> list[str]:
    """The names of the parameters an adapter replaces: those of every SPADE layer."""
    return [f"{module_name}.{param_name}"
            for module_name, module in network.named_modules() if isinstance(module, SpadeGroupNorm)
            for param_name, _ in module.named_parameters()]


def freeze_all_but_adapter(network: nn.Module) -> list[nn.Parameter]:
    """Make only the SPADE layers trainable; returns their parameters for the optimiser."""
    names = set(adapter_parameter_names(network))
    trainable = []
    for name, param in network.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            trainable.append(param)
    return trainable


def base_fingerprint(network: nn.Module) -> str:
    """The fingerprint (`weights_fingerprint`) of every weight an adapter leaves alone."""
    return weights_fingerprint(network.state_dict(), exclude=frozenset(adapter_parameter_names(network)))


def save_adapter(path: str | Path, network: nn.Module, config: SemanticDiffusionConfig, meta: dict[str, Any]) -> None:
    """Write the SPADE weights of `network` (fp16) with the fingerprint of the rest."""
    names = set(adapter_parameter_names(network))
    weights = {name: t for name, t in network.state_dict().items() if name in names}
    save_checkpoint(path, ADAPTER_KIND, config, weights, {**meta, "base_fingerprint": base_fingerprint(network)})


def with_adapter(generator: SemanticImageGenerator, path: str | Path) -> SemanticImageGenerator:
    """A new generator: `generator`'s network with the adapter's SPADE weights (the base is untouched).

    ValueError when the adapter was trained for another network or other base weights, or when the
    base is quantized (its SPADE layers are not plain weights any more)."""
    if generator.info.quantization is not None:
        raise ValueError(f"adapters need an fp32 generator; this one is {generator.info.quantization}")
    payload = load_checkpoint(path, ADAPTER_KIND)
    if SemanticDiffusionConfig.from_dict(payload["config"]) != generator.config:
        raise ValueError(f"{path} was trained for another network configuration than {generator.info.name}")
    meta = payload["meta"]
    if meta.get("base_fingerprint") != base_fingerprint(generator.network):
        raise ValueError(f"{path} was trained on other base weights than {generator.info.checkpoint}")
    network = copy.deepcopy(generator.network)
    expected = set(adapter_parameter_names(network))
    if set(payload["state_dict"]) != expected:
        raise ValueError(f"{path} does not hold exactly the SPADE weights of this network")
    network.load_state_dict(payload["state_dict"], strict=False)
    info = dataclasses.replace(generator.info, name=meta.get("name", Path(path).stem), adapter=str(path),
                               training_steps=meta.get("step"))
    return SemanticImageGenerator(network, generator.config, info, generator.device)


def adapter_path(checkpoint: str | Path, downsample_factor: int) -> Path:
    """Where the adapter of `checkpoint` for a downsample factor lives: beside it, named
    <stem>.f<factor>.adapter.pt (models/diffusion-camvid.f8.adapter.pt)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.f{downsample_factor}.adapter.pt")


def adapter_paths(checkpoint: str | Path) -> dict[int, Path]:
    """The adapters found beside `checkpoint`, by downsample factor."""
    return beside_by_factor(checkpoint, "adapter.pt")


def adapted_generators(generator: SemanticImageGenerator) -> dict[int, SemanticImageGenerator]:
    """The generator for every downsample factor that has an adapter beside its checkpoint (none
    for an untrained generator). ValueError, naming the file, for an adapter that does not fit."""
    if generator.info.checkpoint is None:
        return {}
    return {factor: with_adapter(generator, path) for factor, path in adapter_paths(generator.info.checkpoint).items()}
