"""The load test's report: comparisons between server variants."""

from __future__ import annotations

from bench import loadreport as report
from bench.loadtest import _variants


def test_api_process_variants_are_compared_to_the_first_value() -> None:
    assert _variants(["budget", "fifo"], "0,auto") == ["budget@0", "budget@auto", "fifo@0", "fifo@auto"]
    assert _variants(["budget"], None) == ["budget"]
    results = {"budget@0": {"images_per_s": 100.0, "idle": {"p50_ms": 5.0}},
               "budget@auto": {"images_per_s": 150.0, "idle": {"p50_ms": 5.6}},
               "fifo@0": {"images_per_s": 80.0, "idle": None}, "fifo@auto": {"images_per_s": 40.0}}
    ratios = report.variant_ratios(results)
    assert ratios == {"budget@auto": {"images_per_s_ratio": 1.5, "idle_p50_ms_delta": 0.6, "against": "budget@0"},
                      "fifo@auto": {"images_per_s_ratio": 0.5, "idle_p50_ms_delta": None, "against": "fifo@0"}}
