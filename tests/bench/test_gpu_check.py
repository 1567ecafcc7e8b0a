"""``patchlife gpu-check`` without a GPU: the table from fake subprocess outputs, failures in it, and the
clear, quick refusal on a machine without CUDA."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import junit_counts, run_checks, table
from bench.gpu_runner import Output, run_subprocess

REPO = Path(__file__).resolve().parents[2]
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="17"><testcase classname="tests.gpu.test_engine_cuda" name="test_graph_replay"><failure
message="assert 0.2 &lt;= 0.03"/></testcase><testcase classname="tests.gpu.test_model_cuda" name="test_eval"/>
</testsuite></testsuites>"""


def bench_json(batch: int) -> str:
    dense_ms, served_ms = 2.0 + batch / 10, 1.0 + batch / 20
    return json.dumps({"buckets_per_batch": 3, "variants": [
        {"name": "dense", "ms_per_batch": dense_ms, "images_per_s": 1e3 * batch / dense_ms, "speedup_vs_dense": 1.0},
        {"name": "served", "ms_per_batch": served_ms, "images_per_s": 1e3 * batch / served_ms,
         "speedup_vs_dense": dense_ms / served_ms}]})


LOADTEST = json.dumps({"modes": {
    "budget": {"images_per_s": 2210.4, "p50_ms": 13.1, "p99_ms": 41.7, "errors": 0},
    "fifo": {"images_per_s": 1630.0, "p50_ms": 18.2, "p99_ms": 60.3, "errors": 2}}}, indent=2)


class FakeRunner:
    """Canned outputs by command; records every call (argv, env)."""

    def __init__(self, tests_rc: int | None = 1, bench_fails_at: int = 256) -> None:
        self.calls: list[tuple[list[str], dict[str, str], float]] = []
        self.tests_rc, self.bench_fails_at = tests_rc, bench_fails_at

    def __call__(self, argv: list[str], env: dict[str, str], timeout: float) -> Output:
        self.calls.append((argv, env, timeout))
        if "pytest" in argv:
            report = next(a.split("=", 1)[1] for a in argv if a.startswith("--junitxml="))
            if self.tests_rc is not None:
                Path(report).write_text(JUNIT)
            return Output(self.tests_rc, "", "", 61.0)
        if "bench" in argv:
            batch = int(argv[argv.index("--batch-size") + 1])
            if batch == self.bench_fails_at:
                return Output(1, "", "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory.", 9.0)
            return Output(0, bench_json(batch) + "\n", "", 20.0)
        assert "loadtest" in argv
        return Output(1, LOADTEST + "\n", "", 75.0)


def test_the_table_from_fake_outputs_shows_numbers_and_failures() -> None:
    fake = FakeRunner()
    checks = run_checks(["tests", "bench", "loadtest"], [1, 16, 64, 256], 10.0, run=fake)
    assert [c.name for c in checks] == ["gpu tests", "bench batch 1", "bench batch 16", "bench batch 64",
                                        "bench batch 64 calibrated", "bench batch 256",
                                        "bench batch 256 calibrated", "loadtest budget", "loadtest fifo"]
    assert [c.ok for c in checks] == [False, True, True, True, True, False, False, True, False]
    by = {c.name: c for c in checks}
    assert by["gpu tests"].result == "15 passed, 1 failed, 1 skipped, 0 errors: test_engine_cuda::test_graph_replay"
    assert by["bench batch 16"].result == "served 1.80 ms/batch, 8889 img/s, 2.00x dense (dense 3.60 ms, 4444 img/s)"
    assert by["bench batch 256"].result == "exit 1: torch.OutOfMemoryError: CUDA out of memory."
    assert by["loadtest fifo"].result == "1630 img/s, p50 18.2 ms, p99 60.3 ms, 2 errors"
    assert by["loadtest budget"].seconds == 75.0 and by["loadtest fifo"].seconds is None  # one subprocess

    # the commands: this interpreter, the contracted flags, the environment each part needs
    for argv, env, _ in fake.calls:
        assert argv[0] == sys.executable and str(REPO) in env["PYTHONPATH"].split(":")
    tests_argv, tests_env, _ = fake.calls[0]
    assert tests_argv[1:7] == ["-m", "pytest", "-q", "-m", "gpu", "tests/gpu"]
    assert tests_env["PATCHLIFE_REQUIRE_GPU"] == "1"
    assert fake.calls[1][0][2:] == ["cli", "bench", "--served", "--device", "cuda", "--dtype", "auto",
                                    "--batch-size", "1", "--json"]
    assert fake.calls[4][0][-3:] == ["64", "--json", "--calibrated"]  # beside the per-image row at 64
    assert by["bench batch 64 calibrated"].result.endswith(", 3 buckets per batch")
    load_argv, load_env, _ = fake.calls[-1]
    assert load_argv[2:] == ["cli", "loadtest", "--json", "--modes", "budget,fifo", "--duration", "10",
                             "--clients", "32", "--repeat", "1"]
    assert load_env["PATCHLIFE_DEVICE"] == "auto"
    assert sum(timeout for _, _, timeout in fake.calls) <= 14 * 60

    text = table(checks, "patchlife gpu-check on Fake GPU")
    lines = text.splitlines()
    assert lines[0] == "patchlife gpu-check on Fake GPU"
    rows = [ln for ln in lines if ln.startswith("| ")]
    assert len(rows) == 1 + len(checks) and len({len(r) for r in rows}) == 1  # header + one row each, aligned
    assert re.match(r"\| bench batch 256 +\| FAIL +\| exit 1: torch.OutOfMemoryError", rows[6])
    assert lines[-1] == "FAILED: gpu tests, bench batch 256, bench batch 256 calibrated, loadtest fifo"


def test_timeouts_and_unreadable_outputs_are_failures_not_crashes() -> None:
    def runner(argv: list[str], env: dict[str, str], timeout: float) -> Output:
        if "pytest" in argv:
            return Output(None, "", "", timeout)  # killed at its limit before writing the report
        if "bench" in argv:
            return Output(0, "Traceback? no: a warning line\n", "", 1.0)
        return Output(2, "", "patchlife loadtest: error: unrecognized arguments: --repeat 1\n", 1.0)

    checks = run_checks(["tests", "bench", "loadtest"], [64], 10.0, run=runner)
    assert [(c.name, c.ok) for c in checks] == [("gpu tests", False), ("bench batch 64", False),
                                                ("bench batch 64 calibrated", False), ("loadtest", False)]
    assert checks[0].result == "timed out after 300 s"
    assert checks[1].result.startswith("no 'dense' and 'served' variants")
    assert checks[3].result == "exit 2: patchlife loadtest: error: unrecognized arguments: --repeat 1"
    assert table(checks, "t").splitlines()[-1] == \
        "FAILED: gpu tests, bench batch 64, bench batch 64 calibrated, loadtest"
    ok = table([gpu_check.Check("bench batch 1", True, "fine", 1.0)], "t")
    assert ok.splitlines()[-1] == "all 1 checks passed"


def test_junit_counts_reads_pytest_reports() -> None:
    counts = junit_counts(JUNIT)
    assert {k: counts[k] for k in ("passed", "failed", "skipped", "errors")} == \
        {"passed": 15, "failed": 1, "skipped": 1, "errors": 0}
    assert counts["failing"] == ["test_engine_cuda::test_graph_replay"]


CHILD = """import subprocess, sys, time
server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(server.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped yet


def test_a_timed_out_subprocess_is_stopped_with_what_it_started() -> None:
    t0 = time.perf_counter()
    out = run_subprocess([sys.executable, "-c", CHILD], {}, timeout=3.0)
    assert out.returncode is None and time.perf_counter() - t0 < 30
    grandchild = int(out.stdout.split()[0])  # like the servers a load test starts
    end = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < end:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_without_cuda_it_refuses_at_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    called = []
    monkeypatch.setattr(gpu_check, "run_checks", lambda *a, **k: called.append(1) or [])
    args = argparse.Namespace(parts="tests,bench,loadtest", batch_sizes="1,16,64,256", duration=10.0, json=False)
    assert gpu_check.run(args) == 2
    assert "no CUDA GPU: torch.cuda.is_available() is False" in capsys.readouterr().err and not called


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_command_without_cuda_exits_nonzero_with_the_reason() -> None:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cli", "gpu-check"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert "patchlife gpu-check: no CUDA GPU" in p.stderr and time.perf_counter() - t0 < 60


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_target_without_install_uses_the_given_python() -> None:
    # Run as a top-level make even under `make test` (no inherited flags, no "Entering directory").
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    make = ["make", "--no-print-directory", "-n"]
    p = subprocess.run([*make, "gpu-check", "NO_INSTALL=1", "PYTHON=python3"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "PYTHONPATH=. python3 -m cli gpu-check"
    p = subprocess.run([*make, "-B", "gpu-check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "pip install" in p.stdout and p.stdout.strip().endswith("patchlife gpu-check")


def _on_the_cpu(argv: list[str], env: dict[str, str], timeout: float) -> Output:
    """The real train/eval commands, moved to the CPU and shrunk: the parts read what the commands write."""
    swap = {"cuda": "cpu", "bf16": "off", "4096": "256", "1024": "64", "1200": "96", "30": "2", "128": "32",
            "0.5,0.7": "0.7"}
    argv = [swap.get(a, a) for a in argv]
    return run_subprocess(argv, env, timeout)


def test_train_and_eval_parts_read_the_real_commands_outputs() -> None:
    checks = run_checks(["train", "eval"], [1], 10.0, run=_on_the_cpu)
    assert [c.name for c in checks] == ["train stage 0 dense", "train stage 1 life", "train stage 2 tail",
                                        "train calibration", "eval cuda vs cpu"]
    assert all(c.ok for c in checks), table(checks, "t")
    assert re.match(r"\d+ img/s, final loss \d+\.\d{3}, held-out top-1 \d+\.\d%", checks[1].result)
    assert checks[3].result.startswith("calibrated held-out top-1 ")
    assert checks[4].result.endswith("largest difference 0.0 points")  # the CPU twice: the same numbers


def test_eval_outside_the_cpus_interval_fails_the_part() -> None:
    row = {"top1": 0.90, "ci95": (0.88, 0.92)}
    cpu = {("life", 0.7, "fixed"): row, ("dense", 1.0, "dense"): row}
    near = {("life", 0.7, "fixed"): {**row, "top1": 0.915}, ("dense", 1.0, "dense"): row}
    assert gpu_check.compare_eval(near, cpu, 1.0).ok
    far = {**near, ("dense", 1.0, "dense"): {**row, "top1": 0.85}}
    check = gpu_check.compare_eval(far, cpu, 1.0)
    assert not check.ok and check.result == "dense/1.0/dense: 85.0% not in 88.0-92.0"
    assert not gpu_check.compare_eval({("life", 0.7, "fixed"): row}, cpu, 1.0).ok  # a row missing


def test_decode_part_reads_bench_decode() -> None:
    rows = [{"images": "224px", "cpu path": 0.9, "cuda b1": 0.5, "cuda b16": 0.08, "cuda b64": 0.05},
            {"images": "640x480", "cpu path": 3.1, "cuda b1": 0.6, "cuda b16": 0.12, "cuda b64": 0.08}]
    eq = {"images": 16, "max_pixel_diff": 30, "mean_pixel_diff": 0.4, "top1_agreement": 0.9375,
          "max_budget_diff": 4, "patches": 196}
    seen: list[list[str]] = []

    served = {"rows": [{"decode": "gpu", "requests_per_s": 900.0, "server_cpu_ms_per_request": 0.8},
                       {"decode": "cpu", "requests_per_s": 300.0, "server_cpu_ms_per_request": 4.1}],
              "target_ms": 1.0, "target_met": True}

    def runner(argv: list[str], env: dict[str, str], timeout: float) -> Output:
        seen.append(argv)
        body = served if "bench.gpu_decode_check" in argv else {"device": "cuda", "rows": rows, "equivalence": eq}
        return Output(0, "some log line\n" + json.dumps(body), "", 30.0)

    speed, same, wired = run_checks(["decode"], [64], 10.0, run=runner)
    assert seen[0][2:5] == ["cli", "bench-decode", "--device"] and "--equivalence" in seen[0]
    assert seen[1][1:3] == ["-m", "bench.gpu_decode_check"]
    assert speed.ok and speed.result.startswith("12,500 img/s (target >= 10,000)")
    assert same.ok and same.result.startswith("top-1 agreement 93.8% on 16 photos, largest budget difference 4 of 196")
    assert wired.ok and wired.result.startswith("server CPU per 224-px JPEG request: 0.8 ms with gpu decoding")
    rows[1]["cuda b64"] = 0.2  # 5,000/s
    eq["top1_agreement"] = 0.5
    served.update(target_met=False)
    speed, same, wired = run_checks(["decode"], [64], 10.0, run=runner)
    assert not speed.ok and not same.ok and not wired.ok
    broken = run_checks(["decode"], [64], 10.0, run=lambda a, e, t: Output(1, "", "RuntimeError: nvjpeg", 2.0))
    assert [(c.name, c.ok, c.result) for c in broken] == [("decode", False, "exit 1: RuntimeError: nvjpeg")]


FRONTEND_ROWS = [
    {"photos": "224px", "images_per_request": 1, "images_per_s": 8400.0, "over_offline": 0.61, "p50_ms": 3.2,
     "p99_ms": 9.5, "open_rate_per_s": 5880.0, "open_p99_ms": 40.1, "server_cpu_ms_per_image": 1.25, "errors": 0,
     "target": {"images_per_s": 8000, "open_p99_ms": 100.0}, "target_misses": []},
    {"photos": "224px", "images_per_request": 16, "images_per_s": 9100.0, "over_offline": 0.66, "p50_ms": 20.0,
     "p99_ms": 60.0, "open_rate_per_s": 398.0, "open_p99_ms": 80.0, "server_cpu_ms_per_image": 0.9, "errors": 0,
     "target": {"images_per_s": 12000}, "target_misses": ["images/s 9100.0 vs >= 12000"]},
    {"photos": "1000px", "images_per_request": 1, "images_per_s": 2100.0, "over_offline": 0.15, "p50_ms": 15.0,
     "p99_ms": 41.0, "open_rate_per_s": 1470.0, "open_p99_ms": 30.0, "server_cpu_ms_per_image": 6.0, "errors": 3}]


def test_the_frontend_part_reads_bench_frontend_rows_and_their_targets() -> None:
    calls: list[list[str]] = []

    def fake(argv: list[str], env: dict[str, str], timeout: float) -> Output:
        calls.append(argv)
        return Output(1, json.dumps({"rows": FRONTEND_ROWS}) + "\n", "", 200.0)  # 1: some row had errors

    checks = run_checks(["frontend"], [1], 10.0, run=fake)
    assert calls[0][2:] == ["cli", "bench-frontend", "--device", "cuda", "--duration", "10", "--json"]
    assert [(c.name, c.ok, c.seconds) for c in checks] == [("frontend 224px x1", True, 200.0),
                                                           ("frontend 224px x16", False, None),
                                                           ("frontend 1000px x1", False, None)]
    assert checks[0].result == ("8,400 img/s (0.610x offline), p50 3.2 ms, p99 9.5 ms, p99 at 5,880 req/s 40.1 ms, "
                                "server CPU 1.250 ms/img, 0 errors")
    assert checks[1].result.endswith("; missed images/s 9100.0 vs >= 12000") and "3 errors" in checks[2].result


def test_a_frontend_run_that_printed_nothing_is_one_failed_row() -> None:
    checks = run_checks(["frontend"], [1], 10.0, run=lambda a, e, t: Output(None, "", "", 420.0))
    assert [(c.name, c.ok, c.result) for c in checks] == [("frontend", False, "timed out after 420 s")]
