"""``patchlife loadtest``'s load logic against a fake in-process server (no model, no sockets)."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import pytest

from service import loadtest


class FakeServer:
    """/classify answers 200 (or 503 for keep_rate=0.5), /metrics counts tokens as a server would."""

    def __init__(self) -> None:
        self.classified = 0
        self.keep_rates: list[str | None] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            n = self.classified
            text = (f"patchlife_needed_tokens_total {100.0 * n}\n"
                    f"patchlife_computed_tokens_total {110.0 * n}\n"
                    f'patchlife_batch_size_sum{{phase="tail"}} {float(n)}\n'
                    f'patchlife_batch_size_count{{phase="tail"}} {n / 4}\n')
            return httpx.Response(200, text=text)
        assert request.url.path == "/classify" and request.method == "POST"
        assert b"image/png" in request.content and b"\x89PNG" in request.content
        rate = request.url.params.get("keep_rate")
        self.keep_rates.append(rate)
        if rate == "0.5":
            return httpx.Response(503, json={"error": {"code": "overloaded"}})
        self.classified += 1
        return httpx.Response(200, json={"results": [{}]})


def args(**kw: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadtest.add_arguments(parser)
    ns = parser.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_mix_is_fixed_png_images_cycling_keep_rates() -> None:
    mix = loadtest.make_mix(6, [None, 0.5, 0.9])
    assert [r for _, r in mix] == [None, 0.5, 0.9, None, 0.5, 0.9]
    assert all(png.startswith(b"\x89PNG") for png, _ in mix)
    assert [png for png, _ in mix] == [png for png, _ in loadtest.make_mix(6, [None, 0.5, 0.9])]
    assert len({png for png, _ in mix}) == 6


def test_closed_loop_pass_counts_requests_errors_and_waste() -> None:
    fake = FakeServer()
    mix = loadtest.make_mix(8, [None, 0.7, 0.5, 0.9])
    a = args(clients=4, requests=40, warmup=8, duration=60.0)
    result = asyncio.run(loadtest.measure("http://fake", mix, a, httpx.MockTransport(fake.handler)))
    assert result["requests"] == 40 and len(fake.keep_rates) == 48  # warm-up + measured
    assert result["errors"] == 10 and result["error_statuses"] == {"503": 10}
    assert result["waste_ratio"] == pytest.approx(0.10)  # (110 - 100) / 100 from the counters' deltas
    assert result["tail_batch_mean"] == pytest.approx(4.0)
    assert result["images_per_s"] > 0 and 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert "open_loop" not in result


def test_open_loop_pass_at_a_fraction_of_the_closed_loop_rate() -> None:
    fake = FakeServer()
    mix = loadtest.make_mix(4, [None])
    a = args(clients=2, requests=30, warmup=0, duration=30.0, rate_fraction=0.5)
    result = asyncio.run(loadtest.measure("http://fake", mix, a, httpx.MockTransport(fake.handler)))
    opened = result["open_loop"]
    assert opened["errors"] == 0 and opened["rate_per_s"] == pytest.approx(0.5 * result["images_per_s"], rel=0.05)
    assert fake.classified == 30 + 30


def test_json_output_has_only_the_modes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_measure(url: str, mix: object, a: object) -> dict[str, object]:
        return {"images_per_s": 1.0, "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0, "errors": 0, "waste_ratio": 0.0}

    monkeypatch.setattr(loadtest, "measure", fake_measure)
    assert loadtest.run(args(url="http://x", json=True, mix_size=2)) == 0
    body = json.loads(capsys.readouterr().out)
    assert list(body) == ["modes"] and body["modes"]["server"]["errors"] == 0
