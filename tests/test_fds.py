"""FDS block (paper eq. 2): shapes, clean absent classes, denoising, batching, input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.semantic.fds import DECIDE_ABOVE_NOISE_STD, FdsVariant, estimate_noise_std, fds, fds_batched

NUM_CLASSES = 12
HEIGHT, WIDTH = 32, 48


def blocky_present_maps(
    seed: int, num_present: int = 4, block: int = 8
) -> tuple[torch.Tensor, list[int], np.ndarray]:
    """One-hot maps of `num_present` random classes laid out in large blocks, plus the label map."""
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(NUM_CLASSES, size=num_present, replace=False).tolist())
    grid = rng.choice(ids, size=(HEIGHT // block, WIDTH // block))
    label_map = np.kron(grid, np.ones((block, block), dtype=np.int64))
    maps = torch.from_numpy((np.array(ids)[:, None, None] == label_map[None]).astype(np.float32))
    return maps, ids, label_map


def add_noise(maps: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return maps + std * torch.randn(maps.shape, generator=generator)


def interior_mask(label_map: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds one class: pooling cannot move their argmax."""
    padded = np.pad(label_map, radius, mode="edge")
    same = np.ones_like(label_map, dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + label_map.shape[0], dx : dx + label_map.shape[1]] == label_map
    return same


@pytest.mark.parametrize("variant", list(FdsVariant))
def test_output_has_all_classes_and_absent_ones_are_zero(variant: FdsVariant) -> None:
    maps, ids, _ = blocky_present_maps(0)
    out = fds(add_noise(maps, 0.6, 0), ids, NUM_CLASSES, variant=variant)
    assert out.shape == (NUM_CLASSES, HEIGHT, WIDTH)
    assert out.dtype == maps.dtype
    absent = [k for k in range(NUM_CLASSES) if k not in ids]
    assert torch.count_nonzero(out[absent]) == 0
    assert torch.count_nonzero(out[ids]) > 0


def test_clean_maps_keep_their_argmax_inside_regions() -> None:
    maps, ids, label_map = blocky_present_maps(1)
    out = fds(maps, ids, NUM_CLASSES)
    inside = interior_mask(label_map)
    assert inside.mean() > 0.3
    np.testing.assert_array_equal(out.argmax(dim=0).numpy()[inside], label_map[inside])
    inside_t = torch.from_numpy(inside)
    torch.testing.assert_close(out[ids][:, inside_t], maps[:, inside_t])


@pytest.mark.parametrize("variant", list(FdsVariant))
@pytest.mark.parametrize("seed", range(3))
def test_fds_removes_most_channel_noise(variant: FdsVariant, seed: int) -> None:
    maps, ids, label_map = blocky_present_maps(seed)
    noisy = add_noise(maps, 0.6, seed)
    before = np.array(ids)[noisy.argmax(dim=0).numpy()]
    after = fds(noisy, ids, NUM_CLASSES, variant=variant).argmax(dim=0).numpy()
    accuracy_before = np.mean(before == label_map)
    accuracy_after = np.mean(after == label_map)
    assert accuracy_after >= 0.9
    assert accuracy_after > accuracy_before + 0.1


def test_kernel_one_is_identity() -> None:
    maps, ids, _ = blocky_present_maps(2)
    noisy = add_noise(maps, 0.6, 2)
    out = fds(noisy, ids, NUM_CLASSES, avg_kernel=1, max_kernel=1, variant=FdsVariant.PAPER)
    torch.testing.assert_close(out[ids], noisy)


def test_average_pool_does_not_darken_borders() -> None:
    maps = torch.ones(1, 5, 7)
    out = fds(maps, [3], NUM_CLASSES, avg_kernel=5, max_kernel=1)
    torch.testing.assert_close(out[3], torch.ones(5, 7))


def test_argmax_variant_is_one_hot_over_present_classes() -> None:
    maps, ids, _ = blocky_present_maps(3)
    # Strongly negative noise: the absent zeros would win a plain argmax almost everywhere.
    noisy = add_noise(maps, 0.6, 3) - 5.0
    out = fds(noisy, ids, NUM_CLASSES, variant=FdsVariant.ARGMAX)
    assert set(out.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(out.sum(dim=0), torch.ones(HEIGHT, WIDTH))
    assert set(out.argmax(dim=0).unique().tolist()) <= set(ids)
    paper = fds(noisy, ids, NUM_CLASSES, variant=FdsVariant.PAPER)
    restricted = np.array(ids)[paper[ids].argmax(dim=0).numpy()]
    np.testing.assert_array_equal(out.argmax(dim=0).numpy(), restricted)


def full_batch(examples: list[tuple[torch.Tensor, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, H, W) maps with garbage in the absent slots, and the (B, K) present mask."""
    full = torch.full((len(examples), NUM_CLASSES, HEIGHT, WIDTH), 7.0)
    mask = torch.zeros(len(examples), NUM_CLASSES, dtype=torch.bool)
    for index, (maps, ids) in enumerate(examples):
        full[index, ids] = maps
        mask[index, ids] = True
    return full, mask


@pytest.mark.parametrize("std", [0.0, 0.1, 0.4, 0.9, 1.5])
def test_noise_estimate_matches_the_channel_whatever_the_scene(std: float) -> None:
    examples = [blocky_present_maps(seed, num_present=2 + 3 * seed, block=4 * 2**seed) for seed in range(3)]
    full, mask = full_batch([(add_noise(maps, std, seed), ids) for seed, (maps, ids, _) in enumerate(examples)])
    estimate = estimate_noise_std(full, mask)
    np.testing.assert_allclose(estimate.numpy(), std, atol=0.03 + 0.04 * std)


def test_noise_estimate_holds_for_soft_maps() -> None:
    """Maps smoothed as area downsampling and bilinear enlarging smooth them still sum to 1 at every
    pixel: the estimate is the noise's, not the scene's."""
    maps, ids, _ = blocky_present_maps(6, num_present=6, block=4)
    soft = torch.nn.functional.avg_pool2d(maps[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    assert bool(((soft > 0.1) & (soft < 0.9)).any())
    estimate = estimate_noise_std(*full_batch([(add_noise(soft, 0.5, 6), ids)]))
    assert float(estimate) == pytest.approx(0.5, abs=0.04)


def test_two_pass_is_eq_2_of_the_decided_map() -> None:
    maps, ids, _ = blocky_present_maps(7)
    noisy = add_noise(maps, 0.9, 7)
    decided = fds(noisy, ids, NUM_CLASSES, variant=FdsVariant.ARGMAX)
    two_pass = fds(noisy, ids, NUM_CLASSES, variant=FdsVariant.TWO_PASS)
    torch.testing.assert_close(two_pass, fds(decided[ids], ids, NUM_CLASSES, variant=FdsVariant.PAPER))
    # A pooled 0/1 map: every value a count over a 3x3 window (4 or 6 pixels at the borders).
    counts = two_pass * 36
    torch.testing.assert_close(counts, counts.round(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_two_pass_cleans_heavy_noise_better_than_one(seed: int) -> None:
    maps, ids, label_map = blocky_present_maps(seed)
    noisy = add_noise(maps, 0.9, seed)
    one = np.array(ids)[fds(noisy, ids, NUM_CLASSES, variant=FdsVariant.PAPER)[ids].argmax(dim=0).numpy()]
    two = fds(noisy, ids, NUM_CLASSES, variant=FdsVariant.TWO_PASS).argmax(dim=0).numpy()
    inside = interior_mask(label_map, radius=1)
    assert np.mean(two[inside] == label_map[inside]) > np.mean(one[inside] == label_map[inside])


def test_adaptive_decides_only_for_noisy_maps() -> None:
    maps, ids, _ = blocky_present_maps(8)
    quiet, loud = add_noise(maps, DECIDE_ABOVE_NOISE_STD - 0.15, 1), add_noise(maps, DECIDE_ABOVE_NOISE_STD + 0.15, 2)
    full, mask = full_batch([(quiet, ids), (loud, ids)])
    adaptive = fds_batched(full, mask, variant=FdsVariant.ADAPTIVE)
    torch.testing.assert_close(adaptive[0], fds_batched(full, mask, variant=FdsVariant.PAPER)[0])
    torch.testing.assert_close(adaptive[1], fds_batched(full, mask, variant=FdsVariant.TWO_PASS)[1])
    assert not torch.equal(adaptive[0], fds_batched(full, mask, variant=FdsVariant.TWO_PASS)[0])


@pytest.mark.parametrize("variant", list(FdsVariant))
def test_batched_matches_per_example(variant: FdsVariant) -> None:
    examples = [blocky_present_maps(seed, num_present=2 + seed) for seed in range(3)]
    full = torch.zeros(len(examples), NUM_CLASSES, HEIGHT, WIDTH)
    mask = torch.zeros(len(examples), NUM_CLASSES, dtype=torch.bool)
    singles = []
    for index, (maps, ids, _) in enumerate(examples):
        noisy = add_noise(maps, 0.6, index)
        full[index, ids] = noisy
        mask[index, ids] = True
        singles.append(fds(noisy, ids, NUM_CLASSES, variant=variant))
    # Garbage in the absent slots must not leak into the output.
    full = torch.where(mask[:, :, None, None], full, torch.full_like(full, 7.0))
    batched = fds_batched(full, mask, variant=variant)
    torch.testing.assert_close(batched, torch.stack(singles))


def test_four_d_input_with_shared_ids_matches_per_example() -> None:
    maps, ids, _ = blocky_present_maps(4)
    batch = torch.stack([add_noise(maps, 0.6, seed) for seed in range(2)])
    out = fds(batch, torch.tensor(ids), NUM_CLASSES)
    assert out.shape == (2, NUM_CLASSES, HEIGHT, WIDTH)
    torch.testing.assert_close(out[1], fds(batch[1], ids, NUM_CLASSES))


def test_variant_accepts_its_name() -> None:
    maps, ids, _ = blocky_present_maps(5)
    torch.testing.assert_close(
        fds(maps, ids, NUM_CLASSES, variant="argmax"),
        fds(maps, ids, NUM_CLASSES, variant=FdsVariant.ARGMAX),
    )


@pytest.mark.parametrize("kernel", [0, 2, 4, -3, 3.0, True])
def test_bad_kernels_raise(kernel) -> None:
    maps, ids, _ = blocky_present_maps(6)
    with pytest.raises(ValueError, match="avg_kernel"):
        fds(maps, ids, NUM_CLASSES, avg_kernel=kernel)
    with pytest.raises(ValueError, match="max_kernel"):
        fds(maps, ids, NUM_CLASSES, max_kernel=kernel)


@pytest.mark.parametrize(
    "ids, message",
    [
        ([1, 2, 3], "3 present_class_ids for 4"),
        ([1, 2, 3, 3], "unique"),
        ([1, 2, 3, 12], r"\[0, 12\)"),
        ([-1, 2, 3, 4], r"\[0, 12\)"),
        ([1.0, 2.0, 3.0, 4.0], "integer"),
        (torch.tensor([[1, 2, 3, 4]]), "1-D"),
        (torch.ones(NUM_CLASSES, dtype=torch.bool), "integer"),
    ],
)
def test_bad_class_ids_raise(ids, message: str) -> None:
    maps, _, _ = blocky_present_maps(7)
    with pytest.raises(ValueError, match=message):
        fds(maps, ids, NUM_CLASSES)


def test_bad_maps_raise() -> None:
    maps, ids, _ = blocky_present_maps(8)
    with pytest.raises(ValueError, match="C_present, H, W"):
        fds(maps[0], ids[:1], NUM_CLASSES)
    with pytest.raises(ValueError, match="float"):
        fds(maps.long(), ids, NUM_CLASSES)
    nan_maps = maps.clone()
    nan_maps[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fds(nan_maps, ids, NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes"):
        fds(maps, ids, 0)


def test_bad_batched_inputs_raise() -> None:
    full = torch.zeros(2, NUM_CLASSES, 8, 8)
    mask = torch.ones(2, NUM_CLASSES, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool"):
        fds_batched(full, mask.float())
    with pytest.raises(ValueError, match="bool"):
        fds_batched(full, mask[:, :-1])
    with pytest.raises(ValueError, match="B, K, H, W"):
        fds_batched(full[0], mask)
    empty_row = mask.clone()
    empty_row[1] = False
    with pytest.raises(ValueError, match="at least one present class"):
        fds_batched(full, empty_row)
