"""Bandwidth ratio, budgets and the rate-quality table (shared.semantic.rate_quality)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.semantic import rate_quality
from shared.semantic.rate_quality import Candidate, RateQualityTable, TableEntry, choose, parse_budget


def test_bandwidth_ratio_counts_complex_uses_per_rgb_source_value() -> None:
    assert rate_quality.source_values(96, 128) == 36_864
    assert rate_quality.channel_uses(7) == 4 and rate_quality.channel_uses(8) == 4
    # CamVid's 12 present maps at 96x128: 73,728 uses, ratio 2; the analog image: ratio 1/2.
    assert rate_quality.bandwidth_ratio(rate_quality.channel_uses(12 * 96 * 128), 96, 128) == 2.0
    assert rate_quality.bandwidth_ratio(rate_quality.channel_uses(96 * 128 * 3), 96, 128) == 0.5
    with pytest.raises(ValueError):
        rate_quality.source_values(0, 128)


@pytest.mark.parametrize(("text", "uses"), [("3072", 3072), ("1/12", 3072), (" 0.5 ", 18_432), ("2.", 73_728),
                                            ("1 / 48", 768), (".25", 9216)])
def test_a_budget_is_channel_uses_or_a_ratio(text: str, uses: int) -> None:
    assert parse_budget(text).uses_for(96, 128) == uses


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "1/0", "0/3", "1e3", "2/3/4", "nan", "1000/1", "0.0"])
def test_a_bad_budget_says_what_a_budget_is(text: str) -> None:
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def test_the_paper_psnr_converts_to_the_average_power_snr_by_the_map_scale() -> None:
    assert rate_quality.average_power_snr_db(7.0, "average_power", 3.0) == 7.0
    # 12 binary maps: scale sqrt(12), a PSNR of X dB is an average-power SNR of X - 10.8 dB.
    assert rate_quality.average_power_snr_db(10.0, "paper_psnr", 12 ** 0.5) == pytest.approx(10 - 10.792, abs=1e-3)
    with pytest.raises(ValueError):
        rate_quality.average_power_snr_db(1.0, "peak", 1.0)


def _table_dict() -> dict:
    return {"version": 1, "snr_definition": "average_power", "snrs_db": [1, 10, 20], "tolerance_miou": 0.01,
            "made_by": "python -m evaluation.rate_quality", "images": 16, "split": "val",
            "entries": [{"representation": "ours", "downsample_factor": 1, "compression": "none", "jpeg_quality": 75,
                         "bandwidth_ratio": 2.0, "miou": [0.50, 0.56, 0.56]},
                        {"representation": "ours", "downsample_factor": 4, "compression": "none",
                         "jpeg_quality": 75, "bandwidth_ratio": 0.125, "miou": [0.40, 0.54, 0.555]}]}


def test_the_table_interpolates_in_the_snr_and_holds_its_end_values(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(_table_dict()))
    table = RateQualityTable.load(path)
    full, quarter = table.entries
    assert table.expected_miou(quarter, -5) == 0.40 and table.expected_miou(quarter, 100) == 0.555
    assert table.expected_miou(quarter, 5.5) == pytest.approx(0.47)
    assert quarter.name == "ours, factor 4"


@pytest.mark.parametrize(("change", "problem"), [
    ({"version": 2}, "version"), ({"snr_definition": "paper_psnr"}, "average_power"),
    ({"snrs_db": [10, 1, 20]}, "increasing"), ({"entries": []}, "non-empty"),
    ({"entries": [{"representation": "ours", "downsample_factor": 1, "compression": "none", "jpeg_quality": 75,
                   "bandwidth_ratio": 2.0, "miou": [0.5]}]}, "one mIoU"),
])
def test_a_broken_table_is_refused_with_the_reason(change: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        RateQualityTable.from_dict(_table_dict() | change, "models/table.json")


def test_choose_takes_the_cheapest_within_the_tolerance_of_the_best_that_fits() -> None:
    table = RateQualityTable.from_dict(_table_dict(), "t")
    full, quarter = table.entries

    def candidate(entry: TableEntry, uses: int, snr: float) -> Candidate:
        return Candidate(entry, uses, uses / 36_864, snr, table.expected_miou(entry, snr))

    at_20 = [candidate(full, 73_728, 20), candidate(quarter, 4_608, 20)]
    assert choose(at_20, 100_000, 0.01).entry is quarter  # 0.005 worse for 1/16 of the uses
    at_1 = [candidate(full, 73_728, 1), candidate(quarter, 4_608, 1)]
    assert choose(at_1, 100_000, 0.01).entry is full  # 0.10 better: worth the uses
    assert choose(at_1, 10_000, 0.01).entry is quarter  # the only one within the budget
    assert choose(at_1, 4_000, 0.01) is None
    # Equally cheap (JPEG maps take the channel uses of plain ones): the first, unless clearly better.
    jpeg = TableEntry("ours", 4, "jpeg", 75, 0.125, (0.405, 0.545, 0.56))
    assert choose([candidate(quarter, 4_608, 10), candidate(jpeg, 4_608, 10)], 10_000, 0.01).entry is quarter
    assert choose([candidate(quarter, 4_608, 1), candidate(jpeg, 4_608, 1)], 10_000, 0.001).entry is jpeg
