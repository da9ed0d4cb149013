"""The evaluation package: image quality, baselines, config, notes and the command end to end on a tiny fake CamVid."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from evaluation import checks, evaluate
from evaluation.baselines import analog_transmit, digital_transmit, jpeg_decode, plan_digital
from evaluation.image_quality import frechet_distance, gaussian_window, psnr, segmentation_scores, ssim, summarize
from shared.semantic.channels import ChannelConfig, SnrDefinition
from shared.semantic.digital_link import MCS_TABLE, layout_blocks
from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticDiffusionConfig, SemanticImageGenerator
from shared.semantic.diffusion.unet import UNetConfig
from shared.semantic.segmenter import Segmenter, SegmenterConfig

H, W = 24, 32
TINY = UNetConfig(num_classes=12, image_height=12, image_width=16, model_channels=32, channel_mult=(1, 2),
                  attention_downsample=(2,), head_channels=32, spade_hidden=16)


def _scene(rng: np.random.Generator, i: int) -> tuple[np.ndarray, np.ndarray]:
    """A blocky street-like label map and an image whose colours follow it, plus noise."""
    labels = np.zeros((H, W), np.uint8)
    labels[: H // 3] = 0  # sky
    labels[H // 3: 2 * H // 3] = 1  # building
    labels[2 * H // 3:] = 3  # road
    labels[10:18, 4 + i: 12 + i] = 8  # car
    labels[0, :] = 11  # void
    palette = rng.integers(0, 256, (12, 3))
    image = np.clip(palette[labels] + rng.normal(0, 12, (H, W, 3)), 0, 255).astype(np.uint8)
    return image, labels


@pytest.fixture(scope="module")
def fake_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for i in range(3):
        image, labels = _scene(rng, i)
        for kind, array in (("images", cv2.cvtColor(image, cv2.COLOR_RGB2BGR)), ("labels", labels)):
            path = root / "camvid" / "val" / kind / f"f{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(path), array)
    generator = SemanticImageGenerator.load(None, "cpu", untrained_config=SemanticDiffusionConfig(unet=TINY))
    save_checkpoint(root / "diffusion.pt", CHECKPOINT_KIND, generator.config, generator.network.state_dict(),
                    {"name": "tiny", "step": 1, "noisy_training": True})
    Segmenter.untrained(SegmenterConfig(base_channels=8, input_height=H, input_width=W), device="cpu").save(root / "segmenter.pt")

    class FakeLpips(torch.nn.Module):  # the interface of NVIDIA's TorchScript vgg16.pt
        def forward(self, x: torch.Tensor, resize_images: bool = True, return_lpips: bool = False) -> torch.Tensor:
            return x.flatten(1) / 255.0 / math.sqrt(x[0].numel())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript, as the published weights use
        torch.jit.script(FakeLpips()).save(str(root / "lpips.pt"))
    return {"root": root}


# --- metrics ---------------------------------------------------------------------------------------
def test_ssim_identical_constant_and_single_window() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 16, 20, 3), dtype=np.uint8)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    x, y = np.full((1, 12, 12, 3), 100, np.uint8), np.full((1, 12, 12, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(x, y)[0] == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1))
    # An 11x11 image has exactly one window: the weighted statistics of the paper's formula.
    p, q = (rng.integers(0, 256, (11, 11, 3)).astype(np.float64) for _ in range(2))
    g = gaussian_window()
    w = np.outer(g, g)[..., None]
    mx, my = (w * p).sum((0, 1)), (w * q).sum((0, 1))
    vx, vy = (w * p * p).sum((0, 1)) - mx**2, (w * q * q).sum((0, 1)) - my**2
    cov = (w * p * q).sum((0, 1)) - mx * my
    c2 = (0.03 * 255) ** 2
    expected = np.mean((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert ssim(p.astype(np.uint8), q.astype(np.uint8))[0] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="at least"):
        ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_psnr_known_values_and_identical() -> None:
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] = 1
    b[1] = 255
    np.testing.assert_allclose(psnr(b, a), [20 * np.log10(255), 0.0])
    assert np.isposinf(psnr(a, a)).all()
    assert summarize(psnr(a, a))["mean"] == math.inf
    assert summarize([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 2}


def test_frechet_distance_identical_and_shifted() -> None:
    features = np.random.default_rng(2).normal(size=(400, 6))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 0, 2, 0, 0, 0])
    assert frechet_distance(features, features + shift) == pytest.approx(5.0, rel=1e-6)
    assert frechet_distance(features[:2], features[:2]) == pytest.approx(0.0, abs=1e-6)  # singular covariances


def test_segmentation_scores_ignore_void() -> None:
    target = np.array([[[0, 1], [11, 3]]])
    ious, accuracy, pooled = segmentation_scores(target, target, 12, 11)
    assert ious.tolist() == [1.0] and accuracy.tolist() == [1.0] and pooled.sum() == 3
    pred = np.array([[[0, 0], [5, 3]]])  # the void pixel's prediction does not count
    ious, accuracy, _ = segmentation_scores(pred, target, 12, 11)
    assert accuracy[0] == pytest.approx(2 / 3) and ious[0] == pytest.approx((0.5 + 0 + 1) / 3)


# --- baselines -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return _scene(np.random.default_rng(3), 0)[0]


def test_digital_decodes_exactly_at_100_db_and_fails_at_low_snr(photo: np.ndarray) -> None:
    plan = plan_digital(photo, None, quality=75, mcs=MCS_TABLE[2])
    sent = jpeg_decode(plan.jpeg_bytes, photo.shape)
    good = digital_transmit(plan, photo.shape, ChannelConfig(snr_db=100.0, snr_definition="average_power"), seed=1)
    assert good.failure is None and good.failed_blocks == 0
    np.testing.assert_array_equal(good.image, sent)
    assert good.channel_uses == plan.channel_uses
    bad = digital_transmit(plan, photo.shape, ChannelConfig(snr_db=-10.0, snr_definition="average_power"), seed=1)
    assert bad.image is None and bad.failure == "crc" and bad.failed_blocks == plan.num_blocks


def test_digital_plan_fits_the_budget_or_says_so(photo: np.ndarray) -> None:
    generous = plan_digital(photo, 100_000)
    assert not generous.over_budget and generous.jpeg_quality == 75 and generous.mcs == MCS_TABLE[0]
    tight = plan_digital(photo, 2_000)
    assert tight.channel_uses <= 2_000 or tight.over_budget
    impossible = plan_digital(photo, 10)
    assert impossible.over_budget and impossible.channel_uses > 10


def test_analog_is_near_exact_at_100_db(photo: np.ndarray) -> None:
    result = analog_transmit(photo, ChannelConfig(snr_db=100.0), seed=0)
    assert np.abs(result.image.astype(int) - photo).max() <= 1
    assert result.channel_uses == photo.size // 2 and result.payload_bits == photo.size * 8
    noisy = analog_transmit(photo, ChannelConfig(snr_db=1.0), seed=0)
    assert psnr(noisy.image, photo)[0] < 15


def test_seeds_and_subsets_are_deterministic() -> None:
    assert evaluate._seed(0, 2, 1, 1000, 5) == evaluate._seed(0, 2, 1, 1000, 5)
    assert evaluate._seed(0, 2, 1, 1000, 5) != evaluate._seed(0, 2, 1, 1000, 6)
    assert evaluate.evenly_spread(101, 3) == [0, 50, 100]
    assert evaluate.evenly_spread(5, 0) == list(range(5))


def test_config_rejects_what_no_run_could_do_and_the_command_line_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    config = evaluate.EvaluationConfig(snrs=(1.0, 10.0), definitions=("average_power",))
    assert config.definitions == (SnrDefinition.AVERAGE_POWER,) and config.ablation_snrs == (1.0, 10.0)
    assert evaluate.EvaluationConfig(ablation_snrs=(10.0,)).ablation_snrs == (10.0,)
    with pytest.raises(ValueError, match="unknown methods"):
        evaluate.EvaluationConfig(methods=("ours", "jpeg"))
    with pytest.raises(ValueError, match="snrs is empty"):
        evaluate.EvaluationConfig(snrs=())
    with pytest.raises(ValueError):
        evaluate.EvaluationConfig(definitions=("peak",))
    with pytest.raises(ValueError, match="record them"):  # 0 would run the receiver's default but record 0
        evaluate.EvaluationConfig(steps=0)
    with pytest.raises(ValueError, match="guidance"):
        evaluate.EvaluationConfig(guidance=50.0)
    assert evaluate.EvaluationConfig(sampler="ddpm", steps=3, guidance=1.0).sampling.steps == 3
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--methods", "ours,jpeg"])
    assert exit_info.value.code == 2 and "unknown methods ['jpeg']" in capsys.readouterr().err


# --- notes ---------------------------------------------------------------------------------------------
def test_notes_explain_only_the_checks_they_were_written_for(tmp_path: Path) -> None:
    notes_path = tmp_path / "notes.toml"
    notes_path.write_text('''
summary = """Ours holds
at 1 dB."""
[checks.bits]
observed = "ours 10 bits"
explanation = "Fewer bits."
[checks.ablation_ranking]
observed = "ours 0.5 > no_fds 0.4"
explanation = "Written for another run."
''')
    notes = checks.load_notes(notes_path)
    results = {"acceptance": [{"id": "bits", "observed": "ours 10 bits"},
                              {"id": "ablation_ranking", "observed": "ours 0.6 > no_fds 0.4"},
                              {"id": "ours_1db_paper_psnr", "observed": "ratio 0.9"}]}
    checks.apply_notes(results, notes)
    assert [c["explanation"] for c in results["acceptance"]] == ["Fewer bits.", None, None]
    assert results["summary"] is None  # one explained check changed: the summary may be stale too
    results["acceptance"][1]["observed"] = "ours 0.5 > no_fds 0.4"
    checks.apply_notes(results, notes)
    assert results["acceptance"][1]["explanation"] == "Written for another run."
    assert results["summary"] == "Ours holds\nat 1 dB."
    notes_path.write_text('[checks.bits]\nobserved = "x"\n')
    with pytest.raises(ValueError, match="checks.bits needs exactly observed and explanation"):
        checks.load_notes(notes_path)


# --- end to end ------------------------------------------------------------------------------------
def spy_on_the_stage(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (images, conditions) shapes of every call of the upscaling stage, from now on."""
    from shared.semantic.upscaler import Upscaler

    calls = []
    stage_call = Upscaler.__call__

    def spy(self: Upscaler, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        calls.append((tuple(images.shape), tuple(conditions.shape)))
        return stage_call(self, images, conditions)

    monkeypatch.setattr(Upscaler, "__call__", spy)
    return calls


def test_evaluate_end_to_end(fake_setup: dict[str, Path]) -> None:
    root = fake_setup["root"]
    out = root / "results"
    argv = [
        "--split", "val", "--data-root", str(root / "camvid"), "--snrs", "1,100", "--limit", "2",
        "--methods", "ours,no_fds,no_noisy,no_both,analog,digital,real",
        "--model", str(root / "diffusion.pt"), "--ablation-model", str(root / "missing.pt"),
        "--segmenter", str(root / "segmenter.pt"), "--lpips", str(root / "lpips.pt"),
        "--sampler", "ddim", "--steps", "2", "--guidance", "2", "--seed", "0",
        "--map-height", str(H), "--map-width", str(W), "--cliff-snrs=0", "--cliff-images", "1", "--ablation-snrs", "1",
        "--device", "cpu", "--out", str(out), "--report", str(root / "report.md"), "--cache-dir", str(root / "cache"),
    ]
    evaluate.main(argv)
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["configurations_from_cache"] == 0
    markdown = (root / "report.md").read_text()
    assert "](results/grid.png)" in markdown and not (out / "results.md").exists()  # one report, at --report
    # A rerun with the same settings takes every configuration from the cache, with the same numbers,
    # and puts the explanation of a notes file under the check it was written for.
    bits_observed = next(c["observed"] for c in results["acceptance"] if c["id"] == "bits")
    notes = root / "notes.toml"
    notes.write_text(f'summary = "Summary line."\n[checks.bits]\nobserved = {json.dumps(bits_observed)}\n'
                     'explanation = "The maps cost more bits than JPEG."\n')
    evaluate.main(argv[:-1] + [str(root / "cache")] + ["--out", str(root / "rerun"), "--notes", str(notes)])
    rerun_md = (root / "report.md").read_text()
    assert "Summary line." in rerun_md and "_The maps cost more bits than JPEG._" in rerun_md
    assert "compute time, as recorded:" in rerun_md
    rerun = json.loads((root / "rerun" / "results.json").read_text())
    assert rerun["settings"]["configurations_from_cache"] == 2 * 3 * 2 + 1  # definitions x methods x SNRs + no_fds
    assert rerun["results"] == results["results"] and rerun["bits"] == results["bits"]
    assert results["settings"]["images"] == 2 and results["settings"]["evaluated_resolution"] == [H, W]
    assert {k: results["settings"][k] for k in ("sampler", "steps", "guidance", "seed")} == \
        {"sampler": "ddim", "steps": 2, "guidance": 2.0, "seed": 0}
    assert results["methods"]["no_noisy"]["status"].startswith("not run: checkpoint")
    assert results["methods"]["no_both"]["status"].startswith("not run: checkpoint")
    assert set(results["results"]) == {"paper_psnr", "average_power"}
    assert "no_fds" in results["results"]["paper_psnr"] and "no_fds" not in results["results"]["average_power"]
    for definition, per_method in results["results"].items():
        assert set(per_method) == {"ours", "analog", "digital", "real"} | ({"no_fds"} if definition == "paper_psnr" else set())
        for name, per_snr in per_method.items():
            if name == "real":
                assert 0 <= per_snr["no channel"]["miou"]["mean"] <= 1
                continue
            assert set(per_snr) == ({"1"} if name == "no_fds" else {"1", "100"})
            for snr, scores in per_snr.items():
                for key in ("miou", "pixel_accuracy", "ssim", "lpips", "channel_uses"):
                    assert math.isfinite(scores[key]["mean"]) and math.isfinite(scores[key]["std"]), (name, snr, key)
                assert len(scores["per_image"]["miou"]) == 2
                assert scores["bandwidth_ratio"]["mean"] == pytest.approx(scores["channel_uses"]["mean"] / (H * W * 3))
                assert math.isfinite(scores["frechet_segmenter_distance"]) and scores["fid"] == "n/a"
                assert scores["psnr"]["mean"] == "inf" or math.isfinite(scores["psnr"]["mean"])
    digital = results["results"]["average_power"]["digital"]
    assert digital["100"]["decode_failures"] == 0
    assert results["digital_cliff"]["curves"]["paper_psnr"].keys() == {"0"}  # the extra SNRs only
    conditions = results["conditions"]["paper_psnr"]
    assert set(conditions) == {"1"}  # the ablation SNRs, under the ablation definitions run
    assert conditions["1"]["raw_on_0"]["std"] > 0.5 and conditions["1"]["fds_on_0"]["std"] < conditions["1"]["raw_on_0"]["std"]
    bits = results["bits"]["summary"]
    assert 0 < bits["label_map_png_bits"]["mean"] < bits["ours_payload_bits"]["mean"]
    assert bits["ours_channel_uses"]["mean"] == bits["ours_payload_bits"]["mean"] / 2
    # Every fake scene has 5 classes: 5 maps of H x W values in 5 H W / 2 uses, for 3 H W source values.
    assert bits["ours_bandwidth_ratio"]["mean"] == pytest.approx(5 / 6) and bits["analog_bandwidth_ratio"]["mean"] == 0.5
    assert [c["status"] for c in results["acceptance"]].count("NOT EVALUATED") >= 3  # no 30 dB, no ablation model
    assert all(c["explanation"] is None for c in results["acceptance"]) and results["summary"] is None
    for heading in ("## mIoU", "## SSIM", "## LPIPS", "## FID", "Frechet segmenter distance", "layout of Table 5",
                    "## What the models are conditioned on",
                    "## Bits", "decode failures", "## Acceptance checks", "| bandwidth ratio |"):
        assert heading in markdown, heading
    assert "| Method \\ PSNR (dB) | 100 | 1 |" in markdown and "| Method \\ SNR (dB) | 100 | 1 |" in markdown
    assert "| ablation: without FDS | — | " in markdown  # run at 1 dB only
    assert "not run: checkpoint" in markdown and "sampler `ddim`, 2 steps, classifier-free guidance 2" in markdown
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "miou_paper_psnr.png" in plots and "ssim_average_power.png" in plots and "digital_cliff.png" in plots
    assert "fid_paper_psnr.png" not in plots  # nothing to draw without Inception weights
    assert (out / "grid.png").stat().st_size > 0 and (out / "grid_average_power.png").exists()


def _tiny_upscaler(path: Path, in_height: int, in_width: int, name: str) -> Path:
    """An untrained upscaling stage (x4, exactly bicubic until trained) saved as the receiver loads it."""
    from shared.semantic.upscaler import CHECKPOINT_KIND as UPSCALER_KIND
    from shared.semantic.upscaler import UpscalerConfig, UpscalerNet

    config = UpscalerConfig(num_classes=12, in_height=in_height, in_width=in_width, channels=8, blocks=1,
                            mid_channels=8, mid_blocks=1, out_channels=4, spade_hidden=4, out_spade_hidden=4)
    save_checkpoint(path, UPSCALER_KIND, config, UpscalerNet(config).state_dict(), {"name": name})
    return path


def test_evaluate_at_twice_the_map_size_through_the_upscaling_stage(fake_setup: dict[str, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from evaluation import markdown, report

    root = fake_setup["root"]
    # The generator makes 12x16: the stage's x4 makes 48x64, twice the 24x32 maps.
    upscaler = _tiny_upscaler(tmp_path / "upscaler.pt", TINY.image_height, TINY.image_width, "tiny-upscaler")
    calls = spy_on_the_stage(monkeypatch)
    argv = ["--data-root", str(root / "camvid"), "--snrs", "10", "--limit", "2", "--definitions", "paper_psnr",
            "--methods", "ours,no_fds,analog,digital,real", "--model", str(root / "diffusion.pt"),
            "--segmenter", str(root / "segmenter.pt"), "--sampler", "ddim", "--steps", "2", "--map-height", str(H),
            "--map-width", str(W), "--image-height", str(2 * H), "--image-width", str(2 * W), "--upscaler", str(upscaler),
            "--cliff-snrs=", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    parser = evaluate._parser()
    config = evaluate.config_from_args(parser, parser.parse_args(argv), evaluate.EvaluationConfig)
    results = evaluate.run(config, "the command")
    # Ours and no_fds: the 12x16 images with the received maps as sent (24x32, factor 1), one batch each.
    assert calls == [((2, 3, 12, 16), (2, 12, H, W))] * 2
    grid = results["grid"]
    assert grid["original"].shape == (2 * H, 2 * W, 3) and grid["labels"].shape == (H, W)  # the map that is sent
    assert {name: image["10"].shape for name, image in grid["images"]["paper_psnr"].items()} == \
        {name: (2 * H, 2 * W, 3) for name in ("ours", "no_fds", "analog", "digital")}
    settings = results["settings"]
    assert settings["evaluated_resolution"] == [2 * H, 2 * W] and settings["map_size"] == [H, W]
    assert settings["upscaler"] == {"path": evaluate._relative(upscaler), "name": "tiny-upscaler",
                                    "output_resolution": [2 * H, 2 * W]}
    for name, per_snr in results["results"]["paper_psnr"].items():
        scores = per_snr["no channel" if name == "real" else "10"]
        assert len(scores["per_image"]["miou"]) == 2 and 0 <= scores["miou"]["mean"] <= 1, name
        if name != "real":
            assert scores["bandwidth_ratio"]["mean"] == pytest.approx(scores["channel_uses"]["mean"] / (4 * H * W * 3))
    # Ours sends 5 maps of 24x32; the analog image is the 48x64 one; the digital link fits within ours' uses.
    bits = results["bits"]["summary"]
    assert bits["ours_channel_uses"]["mean"] == 5 * H * W / 2 and bits["ours_bandwidth_ratio"]["mean"] == pytest.approx(5 / 24)
    assert bits["analog_channel_uses"]["mean"] == 4 * H * W * 3 / 2 and bits["raw_rgb_bits"]["mean"] == 4 * H * W * 3 * 8
    assert bits["digital_channel_uses"]["mean"] <= bits["ours_channel_uses"]["mean"] or bits["digital_over_budget"]
    report.write_all(results, tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    assert f"Evaluated resolution: {2 * H}x{2 * W}; the sender's map size is {H}x{W}." in text
    assert f"upscaled to {2 * H}x{2 * W} by the receiver's upscaling stage `{evaluate._relative(upscaler)}` (tiny-upscaler)" in text
    assert f"## Bits and channel uses per image at {2 * H}x{2 * W}" in text
    # A stage whose output is not the evaluated size is followed by the receiver's resize, and the report says so.
    assert markdown._stage_text({"evaluated_resolution": [H, W], "upscaler": settings["upscaler"]}).endswith(
        f"then resized (area) to {H}x{W} for the metrics, as the receiver does for its output size.")

    # The cache keys hold the stage (for the methods it runs in) and the map size.
    without_stage = evaluate.run(replace(config, upscaler="", methods=("ours", "analog")), "the command")
    assert without_stage["settings"]["configurations_from_cache"] == 1 and without_stage["settings"]["upscaler"] is None
    other_maps = evaluate.run(replace(config, map_height=2 * H, map_width=2 * W, methods=("analog",)), "the command")
    assert other_maps["settings"]["configurations_from_cache"] == 0
    assert len(calls) == 2  # neither ran the stage again

    with pytest.raises(ValueError, match=f"evaluated size {H // 2}x{2 * W} .* below the map size {H}x{W}"):
        evaluate.EvaluationConfig(map_height=H, map_width=W, image_height=H // 2, image_width=2 * W)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv[:argv.index("--image-height") + 1] + [str(H - 1)] + argv[argv.index("--image-width"):])
    assert exit_info.value.code == 2 and f"below the map size {H}x{W}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="upscaler .*missing.pt not found"):
        replace(config, upscaler=str(tmp_path / "missing.pt"))
    other_stage = _tiny_upscaler(tmp_path / "other.pt", 6, 8, "other")
    with pytest.raises(ValueError, match="takes 6x8 images of 12 classes; model .* makes 12x16 of 12"):
        evaluate.Evaluation(replace(config, upscaler=str(other_stage)))


def test_code_block_layouts_are_valid_5g_codes() -> None:
    from sionna.phy.fec.ldpc import LDPC5GEncoder

    for mcs in MCS_TABLE:
        for payload in (100, 3_000, 3_801, 3_816, 8_401, 25_000, 200_000):
            blocks, k, n = layout_blocks(payload, mcs)
            assert blocks * (k - 24) >= payload + 24 and n % mcs.bits_per_symbol == 0
            assert mcs.code_rate <= k / n <= 0.95 and k <= (3840 if mcs.code_rate <= 0.25 else 8448)
            if payload in (100, 3_816, 25_000):  # Sionna checks the 38.212 limits on construction
                LDPC5GEncoder(k, n, num_bits_per_symbol=mcs.bits_per_symbol)


def test_sampler_sweep_scores_every_configuration_and_picks_the_fewest_close_steps(fake_setup: dict[str, Path],
                                                                                    tmp_path: Path) -> None:
    from scripts.benchmarks import sampler_sweep

    root = fake_setup["root"]
    out, report_path = tmp_path / "sweep.json", tmp_path / "sweep.md"
    sampler_sweep.main(["--configs", "ddpm:3,ddim:2,dpmpp2m:1", "--reference", "ddpm:3", "--limit", "2", "--data-root", str(root / "camvid"),
                        "--model", str(root / "diffusion.pt"), "--segmenter", str(root / "segmenter.pt"),
                        "--tolerance", "1.0", "--out", str(out), "--report", str(report_path)])
    result = json.loads(out.read_text())
    assert [(r["sampler"], r["steps"]) for r in result["rows"]] == [("ddpm", 3), ("ddim", 2), ("dpmpp2m", 1)]
    assert all(0.0 <= r["miou"]["mean"] <= 1.0 and len(r["per_image_miou"]) == 2 for r in result["rows"])
    # A tolerance of 1 admits every row: the default is the one with the fewest steps.
    assert result["default"]["sampler"] == "dpmpp2m" and result["default"]["steps"] == 1
    assert "| ddim | 2 |" in report_path.read_text()


def test_sampler_sweep_default_needs_the_reference_and_respects_the_tolerance() -> None:
    from scripts.benchmarks.sampler_sweep import pick_default

    def row(sampler: str, steps: int, miou: float, seconds: float) -> dict:
        return {"sampler": sampler, "steps": steps, "miou": {"mean": miou}, "seconds_per_image": seconds}

    rows = [row("ddpm", 1000, 0.40, 100.0), row("ddpm", 50, 0.39, 5.0), row("ddim", 10, 0.30, 1.0)]
    assert pick_default(rows, 0.02, ("ddpm", 1000)) == {"sampler": "ddpm", "steps": 50, "speedup_vs_reference": 20.0}
    assert pick_default(rows, 0.15, ("ddpm", 1000))["sampler"] == "ddim"
    assert pick_default(rows[1:], 0.02, ("ddpm", 1000)) is None


# --- the rate-quality frontier ---------------------------------------------------------------------
def test_rate_quality_end_to_end(fake_setup: dict[str, Path]) -> None:
    from evaluation import rate_quality
    from shared.semantic.map_jscc import CHECKPOINT_KIND as JSCC_KIND
    from shared.semantic.map_jscc import MapJscc, MapJsccConfig
    from shared.semantic.rate_quality import RateQualityTable

    root = fake_setup["root"]
    out, table = root / "rq", root / "rq-table.json"
    # A learned encoder of the fake 24x32 maps for the 12x16 generator: 2 symbols a position of 3x4.
    jscc = MapJsccConfig(map_height=H, map_width=W, out_height=12, out_width=16, channels=2, width=16)
    save_checkpoint(root / "jscc.pt", JSCC_KIND, jscc, MapJscc(jscc).state_dict(), {"steps": 0})
    argv = ["--data-root", str(root / "camvid"), "--limit", "2", "--snrs", "1,10", "--factors", "1,2,8",
            "--jpeg-factors", "2", "--ratios", "2,1/4,1/48", "--fixed-ratios", "1/4", "--cliff-snrs", "0",
            "--learned", f"{root / 'jscc.pt'},{root / 'missing-jscc.pt'}", "--model", str(root / "diffusion.pt"),
            "--segmenter", str(root / "segmenter.pt"), "--sampler", "ddim", "--steps", "2",
            "--map-height", str(H), "--map-width", str(W), "--device", "cpu", "--cache-dir", str(root / "rq-cache"),
            "--out", str(out), "--report", str(root / "rq.md"), "--table", str(table)]
    rate_quality.main(argv)
    results = json.loads((out / "results.json").read_text())
    source = H * W * 3
    ours = results["results"]["ours"]
    assert set(ours) == {"f1", "f2", "f8"} and set(ours["f1"]) == {"1", "10"}
    # 5 classes present: 5 maps of (H/f)(W/f) values, two a channel use.
    for factor in (1, 2, 8):
        assert ours[f"f{factor}"]["10"]["bandwidth_ratio"]["mean"] == pytest.approx(5 * H * W / factor**2 / 2 / source)
    for name in ("separated", "digital", "analog"):
        assert set(results["results"][name]) == {"2", "1/4", "1/48"}
        for rate, per_snr in results["results"][name].items():
            budget = rate_quality.rate_quality.parse_ratio(rate) * source
            assert all(max(per_snr[s]["per_image"]["miou"]) <= 1 for s in per_snr)
            assert per_snr["10"]["channel_uses"]["mean"] <= budget
    assert set(results["results"]["separated_fixed"]["1/4"]) == {"0", "1", "10"}  # the cliff SNR too
    # 1/48 of a 24x32 image is 48 channel uses: no label map code fits, every image is lost.
    assert results["results"]["separated"]["1/48"]["10"]["lost"] == 1.0
    learned = results["representations"]["learned"]
    assert learned["status"] == "ok" and learned["problems"][0].startswith("not run: the learned map encoder's")
    # 2 x 3 x 4 real symbols: 12 channel uses for 2,304 source values.
    assert set(results["results"]["learned"]) == {"1/192"}
    assert results["results"]["learned"]["1/192"]["10"]["bandwidth_ratio"]["mean"] == 1 / 192
    assert {c["id"] for c in results["acceptance"]} == {"keep_at_1_12", "equal_uses"}
    assert results["default"]["chosen"]["rate"] in {"f1", "f2", "f8"}
    loaded = RateQualityTable.load(table)
    assert {(e.downsample_factor, e.compression) for e in loaded.entries} == {(1, "none"), (2, "none"), (8, "none"),
                                                                            (2, "jpeg")}
    report = (root / "rq.md").read_text()
    assert not (out / "rate-quality.md").exists()  # one report, at --report
    for heading in ("## Bandwidth ratio", "## Targets", "## The frontier", "## Every representation at equal channel uses",
                    "## The sender's default", "## All configurations"):
        assert heading in report, heading
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["cliff.png", "miou_vs_ratio_10dB.png", "miou_vs_ratio_1dB.png", "miou_vs_snr_ratio_1_4.png"]
    # A rerun takes every configuration from the cache.
    rate_quality.main(argv)
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["results"] == results["results"] and rerun["settings"]["configurations_from_cache"] > 0
    # Another segmenter file (here: the same weights, touched) rescores the received images it kept,
    # without sending or generating again.
    segmenter = root / "segmenter.pt"
    os.utime(segmenter, ns=(segmenter.stat().st_atime_ns, segmenter.stat().st_mtime_ns + 10**9))
    rate_quality.main(argv)
    rescored = json.loads((out / "results.json").read_text())
    assert rescored["settings"]["configurations_from_cache"] == 0 and rescored["results"] == results["results"]


def test_rate_quality_at_twice_the_map_size_through_the_upscaling_stage(fake_setup: dict[str, Path], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from evaluation import rate_quality, rate_quality_report
    from shared.semantic.map_jscc import CHECKPOINT_KIND as JSCC_KIND
    from shared.semantic.map_jscc import MapJscc, MapJsccConfig

    root = fake_setup["root"]
    # The generator makes 12x16: the stage's x4 makes 48x64, twice the 24x32 maps.
    upscaler = _tiny_upscaler(tmp_path / "upscaler.pt", TINY.image_height, TINY.image_width, "tiny-upscaler")
    jscc = MapJsccConfig(map_height=H, map_width=W, out_height=12, out_width=16, channels=2, width=16)
    save_checkpoint(tmp_path / "jscc.pt", JSCC_KIND, jscc, MapJscc(jscc).state_dict(), {"steps": 0})
    calls = spy_on_the_stage(monkeypatch)
    argv = ["--data-root", str(root / "camvid"), "--limit", "2", "--snrs", "10", "--representations",
            "ours,separated,learned,digital,analog", "--factors", "1,2", "--ratios", "2,1/4",
            "--learned", str(tmp_path / "jscc.pt"), "--model", str(root / "diffusion.pt"),
            "--segmenter", str(root / "segmenter.pt"), "--sampler", "ddim", "--steps", "2",
            "--map-height", str(H), "--map-width", str(W), "--image-height", str(2 * H), "--image-width", str(2 * W),
            "--upscaler", str(upscaler), "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    parser = rate_quality._parser()
    config = evaluate.config_from_args(parser, parser.parse_args(argv), rate_quality.RateQualityConfig)
    results = rate_quality.run(config, "the command")
    # Every generated scene through the stage with the maps its receiver has: ours' received FDS maps
    # at the 24x32 map size at f1 and f2 (the receiver's views), the separated link's label map
    # decoded at factor 1 (its scenes made once for both ratios), the learned decoder's 12x16 probabilities.
    assert sorted(calls) == sorted([((2, 3, 12, 16), (2, 12, H, W))] * 3 + [((2, 3, 12, 16), (2, 12, 12, 16))])
    assert results["grid_original"].shape == (2 * H, 2 * W, 3)
    for name, per_rate in results["grid"].items():
        for rate, per_snr in per_rate.items():
            assert per_snr["10"].shape == (2 * H, 2 * W, 3), (name, rate)
    settings = results["settings"]
    assert settings["evaluated_resolution"] == [2 * H, 2 * W] and settings["map_size"] == [H, W]
    assert settings["source_values"] == 4 * H * W * 3
    assert settings["upscaler"] == {"path": evaluate._relative(upscaler), "name": "tiny-upscaler",
                                    "output_resolution": [2 * H, 2 * W]}
    # The ratios count the 48x64 image's values: ours' 5 maps of 24x32 at f1 are 1/2, the learned
    # encoder's 12 channel uses 1/768; the image baselines send the 48x64 image within their budgets.
    source = 4 * H * W * 3
    assert results["results"]["ours"]["f1"]["10"]["bandwidth_ratio"]["mean"] == pytest.approx(5 * H * W / 2 / source)
    assert set(results["results"]["learned"]) == {"1/768"}
    for name in ("separated", "digital", "analog"):
        for rate, per_snr in results["results"][name].items():
            assert per_snr["10"]["channel_uses"]["mean"] <= rate_quality.rate_quality.parse_ratio(rate) * source
            assert len(per_snr["10"]["per_image"]["miou"]) == 2
    assert results["results"]["analog"]["2"]["10"]["channel_uses"]["mean"] == 2 * source
    rate_quality_report.write_all(results, tmp_path / "rq", tmp_path / "rq.md", tmp_path / "table.json")
    report = (tmp_path / "rq.md").read_text()
    assert f"the {2 * H}x{2 * W} RGB image at the evaluated resolution: {source:,} values (the sender's map size is " \
           f"{H}x{W})" in report
    assert f"evaluated at {2 * H}x{2 * W}: the images and the ground-truth label maps" in report
    assert f"resized to the sender's map size {H}x{W} (nearest neighbour)" in report
    assert (f"upscaled to {2 * H}x{2 * W} by the receiver's upscaling stage `{evaluate._relative(upscaler)}` "
            "(tiny-upscaler)") in report
    # The sender's table says where its mIoU was measured and keeps the sender's ratios (per value at the map size).
    table = json.loads((tmp_path / "table.json").read_text())
    assert (table["evaluated_resolution"], table["map_size"], table["upscaler"]) == (
        [2 * H, 2 * W], [H, W], evaluate._relative(upscaler))
    f1 = next(e for e in table["entries"] if (e["representation"], e["downsample_factor"]) == ("ours", 1))
    assert f1["bandwidth_ratio"] == pytest.approx(5 * H * W / 2 / (H * W * 3))

    # The cache keys hold the stage (for the generated scenes only) and the map size.
    without_stage = rate_quality.run(replace(config, upscaler=""), "the command")
    assert without_stage["settings"]["configurations_from_cache"] == 4  # digital and analog at 2 ratios
    assert without_stage["settings"]["upscaler"] is None and len(calls) == 4
    assert without_stage["results"]["digital"] == results["results"]["digital"]
    other_maps = rate_quality.run(replace(config, map_height=2 * H, map_width=2 * W,
                                          representations=("analog",)), "the command")
    assert other_maps["settings"]["configurations_from_cache"] == 0

    with pytest.raises(ValueError, match=f"evaluated size {H // 2}x{2 * W} .* below the map size {H}x{W}"):
        rate_quality.RateQualityConfig(map_height=H, map_width=W, image_height=H // 2, image_width=2 * W)
    with pytest.raises(SystemExit) as exit_info:
        rate_quality.main(argv[:argv.index("--image-height") + 1] + [str(H - 1)] + argv[argv.index("--image-width"):])
    assert exit_info.value.code == 2 and f"below the map size {H}x{W}" in capsys.readouterr().err


def test_rate_quality_serves_ours_through_the_adapter_of_its_factor(fake_setup: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    from evaluation import rate_quality
    from shared.semantic.diffusion.adapters import adapter_parameter_names, adapter_path, save_adapter

    root = fake_setup["root"]
    # A base whose output depends on its condition (a fresh network's output layer is zero), and an
    # adapter for factor 2: its SPADE weights moved, so its scenes differ from the base's.
    generator = SemanticImageGenerator.load(root / "diffusion.pt", "cpu")
    noise = torch.Generator().manual_seed(0)
    parameters = dict(generator.network.named_parameters())
    with torch.no_grad():
        for parameter in parameters.values():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=noise))
        model = tmp_path / "diffusion.pt"
        save_checkpoint(model, CHECKPOINT_KIND, generator.config, generator.network.state_dict(), {"step": 1})
        for name in adapter_parameter_names(generator.network):
            parameters[name].add_(torch.randn(parameters[name].shape, generator=noise))
    adapter = adapter_path(model, 2)
    save_adapter(adapter, generator.network, generator.config, {"name": "tiny-f2", "step": 5})
    out = tmp_path / "rq"
    argv = ["--data-root", str(root / "camvid"), "--limit", "2", "--snrs", "1,10", "--representations",
            "ours,ours_jpeg", "--factors", "1,2", "--jpeg-factors", "2", "--model", str(model),
            "--segmenter", str(root / "segmenter.pt"), "--sampler", "ddim", "--steps", "2",
            "--map-height", str(H), "--map-width", str(W), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--report", str(tmp_path / "rq.md"),
            "--table", str(tmp_path / "table.json")]

    rate_quality.main(argv + ["--no-adapters"])
    base = json.loads((out / "results.json").read_text())
    assert base["settings"]["fine_tuned_per_factor"] == {} and base["without_adapters"] == {}
    assert base["representations"]["ours"]["rates"]["f2"]["adapter"] is None
    assert "`--no-adapters`" in (tmp_path / "rq.md").read_text()

    rate_quality.main(argv)
    adapted = json.loads((out / "results.json").read_text())
    used = {"path": evaluate._relative(adapter), "steps": 5, "fine_tuning_steps": 4}  # the base: step 1
    assert adapted["settings"]["fine_tuned_per_factor"] == {"f2": used}
    assert adapted["representations"]["ours_jpeg"]["rates"]["f2"]["adapter"] == used
    # Factor 1 has no adapter: the base's scores, from the cache; so are the base's at factor 2, now the ablation.
    assert adapted["results"]["ours"]["f1"] == base["results"]["ours"]["f1"]
    for name in ("ours", "ours_jpeg"):
        assert adapted["without_adapters"][name] == {"f2": base["results"][name]["f2"]}
        for snr in ("1", "10"):
            assert (adapted["results"][name]["f2"][snr]["per_image"]["psnr"]
                    != base["results"][name]["f2"][snr]["per_image"]["psnr"])
    assert adapted["settings"]["configurations_from_cache"] == 6  # ours f1 at 2 SNRs, the base's 4 at f2
    report = (tmp_path / "rq.md").read_text()
    assert "## What fine-tuning bought: the condition adapters" in report and "| ours_jpeg f2 |" in report
    assert "f2 (adapter)" in report
    table = json.loads((tmp_path / "table.json").read_text())
    assert {(e["downsample_factor"], e["compression"], e["adapter"]) for e in table["entries"]} == {
        (1, "none", None), (2, "none", used["path"]), (2, "jpeg", used["path"])}

    # A retrained adapter (here: the same file, touched) is never served from the base's or its own old entries.
    os.utime(adapter, ns=(adapter.stat().st_atime_ns, adapter.stat().st_mtime_ns + 10**9))
    rate_quality.main(argv)
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["settings"]["configurations_from_cache"] == 6
    for name, per_rate in adapted["results"].items():  # the same weights: the same scenes, sent and generated again
        for rate, per_snr in per_rate.items():
            for snr, entry in per_snr.items():
                assert rerun["results"][name][rate][snr]["per_image"] == entry["per_image"]
