"""The upscaling stage: network shapes, map sizes, checkpoints, degradation and one training step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.upscaling import UpscalingSet, area_inputs, clean_conditions
from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.segmenter import Segmenter, SegmenterConfig
from shared.semantic.upscaler import CHECKPOINT_KIND, ImageStage, Upscaler, UpscalerConfig, UpscalerNet, bicubic
from training.train_upscaler import TrainConfig, Trainer, degrade

TINY = UpscalerConfig(num_classes=4, in_height=6, in_width=8, channels=8, blocks=1, mid_channels=8, mid_blocks=1,
                      out_channels=4, spade_hidden=4, out_spade_hidden=4)


def tiny_upscaler() -> Upscaler:
    torch.manual_seed(0)
    return Upscaler(UpscalerNet(TINY), "cpu", {"name": "tiny"})


def test_output_shape_and_range():
    up = tiny_upscaler()
    out = up(torch.rand(2, 3, 6, 8) * 2 - 1, torch.rand(2, 4, 12, 16))
    assert out.shape == (2, 3, 24, 32)
    assert out.min() >= -1 and out.max() <= 1
    assert isinstance(up, ImageStage) and up.model_name == "tiny"


@pytest.mark.parametrize("map_size", [(3, 4), (6, 8), (12, 16), (24, 32), (48, 64), (10, 7)])
def test_any_map_size(map_size):
    out = tiny_upscaler()(torch.zeros(1, 3, 6, 8), torch.rand(1, 4, *map_size))
    assert out.shape == (1, 3, 24, 32) and torch.isfinite(out).all()


def test_untrained_network_is_bicubic():
    images = torch.rand(1, 3, 6, 8) * 2 - 1
    out = UpscalerNet(TINY)(images, torch.rand(1, 4, 12, 16))
    assert torch.allclose(out, bicubic(images, 4))


def test_wrong_shapes_are_refused():
    up = tiny_upscaler()
    with pytest.raises(ValueError, match="images"):
        up(torch.zeros(1, 3, 12, 16), torch.zeros(1, 4, 12, 16))
    with pytest.raises(ValueError, match="conditions"):
        up(torch.zeros(1, 3, 6, 8), torch.zeros(1, 5, 12, 16))


def test_checkpoint_roundtrip_and_kind(tmp_path):
    up = tiny_upscaler()
    for p in up.net.parameters():  # move the zero-initialised output off zero
        p.data.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "up.pt"
    save_checkpoint(path, CHECKPOINT_KIND, TINY, up.net.state_dict(), {"name": "tiny"})
    loaded = Upscaler.from_checkpoint(path, "cpu")
    assert loaded.config == TINY and loaded.model_name == "tiny"
    x, m = torch.rand(1, 3, 6, 8) * 2 - 1, torch.rand(1, 4, 12, 16)
    assert torch.allclose(loaded(x, m), up(x, m), atol=2e-2)  # fp16 weights
    save_checkpoint(tmp_path / "other.pt", "segmenter", TINY, up.net.state_dict())
    with pytest.raises(ValueError, match="upscaler"):
        Upscaler.from_checkpoint(tmp_path / "other.pt", "cpu")


def test_degradation_shape_and_range():
    cfg = TrainConfig(clean_p=0.0, blur_p=1.0, noise_max=50.0)
    targets = torch.rand(4, 3, 24, 32) * 2 - 1
    out = degrade(targets, cfg, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 6, 8)
    assert out.min() >= -1 and out.max() <= 1
    clean = degrade(targets, TrainConfig(clean_p=1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(clean, torch.nn.functional.interpolate(targets, scale_factor=0.25, mode="area"))


def test_one_training_step_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 12, (4, 16, 24), dtype=np.uint8)
    val = UpscalingSet(images[:3], np.repeat(np.repeat(labels[:3], 2, 1), 2, 2), area_inputs(images[:3]),
                       clean_conditions(labels[:3]))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), export_path=str(tmp_path / "up.pt"), channels=8, blocks=1,
                      mid_channels=8, mid_blocks=1, out_channels=4, spade_hidden=4, out_spade_hidden=4,
                      crop_height=16, crop_width=24, batch_size=2, adv_start=1, disc_channels=4,
                      max_steps=2, eval_every=2, log_every=1, minutes=5)
    segmenter = Segmenter.untrained(SegmenterConfig(base_channels=8, input_height=16, input_width=24), "cpu")
    trainer = Trainer(cfg, train=(images, labels), val=val, segmenter=segmenter)
    assert trainer.run() == "max_steps"
    assert trainer.step == 2 and (tmp_path / "run" / "state.pt").exists()
    resumed = Trainer(cfg, train=(images, labels), val=val, segmenter=segmenter)
    assert resumed.load_state() and resumed.step == 2
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


def test_shipped_checkpoint_loads():
    from shared.paths import REPO_ROOT

    path = REPO_ROOT / "models" / "upscaler-camvid.pt"
    up = Upscaler.from_checkpoint(path, "cpu")
    assert up.config.in_height == 48 and up.config.in_width == 64 and up.config.num_classes == 12
    assert all(t.dtype == torch.float32 for t in up.net.state_dict().values())
    out = up(torch.zeros(1, 3, 48, 64), torch.full((1, 12, 96, 128), 1 / 12))
    assert out.shape == (1, 3, 192, 256) and torch.isfinite(out).all()
