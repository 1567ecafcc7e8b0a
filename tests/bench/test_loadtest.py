"""``patchlife loadtest``'s load logic against a fake in-process server (no model, no sockets)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench_support import parsed
from PIL import Image

from bench import loadmix, loadreport, loadtest

RESULT = '{"labels": [], "timings_ms": {"decode": 1.0, "queue": 0.0, "compute": 2.0}}'


class FakeServer:
    """/classify answers 200 with one result per image (503 for keep_rate=0.5; one result short for
    keep_rate=0.25), /metrics counts tokens as a server would."""

    def __init__(self, batching: dict[str, object] | None = None) -> None:
        self.classified = 0
        self.keep_rates: list[str | None] = []
        self.images: list[int] = []
        self.batching = batching  # None: today's server (no merges/padding metrics, no "batching" key)

    def metrics(self) -> str:
        n = self.classified
        text = (f"patchlife_needed_tokens_total {100.0 * n}\n"
                f"patchlife_computed_tokens_total {110.0 * n}\n"
                f'patchlife_batch_size_sum{{phase="tail"}} {float(n)}\n'
                f'patchlife_batch_size_count{{phase="tail"}} {n / 4}\n'
                f'patchlife_batch_size_count{{phase="head"}} {n / 8}\n'
                f'patchlife_model_compute_seconds_sum{{phase="head"}} {0.001 * n}\n'
                f'patchlife_model_compute_seconds_sum{{phase="tail"}} {0.002 * n}\n')
        if self.batching is None:
            return text
        # The new series; tail padding split over a label the load test does not ask for (summed), head
        # padding declared but never incremented (no series yet: reads 0, not n/a).
        return text + (f'patchlife_batch_size_sum{{phase="head"}} {float(n)}\n'
                       f"patchlife_image_decode_seconds_sum {0.0005 * n}\npatchlife_image_decode_seconds_count {n}\n"
                       f"# TYPE patchlife_merged_images_total counter\npatchlife_merged_images_total {0.25 * n}\n"
                       "# TYPE patchlife_padded_rows_total counter\n"
                       f'patchlife_padded_rows_total{{phase="tail",class="8"}} {0.25 * n}\n'
                       f'patchlife_padded_rows_total{{phase="tail",class="16"}} {0.25 * n}\n')

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=self.metrics())
        if request.url.path == "/v1/models":
            if self.batching is None:
                return httpx.Response(200, json={"name": "m", "backbone": "b"})
            return httpx.Response(200, json={"name": "m", "batching": self.batching})
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
    return parsed(loadtest.add_arguments, **kw)


def test_mix_is_fixed_png_images_cycling_keep_rates() -> None:
    mix = loadmix.make_mix(6, [None, 0.5, 0.9])
    assert [r for _, r in mix] == [None, 0.5, 0.9, None, 0.5, 0.9]
    assert all(png.startswith(b"\x89PNG") for png, _ in mix)
    assert [png for png, _ in mix] == [png for png, _ in loadmix.make_mix(6, [None, 0.5, 0.9])]
    assert len({png for png, _ in mix}) == 6


def test_the_mix_holds_photo_jpegs_of_each_size_beside_the_scenes() -> None:
    mix = loadmix.make_mix(8, [None], kinds=("scenes", "photo224", "photo640", "photo1500"))
    kinds = [Image.open(io.BytesIO(data)) for data, _ in mix]
    assert [im.format for im in kinds] == ["PNG", "JPEG", "JPEG", "JPEG"] * 2
    assert [im.size for im in kinds[1:4]] == [(224, 224), (640, 480), (1500, 1000)]
    assert mix[1][0] != mix[5][0]  # distinct photos of one size
    request = loadmix.make_requests(mix[1:3], 2)[0]
    assert request.body.count(b"Content-Type: image/jpeg") == 2 and b'filename="0.jpg"' in request.body
    assert loadtest.run(args(mix="scenes,photo9000")) == 2  # an unknown kind is refused before anything starts


def test_payloads_are_encoded_once_and_carry_the_mix() -> None:
    mix = loadmix.make_mix(6, [None, 0.5, 0.9])
    single = loadmix.make_requests(mix, 1)
    assert [p.mix for p in single] == [[m] for m in mix]
    assert [p.path for p in single] == ["/classify", "/classify?keep_rate=0.5", "/classify?keep_rate=0.9"] * 2
    assert all(p.body.count(mix[i][0]) == 1 and p.images == 1 for i, p in enumerate(single))
    quad = loadmix.make_requests(mix, 4)
    assert len(quad) == 6 and all(p.images == 4 and p.body.count(b'name="files"') == 4 for p in quad)
    assert [p.mix[0][1] for p in quad] == [None, 0.5, 0.9] * 2  # keep rates still cycle per request
    assert [png for png, _ in quad[1].mix] == [mix[(4 + j) % 6][0] for j in range(4)]
    assert all({r for _, r in p.mix} == {p.mix[0][1]} for p in quad)  # one keep rate per request


@pytest.mark.parametrize("per_request", [1, 4])
def test_closed_loop_pass_counts_requests_images_errors_and_waste(per_request: int) -> None:
    fake = FakeServer()
    mix = loadmix.make_mix(8, [None, 0.7, 0.5, 0.9])
    a = args(clients=4, requests=40, warmup=8, duration=60.0)
    payloads = loadmix.make_requests(mix, per_request)
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
    assert "open_loop" not in result and "idle" not in result
    # Today's server has no merge/padding series and no "batching" key: n/a, not a crash or a 0.
    assert result["merged_share"] is None and result["head_padding_per_image"] is None
    assert result["tail_padding_per_image"] is None and result["batching"] is None
    assert result["server_cpu_ms_per_image"] is None  # not started here: no pid to read


def test_an_answer_with_the_wrong_number_of_results_is_an_error() -> None:
    fake = FakeServer()
    payloads = loadmix.make_requests(loadmix.make_mix(4, [0.25, 0.7]), 2)
    result = asyncio.run(loadtest.measure("http://fake", payloads, args(clients=2, requests=20, warmup=0),
                                          httpx.MockTransport(fake.handler)))
    assert result["error_statuses"] == {"wrong_result_count": 10} and result["images"] == 20


def test_open_loop_pass_at_a_fraction_of_the_closed_loop_rate() -> None:
    fake = FakeServer()
    payloads = loadmix.make_requests(loadmix.make_mix(4, [None]), 1)
    a = args(clients=2, requests=30, warmup=0, duration=30.0, rate_fraction=0.5)
    result = asyncio.run(loadtest.measure("http://fake", payloads, a, httpx.MockTransport(fake.handler)))
    opened = result["open_loop"]
    assert opened["errors"] == 0 and opened["rate_per_s"] == pytest.approx(0.5 * result["images_per_s"], rel=0.05)
    assert fake.classified == 30 + 30




COST = {"head": {"fixed_ms": 1.5, "per_row_ms": 0.25}, "tail": {"fixed_ms": 2.0, "per_token_us": 0.0125}}


def test_new_metrics_and_batching_info_explain_the_pass() -> None:
    fake = FakeServer(batching={"bucket_grid": [[8, 4], [12, 8], [16, 12]], "cost_model": COST})
    payloads = loadmix.make_requests(loadmix.make_mix(4, [None]), 1)
    a = args(clients=2, requests=40, warmup=0, idle_requests=6)
    readings = iter([10.0, 10.5])  # the server's CPU seconds (all its processes) before and after the window
    result = asyncio.run(loadtest.measure("http://fake", payloads, a, httpx.MockTransport(fake.handler),
                                          server_cpu=lambda: next(readings)))
    assert result["merged_images"] == pytest.approx(10.0) and result["merged_share"] == pytest.approx(0.25)
    assert result["padded_rows_head"] == 0.0 and result["head_padding_per_image"] == 0.0  # declared, no series
    assert result["tail_padding_per_image"] == pytest.approx(0.5)  # two series of the tail summed
    assert result["head_batch_mean"] == pytest.approx(8.0)
    assert result["batching"] == {"buckets": 3, "cost_model": COST}
    assert result["server_cpu_ms_per_image"] == pytest.approx(500.0 / 40)
    idle = result["idle"]
    assert idle["requests"] == 6 and idle["errors"] == 0 and fake.keep_rates[-6:] == [None] * 6
    # per batch: head 1 ms x 8 images, tail 2 ms x 4 images; decode 0.5 ms per image
    assert idle["compute_ms"] == pytest.approx(8.0 + 8.0) and idle["decode_ms"] == pytest.approx(0.5)
    assert idle["p50_over_compute_decode"] == pytest.approx(idle["p50_ms"] / 16.5, abs=1e-3)


def test_parse_metrics_is_tolerant() -> None:
    text = ("# HELP patchlife_batch_size Images per batch.\n# TYPE patchlife_batch_size histogram\n"
            'patchlife_batch_size_bucket{phase="tail",le="+Inf"} 3.0\n'
            'patchlife_batch_size_sum{phase="tail"} 12.0\npatchlife_batch_size_count{phase="tail"} 3.0\n'
            "# TYPE patchlife_merged_images_total counter\n"
            "patchlife_needed_tokens_total 1e3 1700000000\n"  # a timestamp after the value
            "garbage line\n")
    m = loadreport.parse_metrics(text)
    assert m == {"needed": 1000.0, "tail_images": 12.0, "tail_batches": 3.0, "merged": 0.0,
                 "head_images": 0.0, "head_batches": 0.0}  # histogram declared: its other phase reads 0
    e = loadreport.window_summary(loadreport.deltas({}, m), 1.0)
    assert e["tail_batch_mean"] == 4.0 and e["merged_share"] == 0.0
    assert e["waste_ratio"] is None and e["model_busy"] is None and e["tail_padding_per_image"] is None
    assert loadreport.window_summary({}, 0.0) == dict.fromkeys(e)  # nothing at all: every figure n/a
    assert loadreport.batching_info({"models": [{"batching": {"cost_model": 3}}]}) == {"buckets": None,
                                                                                      "cost_model": 3}
    assert loadreport.batching_info(["not", "a", "model"]) is None
    assert loadreport.batching_info({"batching": "odd"}) is None


def test_idle_summary_arithmetic() -> None:
    d = {"head_s": 0.010, "head_batches": 5.0, "tail_s": 0.030, "tail_batches": 5.0, "decode_s": 0.005,
         "decodes": 5.0, "head_images": 5.0}
    s = loadreport.idle_summary([0.010, 0.011, 0.012, 0.020, 0.009], 0, d)
    assert s["p50_ms"] == 11.0 and s["compute_ms"] == 8.0 and s["decode_ms"] == 1.0 and s["head_batch_mean"] == 1.0
    assert s["p50_over_compute_decode"] == pytest.approx(11.0 / 9.0, abs=1e-3) and s["requests"] == 5
    empty = loadreport.idle_summary([], 2, {})
    assert empty["p50_ms"] is None and empty["p50_over_compute_decode"] is None and empty["requests"] == 2


STAT = "cpu  {} 0 {} {} {} 0 0 0 7 7\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 12345\n"


def test_proc_stat_idle_share(tmp_path: Path) -> None:
    before = loadreport.parse_proc_stat(STAT.format(100, 50, 800, 50))
    after = loadreport.parse_proc_stat(STAT.format(250, 100, 850, 100))  # +150 user +50 sys +50 idle +50 iowait
    assert before == loadreport.CpuTimes(idle=850.0, total=1000.0)  # guest (7 7) is inside user: not added
    assert loadreport.idle_share(before, after) == pytest.approx(100 / 300, abs=1e-4)
    assert loadreport.idle_share(after, after) is None and loadreport.idle_share(None, after) is None
    assert loadreport.parse_proc_stat("intr 1\n") is None
    (tmp_path / "stat").write_text(STAT.format(1, 2, 3, 4))
    assert loadreport.read_cpu_times(str(tmp_path / "stat")) == loadreport.CpuTimes(7.0, 10.0)
    assert loadreport.read_cpu_times(str(tmp_path / "missing")) is None


def test_pass_order_alternates_the_batched_modes_then_unbatched() -> None:
    assert loadreport.pass_order(["budget", "fifo", "unbatched"], 3) == ["budget", "fifo"] * 3 + ["unbatched"] * 3
    assert loadreport.pass_order(["unbatched", "fifo", "budget"], 2) == ["fifo", "budget"] * 2 + ["unbatched"] * 2
    assert loadreport.pass_order(["budget"], 2) == ["budget", "budget"]


def test_combine_takes_medians_sums_counts_and_keeps_the_spread() -> None:
    passes: list[dict[str, Any]] = [
        {"images_per_s": 100.0, "p50_ms": 5.0, "errors": 1, "requests": 10, "waste_ratio": None,
         "error_statuses": {"503": 1}, "batching": {"buckets": 3}, "idle": {"p50_ms": 2.0, "errors": 0}},
        {"images_per_s": 80.0, "p50_ms": 7.0, "errors": 0, "requests": 10, "waste_ratio": 0.1,
         "error_statuses": {}, "batching": {"buckets": 4}, "idle": {"p50_ms": 4.0, "errors": 1}},
        {"images_per_s": 130.0, "p50_ms": 6.0, "errors": 2, "requests": 10, "waste_ratio": 0.3,
         "error_statuses": {"503": 2}, "batching": None, "idle": {"p50_ms": 9.0, "errors": 0, "requests": 5}}]
    c = loadreport.combine(passes)
    assert c["images_per_s"] == 100.0 and c["images_per_s_spread"] == [80.0, 130.0] and c["p50_ms"] == 6.0
    assert c["errors"] == 3 and c["requests"] == 30 and c["error_statuses"] == {"503": 3}
    assert c["waste_ratio"] == pytest.approx(0.2)  # median of the passes that have it
    assert c["batching"] == {"buckets": 3} and c["idle"] == {"p50_ms": 4.0, "errors": 1, "requests": 5}
    assert c["passes"] is passes
    ratios = loadreport.pair_ratios({"budget": c, "fifo": loadreport.combine(
        [{"images_per_s": 50.0}, {"images_per_s": 100.0}, {"images_per_s": 100.0}])})
    assert ratios == {"per_pair": [2.0, 0.8, 1.3], "median": 1.3}
    assert loadreport.pair_ratios({"budget": c}) is None


def test_cost_model_is_printed_compactly() -> None:
    assert loadreport.cost_model_lines(COST) == ["cost model head: fixed_ms=1.5, per_row_ms=0.25",
                                                 "cost model tail: fixed_ms=2, per_token_us=0.0125"]
    assert loadreport.cost_model_lines({"a": 1, "b": [1, 2]}) == ["cost model: a=1, b=[1,2]"]
    assert loadreport.cost_model_lines(None) == ["cost model n/a"]
    assert loadreport.cost_model_lines("linear") == ["cost model: linear"]


def _scripted_passes(monkeypatch: pytest.MonkeyPatch, rates: list[float]) -> list[str]:
    """Fake servers (no process) and passes whose images/s come from ``rates``; returns the modes started."""
    started: list[str] = []

    @contextlib.contextmanager
    def fake_server(mode: str, *a: object) -> Iterator[loadtest.Served]:
        started.append(mode)
        yield loadtest.Served(f"http://{mode}", None)

    async def fake_measure(url: str, payloads: object, a: object, server_cpu: object = None,
                           driver: object = None) -> dict[str, object]:
        rate = rates[len(started) - 1] if started else rates[0]
        return {"images_per_s": rate, "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0, "errors": 0,
                "waste_ratio": None, "merged_share": None, "batching": None, "url": url}

    monkeypatch.setattr(loadtest, "server", fake_server)
    monkeypatch.setattr(loadtest, "measure", fake_measure)
    monkeypatch.setattr(loadtest, "_offline_reference", lambda payloads, a: 200.0)
    return started


def test_repeat_alternates_fresh_servers_and_reports_medians_as_json(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    rates = [110.0, 100.0, 90.0, 100.0, 150.0, 100.0, 20.0, 30.0, 25.0]  # budget, fifo, ... then unbatched
    started = _scripted_passes(monkeypatch, rates)
    assert loadtest.run(args(json=True, mix_size=2, offline=True)) == 0
    assert started == ["budget", "fifo"] * 3 + ["unbatched"] * 3
    body = json.loads(capsys.readouterr().out)  # stdout holds only the JSON
    assert list(body) == ["order", "modes", "budget_over_fifo", "offline_images_per_s", "budget_over_offline"]
    assert body["order"] == started and list(body["modes"]) == ["budget", "fifo", "unbatched"]
    budget = body["modes"]["budget"]
    assert budget["images_per_s"] == 110.0 and budget["images_per_s_spread"] == [90.0, 150.0]
    assert [p["images_per_s"] for p in budget["passes"]] == [110.0, 90.0, 150.0]
    assert body["modes"]["unbatched"]["images_per_s"] == 25.0 and budget["merged_share"] is None
    assert body["budget_over_fifo"] == {"per_pair": [1.1, 0.9, 1.5], "median": 1.1}
    assert body["offline_images_per_s"] == 200.0 and body["budget_over_offline"] == 0.55


def test_table_reads_with_medians_and_n_a(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted_passes(monkeypatch, [120.0, 100.0, 80.0, 100.0])
    assert loadtest.run(args(modes="budget,fifo", repeat=2, mix_size=2)) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["budget"][1:3] == ["100.0", "80.0..120.0"] and rows["fifo"][1:3] == ["100.0", "100.0..100.0"]
    assert "budget: passes 120.0, 80.0 images/s" in out and "merged n/a of images" in out
    assert "batching: n/a" in out and "budget/fifo per pair: 1.200, 0.800; median 1.000" in out


def test_against_a_running_server_the_passes_repeat_on_it(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    started = _scripted_passes(monkeypatch, [5.0])
    assert loadtest.run(args(url="http://x/", json=True, mix_size=2, repeat=2)) == 0
    body = json.loads(capsys.readouterr().out)
    assert started == [] and body["order"] == ["server", "server"] and body["budget_over_fifo"] is None
    assert [p["url"] for p in body["modes"]["server"]["passes"]] == ["http://x"] * 2


def test_explain_lines_show_the_cost_model_and_the_idle_verdict() -> None:
    p: dict[str, Any] = {"images_per_s": 80.0, "merged_share": 0.12, "head_padding_per_image": 0.05, "cpu_idle": 0.02,
         "batching": {"buckets": 14, "cost_model": COST},
         "idle": {"requests": 40, "errors": 0, "p50_ms": 11.0, "compute_ms": 8.0, "decode_ms": 1.0,
                  "p50_over_compute_decode": 1.222, "target": 1.25}}
    lines = loadreport.explain_lines("budget", loadreport.combine([p, {**p, "images_per_s": 90.0}]))
    text = "\n".join(lines)
    assert "merged 12.0% of images; padding head 0.05, tail n/a rows/image" in text and "machine idle 2%" in text
    assert "batching: 14 buckets\n" in text and "cost model tail: fixed_ms=2, per_token_us=0.0125" in text
    assert "shown" not in text  # both passes had the same batching info
    changed = {**p, "batching": {"buckets": 14, "cost_model": {"head": {"fixed_ms": 1.7}}}}
    varied = "\n".join(loadreport.explain_lines("budget", loadreport.combine([p, changed])))
    assert "cost model head: fixed_ms=1.5, per_row_ms=0.25\n" in varied
    assert "(pass 1 of 2 shown; the passes differ, each is in --json)" in varied
    assert "p50 11.00 ms vs batch-1 compute 8.00 + decode 1.00 ms: 1.22x (target <= 1.25) ok" in text
    idle = {**p["idle"], "p50_over_compute_decode": 2}
    slow = loadreport.combine([{**p, "batching": {"buckets": "?"}, "idle": idle}])
    assert "batching: ? buckets" in "\n".join(loadreport.explain_lines("fifo", slow))
    assert "2.00x (target <= 1.25) over target" in "\n".join(loadreport.explain_lines("fifo", slow))


def test_without_a_batching_key_the_model_buckets_graphs_and_cost_gauges_are_used() -> None:
    """The shape main's server had before the "batching" key: buckets and graphs in the model info,
    the cost model as gauges."""
    fake = FakeServer()
    graphs = {"enabled": False, "captured": 0, "eager_fallbacks": 0}
    gauges = "".join(f'patchlife_cost_model_{part}_seconds{{phase="{phase}"}} {v}\n'
                     for phase, part, v in (("head", "fixed", 0.002), ("head", "unit", 0.0005),
                                            ("tail", "fixed", 0.003), ("tail", "unit", 1e-7)))

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"name": "m", "buckets": [[8, 4], [12, 8]], "graphs": graphs})
        if request.url.path == "/metrics":
            return httpx.Response(200, text=fake.metrics() + gauges)
        return fake.handler(request)

    payloads = loadmix.make_requests(loadmix.make_mix(2, [None]), 1)
    result = asyncio.run(loadtest.measure("http://fake", payloads, args(clients=1, requests=4, warmup=0),
                                          httpx.MockTransport(handler)))
    assert result["batching"] == {"buckets": 2, "graphs": graphs, "cost_model": {
        "head": {"fixed_s": 0.002, "unit_s": 0.0005}, "tail": {"fixed_s": 0.003, "unit_s": 1e-7}}}
    assert "cost_head_fixed" not in loadreport.deltas({}, loadreport.parse_metrics(gauges))  # gauges: no deltas
    lines = loadreport.explain_lines("budget", loadreport.combine([result]))
    assert any(x.endswith("batching: 2 buckets; graphs captured=0, eager_fallbacks=0") for x in lines)
    assert any(x.endswith("cost model tail: fixed_s=0.003, unit_s=1e-07") for x in lines)
    stepped = loadreport.batching_info({"name": "m", "buckets": {"step": 4}})
    assert stepped == {"buckets": None, "cost_model": None, "bucket_grid": {"step": 4}}
    stepped_lines = loadreport.explain_lines("fifo", loadreport.combine([{**result, "batching": stepped}]))
    assert any(x.endswith('batching: grid {"step":4}') for x in stepped_lines)
    assert any(x.endswith("cost model n/a") for x in stepped_lines)
    # main's /v1/models today: a "batching" key whose grid may be stepped, with the mode; graphs beside it
    now = loadreport.batching_info({"batching": {"bucket_grid": {"step": 4}, "mode": "fifo", "cost_model": COST},
                                    "graphs": graphs})
    assert now == {"buckets": None, "cost_model": COST, "mode": "fifo", "bucket_grid": {"step": 4}, "graphs": graphs}
    now_lines = loadreport.explain_lines("fifo", loadreport.combine([{**result, "batching": now}]))
    assert any(x.endswith('batching: mode fifo, grid {"step":4}; graphs captured=0, eager_fallbacks=0')
               for x in now_lines)
