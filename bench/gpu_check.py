"""``patchlife gpu-check``: one table for a CUDA machine.

Six parts, each a subprocess of this interpreter (``sys.executable``) run from the repository root
with a time limit of its own:

  * ``tests``:    the gpu test tier, ``pytest -m gpu tests/gpu`` (passed / failed / skipped);
  * ``train``:    a short ``patchlife train --synthetic`` on CUDA with bf16 autocast: the three stages,
    calibration and the held-out evaluation, each stage's images/s;
  * ``eval``:     ``patchlife eval`` of the embedded model on CUDA and on the CPU: every CUDA top-1 must
    lie in the CPU row's 95% interval;
  * ``bench``:    ``patchlife bench --served --device cuda --dtype auto --json`` at batch 1, 16, 64, 256
                  (per-image: one bucket), and with ``--calibrated`` (budgets vary, several buckets per
                  batch, as a server runs) at the batch sizes from 64 up;
  * ``loadtest``: ``patchlife loadtest --json --modes budget,fifo --duration 10 --clients 32`` against
    servers that pick the GPU (``PATCHLIFE_DEVICE=auto``);
  * ``decode``:   ``patchlife bench-decode --device cuda --equivalence --json``: batched nvJPEG images/s
    for 640x480 JPEGs at batch 64, end to end to normalised device tensors (target >= 10,000/s), and
    the GPU path's agreement with the CPU path; then ``python -m bench.gpu_decode_check``: server CPU per
    224-px JPEG request with the model process decoding on the GPU (target <= 1 ms) against decode=cpu;
  * ``frontend``: ``patchlife bench-frontend --device cuda --json``: a calibrated deit_small served with API
    processes on auto, 224/1000-px JPEGs, 1 and 16 per request: images/s, p99 at 70% load, against targets.

A part that fails, times out or prints nothing readable gets its error in the table; the others still
run, and the command exits 1 at the end. Without a CUDA device it says so and exits 2 at once. About
10 minutes on one GPU (the synthetic task's images are drawn on the CPU, which bounds ``train``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .gpu_runner import REPO, Runner, failure, parse_json, run_subprocess

PARTS = ("tests", "train", "eval", "bench", "loadtest", "decode", "frontend")
TIMEOUT_S = {"tests": 300.0, "train": 150.0, "eval": 150.0, "bench": 60.0, "loadtest": 180.0,
             "decode": 180.0, "frontend": 420.0}  # per subprocess
# ``train``: big enough for every stage to run a few dozen bf16 steps, small enough for about a minute
TRAIN_ARGS = ["--synthetic", "--backbone", "vit_micro_patch8_64", "--train-size", "4096", "--val-size", "1024",
              "--batch-size", "128", "--stage0-steps", "30", "--stage1-steps", "30", "--stage2-steps", "30",
              "--calibrate", "1024", "--device", "cuda", "--amp", "bf16"]
EVAL_ARGS = ["--synthetic", "--val-size", "1200", "--keep-rates", "0.5,0.7", "--json"]
CALIBRATED_MIN_BATCH = 64  # bench sizes from which a calibrated row runs too


@dataclass
class Check:
    """One row of the table."""

    name: str
    ok: bool
    result: str                      # numbers, or the error
    seconds: float | None = None     # None: the row shares the subprocess of the row above
    data: dict[str, Any] = field(default_factory=dict)


# --- the parts ------------------------------------------------------------------------------------
def check_tests(run: Runner, env: dict[str, str]) -> list[Check]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "gpu.xml"
        argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
                f"--junitxml={report}"]
        out = run(argv, {**env, "PATCHLIFE_REQUIRE_GPU": "1"}, TIMEOUT_S["tests"])
        try:
            counts = junit_counts(report.read_text()) if report.is_file() else None
        except ET.ParseError:  # cut off mid-write by the time limit
            counts = None
    if counts is None:
        return [Check("gpu tests", False, failure(out, TIMEOUT_S["tests"]), out.seconds)]
    summary = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
               f"{counts['errors']} errors")
    if counts["failing"]:
        summary += ": " + ", ".join(counts["failing"][:3]) + (" ..." if len(counts["failing"]) > 3 else "")
    ok = out.returncode == 0 and counts["failed"] == counts["errors"] == 0 and counts["passed"] > 0
    if out.returncode is None:
        summary = f"{failure(out, TIMEOUT_S['tests'])}; {summary}"
    return [Check("gpu tests", ok, summary, out.seconds, counts)]


def junit_counts(xml_text: str) -> dict[str, Any]:
    """passed/failed/skipped/errors and the failing test names from pytest's ``--junitxml`` report."""
    root = ET.fromstring(xml_text)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
               for s in suites for case in s.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "skipped": total["skipped"], "errors": total["errors"],
            "failing": failing}


def check_train(run: Runner, env: dict[str, str]) -> list[Check]:
    """One row per stage (images/s, final loss, held-out top-1 after it) and one for calibration."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "cli", "train", *TRAIN_ARGS, "--out", str(Path(tmp) / "run")]
        out = run(argv, env, TIMEOUT_S["train"])
        metrics_file = Path(tmp) / "run" / "metrics.json"
        metrics = parse_json(metrics_file.read_text()) if metrics_file.is_file() else None
    if out.returncode != 0 or metrics is None:
        return [Check("train", False, failure(out, TIMEOUT_S["train"]) if out.returncode != 0
                      else "no metrics.json written", out.seconds)]
    history = metrics.get("history", [])
    stages = [h for h in history if "images_per_s" in h]
    evals = {h.get("after"): h for h in history if "after" in h}
    rows: list[Check] = []
    seconds: float | None = out.seconds  # on the first row only: one subprocess ran them all
    for h in stages:
        after = evals.get(h.get("name"), {})
        top1 = after.get("val_top1_life", after.get("val_top1_dense"))
        finite = isinstance(h.get("final_loss"), (int, float)) and math.isfinite(h["final_loss"])
        rows.append(Check(f"train stage {h['stage']} {h['name']}", finite and h["steps"] > 0,
                          f"{h['images_per_s']:.0f} img/s, final loss {h['final_loss']:.3f}, held-out top-1 "
                          f"{'-' if top1 is None else f'{100 * top1:.1f}%'}", seconds, h))
        seconds = None
    calibrated = evals.get("calibrated", {})
    top1 = calibrated.get("val_top1_life_calibrated")
    rows.append(Check("train calibration", top1 is not None and len(stages) == 3,
                      f"calibrated held-out top-1 {100 * top1:.1f}% ({len(stages)} of 3 stages ran)"
                      if top1 is not None else f"no calibrated evaluation ({len(stages)} of 3 stages ran)",
                      seconds, calibrated))
    return rows


def check_eval(run: Runner, env: dict[str, str]) -> Check:
    """``patchlife eval`` on CUDA against the CPU: the same rows, each CUDA top-1 in the CPU's interval."""
    tables = {}
    seconds = 0.0
    for device in ("cuda", "cpu"):
        out = run([sys.executable, "-m", "cli", "eval", *EVAL_ARGS, "--device", device], env,
                  TIMEOUT_S["eval"] / 2)
        seconds += out.seconds
        body = parse_json(out.stdout)
        if out.returncode != 0 or body is None:
            return Check("eval cuda vs cpu", False, f"{device}: {failure(out, TIMEOUT_S['eval'] / 2)}", seconds)
        tables[device] = {(r["method"], r["keep_rate"], r["mode"]): r for r in body.get("rows", [])}
    return compare_eval(tables["cuda"], tables["cpu"], seconds)


def compare_eval(cuda: dict[tuple[Any, ...], dict[str, Any]], cpu: dict[tuple[Any, ...], dict[str, Any]],
                 seconds: float | None) -> Check:
    if not cuda or cuda.keys() != cpu.keys():
        return Check("eval cuda vs cpu", False, f"different rows: cuda {sorted(map(str, cuda))[:4]}, "
                     f"cpu {sorted(map(str, cpu))[:4]}", seconds)
    outside = [f"{'/'.join(map(str, k))}: {100 * r['top1']:.1f}% not in {100 * cpu[k]['ci95'][0]:.1f}-"
               f"{100 * cpu[k]['ci95'][1]:.1f}" for k, r in cuda.items()
               if not cpu[k]["ci95"][0] <= r["top1"] <= cpu[k]["ci95"][1]]
    largest = max(abs(r["top1"] - cpu[k]["top1"]) for k, r in cuda.items())
    result = (f"{len(cuda)} rows, every CUDA top-1 in the CPU's 95% interval, largest difference "
              f"{100 * largest:.1f} points" if not outside else "; ".join(outside[:3]))
    return Check("eval cuda vs cpu", not outside, result, seconds, {"largest_top1_difference": largest})


def check_bench(run: Runner, env: dict[str, str], batch_size: int, calibrated: bool = False) -> Check:
    name = f"bench batch {batch_size}" + (" calibrated" if calibrated else "")
    argv = [sys.executable, "-m", "cli", "bench", "--served", "--device", "cuda", "--dtype", "auto",
            "--batch-size", str(batch_size), "--json", *(["--calibrated"] if calibrated else [])]
    out = run(argv, env, TIMEOUT_S["bench"])
    body = parse_json(out.stdout) or {}
    variants = {v.get("name"): v for v in body.get("variants", []) if isinstance(v, dict)}
    if out.returncode != 0 or not {"dense", "served"} <= variants.keys():
        why = failure(out, TIMEOUT_S["bench"]) if out.returncode != 0 else \
            f"no 'dense' and 'served' variants in the output (got {sorted(map(str, variants))})"
        return Check(name, False, why, out.seconds)
    d, s = variants["dense"], variants["served"]
    try:
        result = (f"served {s['ms_per_batch']:.2f} ms/batch, {s['images_per_s']:.0f} img/s, "
                  f"{s['speedup_vs_dense']:.2f}x dense (dense {d['ms_per_batch']:.2f} ms, "
                  f"{d['images_per_s']:.0f} img/s)")
    except (KeyError, TypeError, ValueError) as exc:
        return Check(name, False, f"unexpected bench output ({exc!r}): {json.dumps(s)[:150]}", out.seconds)
    if calibrated:
        result += f", {body.get('buckets_per_batch', '?')} buckets per batch"
    return Check(name, True, result, out.seconds, {"variants": list(variants.values()),
                                                   "buckets_per_batch": body.get("buckets_per_batch")})


def check_loadtest(run: Runner, env: dict[str, str], duration: float) -> list[Check]:
    modes = ("budget", "fifo")
    argv = [sys.executable, "-m", "cli", "loadtest", "--json", "--modes", ",".join(modes),
            "--duration", f"{duration:g}", "--clients", "32", "--repeat", "1"]
    out = run(argv, {**env, "PATCHLIFE_DEVICE": "auto"}, TIMEOUT_S["loadtest"])
    body = parse_json(out.stdout) or {}
    results = body.get("modes") if isinstance(body.get("modes"), dict) else {}
    if not results:
        return [Check("loadtest", False, failure(out, TIMEOUT_S["loadtest"]), out.seconds)]
    rows = []
    for i, mode in enumerate(modes):
        r: dict[str, Any] = results.get(mode) or {}
        seconds = out.seconds if i == 0 else None  # one subprocess ran every mode
        try:
            text = (f"{r['images_per_s']:.0f} img/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                    f"{r['errors']} errors")
        except (KeyError, TypeError, ValueError) as exc:
            rows.append(Check(f"loadtest {mode}", False, f"no usable result for this mode ({exc!r})", seconds))
            continue
        rows.append(Check(f"loadtest {mode}", r["errors"] == 0, text, seconds, r))
    return rows


DECODE_TARGET_PER_S = 10_000  # 640x480 JPEGs at batch 64, bytes to normalised device tensors (H200 class)
DECODE_MIN_TOP1 = 0.9         # the GPU path's top-1 agreement with the CPU path below which the row fails


def check_decode(run: Runner, env: dict[str, str]) -> list[Check]:
    """Batched nvJPEG throughput (640x480 at batch 64 against the target) and the equivalence with the CPU path."""
    argv = [sys.executable, "-m", "cli", "bench-decode", "--device", "cuda", "--batch-sizes", "1,16,64",
            "--seconds", "1", "--equivalence", "--json"]
    out = run(argv, env, TIMEOUT_S["decode"])
    body = parse_json(out.stdout) or {}
    rows = {r.get("images"): r for r in body.get("rows", []) if isinstance(r, dict)}
    vga, eq = rows.get("640x480") or {}, body.get("equivalence") or {}
    try:
        per_s = 1000.0 / vga["cuda b64"]
        speed = Check("decode 640x480 b64", per_s >= DECODE_TARGET_PER_S,
                      f"{per_s:,.0f} img/s (target >= {DECODE_TARGET_PER_S:,}); ms/img b1 {vga['cuda b1']:.3f}, "
                      f"b16 {vga['cuda b16']:.3f}, b64 {vga['cuda b64']:.4f}, CPU path {vga['cpu path']:.2f}",
                      out.seconds, {"rows": list(rows.values())})
        same = Check("decode equivalence", eq["top1_agreement"] >= DECODE_MIN_TOP1,
                     f"top-1 agreement {eq['top1_agreement']:.1%} on {eq['images']} photos, largest budget difference "
                     f"{eq['max_budget_diff']} of {eq['patches']} patches, pixel |diff| max {eq['max_pixel_diff']}, "
                     f"mean {eq['mean_pixel_diff']:.2f}", None, eq)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        why = failure(out, TIMEOUT_S["decode"]) if out.returncode != 0 else f"unexpected bench-decode output ({exc!r})"
        return [Check("decode", False, why, out.seconds)]
    return [speed, same, check_decode_served(run, env)]


def check_decode_served(run: Runner, env: dict[str, str]) -> Check:
    """Server CPU per 224-px JPEG request with the model process decoding on the GPU, against decode=cpu
    (``python -m bench.gpu_decode_check``: the embedded model, API processes on auto)."""
    argv = [sys.executable, "-m", "bench.gpu_decode_check", "--device", "cuda", "--seconds", "8", "--json"]
    out = run(argv, env, TIMEOUT_S["decode"])
    body = parse_json(out.stdout) or {}
    try:
        rows = {r["decode"]: r for r in body["rows"]}
        text = (f"server CPU per 224-px JPEG request: {rows['gpu']['server_cpu_ms_per_request']} ms with gpu decoding "
                f"(target <= {body['target_ms']}), {rows['cpu']['server_cpu_ms_per_request']} ms with cpu; "
                f"{rows['gpu']['requests_per_s']} vs {rows['cpu']['requests_per_s']} req/s")
        return Check("decode served", bool(body["target_met"]), text, out.seconds, body)
    except (KeyError, TypeError) as exc:
        why = failure(out, TIMEOUT_S["decode"]) if out.returncode != 0 else f"unexpected output ({exc!r})"
        return Check("decode served", False, why, out.seconds)


def check_frontend(run: Runner, env: dict[str, str], duration: float) -> list[Check]:
    """``patchlife bench-frontend`` on CUDA: a row per photo size and images per request; a row with a
    target (224-px JPEGs, 1 and 16 per request) fails when it misses it."""
    argv = [sys.executable, "-m", "cli", "bench-frontend", "--device", "cuda", "--duration", f"{duration:g}", "--json"]
    out = run(argv, env, TIMEOUT_S["frontend"])
    rows = (parse_json(out.stdout) or {}).get("rows")
    if out.returncode not in (0, 1) or not isinstance(rows, list) or not rows:
        return [Check("frontend", False, failure(out, TIMEOUT_S["frontend"]), out.seconds)]
    checks: list[Check] = []
    seconds: float | None = out.seconds  # one subprocess ran every row: its time on the first
    for r in rows:
        try:
            text = (f"{r['images_per_s']:,.0f} img/s ({r['over_offline']:.3f}x offline), p50 {r['p50_ms']:.1f} ms, "
                    f"p99 {r['p99_ms']:.1f} ms, p99 at {r['open_rate_per_s']:,.0f} req/s {r['open_p99_ms']:.1f} ms, "
                    f"server CPU {r['server_cpu_ms_per_image']:.3f} ms/img, {r['errors']} errors")
        except (KeyError, TypeError, ValueError) as exc:
            text = f"unexpected bench-frontend row ({exc!r}): {json.dumps(r)[:150]}"
        misses = r.get("target_misses") or []
        ok = not text.startswith("unexpected") and r.get("errors") == 0 and not misses
        checks.append(Check(f"frontend {r.get('photos')} x{r.get('images_per_request')}", ok,
                            text + ("; missed " + "; ".join(misses) if misses else ""), seconds, r))
        seconds = None
    return checks


def run_checks(parts: Sequence[str], batch_sizes: Sequence[int], duration: float, run: Runner = run_subprocess,
               progress: Callable[[str], None] = lambda _msg: None) -> list[Check]:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
    checks: list[Check] = []
    if "tests" in parts:
        progress("gpu test tier (pytest -m gpu tests/gpu)")
        checks += check_tests(run, env)
    if "train" in parts:
        progress("patchlife train --synthetic on CUDA, bf16, three short stages")
        checks += check_train(run, env)
    if "eval" in parts:
        progress("patchlife eval of the embedded model, CUDA against the CPU")
        checks.append(check_eval(run, env))
    if "bench" in parts:
        for n in batch_sizes:
            progress(f"patchlife bench --served, batch {n}")
            checks.append(check_bench(run, env, n))
            if n >= CALIBRATED_MIN_BATCH:
                progress(f"patchlife bench --served --calibrated, batch {n}")
                checks.append(check_bench(run, env, n, calibrated=True))
    if "loadtest" in parts:
        progress(f"patchlife loadtest, budget and fifo, {duration:g} s each")
        checks += check_loadtest(run, env, duration)
    if "decode" in parts:
        progress("patchlife bench-decode on cuda, with the CPU-vs-GPU equivalence")
        checks += check_decode(run, env)
    if "frontend" in parts:
        progress("patchlife bench-frontend: a calibrated deit_small through HTTP, API processes on auto")
        checks += check_frontend(run, env, duration)
    return checks


# --- output -----------------------------------------------------------------------------------------
def table(checks: Sequence[Check], title: str) -> str:
    """A markdown table, one row per check, columns padded to line up in a terminal."""
    rows = [("check", "status", "result", "time")]
    rows += [(c.name, "ok" if c.ok else "FAIL", c.result.replace("|", "/"),
              "" if c.seconds is None else f"{c.seconds:.0f} s") for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [title, ""]
    for j, r in enumerate(rows):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    failed = [c.name for c in checks if not c.ok]
    lines += ["", f"FAILED: {', '.join(failed)}" if failed else f"all {len(checks)} checks passed"]
    return "\n".join(lines)


def device_line() -> tuple[str, dict[str, Any]]:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return f"{info['gpu']}, torch {info['torch']} (CUDA {info['cuda']})", info


def no_cuda_message() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    build = f"a build for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return (f"patchlife gpu-check: no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"{build}{hint}). Run it on a machine with an NVIDIA GPU, its driver, and a CUDA build of torch.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run (comma-separated: {','.join(PARTS)})")
    p.add_argument("--batch-sizes", default="1,16,64,256", help="bench batch sizes (comma-separated)")
    p.add_argument("--duration", type=float, default=10.0, help="load test: seconds per batching mode")
    p.add_argument("--json", action="store_true", help="print only a JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    try:
        sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not parts or set(parts) - set(PARTS) or not sizes or min(sizes) < 1 or args.duration <= 0:
        print(f"patchlife gpu-check: --parts from {','.join(PARTS)}, --batch-sizes positive integers, "
              "--duration > 0", file=sys.stderr)
        return 2
    if (message := no_cuda_message()) is not None:
        print(message, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    checks = run_checks(parts, sizes, args.duration,
                        progress=lambda msg: print(f"[gpu-check] {msg} ...", file=sys.stderr, flush=True))
    device, info = device_line()
    seconds = time.perf_counter() - t0
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "seconds": round(seconds, 1), **info, "checks": [asdict(c) for c in checks]}))
    else:
        print(table(checks, f"patchlife gpu-check on {device}, {seconds:.0f} s"))
    return 0 if ok else 1
