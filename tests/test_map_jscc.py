"""The learned map encoder (shared/semantic/map_jscc.py) and its training script."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.map_jscc import CHECKPOINT_KIND, MapJscc, MapJsccConfig, load_map_jscc


def test_the_encoder_sends_unit_power_symbols_and_the_decoder_returns_the_generator_size() -> None:
    config = MapJsccConfig(channels=8)
    assert config.num_symbols == 8 * 12 * 16  # 1,536 real symbols: 768 uses, 1/48 of 96x128x3
    model = MapJscc(config).eval()
    maps = torch.zeros(2, 12, 96, 128)
    maps[0, 3] = 1  # one class everywhere
    maps[1, 0, :48], maps[1, 5, 48:] = 1, 1  # two halves
    symbols = model.encode(maps)
    assert symbols.shape == (2, 1536)
    assert torch.allclose(symbols.square().mean(1), torch.ones(2), atol=1e-4)
    condition = model.condition(symbols)
    assert condition.shape == (2, 12, 48, 64) and torch.allclose(condition.sum(1), torch.ones(2, 48, 64), atol=1e-5)
    with pytest.raises(ValueError, match="maps must have shape"):
        model.encode(torch.zeros(1, 12, 48, 64))
    with pytest.raises(ValueError, match="symbols must have shape"):
        model.decode(torch.zeros(1, 100))


def test_sizes_that_the_decoder_cannot_reach_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        MapJsccConfig(map_height=100)
    with pytest.raises(ValueError, match="times a power of two"):
        MapJsccConfig(out_height=40)


def test_a_missing_checkpoint_is_a_clear_error_and_a_saved_one_loads(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="models/map-jscc-1-24.pt is missing: train one with"):
        load_map_jscc(tmp_path / "none.pt", shown_as="models/map-jscc-1-24.pt")
    config = MapJsccConfig(channels=4, width=16)
    model = MapJscc(config)
    save_checkpoint(tmp_path / "jscc.pt", CHECKPOINT_KIND, config, model.state_dict(), {"steps": 3})
    loaded, meta = load_map_jscc(tmp_path / "jscc.pt")
    assert loaded.config == config and meta == {"steps": 3} and not loaded.training
    save_checkpoint(tmp_path / "other.pt", "segmenter", config, model.state_dict())
    with pytest.raises(ValueError, match="expected 'map-jscc'"):
        load_map_jscc(tmp_path / "other.pt")


def test_training_writes_a_checkpoint_with_its_val_scores(tmp_path: Path) -> None:
    from training import train_map_jscc

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            labels = np.kron(rng.integers(0, 12, (6, 8)), np.ones((16, 16), dtype=np.int64)).astype(np.uint8)
            for kind, array in (("images", rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)), ("labels", labels)):
                path = tmp_path / "camvid" / split / kind / f"f{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(path), array)
    out = tmp_path / "jscc.pt"
    meta = train_map_jscc.main(["--ratio", "1/96", "--cpu-minutes", "0.02", "--width", "16", "--batch-size", "2",
                                "--data-root", str(tmp_path / "camvid"), "--out", str(out)])
    model, saved = load_map_jscc(out)
    assert model.config.channels == 4 and saved == meta and meta["ratio"] == "1/96" and meta["steps"] >= 1
    assert set(meta["val_decoded_maps_average_power_snr"]) == {"1", "5", "10", "20"}
    with pytest.raises(SystemExit):  # 1/100 of the source is not a whole number of symbols a position
        train_map_jscc.main(["--ratio", "1/100", "--data-root", str(tmp_path / "camvid"), "--out", str(out)])
