"""``patchlife bench-http``: its refusals, its ratios from scripted passes, and (where wrk is installed)
a one-second run against a tiny model, two settings side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from bench_support import parsed
from tiny_models import tiny_checkpoint

from bench import httpbench, loaddrive


def args(**kw: object) -> argparse.Namespace:
    return parsed(httpbench.add_arguments, **kw)


def test_without_wrk_it_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(httpbench, "wrk_available", lambda: False)
    assert httpbench.run(args()) == 2
    assert capsys.readouterr().err.strip() == "patchlife bench-http: needs the wrk tool on PATH (Debian: apt-get " \
                                              "install wrk)"


@pytest.mark.parametrize(("override", "message"), [
    ({"files": "64px-png,huge"}, "--files: names from 64px-png,451x300-progressive,1000x872,3000x2000"),
    ({"api_processes": "0,many"}, "--api-processes: 'auto' or whole numbers"),
    ({"env": ["PATCHLIFE_DECODE"]}, "--env: NAME=VALUE"),
    ({"rounds": 0}, "--rounds, --connections and --threads must be >= 1"),
])
def test_bad_options_are_refused_before_anything_starts(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str],
                                                        override: dict[str, object], message: str) -> None:
    monkeypatch.setattr(httpbench, "wrk_available", lambda: True)
    assert httpbench.run(args(**override)) == 2
    assert message in capsys.readouterr().err


def test_files_are_the_issue_s_sizes_and_formats() -> None:
    import io

    from PIL import Image

    seen = {name: Image.open(io.BytesIO(make())) for name, make in httpbench.FILES.items()}
    assert {n: (im.format, im.size) for n, im in seen.items()} == {
        "64px-png": ("PNG", (64, 64)), "451x300-progressive": ("JPEG", (451, 300)),
        "1000x872": ("JPEG", (1000, 872)), "3000x2000": ("JPEG", (3000, 2000))}
    assert seen["451x300-progressive"].info.get("progressive") == 1 and "progressive" not in seen["1000x872"].info


def _pass(rps: float, cpu: float) -> dict[str, object]:
    return {"requests_per_s": rps, "server_cpu_ms_per_request": cpu, "p50_ms": 1.0, "p99_ms": 2.0,
            "requests": 100, "errors": 0, "client_cpu_ms_per_request": 0.1}


def test_settings_are_compared_round_by_round() -> None:
    rounds = {"64px-png": {"0": [_pass(100, 5.0), _pass(80, 6.0), _pass(120, 4.0)],
                           "auto": [_pass(200, 2.5), _pass(200, 2.0), _pass(180, 3.0)]}}
    body = httpbench.summarise(rounds, ["0", "auto"])
    assert body["results"]["64px-png"]["0"]["requests_per_s"] == 100.0
    assert body["results"]["64px-png"]["auto"]["server_cpu_ms_per_request"] == 2.5
    ratio = body["ratios"]["64px-png"]["auto"]
    assert ratio["requests_per_s"] == {"median": 2.0, "per_round": [2.0, 2.5, 1.5]}
    assert ratio["server_cpu_ms_per_request"] == {"median": 0.5, "per_round": [0.5, 0.3333, 0.75]}
    text = httpbench.table({"settings": ["0", "auto"], "model": "m", "rounds": 3,
                            "wrk": {"threads": 1, "connections": 32, "duration_s": 10.0}, **body})
    assert "api processes auto over 0" in text and "requests/s 2.000x [2.0, 2.5, 1.5]" in text


@pytest.mark.skipif(not loaddrive.wrk_available(), reason="needs the wrk tool (Debian: apt-get install wrk)")
def test_a_one_second_run_against_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "tiny", ["a", "b"], "tiny")
    code = httpbench.run(args(checkpoint=checkpoint, files="64px-png", duration=1.0, warmup=0.0, rounds=1,
                              connections=4, json=True, startup_timeout=120.0, env=["PATCHLIFE_WARMUP_BATCHES=1"]))
    body = json.loads(capsys.readouterr().out)
    assert code == 0 and body["settings"] == ["0", "auto"]
    for setting in ("0", "auto"):
        r = body["results"]["64px-png"][setting]
        assert r["requests"] > 0 and r["errors"] == 0 and r["requests_per_s"] > 0
        assert r["server_cpu_ms_per_request"] > 0  # the server's processes, not this one
    assert len(body["ratios"]["64px-png"]["auto"]["requests_per_s"]["per_round"]) == 1
