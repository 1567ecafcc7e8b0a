"""``python -m bench.wire`` prints both framings side by side for every case, on equal work (it checks
that both carried the same results), and the new one sends a batch's answers in one frame."""

from __future__ import annotations

import re

import pytest

from bench.wire import main


def test_prints_both_framings_for_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--rounds", "10", "--classes", "10", "--grid", "3"])
    out = capsys.readouterr().out
    for case in ("Submit, 1 image", "Submit, 16 images", "16 answers of 1 image", "1 answer of 16 images"):
        for label in ("pickle", "msgspec"):
            assert re.search(rf"{case}\s+{label}\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\s+\d+\s+\d+", out), (case, label, out)
    assert re.search(r"16 answers of 1 image\s+pickle(\s+\S+){4}\s+16\n", out)  # a frame per request before
    assert re.search(r"16 answers of 1 image\s+msgspec(\s+\S+){4}\s+1\n", out)  # one per batch now
    assert len(re.findall(r"\d+\.\dx faster", out)) == 4
