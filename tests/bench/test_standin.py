"""The stand-in device (``bench/standin.py``): its table, its queue that waits without the CPU, answers
of the real shapes through the real worker, and ``patchlife serve`` with it (``bench/standin_serve.py``)
as ``patchlife bench-frontend --engine stand-in`` runs it, CPU split by process."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch
from bench_support import parsed
from tiny_models import tiny_checkpoint

from bench import frontend, standin_frontend
from bench.child import serve_child
from bench.photos import photo_jpeg, photo_png
from bench.standin import DEFAULT_TABLE, DeviceQueue, StandInDecoder, StandInEngine, Table
from service.api_errors import ApiError
from service.protocol import ImageResult
from service.runtime.handoff import Rows
from service.runtime.worker import Worker
from service.settings import Settings

CLASSES = ["a", "b", "c"]


def write_table(path: Path, head_ms: float, tail_ms: float, tokens: int = 100) -> Path:
    path.write_text(json.dumps({"name": "test", "source": "made up", "head": {"rows": [1, 8], "ms": [head_ms, head_ms]},
                                "tail": {"tokens_per_row": tokens, "rows": [1, 8], "ms": [tail_ms, tail_ms]}}))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("standin") / "tiny", CLASSES, "standin-test")


def test_the_shipped_h200_table_reads_back_its_source_figures() -> None:
    t = Table.load(DEFAULT_TABLE)
    assert "gpu-findings.md" in t.source and t.tail_tokens == 864
    # head + tail at the table's own counts = the served ms per batch of the findings (1.25 / 3.73 / 12.46)
    for rows, served_ms in ((1, 1.25), (64, 3.73), (256, 12.46)):
        total = t.seconds("head", rows) + t.seconds("tail", rows, 864)
        assert total == pytest.approx(served_ms / 1000.0, rel=1e-3)
    assert t.seconds("head", 32) == pytest.approx((0.5962 + (1.7792 - 0.5962) * 31 / 63) / 1000.0)  # linear between
    assert t.seconds("tail", 64, 432) == pytest.approx(t.seconds("tail", 64, 864) / 2)  # half the tokens: half the time
    assert t.seconds("head", 512) > t.seconds("head", 256)  # beyond the last size: the last slope


@pytest.mark.parametrize("body", [{"head": {"rows": [1], "ms": [1.0]}},
                                  {"head": {"rows": [8, 1], "ms": [1.0, 2.0]}, "tail": {"tokens_per_row": 1,
                                                                                       "rows": [1], "ms": [1.0]}},
                                  {"head": {"rows": [1], "ms": [0.0]}, "tail": {"tokens_per_row": 1, "rows": [1],
                                                                              "ms": [1.0]}}])
def test_a_bad_table_is_refused_with_its_path(tmp_path: Path, body: dict[str, object]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="bad.json"):
        Table.load(path)


def test_the_device_queue_runs_launches_one_after_another_and_waits_asleep() -> None:
    queue = DeviceQueue()
    t0 = time.monotonic()
    first, second = queue.launch(0.2), queue.launch(0.3)
    assert second.at - first.at == pytest.approx(0.3) and first.at >= t0 + 0.2
    assert not second.query()
    cpu0 = time.process_time()
    second.synchronize()
    assert time.monotonic() >= second.at and second.query()
    assert time.process_time() - cpu0 < 0.1  # half a second waited, next to no CPU: it sleeps


def test_head_and_tail_return_at_once_with_answers_of_the_real_shapes(checkpoint: Path, tmp_path: Path) -> None:
    engine = StandInEngine(Table.load(write_table(tmp_path / "t.json", 1000.0, 1000.0)), checkpoint, "cpu", "float32",
                           max_batch_size=8)
    assert engine.asynchronous and engine.padded_rows(3) == 4 and engine.padded_rows(8) == 8
    pixels = [torch.zeros(3, 32, 32, dtype=torch.uint8) for _ in range(3)]
    hb = engine.head(pixels, [None, 0.5, None])
    copy = engine.tail([Rows(hb, torch.tensor([0, 2]))], engine.schedule_counts(None))
    assert not hb.plan.ready() and not copy.ready()  # 1 s each: launched, not done
    probs = copy.get()
    assert hb.plan.ready()  # the tail ran after the head
    assert probs.shape == (2, len(CLASSES)) and torch.allclose(probs.sum(dim=1), torch.ones(2))
    assert hb.lives.shape == (3, *engine.grid) and hb.keep_rates[1] == 0.5
    assert hb.budgets.tolist() == [list(engine.schedule_counts(r)) for r in (None, 0.5, None)]
    assert hb.buckets.tolist() == [list(engine.bucket(b)) for b in hb.budgets.tolist()]
    assert engine.info()["stand_in"]["table"] == "test"


def test_the_worker_serves_it_and_learns_the_tables_times(checkpoint: Path, tmp_path: Path) -> None:
    engine = StandInEngine(Table.load(write_table(tmp_path / "t.json", 30.0, 20.0)), checkpoint, "cpu", "float32",
                           max_batch_size=8)
    timings = engine.warmup(1)
    assert {t.phase for t in timings} == {"head", "tail"}
    assert min(t.seconds for t in timings if t.phase == "head") >= 0.03  # each waited for its launch's deadline

    async def serve() -> list[list[ImageResult]]:
        worker = Worker(engine, Settings(checkpoint=checkpoint, max_batch_size=8), timings=timings)
        await worker.start()
        try:
            requests = [worker.submit([torch.zeros(3, 32, 32, dtype=torch.uint8)] * n, None, time.monotonic() + 60)
                        for n in (1, 4, 2)]
            return list(await asyncio.gather(*requests))
        finally:
            await worker.stop()

    answers = asyncio.run(serve())
    assert [len(a) for a in answers] == [1, 4, 2]
    for result in (r for a in answers for r in a):
        assert result.probs.shape == (len(CLASSES),) and result.lives.shape == engine.grid
        assert result.counts == engine.bucket(engine.schedule_counts(None))


def test_serve_with_the_stand_in_answers_and_says_so(checkpoint: Path) -> None:
    env = {"PATCHLIFE_API_PROCESSES": "1", "PATCHLIFE_CHECKPOINT": str(checkpoint), "PATCHLIFE_DEVICE": "cpu",
           "PATCHLIFE_WARMUP_BATCHES": "1"}
    with serve_child(env, ["--log-level", "warning"], 240, command=["-m", "bench.standin_serve"]) as child:
        info = httpx.get(child.url + "/v1/models", timeout=30).json()
        r = httpx.post(child.url + "/classify", files=[("files", ("a.png", photo_png(64, 64), "image/png"))] * 2,
                       timeout=30)
    assert "gpu-findings.md" in info["stand_in"]["source"]
    assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text


def test_the_stand_in_device_can_decode_the_jpegs(checkpoint: Path) -> None:
    """``--device-decode-ms``: the model process takes JPEGs undecoded (as beside a GPU) and its stand-in
    decoder answers each with the model's input, a header it cannot read with that image's 400."""
    env = {"PATCHLIFE_API_PROCESSES": "1", "PATCHLIFE_CHECKPOINT": str(checkpoint), "PATCHLIFE_DEVICE": "cpu",
           "PATCHLIFE_WARMUP_BATCHES": "1"}
    command = ["-m", "bench.standin_serve", "--device-decode-ms", "0.5"]
    with serve_child(env, ["--log-level", "warning"], 240, command=command) as child:
        jpegs = httpx.post(child.url + "/classify", files=[("files", ("a.jpg", photo_jpeg(96, 64), "image/jpeg"))] * 3,
                           timeout=30)
        png = httpx.post(child.url + "/classify", files={"file": ("a.png", photo_png(64, 64), "image/png")}, timeout=30)
        log = child.log()
    assert jpegs.status_code == 200 and len(jpegs.json()["results"]) == 3, jpegs.text
    assert png.status_code == 200, png.text
    assert "JPEGs are decoded on the stand-in device, 0.5 ms per image" in log


def test_the_stand_in_decoder_checks_each_header_and_sleeps_its_time() -> None:
    decoder = StandInDecoder(side=32, seconds_per_image=0.02, max_pixels=10_000)
    t0 = time.monotonic()
    out = decoder.each([photo_jpeg(64, 48), b"not a jpeg", photo_jpeg(200, 100)], ["a", "b", "c"])
    assert time.monotonic() - t0 >= 0.06                       # 3 images x 20 ms, asleep
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (3, 32, 32) and out[0].dtype == torch.uint8
    assert isinstance(out[1], ApiError) and out[1].status == 400
    assert isinstance(out[2], ApiError) and out[2].status == 413  # 20,000 pixels over the limit


def args(**kw: object) -> argparse.Namespace:
    return parsed(frontend.add_arguments, engine="stand-in", **kw)


def test_bad_stand_in_options_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for kw, says in (({"inputs": "jpeg224,gif"}, "--inputs: from jpeg224,png64,v2pixels"),
                     ({"api_processes": "0"}, "--api-processes >= 1"),
                     ({"table": tmp_path / "none.json"}, "--table: no file"),
                     ({"rate": 0.0}, "--rate > 0"),
                     ({"device_decode_ms": -1.0}, "--device-decode-ms: >= 0")):
        assert frontend.run(args(**kw)) == 2
        assert says in capsys.readouterr().err


def test_bench_frontend_with_the_stand_in_splits_the_cpu_by_process(
        checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHLIFE_WARMUP_BATCHES", "1")
    code = frontend.run(args(checkpoint=checkpoint, api_processes="1", images_per_request="1,2", processes=1,
                             clients=2, duration=1.0, max_batch_size=8, rate=1000.0, json=True))
    body = json.loads(capsys.readouterr().out)
    assert code == 0, body
    assert [(r["input"], r["images_per_request"]) for r in body["rows"]] == \
        [(i, n) for i in standin_frontend.INPUTS for n in (1, 2)]
    for r in body["rows"]:
        assert r["errors"] == 0 and r["images_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0, r
        assert r["model_cpu_ms_per_image"] > 0 and r["api_cpu_ms_per_request"] > 0, r
        want = 1000.0 * (r["model_cpu_ms_per_image"] + r["api_cpu_ms_per_request"] / r["images_per_request"]) / 1000
        assert r["cores_at_rate"] == pytest.approx(want, rel=1e-2, abs=0.02), r
