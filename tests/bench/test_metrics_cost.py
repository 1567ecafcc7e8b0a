"""``python -m bench.metrics_cost`` prints its figures: per-request writes in both modes, and scrapes."""

from __future__ import annotations

import re

import pytest

from bench.metrics_cost import main


def test_prints_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--apis", "1", "--writes", "200", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"in-process\s+\d+\.\d us", out) and re.search(r"multiprocess\s+\d+\.\d us\s+\(\d+\.\dx\)", out)
    assert re.search(r"in-process registry\s+\d+\.\d ms", out)
    # a model process and an API process: counters, histograms and three gauge modes each
    assert re.search(r"1 model \+\s+1 API processes \(\s+10 files\)\s+\d+\.\d ms", out), out
