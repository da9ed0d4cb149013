"""training/: weights in parts, resuming from them, the time budget and the batched link in
train_diffusion.py, on tiny fake CamVid folders (no real data needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.semantic.checkpoints import load_checkpoint
from tests.training_helpers import train_args, train_log
from training import train_diffusion
from training.weight_parts import MAX_PART_BYTES, has_parts, load_parts, save_parts


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_parts_round_trip_and_size_limit(tmp_path: Path) -> None:
    payload = {"w": torch.randn(300, 100).half(), "b": torch.arange(7), "step": 12, "name": "x"}
    parts = save_parts(payload, tmp_path, part_bytes=10_000)
    assert len(parts) > 1 and all(p.stat().st_size <= 10_000 for p in parts)
    back = load_parts(tmp_path)
    assert torch.equal(back["w"], payload["w"]) and torch.equal(back["b"], payload["b"])
    assert back["step"] == 12 and back["name"] == "x"
    # a smaller payload under the same name leaves no stale parts behind
    save_parts({"w": torch.zeros(2)}, tmp_path, part_bytes=10_000)
    assert sorted(p.name for p in tmp_path.glob("weights.part*")) == ["weights.part00"]
    with pytest.raises(ValueError, match="part_bytes"):
        save_parts(payload, tmp_path, part_bytes=MAX_PART_BYTES + 1)


def test_parts_detect_damage(tmp_path: Path) -> None:
    save_parts({"w": torch.randn(100, 100)}, tmp_path, part_bytes=8_000)
    part = tmp_path / "weights.part01"
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="weights.part01"):
        load_parts(tmp_path)
    part.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_parts(tmp_path)
    assert not has_parts(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError):
        load_parts(tmp_path / "elsewhere")


def test_parts_resume_rewarms_the_learning_rate(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    assert train_diffusion.main(train_args(tmp_path, "a", "--max-steps", "3", "--save-parts", str(parts))) == "max_steps"
    payload = load_parts(parts)
    assert payload["step"] == 3 and payload["ema"]["out.2.weight"].dtype == torch.float16
    assert "model" in payload and "optimizer" not in payload

    argv = train_args(tmp_path, "b", "--max-steps", "5", "--resume-parts", str(parts), "--rewarm-steps", "4", "--lr", "1e-3")
    trainer = train_diffusion.Trainer(train_diffusion.parse_config(argv))
    assert trainer.load_state() == "parts"
    assert trainer.step == 3
    for name, value in trainer.ema.state_dict().items():
        torch.testing.assert_close(value, payload["ema"][name].float())
    assert trainer.lr_at(3) == pytest.approx(1e-3 / 4) and trainer.lr_at(6) == pytest.approx(1e-3)
    assert train_diffusion.main(argv) == "max_steps"
    log = train_log(tmp_path, "b")
    assert log[0]["resumed"] == "parts"
    assert [r["lr"] for r in log if "lr" in r] == pytest.approx([1e-3 / 4, 2e-3 / 4])
    # a second run in the same out_dir resumes exactly from its state.pt, not from the parts
    assert train_diffusion.main(argv + ["--max-steps", "6"]) == "max_steps"
    starts = [r for r in train_log(tmp_path, "b") if r.get("event") == "start"]
    assert [r["resumed"] for r in starts] == ["parts", "state"] and starts[1]["step"] == 5


def test_parts_with_ema_only_and_export(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    train_diffusion.main(train_args(tmp_path, "a", "--max-steps", "2", "--save-parts", str(parts), "--parts-include", "ema"))
    assert "model" not in load_parts(parts)
    out = tmp_path / "shipped.pt"
    train_diffusion.main(["--export-parts", str(parts), "--export-path", str(out)])
    shipped = load_checkpoint(out, "semantic-diffusion")
    assert shipped["meta"]["step"] == 2 and shipped["config"]["unet"]["model_channels"] == 8
    with pytest.raises(SystemExit):
        train_diffusion.parse_config(["--parts-include", "model"])


def test_time_budget_stops_in_time_and_writes_parts(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    assert train_diffusion.main(train_args(tmp_path, "a", "--time-budget-s", "8", "--save-parts", str(parts))) == "budget"
    stop = train_log(tmp_path, "a")[-1]
    assert stop["event"] == "stop" and stop["reason"] == "budget" and stop["call_seconds"] <= 8.0
    assert stop["step"] > 0 and has_parts(parts)


@pytest.mark.parametrize("batched", ["true", "false"])
def test_both_condition_paths_train(tmp_path: Path, batched: str) -> None:
    assert train_diffusion.main(train_args(tmp_path, "a", "--max-steps", "2", "--batched-link", batched)) == "max_steps"
    losses = [r["loss"] for r in train_log(tmp_path, "a") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_conditions_and_batches_on_the_device(tmp_path: Path) -> None:
    trainer = train_diffusion.Trainer(train_diffusion.parse_config(train_args(tmp_path, "a", "--condition-dropout", "0")))
    x0, labels = trainer.next_batch(list(range(8)))
    assert x0.shape == (4, 3, 16, 16) and labels.shape == (4, 32, 32) and x0.min() >= -1 and x0.max() <= 1
    cond = trainer.conditions(labels)
    assert cond.shape == (4, 12, 16, 16)
    # FDS keeps every map within [0, 1] up to noise, absent classes exactly zero
    for b in range(4):
        absent = sorted(set(range(12)) - set(labels[b].unique().tolist()))
        assert torch.all(cond[b, absent] == 0)
    bench = trainer.benchmark(2)
    assert set(bench) == {"bare_step_s", "conditions_s", "full_step_s", "overhead"}
    assert bench["full_step_s"] > 0 and bench["bare_step_s"] > 0
