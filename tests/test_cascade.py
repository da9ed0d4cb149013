"""The cascade evaluation at 192x256 (evaluation/cascade.py), on a tiny generator and stage."""
from __future__ import annotations

import numpy as np
import torch

from evaluation.cascade import cascade_images, grid_picture, markdown, received_maps, targets
from shared.semantic.diffusion.generator import SemanticDiffusionConfig, SemanticImageGenerator
from shared.semantic.diffusion.unet import UNetConfig
from shared.semantic.upscaler import Upscaler, UpscalerConfig, UpscalerNet

GENERATOR = UNetConfig(num_classes=12, image_height=8, image_width=16, model_channels=16, channel_mult=(1, 2),
                       attention_downsample=(2,), head_channels=16, spade_hidden=8)
STAGE = UpscalerConfig(num_classes=12, in_height=8, in_width=16, channels=8, blocks=1, mid_channels=8, mid_blocks=1,
                       out_channels=4, spade_hidden=4, out_spade_hidden=4)


def test_the_received_maps_come_at_the_size_they_were_sent() -> None:
    labels = np.kron(np.random.default_rng(0).integers(0, 12, (3, 4, 8)), np.ones((1, 4, 4), dtype=np.int64))
    for factor in (1, 2):
        maps = received_maps(labels, 10.0, factor, seed=0)
        assert maps.shape == (3, 12, 16 // factor, 32 // factor) and torch.isfinite(maps).all()
    clean = received_maps(labels, 100.0, 1, seed=0)
    assert (clean.argmax(1).numpy() == labels).mean() > 0.99


def test_the_stage_and_bicubic_upscale_the_same_base_images() -> None:
    generator = SemanticImageGenerator.load(None, "cpu", untrained_config=SemanticDiffusionConfig(unet=GENERATOR))
    torch.manual_seed(0)
    upscaler = Upscaler(UpscalerNet(STAGE), "cpu", {"name": "tiny"})  # untrained: exactly bicubic
    maps = received_maps(np.random.default_rng(1).integers(0, 12, (3, 16, 32)), 10.0, 1, seed=0)
    images = cascade_images(generator, upscaler, maps, batch_size=2)
    assert images["base"].shape == (3, 8, 16, 3)
    assert images["bicubic"].shape == images["stage"].shape == (3, 32, 64, 3)
    assert np.abs(images["stage"].astype(int) - images["bicubic"].astype(int)).max() <= 1
    again = cascade_images(generator, upscaler, maps, batch_size=3)  # seeds follow the image, not the batch
    assert (again["base"] == images["base"]).all()
    picture = grid_picture({"labels": np.zeros((2, 32, 64), dtype=np.uint8), "real": images["bicubic"][:2],
                            "bicubic": images["bicubic"][:2], "stage": images["stage"][:2]})
    assert picture.shape == (2 * 36, 4 * 68, 3)


def test_the_targets_say_met_or_missed_with_their_numbers() -> None:
    def row(snr: float, bicubic: float, stage: float) -> dict:
        return {"snr_db": snr, "bicubic": {"miou": bicubic, "fsd": 2.0}, "stage": {"miou": stage, "fsd": 1.5},
                "stage_minus_bicubic_miou": {"mean": stage - bicubic, "se": 0.01}}

    result = {"images": 4, "downsample_factor": 1, "sampler": "ddim:10", "map_size": [96, 128], "model": "m", "upscaler": "u",
              "segmenter": "s", "command": "c", "real": {"miou": 0.6},
              "rows": [row(1.0, 0.40, 0.50), row(100.0, 0.50, 0.55)]}
    lines = targets(result)
    assert lines[0].endswith("met") and lines[1].endswith("met")
    assert "0.917, met" in lines[2]  # 0.55 / 0.6
    assert "0.909, missed" in lines[3]  # 0.50 / 0.55
    assert "| 1 | 0.400 / 2.000 | 0.500 / 1.500 | +0.100 ± 0.010 | 0.833 |" in markdown(result)
