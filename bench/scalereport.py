"""The arithmetic of ``patchlife loadtest --open-loop``: served accuracy, objective attainment and goodput.

Pure functions (no sockets, no clock). A pass is the list of answers ``loadpass`` recorded (which
request, status, seconds from its scheduled send, body); each request carries the class names of
its labelled scenes (``LoadRequest.labels``). Per pass:

* **throughput**: images answered 200 per second of the pass (arrivals plus the drain after them);
* **p50 / p99**: latency of the requests answered 200, from the scheduled send;
* **objective attainment**: requests answered 200 within the objective over *all* requests sent
  (a 503, a 504 or a timeout is a miss);
* **scaled share**: images whose answer says ``"scaled": true`` over the images answered (n/a when
  the server's answers do not say);
* **served top-1**: images whose top label is their scene's class over the images answered;
* **goodput**: images answered correctly *and* within the objective, per second of the arrival
  window (the offered duration), in images/s like the offered rate.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Answer = tuple[int, str, float, bytes]  # request index, status, seconds from the scheduled send, body


@dataclass(frozen=True)
class ImageAnswer:
    correct: bool
    scaled: bool | None       # None: the answer does not say
    keep_rate: float | None   # the keep rate the image ran at, when the answer says


def _field(result: dict[str, Any], key: str) -> Any:
    """``key`` of one result, or of its ``budget`` (where the keep rate has always been)."""
    if key in result:
        return result[key]
    budget = result.get("budget")
    return budget.get(key) if isinstance(budget, dict) else None


def read_answer(body: bytes, labels: Sequence[str]) -> list[ImageAnswer]:
    """Each image's answer in a 200 ``/classify`` body, against its class name; an answer that cannot be
    read counts as wrong for every image (never as right)."""
    try:
        results = json.loads(body)["results"]
    except (ValueError, KeyError, TypeError):
        return [ImageAnswer(False, None, None) for _ in labels]
    out = []
    for i, label in enumerate(labels):
        r = results[i] if i < len(results) and isinstance(results[i], dict) else {}
        top = r.get("labels") or [{}]
        scaled, keep = _field(r, "scaled"), _field(r, "keep_rate")
        out.append(ImageAnswer(top[0].get("label") == label, scaled if isinstance(scaled, bool) else None,
                               float(keep) if isinstance(keep, int | float) else None))
    return out


def _ratio(num: float, den: float, digits: int = 4) -> float | None:
    return round(num / den, digits) if den else None


def pass_summary(answers: Sequence[Answer], labels: Sequence[Sequence[str]], objective_s: float | None,
                 window_s: float, elapsed_s: float) -> dict[str, Any]:
    """One open-loop (or closed-loop) pass: ``labels[i]`` are request ``i``'s class names; ``window_s``
    is how long arrivals were sent, ``elapsed_s`` until the last answer. Without an objective,
    attainment and goodput are None."""
    statuses: dict[str, int] = {}
    latencies, images, correct, good, within = [], 0, 0, 0, 0
    scaled, told, keep_rates = 0, 0, []
    for index, status, latency_s, body in answers:
        statuses[status] = statuses.get(status, 0) + 1
        if status != "200":
            continue
        latencies.append(latency_s)
        served = read_answer(body, labels[index])
        hits = sum(a.correct for a in served)
        images, correct = images + len(served), correct + hits
        if objective_s is not None and latency_s <= objective_s:
            within, good = within + 1, good + hits
        told += sum(a.scaled is not None for a in served)
        scaled += sum(a.scaled is True for a in served)
        keep_rates += [a.keep_rate for a in served if a.keep_rate is not None]
    ms = np.array(latencies) * 1000.0
    p50, p99 = (round(float(np.percentile(ms, q)), 2) if latencies else None for q in (50, 99))
    requests = len(answers)
    return {"requests": requests, "images": images, "images_per_s": round(images / elapsed_s, 2) if elapsed_s else None,
            "p50_ms": p50, "p99_ms": p99,
            "attainment": _ratio(within, requests) if objective_s is not None else None,
            "goodput": round(good / window_s, 2) if objective_s is not None and window_s else None,
            "top1": _ratio(correct, images), "scaled_share": _ratio(scaled, told) if told else None,
            "keep_rate_mean": round(statistics.fmean(keep_rates), 4) if keep_rates else None,
            "status_503": statuses.get("503", 0), "status_504": statuses.get("504", 0),
            "errors": requests - statuses.get("200", 0),
            "error_statuses": {s: n for s, n in sorted(statuses.items()) if s != "200"}}


# -- offered rates -----------------------------------------------------------------------------
def parse_offered(text: str) -> list[str]:
    """Offered-rate tokens: images/s (``430``), ``mid`` ((C_default + C_floor) / 2), ``0.5d`` (x
    C_default) or ``1.2f`` (x C_floor). ValueError names a bad one."""
    tokens = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not tokens:
        raise ValueError("--offered: give at least one rate")
    for t in tokens:
        try:
            value = 1.0 if t == "mid" else float(t[:-1] if t[-1] in "df" else t)
        except ValueError:
            raise ValueError(f"--offered: {t!r} is not images/s, 'mid', '<x>d' or '<x>f'") from None
        if not value > 0:
            raise ValueError(f"--offered: {t!r} must be above 0")
    return tokens


def needs_capacity(tokens: Sequence[str]) -> bool:
    return any(t == "mid" or t[-1] in "df" for t in tokens)


def resolve_offered(tokens: Sequence[str], c_default: float | None, c_floor: float | None) -> list[float]:
    """Images/s of each token, given the closed-loop capacities (needed only by relative tokens)."""
    out = []
    for t in tokens:
        if needs_capacity([t]) and (c_default is None or c_floor is None):
            raise ValueError(f"--offered {t}: needs the closed-loop capacities")
        if t == "mid":
            out.append((c_default + c_floor) / 2)  # type: ignore[operator]
        elif t[-1] == "d":
            out.append(float(t[:-1]) * c_default)  # type: ignore[operator]
        elif t[-1] == "f":
            out.append(float(t[:-1]) * c_floor)  # type: ignore[operator]
        else:
            out.append(float(t))
    return [round(r, 2) for r in out]


# -- repeated passes -----------------------------------------------------------------------------
_SUMMED = frozenset({"requests", "images", "status_503", "status_504", "errors"})


def combine_passes(passes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Passes of one configuration at one offered rate: counts summed, every other number the median
    (over the passes that have it), error statuses added up, the passes kept."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for p in passes for k in p):
        values = [p[key] for p in passes if p.get(key) is not None]
        if key == "error_statuses":
            out[key] = {s: sum(v.get(s, 0) for v in values) for s in sorted({s for v in values for s in v})}
        elif not values:
            out[key] = None
        elif key in _SUMMED:
            out[key] = sum(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = round(float(statistics.median(values)), 4)
        else:
            out[key] = values[0]
    out["passes"] = list(passes)
    return out


def comparison(on: dict[str, Any], off: dict[str, Any], top1_unloaded: float | None) -> dict[str, Any]:
    """Scaling on against off at one offered rate: goodput ratio, and each one's served top-1 minus
    the unloaded service's, in points (negative: below it)."""
    def delta(r: dict[str, Any]) -> float | None:
        return round(100.0 * (r["top1"] - top1_unloaded), 2) if top1_unloaded is not None and r.get("top1") \
            is not None else None

    g_on, g_off = on.get("goodput"), off.get("goodput")
    return {"goodput_ratio": round(g_on / g_off, 2) if g_on is not None and g_off else None,
            "top1_delta_points_on": delta(on), "top1_delta_points_off": delta(off)}


# -- output ---------------------------------------------------------------------------------------
def _f(v: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    return "n/a" if v is None else f"{scale * v:{spec}}"


def _capacity_lines(body: dict[str, Any]) -> list[str]:
    cap = body.get("capacity")
    if not cap:
        return []
    lines = []
    for name, keep in (("default", body.get("default_keep_rate")), ("floor", body.get("floor"))):
        c = cap[name]
        rates = [p["images_per_s"] for p in c["passes"]]
        lines.append(f"C_{name:<8} {_f(c['images_per_s'])} images/s (passes {', '.join(_f(r) for r in rates)}) at "
                     f"keep {_f(keep, '.2f')}, closed loop; top-1 {_f(c['top1'], '.1f', 100)}%, "
                     f"p50 {_f(c['p50_ms'])} ms")
    d, f = cap["default"]["images_per_s"], cap["floor"]["images_per_s"]
    lines.append(f"C_floor / C_default = {_f(f / d if d else None, '.2f')}")
    return lines


def table(body: dict[str, Any]) -> str:
    """One row per configuration and offered rate (medians over the passes), the capacities, and
    scaling on against off."""
    head = (f"{'scaling':<8} {'offered':>8} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'attain':>7} "
            f"{'503':>5} {'504':>5} {'scaled':>7} {'keep':>5} {'top-1':>6} {'goodput':>8} {'client':>6}")
    n = body["images_per_request"]
    lines = [f"objective {body['objective_ms']:g} ms, {n} image{'' if n == 1 else 's'} per request, "
             f"{body['duration_s']:g} s per pass", *_capacity_lines(body), "", head, "-" * len(head)]
    for config, rows in body["results"].items():
        for r in rows:
            lines.append(f"{config:<8} {r['offered']:>8.1f} {_f(r['images_per_s']):>9} {_f(r['p50_ms']):>8} "
                         f"{_f(r['p99_ms']):>8} {_f(r['attainment'], '.1%'):>7} {r['status_503']:>5} "
                         f"{r['status_504']:>5} {_f(r['scaled_share'], '.1%'):>7} {_f(r['keep_rate_mean'], '.2f'):>5} "
                         f"{_f(r['top1'], '.1%'):>6} {_f(r['goodput']):>8} {_f(r.get('client_busy'), '.0%'):>6}")
    lines += ["", "attain: requests answered within the objective / requests sent; scaled: images the service "
              "scaled / images answered; goodput: images answered correctly within the objective per second; "
              "client: the busiest load generator's share of a core"]
    for rate, c in zip(body["offered"], body.get("comparison") or [], strict=False):
        ratio = _f(c["goodput_ratio"], ".2f") if c["goodput_ratio"] is not None else "n/a (off: no goodput)"
        lines.append(f"at {rate:.1f} images/s: goodput on/off x{ratio}; served top-1 minus the unloaded one "
                     f"(C_default's closed loop): on {_f(c['top1_delta_points_on'], '+.2f')}, off "
                     f"{_f(c['top1_delta_points_off'], '+.2f')} points")
    return "\n".join(lines + target_lines(body))


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "MISSED"


def target_lines(body: dict[str, Any]) -> list[str]:
    """Issue 33's targets, where the run has their rates: at ``mid``, attainment >= 95% with scaling on,
    goodput >= 3x off's, served top-1 at most 1.5 points below the unloaded one; at ``0.5d``, no image
    scaled."""
    results, out = body.get("results", {}), list[str]()
    if "on" not in results:
        return out
    comparisons = body.get("comparison") or [{} for _ in results["on"]]
    for i, (token, on) in enumerate(zip(body["tokens"], results["on"], strict=False)):
        delta = comparisons[i].get("top1_delta_points_on")
        if token == "mid":
            att, ratio = on.get("attainment"), comparisons[i].get("goodput_ratio")
            off_goodput = results["off"][i].get("goodput") if "off" in results else None
            # off's goodput 0 and on's above it: an unbounded ratio, the target is met
            ratio_ok = ratio >= 3 if ratio is not None else (True if off_goodput == 0 and on.get("goodput") else None)
            out += [f"target at mid: attainment on {_f(att, '.1%')} (>= 95%): "
                    f"{_verdict(att >= 0.95 if att is not None else None)}",
                    f"target at mid: goodput on/off x{_f(ratio, '.2f')} (>= 3): {_verdict(ratio_ok)}",
                    f"target at mid: served top-1 on {_f(delta, '+.2f')} points vs unloaded (>= -1.5): "
                    f"{_verdict(delta >= -1.5 if delta is not None else None)}"]
        elif token == "0.5d":
            share = on.get("scaled_share")
            out.append(f"target at 0.5 x C_default: scaled {_f(share, '.1%')} (0): "
                       f"{_verdict(share == 0 if share is not None else None)}; top-1 on "
                       f"{_f(delta, '+.2f')} points vs unloaded")
    return out
