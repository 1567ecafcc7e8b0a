"""``patchlife loadtest --open-loop --plot FILE.png``: goodput, p99 and served top-1 against the offered
rate, scaling on beside scaling off. matplotlib is optional (``pip install 'patchlife[plot]'``)."""

from __future__ import annotations

import importlib.util
from typing import Any

STYLE = {"on": ("tab:blue", "o", "scaling on"), "off": ("tab:red", "s", "scaling off (fixed keep rate)"),
         "server": ("tab:green", "^", "server")}


def matplotlib_missing() -> str | None:
    """None when matplotlib can be imported, else what to install."""
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'patchlife[plot]' (or pip install matplotlib)"
    return None


def plot(body: dict[str, Any], path: str) -> None:
    """Three panels side by side (goodput, p99, served top-1), one line per configuration; the
    objective on the p99 panel, the closed-loop capacities as vertical lines when measured."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = (("goodput", "goodput (correct within objective, images/s)", 1.0),
              ("p99_ms", "p99 latency (ms)", 1.0), ("top1", "served top-1 (%)", 100.0))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True, constrained_layout=True)
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        for config, rows in body["results"].items():
            colour, marker, label = STYLE.get(config, ("tab:grey", "x", config))
            points = [(r["offered"], scale * r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), color=colour, marker=marker, label=label)
        if key == "p99_ms":  # seconds of queue against a fraction of one: a log axis shows both
            ax.axhline(body["objective_ms"], color="black", linestyle=":", label="objective")
            ax.set_yscale("log")
        if key == "top1" and (lows := [scale * r[key] for rows in body["results"].values() for r in rows
                                       if r.get(key) is not None]):
            ax.set_ylim(max(0.0, min(lows) - 5.0), 100.0)  # points of accuracy, not a zoom on noise
        for name, style in (("default", "--"), ("floor", "-.")):
            if (c := (body.get("capacity") or {}).get(name)) is not None and c.get("images_per_s"):
                ax.axvline(c["images_per_s"], color="grey", linestyle=style, label=f"C_{name}")
        ax.set_title(title)
        ax.set_xlabel("offered load (images/s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[1].legend(fontsize="small")
    n = body["images_per_request"]
    fig.suptitle(f"patchlife open loop: objective {body['objective_ms']:g} ms, {n} image{'' if n == 1 else 's'} "
                 "per request")
    fig.savefig(path, dpi=120)
    plt.close(fig)
