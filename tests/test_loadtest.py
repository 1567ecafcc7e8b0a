"""``patchlife loadtest``'s load logic against a fake in-process server (no model, no sockets)."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import pytest

from service import loadtest

RESULT = '{"labels": [], "timings_ms": {"decode": 1.0, "queue": 0.0, "compute": 2.0}}'


class FakeServer:
    """/classify answers 200 with one result per image (503 for keep_rate=0.5; one result short for
    keep_rate=0.25), /metrics counts tokens as a server would."""

    def __init__(self) -> None:
        self.classified = 0
        self.keep_rates: list[str | None] = []
        self.images: list[int] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            n = self.classified
            text = (f"patchlife_needed_tokens_total {100.0 * n}\n"
                    f"patchlife_computed_tokens_total {110.0 * n}\n"
                    f'patchlife_batch_size_sum{{phase="tail"}} {float(n)}\n'
                    f'patchlife_batch_size_count{{phase="tail"}} {n / 4}\n'
                    f'patchlife_batch_size_count{{phase="head"}} {n / 8}\n'
                    f'patchlife_model_compute_seconds_sum{{phase="head"}} {0.001 * n}\n'
                    f'patchlife_model_compute_seconds_sum{{phase="tail"}} {0.002 * n}\n')
            return httpx.Response(200, text=text)
        assert request.url.path == "/classify" and request.method == "POST"
        assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
        n = request.content.count(b'name="files"')
        assert n == request.content.count(b"\x89PNG") == request.content.count(b"Content-Type: image/png") > 0
        rate = request.url.params.get("keep_rate")
        self.keep_rates.append(rate)
        self.images.append(n)
        if rate == "0.5":
            return httpx.Response(503, json={"error": {"code": "overloaded"}})
        self.classified += 1
        results = ", ".join([RESULT] * (n - 1 if rate == "0.25" else n))
        return httpx.Response(200, text=f'{{"model": "m", "results": [{results}]}}')


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


def test_payloads_are_encoded_once_and_carry_the_mix() -> None:
    mix = loadtest.make_mix(6, [None, 0.5, 0.9])
    single = loadtest.make_payloads(mix, 1)
    assert [p.mix for p in single] == [[m] for m in mix]
    assert [p.path for p in single] == ["/classify", "/classify?keep_rate=0.5", "/classify?keep_rate=0.9"] * 2
    assert all(p.body.count(mix[i][0]) == 1 and p.images == 1 for i, p in enumerate(single))
    quad = loadtest.make_payloads(mix, 4)
    assert len(quad) == 6 and all(p.images == 4 and p.body.count(b'name="files"') == 4 for p in quad)
    assert [p.mix[0][1] for p in quad] == [None, 0.5, 0.9] * 2  # keep rates still cycle per request
    assert [png for png, _ in quad[1].mix] == [mix[(4 + j) % 6][0] for j in range(4)]
    assert all({r for _, r in p.mix} == {p.mix[0][1]} for p in quad)  # one keep rate per request


@pytest.mark.parametrize("per_request", [1, 4])
def test_closed_loop_pass_counts_requests_images_errors_and_waste(per_request: int) -> None:
    fake = FakeServer()
    mix = loadtest.make_mix(8, [None, 0.7, 0.5, 0.9])
    a = args(clients=4, requests=40, warmup=8, duration=60.0)
    payloads = loadtest.make_payloads(mix, per_request)
    result = asyncio.run(loadtest.measure("http://fake", payloads, a, httpx.MockTransport(fake.handler)))
    assert result["requests"] == 40 and len(fake.keep_rates) == 48  # warm-up + measured
    assert set(fake.images) == {per_request}
    assert result["errors"] == 10 and result["error_statuses"] == {"503": 10}
    assert result["images"] == 30 * per_request
    assert result["images_per_s"] == pytest.approx(per_request * result["requests_per_s"], rel=0.02)
    assert result["waste_ratio"] == pytest.approx(0.10)  # (110 - 100) / 100 from the counters' deltas
    assert result["tail_batch_mean"] == pytest.approx(4.0) and result["head_batch_mean"] == pytest.approx(8.0)
    assert result["images_per_s"] > 0 and 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["client_cpu_ms_per_request"] > 0
    # 3 ms of (fake) model time per answered request, over the pass's wall time
    assert result["model_busy"] == pytest.approx(0.003 * result["requests_per_s"], rel=0.05)
    assert "open_loop" not in result


def test_an_answer_with_the_wrong_number_of_results_is_an_error() -> None:
    fake = FakeServer()
    payloads = loadtest.make_payloads(loadtest.make_mix(4, [0.25, 0.7]), 2)
    result = asyncio.run(loadtest.measure("http://fake", payloads, args(clients=2, requests=20, warmup=0),
                                          httpx.MockTransport(fake.handler)))
    assert result["error_statuses"] == {"wrong_result_count": 10} and result["images"] == 20


def test_open_loop_pass_at_a_fraction_of_the_closed_loop_rate() -> None:
    fake = FakeServer()
    payloads = loadtest.make_payloads(loadtest.make_mix(4, [None]), 1)
    a = args(clients=2, requests=30, warmup=0, duration=30.0, rate_fraction=0.5)
    result = asyncio.run(loadtest.measure("http://fake", payloads, a, httpx.MockTransport(fake.handler)))
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
