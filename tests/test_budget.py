"""The sender's budget: the map coding chosen from the rate-quality table (sender_service/budget.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sender_service.budget import BudgetError, BudgetRequest, TableUnavailableError, choose_coding
from sender_service.settings import SenderSettings

H, W = 96, 128


def labels_with(num_classes: int) -> np.ndarray:
    """Vertical stripes of the first `num_classes` ids: that many present classes."""
    return (np.arange(W)[None, :] * num_classes // W).repeat(H, axis=0).astype(np.uint8)


def table(snr_miou: dict[tuple[int, str], list[float]], snrs: list[float] = (1.0, 10.0, 20.0)) -> dict:
    return {"version": 1, "snr_definition": "average_power", "snrs_db": list(snrs), "tolerance_miou": 0.01,
            "made_by": "python -m evaluation.rate_quality --limit 16", "images": 16, "split": "val",
            "entries": [{"representation": "ours", "downsample_factor": factor, "compression": compression,
                         "jpeg_quality": 75, "bandwidth_ratio": 2 / factor**2, "miou": miou}
                        for (factor, compression), miou in snr_miou.items()]}


@pytest.fixture
def settings(tmp_path: Path) -> SenderSettings:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table({(1, "none"): [0.56, 0.56, 0.56], (2, "none"): [0.54, 0.556, 0.56],
                                      (4, "none"): [0.45, 0.53, 0.55], (8, "none"): [0.30, 0.45, 0.50],
                                      (4, "jpeg"): [0.40, 0.50, 0.52]})))
    return SenderSettings(rate_quality_table=path, map_height=H, map_width=W)


def request(budget: str, snr_db: float = 10.0, definition: str = "average_power", **kwargs) -> BudgetRequest:
    return BudgetRequest(text=budget, snr_db=snr_db, snr_definition=definition, **kwargs)


def test_the_cheapest_coding_within_the_tolerance_of_the_best_that_fits(settings: SenderSettings) -> None:
    labels = labels_with(12)  # 12 maps: factor f takes 12 (96/f)(128/f) / 2 uses, a ratio of 2 / f^2
    choice = choose_coding(labels, request("2.0"), settings)
    # At 10 dB factor 2 is 0.004 below factor 1, within the tolerance, for a quarter of the uses.
    assert choice.encoding.semantic.downsample_factor == 2 and choice.encoding.semantic.map_height == 48
    record = choice.record
    assert record["chosen"]["channel_uses"] == 12 * 48 * 64 // 2 and record["chosen"]["bandwidth_ratio"] == 0.5
    assert record["channel_uses"] == 73_728 and record["requested"] == "2.0"
    assert record["table"].endswith("table.json") and record["table_made_by"].startswith("python -m evaluation")
    assert [c["fits"] for c in record["candidates"]] == [True] * 5
    # Within 1/12 (3,072 uses) only factor 8 fits (1/32); within 3072 uses as a number, the same.
    assert choose_coding(labels, request("1/12"), settings).encoding.semantic.downsample_factor == 8
    assert choose_coding(labels, request("3072"), settings).encoding.semantic.downsample_factor == 8
    # At 1 dB factor 2 loses 0.02 to factor 1: beyond the tolerance, so factor 1 is worth its uses.
    assert choose_coding(labels, request("2.0", snr_db=1.0), settings).encoding.semantic.downsample_factor == 1


def test_the_paper_psnr_is_converted_with_each_codings_own_scale(settings: SenderSettings) -> None:
    labels = labels_with(12)
    choice = choose_coding(labels, request("2.0", snr_db=11.8, definition="paper_psnr"), settings)
    factor_1 = next(c for c in choice.record["candidates"] if (c["downsample_factor"], c["compression"]) == (1, "none"))
    # 12 binary maps are scaled by sqrt(12): a PSNR of 11.8 dB is an average-power SNR of 1.0 dB.
    assert factor_1["snr_db_average_power"] == pytest.approx(11.8 - 10 * math.log10(12), abs=1e-3)
    assert choice.encoding.semantic.downsample_factor == 1


def test_too_small_a_budget_names_the_smallest_that_works(settings: SenderSettings) -> None:
    with pytest.raises(BudgetError) as raised:
        choose_coding(labels_with(12), request("1000"), settings)
    assert raised.value.status_code == 400
    # Factor 8: 12 maps of 12x16 values, 1,152 uses.
    assert "too small" in raised.value.message and "smallest that works is 1152 channel uses" in raised.value.message


@pytest.mark.parametrize(("budget", "kwargs", "match"), [
    ("1/12", {"codec_given": True}, "either budget or those fields"),
    ("a lot", {}, "budget must be complex channel uses"),
    ("1/0", {}, "divides by zero"),
])
def test_a_budget_that_cannot_be_read_is_a_422(settings: SenderSettings, budget: str, kwargs: dict, match: str) -> None:
    with pytest.raises(BudgetError, match=match) as raised:
        choose_coding(labels_with(3), request(budget, **kwargs), settings)
    assert raised.value.status_code == 422


def test_a_missing_or_broken_table_says_so(tmp_path: Path) -> None:
    missing = SenderSettings(rate_quality_table=tmp_path / "none.json")
    with pytest.raises(TableUnavailableError, match="is missing, so budgets cannot be honoured"):
        choose_coding(labels_with(3), request("1/12"), missing)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(table({(1, "none"): [0.5]})))
    with pytest.raises(TableUnavailableError, match="one mIoU in \\[0, 1\\] per SNR"):
        choose_coding(labels_with(3), request("1/12"), SenderSettings(rate_quality_table=broken))


def test_the_table_is_read_again_when_it_changes(settings: SenderSettings) -> None:
    labels = labels_with(12)
    assert choose_coding(labels, request("2.0"), settings).encoding.semantic.downsample_factor == 2
    settings.rate_quality_table.write_text(json.dumps(table({(1, "none"): [0.6, 0.6, 0.6],
                                                             (2, "none"): [0.3, 0.3, 0.3]})))
    assert choose_coding(labels, request("2.0"), settings).encoding.semantic.downsample_factor == 1
