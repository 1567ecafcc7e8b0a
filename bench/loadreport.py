"""What ``patchlife loadtest`` reads from a server and the machine, and how it sums passes up.

Pure functions (no sockets): the server's ``/metrics`` text and ``GET /v1/models`` answer are
parsed tolerantly (a series or key the server does not have becomes ``None``, printed "n/a"),
``/proc/stat`` gives the machine's idle share (the server's own CPU: ``bench.proctree``),
repeated passes of a mode are reduced to medians (with the spread of images/s), and the table and
its "explain" lines are formatted.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The server's series this load test reads: key -> (metric, labels a series must carry). All series
# of the metric whose labels include these are summed. Renamed metrics are fixed here and only here.
SERIES: dict[str, tuple[str, dict[str, str]]] = {
    "needed": ("patchlife_needed_tokens_total", {}),
    "computed": ("patchlife_computed_tokens_total", {}),
    "head_images": ("patchlife_batch_size_sum", {"phase": "head"}),
    "head_batches": ("patchlife_batch_size_count", {"phase": "head"}),
    "tail_images": ("patchlife_batch_size_sum", {"phase": "tail"}),
    "tail_batches": ("patchlife_batch_size_count", {"phase": "tail"}),
    "head_s": ("patchlife_model_compute_seconds_sum", {"phase": "head"}),
    "tail_s": ("patchlife_model_compute_seconds_sum", {"phase": "tail"}),
    "decode_s": ("patchlife_image_decode_seconds_sum", {}),
    "decodes": ("patchlife_image_decode_seconds_count", {}),
    "merged": ("patchlife_merged_images_total", {}),  # images run at a larger bucket than their own
    "padded_head": ("patchlife_padded_rows_total", {"phase": "head"}),  # rows added to reach a captured
    "padded_tail": ("patchlife_padded_rows_total", {"phase": "tail"}),  # batch-size class
}
# Gauges read as they are at the end of a window (not as increases): the cost model's parameters, as
# main's server exported them before /v1/models carried "batching" (used only when it does not).
GAUGES: dict[str, tuple[str, dict[str, str]]] = {
    f"cost_{phase}_{part}": (f"patchlife_cost_model_{name}_seconds", {"phase": phase})
    for phase in ("head", "tail") for part, name in (("fixed", "fixed"), ("unit", "unit"))
}
BUSY_WARNING = 0.70  # share of one core a load-generating process may use before its figures are suspect
IDLE_TARGET = 1.25  # idle p50 latency within 25% of the server's batch-1 compute + decode
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_SUFFIXES = ("_sum", "_count", "_bucket")


# -- /metrics -----------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """The ``SERIES`` found in Prometheus text; a metric that is declared (``# TYPE``) but has no
    series with the wanted labels yet (labelled series appear on first use) reads 0."""
    declared: set[str] = set()
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif line and not line.startswith("#"):
            if (sample := _sample(line)) is not None:
                samples.append(sample)
    out: dict[str, float] = {}
    for key, (metric, labels) in (SERIES | GAUGES).items():
        values = [v for name, have, v in samples if name == metric and labels.items() <= have.items()]
        if values:
            out[key] = sum(values)
        elif metric in declared or any(metric.removesuffix(s) in declared for s in _SUFFIXES if metric.endswith(s)):
            out[key] = 0.0
    return out


def _sample(line: str) -> tuple[str, dict[str, str], float] | None:
    name, brace, rest = line.partition("{")
    if brace:
        labels, _, rest = rest.rpartition("}")
    else:
        name, _, rest = line.partition(" ")
        labels = ""
    try:
        return name.strip(), dict(_LABEL.findall(labels)), float(rest.split()[0])
    except (ValueError, IndexError):
        return None


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Increase of every ``SERIES`` present after the window (absent before: it started at 0)."""
    return {k: after[k] - before.get(k, 0.0) for k in after if k in SERIES}


def cost_model_from_gauges(m: dict[str, float]) -> dict[str, dict[str, float]] | None:
    """``{"head": {"fixed_s": .., "unit_s": ..}, "tail": {..}}`` from the ``GAUGES``, or None."""
    out: dict[str, dict[str, float]] = {}
    for key, value in m.items():
        if key in GAUGES:
            _, phase, part = key.split("_")
            out.setdefault(phase, {})[f"{part}_s"] = value
    return out or None


def _ratio(num: float | None, den: float | None, digits: int = 4) -> float | None:
    return round(num / den, digits) if num is not None and den else None


def window_summary(d: dict[str, float], elapsed_s: float) -> dict[str, float | None]:
    """What the server did in a window, from its counters' increases ``d`` over ``elapsed_s``."""
    needed, tail_images = d.get("needed"), d.get("tail_images")
    head_images = d.get("head_images", tail_images)  # every image runs the head once
    busy = d["head_s"] + d.get("tail_s", 0.0) if "head_s" in d else None
    waste = d["computed"] - needed if needed is not None and "computed" in d else None
    return {"waste_ratio": _ratio(waste, needed),
            "tail_batch_mean": _ratio(tail_images, d.get("tail_batches"), 2),
            "head_batch_mean": _ratio(head_images, d.get("head_batches"), 2),
            "model_busy": _ratio(busy, elapsed_s, 3),  # share of the wall time the model thread computed
            "merged_images": d.get("merged"), "merged_share": _ratio(d.get("merged"), tail_images),
            "padded_rows_head": d.get("padded_head"), "padded_rows_tail": d.get("padded_tail"),
            "head_padding_per_image": _ratio(d.get("padded_head"), head_images),
            "tail_padding_per_image": _ratio(d.get("padded_tail"), tail_images)}


def idle_summary(latencies_s: list[float], errors: int, d: dict[str, float]) -> dict[str, Any]:
    """Sequential single-image requests on an idle server against its own batch-1 compute + decode."""
    p50 = round(1000.0 * statistics.median(latencies_s), 3) if latencies_s else None
    head, tail = _ratio(d.get("head_s"), d.get("head_batches"), 6), _ratio(d.get("tail_s"), d.get("tail_batches"), 6)
    compute = round(1000.0 * (head + tail), 3) if head is not None and tail is not None else None
    decode = _ratio(d.get("decode_s"), d.get("decodes"), 6)
    decode_ms = round(1000.0 * decode, 3) if decode is not None else None
    base = compute + decode_ms if compute is not None and decode_ms is not None else None
    return {"requests": len(latencies_s) + errors, "errors": errors, "p50_ms": p50,
            "compute_ms": compute, "decode_ms": decode_ms,
            "head_batch_mean": _ratio(d.get("head_images", d.get("tail_images")), d.get("head_batches"), 2),
            "p50_over_compute_decode": _ratio(p50, base, 3), "target": IDLE_TARGET}


# -- GET /v1/models -----------------------------------------------------------------------------
def batching_info(body: Any) -> dict[str, Any] | None:
    """``{"buckets": n, "cost_model": ...}`` from the ``batching`` key of the (first) model, or None.

    A ``bucket_grid`` that is not a list (a stepped grid, ``{"step": 4}``) is kept as it is, the
    model's ``graphs`` are added when there, and without a ``batching`` key the model's ``buckets``
    stand in for the grid (the cost model then comes from the ``GAUGES``).
    """
    if isinstance(body, dict) and isinstance(body.get("models"), list) and body["models"]:
        body = body["models"][0]
    if not isinstance(body, dict):
        return None
    batching, graphs = body.get("batching"), body.get("graphs")
    if isinstance(batching, dict):
        grid, cost = batching.get("bucket_grid"), batching.get("cost_model")
    elif "buckets" in body or isinstance(graphs, dict):
        grid, cost = body.get("buckets"), None
    else:
        return None
    out = {"buckets": len(grid) if isinstance(grid, list) else None, "cost_model": cost}
    if isinstance(batching, dict) and "mode" in batching:
        out["mode"] = batching["mode"]  # the batching mode the server says it runs
    if grid is not None and not isinstance(grid, list):
        out["bucket_grid"] = grid  # e.g. {"step": 4}: a stepped grid, no fixed count
    return out | {"graphs": graphs} if isinstance(graphs, dict) else out


# -- /proc ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuTimes:
    idle: float   # idle + iowait, clock ticks since boot, all CPUs
    total: float  # user nice system idle iowait irq softirq steal (guest time is inside user/nice)


def parse_proc_stat(text: str) -> CpuTimes | None:
    for line in text.splitlines():
        if line.startswith("cpu "):
            ticks = [float(v) for v in line.split()[1:9]]
            return CpuTimes(sum(ticks[3:5]), sum(ticks)) if len(ticks) >= 4 else None
    return None


def read_cpu_times(path: str = "/proc/stat") -> CpuTimes | None:
    try:
        return parse_proc_stat(Path(path).read_text())
    except (OSError, ValueError):
        return None


def idle_share(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """The machine's idle share (idle + iowait over all time) between two readings."""
    if before is None or after is None or after.total <= before.total:
        return None
    return round((after.idle - before.idle) / (after.total - before.total), 4)


# -- repeated passes ------------------------------------------------------------------------------
def pass_order(modes: list[str], repeat: int) -> list[str]:
    """Batched modes alternate pass by pass (budget, fifo, budget, fifo, ...), unbatched runs last."""
    alternating = [m for m in modes if m != "unbatched"]
    return alternating * repeat + (["unbatched"] * repeat if "unbatched" in modes else [])


_SUMMED = frozenset({"errors", "requests", "images"})  # over a mode's passes; inside a pass's nested
_NESTED = frozenset({"open_loop", "idle"})              # results only the errors are summed


def combine(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's passes -> medians of every number (counts summed), the images/s spread, the passes."""
    out = _medians(passes, _SUMMED)
    rates = [p["images_per_s"] for p in passes]
    out["images_per_s_spread"] = [min(rates), max(rates)]
    out["passes"] = passes
    return out


def _medians(passes: list[dict[str, Any]], summed: frozenset[str]) -> dict[str, Any]:
    keys = list(dict.fromkeys(k for p in passes for k in p))
    return {k: _combine_values(k, [v for p in passes if (v := p.get(k)) is not None], summed) for k in keys}


def _combine_values(key: str, values: list[Any], summed: frozenset[str]) -> Any:
    if not values:
        return None
    if key in summed:
        return sum(values)
    if key == "error_statuses":
        return dict(sum((Counter(v) for v in values), Counter()))
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        median = round(float(statistics.median(values)), 4)
        return int(median) if all(isinstance(v, int) for v in values) and median.is_integer() else median
    if key in _NESTED:
        return _medians(values, frozenset({"errors"}))
    return values[0]  # e.g. the batching info: the first pass's


def pair_ratios(modes: dict[str, dict[str, Any]], num: str = "budget", den: str = "fifo") -> dict[str, Any] | None:
    """images/s of ``num`` over ``den`` for each adjacent pair of passes, and their median."""
    if num not in modes or den not in modes:
        return None
    ratios = [round(a["images_per_s"] / b["images_per_s"], 4)
              for a, b in zip(modes[num]["passes"], modes[den]["passes"]) if b["images_per_s"]]
    return {"per_pair": ratios, "median": round(statistics.median(ratios), 4) if ratios else None}


# -- output -----------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
    if v is None:
        return "n/a"
    try:
        return f"{scale * v:{spec}}{unit}"
    except (TypeError, ValueError):
        return str(v)


def _compact(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def cost_model_lines(cost: Any) -> list[str]:
    """The cost model as the server reports it: one line per phase for a dict of dicts."""
    if cost is None:
        return ["cost model n/a"]
    if isinstance(cost, dict) and cost and all(isinstance(v, dict) for v in cost.values()):
        return [f"cost model {k}: " + ", ".join(f"{n}={_compact(x)}" for n, x in v.items()) for k, v in cost.items()]
    if isinstance(cost, dict):
        return ["cost model: " + ", ".join(f"{n}={_compact(x)}" for n, x in cost.items())]
    return [f"cost model: {_compact(cost)}"]


def _batching_lines(batching: dict[str, Any], passes: list[dict[str, Any]]) -> list[str]:
    grid = f"grid {_compact(batching['bucket_grid'])}" if "bucket_grid" in batching else \
        f"{_fmt(batching.get('buckets'), '.0f')} buckets"
    if isinstance(graphs := batching.get("graphs"), dict):
        shown = [k for k in ("mode", "captured", "eager_fallbacks") if k in graphs] or list(graphs)
        grid += "; graphs " + ", ".join(f"{k}={_compact(graphs[k])}" for k in shown)
    varies = len({json.dumps(p.get("batching"), sort_keys=True) for p in passes}) > 1
    note = [f"(pass 1 of {len(passes)} shown; the passes differ, each is in --json)"] if varies else []
    mode = f"mode {_compact(batching['mode'])}, " if "mode" in batching else ""
    return [f"batching: {mode}{grid}", *cost_model_lines(batching.get("cost_model")), *note]


def explain_lines(mode: str, r: dict[str, Any]) -> list[str]:
    """A few lines saying what the server did in ``mode`` (medians over the passes)."""
    pad = " " * (len(mode) + 2)
    lines = [f"{mode}: passes " + ", ".join(f"{p['images_per_s']:.1f}" for p in r["passes"]) + " images/s",
             f"{pad}batches head {_fmt(r.get('head_batch_mean'))}, tail {_fmt(r.get('tail_batch_mean'))} images; "
             f"merged {_fmt(r.get('merged_share'), '.1f', 100, '%')} of images; padding head "
             f"{_fmt(r.get('head_padding_per_image'), '.2f')}, tail {_fmt(r.get('tail_padding_per_image'), '.2f')} "
             f"rows/image; waste {_fmt(r.get('waste_ratio'), '.1f', 100, '%')}",
             f"{pad}CPU: model busy {_fmt(r.get('model_busy'), '.0f', 100, '%')}, machine idle "
             f"{_fmt(r.get('cpu_idle'), '.0f', 100, '%')}, server {_fmt(r.get('server_cpu_ms_per_image'), '.2f')} "
             f"CPU ms/image"]
    batching = r.get("batching")
    if batching is None:
        lines.append(f"{pad}batching: n/a (no 'batching' in /v1/models)")
    else:
        lines += [pad + line for line in _batching_lines(batching, r["passes"])]
    if (i := r.get("idle")) is not None:
        verdict = "" if i.get("p50_over_compute_decode") is None else \
            " ok" if i["p50_over_compute_decode"] <= i["target"] else " over target"
        lines.append(f"{pad}idle: {i['requests']} single requests a pass, p50 {_fmt(i.get('p50_ms'), '.2f')} ms vs "
                     f"batch-1 compute {_fmt(i.get('compute_ms'), '.2f')} + decode {_fmt(i.get('decode_ms'), '.2f')}"
                     f" ms: {_fmt(i.get('p50_over_compute_decode'), '.2f')}x (target <= {i['target']}){verdict}")
    return lines


def variant_ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For modes run at several PATCHLIFE_API_PROCESSES values (``budget@0``, ``budget@auto``): each
    variant's images/s over the first variant's, and its idle p50 minus the first's (ms)."""
    first: dict[str, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for label, r in results.items():
        mode = label.partition("@")[0]
        base = first.setdefault(mode, r)
        if base is r:
            continue
        idle, idle0 = (r.get("idle") or {}).get("p50_ms"), (base.get("idle") or {}).get("p50_ms")
        out[label] = {"images_per_s_ratio": round(r["images_per_s"] / base["images_per_s"], 4)
                      if base["images_per_s"] else None,
                      "idle_p50_ms_delta": round(idle - idle0, 3) if idle is not None and idle0 is not None else None,
                      "against": next(k for k, v in results.items() if v is base)}
    return out


def table(body: dict[str, Any]) -> str:
    """One row per mode (medians over its passes), then the explain lines and the comparisons."""
    head = f"{'mode':<12} {'images/s':>9} {'min..max':>15} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} " \
           f"{'errors':>6} {'waste':>7} {'tail batch':>10} {'model busy':>10} {'client ms/req':>13}"
    lines = [head, "-" * len(head)]
    for mode, r in body["modes"].items():
        lo, hi = r["images_per_s_spread"]
        lines.append(f"{mode:<12} {r['images_per_s']:>9.1f} {f'{lo:.1f}..{hi:.1f}':>15} {r['p50_ms']:>8.1f} "
                     f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6} "
                     f"{_fmt(r.get('waste_ratio'), '.1f', 100, '%'):>7} {_fmt(r.get('tail_batch_mean')):>10} "
                     f"{_fmt(r.get('model_busy'), '.0f', 100, '%'):>10} "
                     f"{_fmt(r.get('client_cpu_ms_per_request'), '.2f'):>13}")
    lines.append("")
    for mode, r in body["modes"].items():
        lines += explain_lines(mode, r)
        if r.get("error_statuses"):
            lines.append(f"errors {mode}: {r['error_statuses']}")
        if (o := r.get("open_loop")) is not None:
            lines.append(f"open loop {mode}: {o['rate_per_s']:.1f} req/s offered, p50 {o['p50_ms']:.1f} ms, "
                         f"p99 {o['p99_ms']:.1f} ms (p99/p50 {o['p99_over_p50']}), errors {o['errors']}")
    for mode, r in body["modes"].items():
        if (busy := r.get("client_busy_max")) is not None and busy > BUSY_WARNING:
            lines.append(f"WARNING {mode}: a load-generating process was busy {100 * busy:.0f}% of a core "
                         f"(over {100 * BUSY_WARNING:.0f}%): the client may be the bottleneck; add --processes "
                         "or use --driver wrk")
    if (pairs := body.get("budget_over_fifo")) is not None:
        lines.append("budget/fifo per pair: " + ", ".join(f"{x:.3f}" for x in pairs["per_pair"])
                     + f"; median {_fmt(pairs['median'], '.3f')}")
    for label, v in (body.get("api_processes") or {}).items():
        lines.append(f"{label} / {v['against']}: images/s x{_fmt(v['images_per_s_ratio'], '.3f')}, idle p50 "
                     f"{_fmt(v['idle_p50_ms_delta'], '+.2f')} ms")
    if (offline := body.get("offline_images_per_s")) is not None:
        lines.append(f"offline (same model and mix, no HTTP): {offline:.1f} images/s; budget median / offline "
                     f"{_fmt(body.get('budget_over_offline'), '.3f')}")
    return "\n".join(lines)
