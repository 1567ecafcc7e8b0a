"""``patchlife loadtest --open-loop``: Poisson arrivals, the report's arithmetic from known answers, the
pass order and server configurations, a scripted run against fake servers, the plot, and one short run
against real servers of a tiny model."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench_support import parsed

from bench import loadmix, loadtest, scaling
from bench import scalereport as sr
from bench.loadpass import arrival_times, open_loop


def args(**kw: object) -> argparse.Namespace:
    return parsed(loadtest.add_arguments, **kw)


def body(labels: list[str], scaled: list[bool] | None = None, keep: float = 0.5, in_budget: bool = False) -> bytes:
    """A /classify answer with the given top labels (and the scaling fields, top-level or in budget)."""
    results = []
    for i, label in enumerate(labels):
        r: dict[str, Any] = {"labels": [{"label": label, "index": 0, "probability": 0.9}, {"label": "x", "index": 1,
                                                                                          "probability": 0.1}],
                             "budget": {"keep_rate": keep}, "timings_ms": {}}
        if scaled is not None:
            (r["budget"] if in_budget else r)["scaled"] = scaled[i]
            (r["budget"] if in_budget else r)["keep_rate"] = keep
        results.append(r)
    return json.dumps({"model": "m", "results": results}).encode()


# -- arrivals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [5.0, 60.0, 400.0])
def test_poisson_arrivals_have_the_offered_mean_rate_and_exponential_gaps(rate: float) -> None:
    duration = 20_000 / rate  # about 20,000 arrivals whatever the rate
    times = arrival_times(rate, 10**9, duration, seed=3)
    n = len(times)
    # A Poisson count has standard deviation sqrt(mean): 4 of them is a bound that fails by chance ~1e-4
    assert abs(n - rate * duration) < 4 * math.sqrt(rate * duration)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.04)  # exponential: CV 1
    assert sum(g < 0.1 / rate for g in gaps) / n == pytest.approx(1 - math.exp(-0.1), abs=0.01)  # its CDF
    assert times == sorted(times) and 0 < times[0] and times[-1] <= duration
    assert arrival_times(rate, 10**9, duration, seed=3) == times != arrival_times(rate, 10**9, duration, seed=4)
    assert arrival_times(rate, 7, duration, seed=3) == times[:7]


def test_open_loop_sends_the_arrivals_and_records_every_answer() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params.get("min_keep_rate", ""))
        if len(seen) % 4 == 0:
            return httpx.Response(503, json={"error": {"code": "overloaded"}})
        return httpx.Response(200, content=body(["a", "b"]))

    mix = loadmix.make_mix(4, [None])
    payloads = loadmix.make_requests(mix, 2, ["a", "b", "c", "d"], {"min_keep_rate": "0.3"})
    assert [p.labels for p in payloads] == [("a", "b"), ("c", "d"), ("a", "b"), ("c", "d")]

    async def go() -> Any:
        async with httpx.AsyncClient(base_url="http://t", transport=httpx.MockTransport(handler)) as client:
            return await open_loop(client, payloads, 200.0, 10**9, 0.5, seed=1, record=True)

    sent = asyncio.run(go())
    expected = len(arrival_times(200.0, 10**9, 0.5, seed=1))
    assert len(sent.answers) == len(seen) == expected and set(seen) == {"0.3"}
    assert sorted(i for i, *_ in sent.answers) == sorted(i % 4 for i in range(expected))
    summary = sr.pass_summary(sent.answers, [p.labels for p in payloads], 10.0, 0.5, sent.elapsed_s)
    assert summary["status_503"] == expected // 4 and summary["errors"] == expected // 4
    # answers to requests 0 and 2 (labels a, b) are right, to 1 and 3 (c, d) wrong (every 4th arrival got 503)
    answered = [i for i, status, *_ in sent.answers if status == "200"]
    assert summary["top1"] == round(sum(i % 2 == 0 for i in answered) / len(answered), 4)
    assert 0 < summary["top1"] < 1 and summary["images"] == 2 * len(answered) == 2 * (expected - expected // 4)


# -- the arithmetic ------------------------------------------------------------------------------
def test_read_answer_finds_the_fields_at_the_top_or_in_the_budget_and_never_rewards_garbage() -> None:
    top = sr.read_answer(body(["a", "b"], [True, False], keep=0.3), ["a", "c"])
    assert top == [sr.ImageAnswer(True, True, 0.3), sr.ImageAnswer(False, False, 0.3)]
    assert sr.read_answer(body(["a"], [True], 0.3, in_budget=True), ["a"]) == [sr.ImageAnswer(True, True, 0.3)]
    assert sr.read_answer(body(["a"]), ["a"]) == [sr.ImageAnswer(True, None, 0.5)]  # today's answer: no "scaled"
    assert sr.read_answer(b"not json", ["a", "b"]) == [sr.ImageAnswer(False, None, None)] * 2
    assert sr.read_answer(body(["a"]), ["a", "a"])[1] == sr.ImageAnswer(False, None, None)  # a missing result


def test_pass_summary_from_known_answers() -> None:
    labels = [("a", "b"), ("c", "d")]
    answers = [
        (0, "200", 0.10, body(["a", "b"], [False, False], 0.5)),  # within, 2 right
        (1, "200", 0.20, body(["c", "x"], [True, True], 0.3)),    # within, 1 right, 2 scaled
        (0, "200", 0.40, body(["a", "b"], [True, False], 0.3)),   # late: 2 right but not good
        (1, "200", 0.30, body(["x", "x"], [False, False], 0.5)),  # late, 0 right
        (0, "503", 0.01, b""), (1, "504", 1.0, b""), (0, "ReadTimeout", 60.0, b""),
    ]
    s = sr.pass_summary(answers, labels, objective_s=0.25, window_s=2.0, elapsed_s=4.0)
    assert s["requests"] == 7 and s["images"] == 8 and s["images_per_s"] == 2.0  # 8 images in 4 s
    assert s["attainment"] == round(2 / 7, 4)  # two of the seven requests within 250 ms
    assert s["goodput"] == 1.5  # 3 right images within the objective over the 2-s arrival window
    assert s["top1"] == 5 / 8 and s["scaled_share"] == 3 / 8
    assert s["keep_rate_mean"] == pytest.approx((0.5 * 2 + 0.3 * 2 + 0.3 * 2 + 0.5 * 2) / 8)
    assert (s["status_503"], s["status_504"], s["errors"]) == (1, 1, 3)
    assert s["error_statuses"] == {"503": 1, "504": 1, "ReadTimeout": 1}
    assert s["p50_ms"] == 250.0 and s["p99_ms"] == pytest.approx(397.0)  # of the four 200s: 100/200/300/400 ms
    unjudged = sr.pass_summary(answers, labels, objective_s=None, window_s=2.0, elapsed_s=4.0)
    assert unjudged["attainment"] is None and unjudged["goodput"] is None and unjudged["top1"] == 5 / 8
    old = sr.pass_summary([(0, "200", 0.1, body(["a", "b"]))], labels, 0.25, 1.0, 1.0)
    assert old["scaled_share"] is None and old["attainment"] == 1.0 and old["goodput"] == 2.0


def test_offered_rates_absolute_and_relative_to_the_capacities() -> None:
    tokens = sr.parse_offered("0.5d, MID,1.2f,430")
    assert tokens == ["0.5d", "mid", "1.2f", "430"] and sr.needs_capacity(tokens)
    assert sr.resolve_offered(tokens, 380.0, 490.0) == [190.0, 435.0, 588.0, 430.0]
    assert not sr.needs_capacity(["100", "200.5"]) and sr.resolve_offered(["100"], None, None) == [100.0]
    with pytest.raises(ValueError, match="capacities"):
        sr.resolve_offered(["mid"], None, None)
    for bad in ("", "fast", "0", "-3d", "xd"):
        with pytest.raises(ValueError, match="--offered"):
            sr.parse_offered(bad)


def test_combine_sums_counts_and_takes_medians_and_comparison() -> None:
    passes = [{"offered": 100.0, "goodput": g, "top1": t, "status_503": n, "images": 10, "scaled_share": s,
               "error_statuses": {"503": n}} for g, t, n, s in ((10.0, 0.9, 1, None), (30.0, 0.8, 2, 0.5),
                                                                 (20.0, 0.7, 0, 0.7))]
    c = sr.combine_passes(passes)
    assert c["goodput"] == 20.0 and c["top1"] == 0.8 and c["status_503"] == 3 and c["images"] == 30
    assert c["scaled_share"] == 0.6 and c["error_statuses"] == {"503": 3} and len(c["passes"]) == 3
    cmp = sr.comparison({"goodput": 30.0, "top1": 0.91}, {"goodput": 10.0, "top1": 0.93}, 0.92)
    assert cmp == {"goodput_ratio": 3.0, "top1_delta_points_on": -1.0, "top1_delta_points_off": 1.0}
    assert sr.comparison({"goodput": 5.0, "top1": None}, {"goodput": 0.0, "top1": 0.9}, None)["goodput_ratio"] is None


def test_server_order_alternates_with_off_first_when_it_measures_the_capacities() -> None:
    assert scaling.server_order(["on", "off"], 2, capacity=True) == ["off", "on", "off", "on"]
    assert scaling.server_order(["on", "off"], 2, capacity=False) == ["on", "off", "on", "off"]


def test_the_on_server_sets_the_objective_and_the_off_server_unsets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[dict[str, str], tuple[str, ...]]] = []

    @contextlib.contextmanager
    def fake_child(env: dict[str, str], argv: list[str], startup_s: float,
                   unset: tuple[str, ...] = ()) -> Iterator[Any]:
        calls.append((env, tuple(unset)))
        yield argparse.Namespace(url="http://child")

    monkeypatch.setattr(scaling, "serve_child", fake_child)
    a = args(objective_ms=250.0, checkpoint="ck")
    for config in ("on", "off"):
        with scaling._server(config, a) as url:
            assert url == "http://child"
    assert calls == [({scaling.OBJECTIVE_ENV: "250", "PATCHLIFE_CHECKPOINT": "ck"}, ()),
                     ({"PATCHLIFE_CHECKPOINT": "ck"}, (scaling.OBJECTIVE_ENV,))]


@pytest.mark.parametrize("kw,message", [({"scaling": "on,maybe"}, "--scaling"), ({"offered": "lots"}, "--offered"),
                                        ({"url": "http://x", "offered": "mid"}, "images/s"),
                                        ({"floor": 1.5}, "--floor"), ({"min_keep_rate": 0.0}, "--min-keep-rate"),
                                        ({"duration": 0.0}, "--duration")])
def test_bad_options_are_refused_before_anything_starts(kw: dict[str, Any], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtest.run(args(open_loop=True, **kw)) == 2
    assert message in capsys.readouterr().err


# -- a scripted run: fake servers, real client ---------------------------------------------------
class FakeServers:
    """``off`` answers every image right but in 300 ms (200 ms at keep_rate=0.3); ``on`` answers in 20 ms,
    each image scaled, the last of each request wrong. Both report accuracy scaling's floor of 0.3 in
    /v1/models (as a server with the objective on does)."""

    def __init__(self, scenes: int) -> None:
        mix, labels = loadmix.labelled_scenes(scenes, 1)
        self.label_of = {png: label for (png, _), label in zip(mix, labels, strict=True)}
        self.started: list[str] = []
        self.queries: dict[str, list[str]] = {"on": [], "off": []}

    @contextlib.contextmanager
    def server(self, config: str, a: argparse.Namespace) -> Iterator[str]:
        self.started.append(config)
        yield f"http://{config}"

    def client(self, url: str, a: argparse.Namespace) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=url, transport=httpx.MockTransport(self.handle))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        config = request.url.host
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"name": "m", "schedule": {"keep_rate": 0.5}, "batching": {
                "accuracy_scaling": {"latency_objective_ms": 250.0, "default_keep_rate": 0.5, "floor": 0.3}}})
        content = request.content
        self.queries[config].append(request.url.query.decode())
        labels = [label for _, label in sorted((content.find(png), label) for png, label in self.label_of.items()
                                               if png in content)]
        labels *= content.count(b'name="files"') // len(labels)  # a scene may come twice in a request
        if config == "on":
            await asyncio.sleep(0.02)
            return httpx.Response(200, content=body([*labels[:-1], "wrong"], [True] * len(labels), keep=0.3))
        await asyncio.sleep(0.2 if "keep_rate=0.3" in request.url.query.decode() else 0.3)
        return httpx.Response(200, content=body(labels, [False] * len(labels)))


def test_a_scripted_run_compares_on_and_off_at_the_capacities_midpoint(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeServers(8)
    monkeypatch.setattr(scaling, "_server", fake.server)
    monkeypatch.setattr(scaling, "_client", fake.client)
    monkeypatch.delenv(scaling.FLOOR_ENV, raising=False)
    a = args(open_loop=True, json=True, scenes=8, clients=4, warmup=2, repeat=2, duration=1.0,
             capacity_duration=1.0, offered="mid,8")
    assert loadtest.run(a) == 0
    out = json.loads(capsys.readouterr().out)
    assert fake.started == ["off", "on", "off", "on"] and out["images_per_request"] == 8
    assert out["floor"] == 0.3 and out["default_keep_rate"] == 0.5  # from /v1/models
    cap = out["capacity"]
    # 4 clients x 8 images per 300 ms (default) and per 200 ms (floor), less the client's own time
    assert 0.7 * 107 < cap["default"]["images_per_s"] < 107 and 0.7 * 160 < cap["floor"]["images_per_s"] < 160
    assert len(cap["default"]["passes"]) == 2 and cap["default"]["top1"] == cap["floor"]["top1"] == 1.0
    assert "keep_rate=0.3" in fake.queries["off"] and all("keep_rate" not in q for q in fake.queries["on"])
    mid = round((out["capacity"]["default"]["passes"][0]["images_per_s"] +
                 out["capacity"]["floor"]["passes"][0]["images_per_s"]) / 2, 2)
    assert out["offered"] == [mid, 8.0]  # resolved from the first capacity passes
    on, off = out["results"]["on"][0], out["results"]["off"][0]
    assert on["offered"] == off["offered"] == mid and len(on["passes"]) == len(off["passes"]) == 2
    # the same arrivals for on and off within a repeat, other arrivals in the next repeat
    assert [p["requests"] for p in on["passes"]] == [p["requests"] for p in off["passes"]]
    sent = on["requests"]
    assert abs(sent - 2 * mid / 8) < 4 * math.sqrt(2 * mid / 8) + 1
    assert on["attainment"] == 1.0 and off["attainment"] == 0.0 and off["goodput"] == 0.0
    assert on["top1"] == 7 / 8 and off["top1"] == 1.0 and on["scaled_share"] == 1.0 and off["scaled_share"] == 0.0
    assert on["goodput"] == pytest.approx(7 / 8 * on["images"] / 2 / 1.0, rel=0.35)  # per pass: images x 7/8 / 1 s
    assert on["keep_rate_mean"] == 0.3 and on["status_503"] == off["status_504"] == 0
    assert out["comparison"][0] == {"goodput_ratio": None, "top1_delta_points_on": -12.5,
                                    "top1_delta_points_off": 0.0}
    plot = tmp_path / "scaling.png"
    pytest.importorskip("matplotlib")
    from bench.scaleplot import plot as draw
    draw(out, str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    table = sr.table(out)
    assert "C_default" in table and "C_floor / C_default" in table and "goodput on/off x" in table
    rows = [line.split() for line in table.splitlines() if line.startswith(("on ", "off "))]
    assert [r[0] for r in rows] == ["off", "off", "on", "on"] and rows[2][5] == "100.0%" and rows[0][5] == "0.0%"


def test_plot_without_matplotlib_is_refused_with_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert loadtest.run(args(open_loop=True, plot="x.png")) == 2
    assert "pip install 'patchlife[plot]'" in capsys.readouterr().err


def test_a_pass_without_any_answer_has_no_percentiles_and_no_top1() -> None:
    s = sr.pass_summary([(0, "503", 0.01, b"")], [("a",)], 0.25, 1.0, 1.0)
    assert s["p50_ms"] is None and s["p99_ms"] is None and s["top1"] is None and s["images_per_s"] == 0.0
    assert s["attainment"] == 0.0 and s["goodput"] == 0.0 and s["status_503"] == 1
    json.dumps(s, allow_nan=False)  # no NaN in the --json output


# -- real servers --------------------------------------------------------------------------------
def test_a_short_run_against_real_servers_of_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tiny_models import tiny_checkpoint

    from model.training.data import synthetic_class_names

    checkpoint = tiny_checkpoint(tmp_path / "tiny", synthetic_class_names(), "scaling-tiny")
    for k, v in {"PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_DTYPE": "float32", "PATCHLIFE_WARMUP_BATCHES": "1",
                 "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    a = args(open_loop=True, json=True, checkpoint=str(checkpoint), scenes=16, clients=4, warmup=2, repeat=1,
             duration=1.5, capacity_duration=1.0, offered="0.5d", floor=0.3, images_per_request=2,
             startup_timeout=120.0)
    assert loadtest.run(a) == 0
    out = json.loads(capsys.readouterr().out)
    cap = out["capacity"]
    assert cap["default"]["images_per_s"] > 0 and cap["floor"]["images_per_s"] > 0 and out["floor"] == 0.3
    assert out["default_keep_rate"] == 0.7  # the tiny model's, from its /v1/models
    assert out["offered"] == [round(0.5 * cap["default"]["images_per_s"], 2)]
    for config in ("on", "off"):
        (r,) = out["results"][config]
        assert r["requests"] > 0 and r["errors"] == 0 and r["images"] == 2 * r["requests"]
        assert 0 <= r["top1"] <= 1 and 0 <= r["attainment"] <= 1 and r["p50_ms"] <= r["p99_ms"]
        # good images (right, in time) are at most the right ones; top-1 and goodput are rounded
        assert r["goodput"] * 1.5 <= r["top1"] * r["images"] + 0.05
    # the fixed-rate service ran every image at its default keep rate
    assert out["results"]["off"][0]["keep_rate_mean"] == 0.7 and cap["floor"]["keep_rate_mean"] == 0.3


def test_target_lines_judge_the_issue_targets_at_their_rates() -> None:
    def row(att: float, goodput: float, share: float | None) -> dict[str, Any]:
        return {"attainment": att, "goodput": goodput, "scaled_share": share}

    body: dict[str, Any] = {"tokens": ["0.5d", "mid"], "results": {"on": [row(1.0, 50.0, 0.0), row(0.97, 300.0, 0.4)],
                                                   "off": [row(1.0, 50.0, None), row(0.05, 20.0, None)]},
            "comparison": [{"goodput_ratio": 1.0, "top1_delta_points_on": 0.0},
                           {"goodput_ratio": 15.0, "top1_delta_points_on": -1.6}]}
    lines = sr.target_lines(body)
    assert lines == ["target at 0.5 x C_default: scaled 0.0% (0): met; top-1 on +0.00 points vs unloaded",
                     "target at mid: attainment on 97.0% (>= 95%): met",
                     "target at mid: goodput on/off x15.00 (>= 3): met",
                     "target at mid: served top-1 on -1.60 points vs unloaded (>= -1.5): MISSED"]
    body["results"]["off"][1]["goodput"] = 0.0  # off answered nothing in time: the ratio is unbounded
    body["comparison"][1]["goodput_ratio"] = None
    body["results"]["on"][0]["scaled_share"] = None  # a server that does not say
    lines = sr.target_lines(body)
    assert lines[0].startswith("target at 0.5 x C_default: scaled n/a (0): n/a")
    assert lines[2] == "target at mid: goodput on/off xn/a (>= 3): met"
    assert sr.target_lines({"tokens": ["mid"], "results": {"off": [row(0.1, 1.0, None)]}}) == []


def test_the_floor_comes_from_the_option_the_setting_or_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(scaling.FLOOR_ENV, raising=False)
    on = {"name": "m", "batching": {"accuracy_scaling": {"floor": 0.3, "default_keep_rate": 0.5}}}
    off = {"name": "m", "batching": {"accuracy_scaling": None}}
    assert scaling._floor(args(floor=0.4), on) == 0.4
    assert scaling._floor(args(), on) == 0.3
    with pytest.raises(RuntimeError, match="give --floor"):
        scaling._floor(args(), off)
    monkeypatch.setenv(scaling.FLOOR_ENV, "0.2")
    assert scaling._floor(args(), off) == 0.2
