"""shared/semantic/segmenter.py and training/train_segmenter.py on small synthetic data."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.semantic.checkpoints import FORMAT_VERSION, save_checkpoint
from shared.semantic.segmenter import (
    FastSegmenterNet,
    Segmenter,
    SegmenterConfig,
    SegmenterNet,
    build_net,
    confusion_matrix,
    count_parameters,
    miou,
    per_class_iou,
    pixel_accuracy,
)



@pytest.fixture(autouse=True)
def _one_thread():
    """The suite shares a small machine with training runs; oversubscribed threads crawl."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = SegmenterConfig(num_classes=5, base_channels=8, input_height=24, input_width=32)


def test_default_net_size_and_shapes() -> None:
    net = SegmenterNet()
    assert 0.5e6 <= count_parameters(net) <= 2e6
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 96, 128)).shape == (2, 12, 96, 128)
    small = SegmenterNet(SMALL).eval()
    with torch.no_grad():
        assert small(torch.zeros(1, 3, 37, 53)).shape == (1, 5, 37, 53)  # any size, not only multiples of 8


FAST_SMALL = SegmenterConfig(num_classes=5, base_channels=8, architecture="fast", input_height=48, input_width=64)


def test_fast_net_size_and_shapes_at_192x256() -> None:
    cfg = SegmenterConfig(architecture="fast", input_height=192, input_width=256)
    net = build_net(cfg)
    assert isinstance(net, FastSegmenterNet) and count_parameters(net) <= 5e6
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 192, 256)).shape == (1, 12, 192, 256)
    small = build_net(FAST_SMALL).eval()
    with torch.no_grad():
        assert small(torch.zeros(2, 3, 37, 53)).shape == (2, 5, 37, 53)  # any size, not only multiples of 32
    assert hasattr(small, "ppm")  # the evaluation's Frechet segmenter distance reads the pooled context there
    assert isinstance(build_net(SMALL), SegmenterNet)


def test_fast_segmenter_round_trip(tmp_path: Path) -> None:
    seg = Segmenter.untrained(FAST_SMALL, device="cpu", seed=5)
    img = np.random.default_rng(4).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    path = tmp_path / "fast.pt"
    seg.save(path, half=False)
    loaded = Segmenter.from_checkpoint(path, device="cpu")
    assert isinstance(loaded.net, FastSegmenterNet) and loaded.config == FAST_SMALL
    assert np.array_equal(loaded.segment(img), seg.segment(img))
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    assert torch.equal(loaded.logits(x), seg.logits(x))


def test_checkpoint_without_architecture_loads_as_the_old_network(tmp_path: Path) -> None:
    """Checkpoints written before the `architecture` field hold the encoder-decoder."""
    import dataclasses

    seg = Segmenter.untrained(SMALL, device="cpu", seed=6)
    old_config = {k: v for k, v in dataclasses.asdict(SMALL).items() if k != "architecture"}
    path = tmp_path / "old.pt"
    payload = {"format_version": FORMAT_VERSION, "kind": "segmenter", "config": old_config,
               "state_dict": seg.net.state_dict(), "meta": {}}
    torch.save(payload, path)
    loaded = Segmenter.from_checkpoint(path, device="cpu")
    assert isinstance(loaded.net, SegmenterNet) and loaded.config.architecture == "unet"
    img = np.random.default_rng(5).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    assert np.array_equal(loaded.segment(img), seg.segment(img))


def test_shipped_checkpoint_loads() -> None:
    path = Path(__file__).resolve().parents[1] / "models" / "segmenter-camvid.pt"
    if not path.is_file():
        pytest.skip("no shipped segmenter")
    seg = Segmenter.from_checkpoint(path, device="cpu")
    out = seg.segment(np.zeros((192, 256, 3), np.uint8))
    assert out.shape == (192, 256) and out.max() < seg.config.num_classes


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="architecture"):
        SegmenterConfig(architecture="resnet")
    with pytest.raises(ValueError):
        SegmenterConfig(num_classes=1)
    with pytest.raises(ValueError):
        SegmenterConfig(base_channels=7)
    with pytest.raises(ValueError):
        SegmenterConfig(input_height=4)


def test_segment_size_round_trip() -> None:
    seg = Segmenter.untrained(SMALL, device="cpu", seed=1)
    assert seg.trained is False and seg.config == SMALL
    rng = np.random.default_rng(0)
    for shape in ((37, 53, 3), (24, 32, 3), (7, 300, 3)):
        out = seg.segment(rng.integers(0, 256, shape, dtype=np.uint8))
        assert out.shape == shape[:2] and out.dtype == np.uint8 and out.max() < SMALL.num_classes
    # Another output size: the network's own prediction, resized nearest (not the photo shrunk first).
    photo = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    own = seg.segment(photo, (SMALL.input_height, SMALL.input_width))
    assert np.array_equal(seg.segment(photo, (12, 20)), cv2.resize(own, (20, 12), interpolation=cv2.INTER_NEAREST))
    batch = torch.rand(3, 3, 41, 29) * 2 - 1
    pred = seg.segment_batch(batch)
    assert pred.shape == (3, 41, 29) and pred.dtype == torch.int64
    assert int(pred.min()) >= 0 and int(pred.max()) < SMALL.num_classes


def test_segment_and_segment_batch_agree_at_input_size() -> None:
    seg = Segmenter.untrained(SMALL, device="cpu", seed=2)
    img = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert np.array_equal(seg.segment(img), seg.segment_batch(x)[0].numpy().astype(np.uint8))


def test_untrained_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = Segmenter.untrained(SMALL, device="cpu", seed=4)
    after = torch.rand(3)
    b = Segmenter.untrained(SMALL, device="cpu", seed=4)
    assert torch.equal(expected, after)
    for (k, v), (_, w) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(v, w), k


def test_confusion_matrix_and_metrics_known_answers() -> None:
    target = np.array([[0, 0, 1, 1], [2, 2, 2, 3]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 3]])
    conf = confusion_matrix(pred, target, 4)
    expected = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 1]])
    assert np.array_equal(conf, expected) and conf.dtype == np.int64
    # IoU: c0 = 1/(2+2-1) = 1/3, c1 = 2/3, c2 = 2/3, c3 = 1
    assert np.allclose(per_class_iou(conf), [1 / 3, 2 / 3, 2 / 3, 1.0])
    assert miou(conf) == pytest.approx((1 / 3 + 2 / 3 + 2 / 3 + 1) / 4)
    assert miou(conf, exclude=[3]) == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert pixel_accuracy(conf) == pytest.approx(6 / 8)
    # ignore_index drops target pixels; torch tensors are accepted
    conf_ign = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 4, ignore_index=3)
    assert conf_ign.sum() == 7 and conf_ign[3].sum() == 0
    # a class absent from target and prediction does not count
    conf5 = confusion_matrix(pred, target, 5)
    assert np.isnan(per_class_iou(conf5)[4])
    assert miou(conf5) == pytest.approx(miou(conf))
    perfect = confusion_matrix(target, target, 4)
    assert miou(perfect) == 1.0 and pixel_accuracy(perfect) == 1.0
    assert np.isnan(miou(np.zeros((3, 3)))) and np.isnan(pixel_accuracy(np.zeros((3, 3))))


def test_confusion_matrix_errors() -> None:
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), 2)
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(np.zeros(3, int), np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="pred"):
        confusion_matrix(np.array([0, -1, 0]), np.zeros(3, int), 2)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(np.zeros(3), np.zeros(3), 2)


def test_bad_inputs() -> None:
    seg = Segmenter.untrained(SMALL, device="cpu")
    for bad in (
        np.zeros((8, 8, 3), np.float32),
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((0, 8, 3), np.uint8),
        [[1, 2, 3]],
    ):
        with pytest.raises(ValueError):
            seg.segment(bad)  # type: ignore[arg-type]
    for bad in (torch.zeros(3, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, 3, 8, 8)):
        with pytest.raises(ValueError):
            seg.segment_batch(bad)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    seg = Segmenter.untrained(SMALL, device="cpu", seed=7)
    img = np.random.default_rng(3).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    full = tmp_path / "full.pt"
    seg.save(full, meta={"val_miou_void_excluded": 0.5}, half=False)
    loaded = Segmenter.from_checkpoint(full, device="cpu")
    assert loaded.trained and loaded.config == SMALL and loaded.meta["val_miou_void_excluded"] == 0.5
    assert np.array_equal(loaded.segment(img), seg.segment(img))
    half = tmp_path / "half.pt"
    seg.save(half)  # fp16 weights, as shipped
    a, b = Segmenter.from_checkpoint(half, "cpu"), Segmenter.from_checkpoint(half, "cpu")
    assert np.array_equal(a.segment(img), b.segment(img))
    assert (a.segment(img) == seg.segment(img)).mean() > 0.95
    other = tmp_path / "other.pt"
    save_checkpoint(other, "diffusion", SMALL, seg.net.state_dict())
    with pytest.raises(ValueError, match="segmenter"):
        Segmenter.from_checkpoint(other, "cpu")
    with pytest.raises(FileNotFoundError):
        Segmenter.from_checkpoint(tmp_path / "missing.pt", "cpu")


def _synthetic_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is given by colour blocks: a learnable toy segmentation task."""
    labels = torch.randint(0, 3, (n, 3, 4), generator=gen)
    labels = F.interpolate(labels[:, None].float(), size=(24, 32), mode="nearest")[:, 0].long()
    colours = torch.tensor([[-0.8, -0.8, 0.8], [0.8, -0.8, -0.8], [-0.8, 0.8, -0.8]])
    images = colours[labels].permute(0, 3, 1, 2) + 0.1 * torch.randn(n, 3, 24, 32, generator=gen)
    return images, labels


def test_few_training_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = SegmenterNet(SegmenterConfig(num_classes=3, base_channels=8, input_height=24, input_width=32))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, y = _synthetic_batch(8, gen)
    net.eval()
    with torch.no_grad():
        before = F.cross_entropy(net(x), y).item()
    net.train()
    for _ in range(12):
        xb, yb = _synthetic_batch(8, gen)
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        after = F.cross_entropy(net(x), y).item()
    assert after < 0.6 * before


def _fake_camvid(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for i in range(n):
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / split / "images" / f"{i}.png"), rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
            cv2.imwrite(str(root / split / "labels" / f"{i}.png"), rng.integers(0, 12, (12, 16), dtype=np.uint8))
    return root


def test_training_script_resumes_exactly(tmp_path: Path) -> None:
    from training import train_segmenter

    data_root = _fake_camvid(tmp_path / "camvid")
    common = [
        "--data-root", str(data_root), "--batch-size", "4", "--base-channels", "8", "--input-height", "24",
        "--input-width", "32", "--warmup-steps", "2", "--min-lr-ratio", "1", "--minutes", "5", "--log-every", "1",
    ]  # fmt: skip
    straight = tmp_path / "straight"
    out = train_segmenter.main(common + ["--out-dir", str(straight), "--model-path", str(straight / "m.pt"), "--max-steps", "4"])
    assert out["step"] == 4 and out["epoch"] == 2
    resumed = tmp_path / "resumed"
    args = common + ["--out-dir", str(resumed), "--model-path", str(resumed / "m.pt")]
    train_segmenter.main(args + ["--max-steps", "2"])
    out2 = train_segmenter.main(args + ["--max-steps", "4"])
    assert out2["step"] == 4
    a = torch.load(straight / "state.pt", weights_only=False)
    b = torch.load(resumed / "state.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert "resumed from" in (resumed / "log.txt").read_text()
    seg = Segmenter.from_checkpoint(straight / "m.pt", "cpu")
    assert seg.trained and "val_miou_void_excluded" in seg.meta and seg.meta["epoch"] >= 1
    assert seg.segment(np.zeros((12, 16, 3), np.uint8)).shape == (12, 16)


def test_lovasz_softmax_equals_one_minus_iou_at_hard_predictions() -> None:
    from training.train_segmenter import lovasz_softmax

    torch.manual_seed(2)
    labels = torch.randint(0, 4, (2, 6, 8))
    labels[0, 0] = 11  # void
    labels[1, 1] = -100  # padding
    predicted = torch.randint(0, 4, (2, 6, 8))
    logits = F.one_hot(predicted, 12).permute(0, 3, 1, 2).float() * 1e4  # softmax is one-hot
    keep = (labels != 11) & (labels != -100)
    expected = []
    for c in labels[keep].unique().tolist():
        truth, guess = (labels == c) & keep, (predicted == c) & keep
        expected.append(1 - (truth & guess).sum().item() / (truth | guess).sum().item())
    assert lovasz_softmax(logits, labels, [11, -100]).item() == pytest.approx(np.mean(expected), abs=1e-5)
    perfect = F.one_hot(labels.clamp(0, 11), 12).permute(0, 3, 1, 2).float() * 1e4
    assert lovasz_softmax(perfect, labels, [11, -100]).item() == pytest.approx(0.0, abs=1e-6)
    soft = torch.randn(2, 12, 6, 8, requires_grad=True)
    lovasz_softmax(soft, labels, [11, -100]).backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


def test_scale_crop_zoom_out_pads_with_the_ignored_label() -> None:
    from training.train_segmenter import scale_crop

    torch.manual_seed(0)
    image = torch.rand(1, 3, 24, 32) * 2 - 1
    labels = torch.full((1, 1, 24, 32), 3.0)
    x, y = scale_crop(image, labels, (12, 16), 0.5, -100)  # the window is twice the frame
    assert x.shape == (1, 3, 12, 16) and y.shape == (1, 1, 12, 16)
    assert set(y.unique().tolist()) == {3.0, -100.0}
    assert (y == 3).float().mean() == pytest.approx(0.25, abs=0.1)  # the frame fills about a quarter
    x, y = scale_crop(image, labels, (12, 16), 2.0, -100)  # zoom in: no padding
    assert set(y.unique().tolist()) == {3.0}


def test_augment_shapes_and_ranges() -> None:
    from training.train_segmenter import TrainConfig, augment

    torch.manual_seed(1)
    cfg = TrainConfig(input_height=12, input_width=16, scale_min=0.7, scale_max=2.0, scale_prob=1.0, jitter_prob=1.0,
                      hue_max=0.1, daylight_prob=1.0, blur_prob=1.0, jpeg_prob=1.0, downup_prob=1.0, noise_prob=1.0)
    images = torch.rand(4, 3, 24, 32) * 2 - 1
    labels = torch.randint(0, 12, (4, 24, 32))
    x, y = augment(images, labels, cfg, -100)
    assert x.shape == (4, 3, 12, 16) and y.shape == (4, 12, 16) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert set(y.unique().tolist()) <= set(range(12)) | {-100}


def test_colour_jitter_hue_keeps_grey() -> None:
    from training.train_segmenter import colour_jitter

    torch.manual_seed(2)
    grey = torch.zeros(1, 3, 4, 4) + 0.2
    out = colour_jitter(grey, 0.25)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_score_segmentation_matches_the_metrics() -> None:
    from shared.semantic.segmenter import score_segmentation, scores_from_confusion

    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (5, 6, 8), generator=gen)
    pairs = [(torch.zeros(3, 6, 8), labels[i]) for i in range(5)]
    preds = torch.where(torch.rand(5, 6, 8, generator=gen) < 0.7, labels, torch.randint(0, 4, (5, 6, 8), generator=gen))
    calls = iter(range(5))

    def predict(images: torch.Tensor) -> torch.Tensor:
        start = next(calls) * 2
        return preds[start : start + len(images)]

    names = ("a", "b", "c", "void")
    scores = score_segmentation(predict, pairs, names, void_id=3, batch_size=2)
    conf = confusion_matrix(preds, labels, 4)
    real = conf.copy()
    real[3] = 0
    assert scores.miou_void_excluded == pytest.approx(miou(real, exclude=[3]))
    assert scores.miou_with_void == pytest.approx(miou(conf))
    assert scores.per_class_iou["a"] == pytest.approx(per_class_iou(real)[0], abs=1e-4)
    assert scores.per_class_iou["void"] == pytest.approx(per_class_iou(conf)[3], abs=1e-4)
    assert np.array_equal(scores.confusion, conf)
    assert set(scores.as_dict()) == {"miou_void_excluded", "miou_with_void", "pixel_acc_void_excluded", "per_class_iou"}
    with pytest.raises(ValueError, match="confusion"):
        scores_from_confusion(conf, names[:3], 2)


def test_training_script_warm_start_and_ema(tmp_path: Path) -> None:
    from training import train_segmenter

    data_root = _fake_camvid(tmp_path / "camvid")
    common = ["--data-root", str(data_root), "--batch-size", "4", "--base-channels", "8", "--input-height", "24",
              "--input-width", "32", "--warmup-steps", "1", "--minutes", "5", "--scale-min", "0.8"]
    first = tmp_path / "first"
    train_segmenter.main(common + ["--out-dir", str(first), "--model-path", str(first / "m.pt"), "--max-steps", "2"])
    second = tmp_path / "second"
    out = train_segmenter.main(common + ["--out-dir", str(second), "--model-path", str(second / "m.pt"), "--max-steps", "2",
                                         "--init-from", str(first / "m.pt"), "--ema-decay", "0.9"])
    assert out["step"] == 2
    log = (second / "log.txt").read_text()
    assert "warm start from" in log
    state = torch.load(second / "state.pt", weights_only=False)
    assert state["ema"] is not None
    larger = [a if a not in ("24", "32") else str(int(a) * 2) for a in common]  # the same layers read at 48x64
    fine_tuned = tmp_path / "larger"
    out = train_segmenter.main(larger + ["--out-dir", str(fine_tuned), "--model-path", str(fine_tuned / "m.pt"),
                                         "--max-steps", "1", "--init-from", str(first / "m.pt")])
    assert out["step"] == 1 and "warm start from" in (fine_tuned / "log.txt").read_text()
    with pytest.raises(ValueError, match="another network"):
        train_segmenter.main(common[:6] + ["--base-channels", "16", "--out-dir", str(tmp_path / "third"),
                                           "--model-path", str(tmp_path / "third" / "m.pt"), "--init-from", str(first / "m.pt")])


def test_photometric_augmentations_keep_shape_and_range() -> None:
    from training.train_segmenter import daylight_shift, gaussian_blur, jpeg_round_trip

    torch.manual_seed(3)
    image = torch.rand(1, 3, 24, 32) * 2 - 1
    for _ in range(6):  # every kind of colour cast
        out = daylight_shift(image)
        assert out.shape == image.shape and out.min() >= -1 and out.max() <= 1
    flat = torch.full((1, 3, 24, 32), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.2), flat, atol=1e-5)  # a blur keeps a flat image
    blurred = gaussian_blur(image, 1.2)
    assert blurred.shape == image.shape and blurred.std() < image.std()
    jpeg = jpeg_round_trip(image, 30)
    assert jpeg.shape == image.shape and jpeg.dtype == image.dtype and jpeg.min() >= -1 and jpeg.max() <= 1
    assert 0 < (jpeg - image).abs().mean() < 0.5


def test_training_script_trains_the_old_architecture(tmp_path: Path) -> None:
    from training import train_segmenter

    data_root = _fake_camvid(tmp_path / "camvid")
    out_dir = tmp_path / "unet"
    train_segmenter.main(["--data-root", str(data_root), "--batch-size", "4", "--architecture", "unet",
                          "--base-channels", "8", "--input-height", "24", "--input-width", "32", "--minutes", "5",
                          "--out-dir", str(out_dir), "--model-path", str(out_dir / "m.pt"), "--max-steps", "2"])
    seg = Segmenter.from_checkpoint(out_dir / "m.pt", "cpu")
    assert isinstance(seg.net, SegmenterNet) and seg.config.architecture == "unet"
    scores = train_segmenter.main(["--data-root", str(data_root), "--eval-only", "--model-path", str(out_dir / "m.pt")])
    assert set(scores) == {"input_size", "full_192x256", "downup_48x64", "map_96x128", "map_48x64"}
    assert all(0 <= s["pixel_acc_void_excluded"] <= 1 for s in scores.values())


def test_recalibrate_batchnorm_uses_the_batches_statistics() -> None:
    from training.train_segmenter import recalibrate_batchnorm

    torch.manual_seed(4)
    net = build_net(FAST_SMALL)
    batches = [torch.rand(2, 3, 48, 64) * 2 - 1 + 0.5 for _ in range(3)]
    recalibrate_batchnorm(net, batches)
    assert not net.training
    first = net.down2[1]  # the stem's BatchNorm sees the stem conv's outputs
    with torch.no_grad():
        feats = torch.cat([net.down2[0](x) for x in batches])
    assert torch.allclose(first.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-4)
    assert first.momentum == 0.1 and first.num_batches_tracked == 3


def test_training_script_recalibrates_a_file(tmp_path: Path) -> None:
    from training import train_segmenter

    data_root = _fake_camvid(tmp_path / "camvid")
    common = ["--data-root", str(data_root), "--batch-size", "4", "--base-channels", "8", "--input-height", "32",
              "--input-width", "32", "--out-dir", str(tmp_path / "run"), "--model-path", str(tmp_path / "run" / "m.pt")]
    train_segmenter.main(common + ["--max-steps", "1", "--minutes", "5"])
    out = train_segmenter.main(common + ["--recalibrate-bn"])
    seg = Segmenter.from_checkpoint(out["path"], "cpu")
    assert seg.meta["bn_recalibrated"] and seg.meta["val_miou_void_excluded"] == out["after"]["miou_void_excluded"]
