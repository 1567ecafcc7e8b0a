"""Schemathesis against a real ``patchlife serve``: a bounded run generated from ``/openapi.json`` (fixed
seed, a few hundred cases over every operation, examples + coverage + fuzzing phases) finds no 5xx but
the documented 503/504 and no answer that breaks the schema; and generated calls do reach the model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_support import serve_process

pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")

CONFIG = Path(__file__).with_name("schemathesis.toml")
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")


def _successes(metrics: str, route: str) -> float:
    prefix = f'patchlife_http_request_duration_seconds_count{{method="POST",route="{route}",status="200"}}'
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_and_no_schema_break(checkpoint_dir: Path, tmp_path: Path) -> None:
    with serve_process(checkpoint_dir) as (_, base):
        t0 = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", f"{base}/openapi.json",
             "--checks", CHECKS, "--phases", "examples,coverage,fuzzing", "--max-examples", "25", "--seed", "1",
             "--generation-deterministic", "--workers", "1", "--no-color",
             "--request-timeout", "30"],
            capture_output=True, text=True, cwd=tmp_path, timeout=240)
        seconds = time.monotonic() - t0
        metrics = httpx.get(f"{base}/metrics").text
    summary = [line for line in run.stdout.splitlines() if "generated" in line or "passed" in line]
    print(f"\nschemathesis in {seconds:.0f} s: {' / '.join(s.strip() for s in summary[-2:])}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    reached = {route: _successes(metrics, route) for route in ("/classify", "/explain", "/v2/models/{name}/infer")}
    print(f"answered 200 by the model: {reached}")
    assert all(n >= 1 for n in reached.values()), reached
