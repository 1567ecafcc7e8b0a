"""Triton's perf_analyzer against a real ``patchlife serve``, briefly, over gRPC and HTTP (optional).

It runs where perf_analyzer is already at hand: ``PATCHLIFE_PERF_ANALYZER`` (a command), a
``perf_analyzer`` on the PATH, or the project's ``scripts/perf-analyzer`` once its cache holds what it
needs (run it once by hand; this test never downloads it); otherwise it skips and says so. The figures of
docs/api.md come from the full sweep there, not from this check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ops_support import REPO

from bench.perf_inputs import input_data

MODEL = "ops-tiny"
WRAPPER = REPO / "scripts" / "perf-analyzer"


def _command() -> list[str]:
    if os.environ.get("PATCHLIFE_PERF_ANALYZER"):
        return os.environ["PATCHLIFE_PERF_ANALYZER"].split()
    found = shutil.which("perf_analyzer")
    if found:
        return [found]
    if subprocess.run([sys.executable, str(WRAPPER), "--cached"]).returncode == 0:
        return [sys.executable, str(WRAPPER)]
    pytest.skip("perf_analyzer is not available: Triton's load tool was NOT run against the server (set "
                "PATCHLIFE_PERF_ANALYZER, put perf_analyzer on the PATH, or run scripts/perf-analyzer once)")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol,data", [("grpc", "png.json"), ("http", "pixels.json")])
def test_perf_analyzer_runs_without_errors(protocol: str, data: str, service_url: str, grpc_target: str,
                                           pngs: list[bytes], tmp_path: Path) -> None:
    command = _command()
    for name, doc in input_data(pngs[:8]).items():
        (tmp_path / name).write_text(json.dumps(doc))
    url = grpc_target if protocol == "grpc" else service_url.removeprefix("http://")
    # -s 100: accept any window as stable (the machine is shared; this checks that it works, not how fast)
    args = ["-m", MODEL, "-i", protocol, "-u", url, "--input-data", str(tmp_path / data),
            "--concurrency-range", "2", "-p", "1000", "-s", "100"]
    run = subprocess.run(command + args, capture_output=True, text=True, timeout=240)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert not re.search(r"^(error|Thread \[\d+\] had error|Failed)", out, re.M), out[-3000:]
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", out)
    assert throughput and float(throughput.group(1)) > 0, out[-3000:]
    assert re.search(r"Avg request latency: \d+ usec \(overhead", out), "server-side statistics missing:\n" + out
