"""The page's example images of a checkpoint: ``OUT/examples/`` and its index, with the model's answers.

``GET /v1/examples`` lists ``examples/examples.json``, a JSON list of ``{"file", "label", "note"}``
(``docs/api.md``); the page shows them as a row to click. ``patchlife train`` writes them at the end of
every run, and ``patchlife ensure-default`` for the embedded model, both through :func:`write_examples`:

* from an ImageFolder tree: the first few held-out (``val/``) images of each class, scaled down to
  at most :data:`MAX_SIDE` pixels, each note naming its source file and the model's answer;
* from the synthetic task: held-out scenes picked by what they show (:data:`SCENES`): an empty one,
  decoys only, a busy one..., or, when the held-out split is too small to hold them all, the first
  few of each class.

The model's top-1 on each image, as saved, also goes to ``metrics.json`` (``examples``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:  # torch only when writing: ensure-default imports this module for its --help too
    import torch

EXAMPLES_DIR = "examples"
EXAMPLES_INDEX = "examples.json"
MAX_EXAMPLES = 12  # a row on the page, not a gallery
MAX_SIDE = 384     # the page shows thumbnails; the model sees input_size anyway

# (file, what the held-out scene shows, note): the synthetic task's examples
SCENES: list[tuple[str, dict[str, int], str]] = [
    ("empty.png", {"count": 0, "objects_max": 0}, "no objects: plain textured background"),
    ("simple.png", {"count": 1, "objects_max": 1}, "one red circle, nothing else"),
    ("decoys.png", {"count": 0, "objects_min": 5}, "no red circles, only look-alike distractors"),
    ("three.png", {"count": 3, "objects_max": 5}, "three red circles, a few distractors"),
    ("busy.png", {"count": 5, "objects_min": 10}, "five red circles of both sizes among many distractors"),
]


@dataclass
class Candidate:
    """An example before the model has answered: its image, what it shows, and the model's input."""

    file: str
    image: Image.Image
    label: str
    note: str
    pixels: torch.Tensor | None  # [3, H, W] model input; None: preprocess the saved file
    source: dict[str, Any]


def pick_examples(seed: int, size: int, image_size: int = 64) -> list[tuple[str, int, str]]:
    """``(file, held-out item, note)`` for each of :data:`SCENES`: the first item that fits."""
    from .data import scene_content

    content = scene_content(2 * seed + 1, range(size), image_size)
    picked = []
    for name, want, note in SCENES:
        ok = (content["count"] == want["count"]) & (content["objects"] <= want.get("objects_max", 99)) \
            & (content["objects"] >= want.get("objects_min", 0))
        if not ok.any():
            raise ValueError(f"no held-out item fits {name}: {want}")
        picked.append((name, int(ok.argmax()), note))
    return picked


def per_class(classes: int) -> int:
    """How many examples of each class: a few, all within :data:`MAX_EXAMPLES`."""
    return max(1, min(3, MAX_EXAMPLES // max(1, classes)))


def _synthetic(spec: dict[str, Any], pre: dict[str, Any]) -> list[Candidate]:
    from .data import SyntheticShapes

    val = SyntheticShapes(int(spec["val_size"]), 2 * int(spec["seed"]) + 1, int(pre["input_size"][-1]),
                          tuple(pre["mean"]), tuple(pre["std"]))  # type: ignore[arg-type]
    try:
        picked = pick_examples(int(spec["seed"]), len(val), val.image_size)
    except ValueError:  # a small held-out split: the first few scenes of each class instead
        labels = val.render(range(len(val)))[1].tolist()
        k = per_class(len(val.class_names))
        picked = [(f"class{c}-{j}.png", item, f"held-out scene {item}")
                  for c in range(len(val.class_names))
                  for j, item in enumerate([i for i, lab in enumerate(labels) if lab == c][:k])]
    out = []
    for name, item, note in picked[:MAX_EXAMPLES]:
        image, label = val.image(item)
        out.append(Candidate(name, image, label, note, val.normalize(val.render([item])[0])[0],
                             {"held_out_item": item}))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "class"


def _folder(spec: dict[str, Any], pre: dict[str, Any]) -> list[Candidate]:
    from .data import FolderSplit

    root = Path(spec["root"])
    val = FolderSplit(root / "val", pre, training=False, workers=0)
    classes = val.class_names[:MAX_EXAMPLES]
    k = per_class(len(classes))
    out = []
    for c, name in enumerate(classes):
        paths = sorted(Path(p) for p, label in val.dataset.samples if label == c)[:k]
        for j, path in enumerate(paths):
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            image.thumbnail((MAX_SIDE, MAX_SIDE))
            file = f"{_slug(name)}-{j + 1}.jpg"
            rel = path.relative_to(root).as_posix()
            out.append(Candidate(file, image, name, f"held-out image {rel}", None, {"held_out_file": rel}))
    return out


def write_examples(out: Path) -> list[dict[str, Any]]:
    """Write the checkpoint's examples and index from its held-out split; returns the index.

    Each image is saved first and the model answers what was saved (a JPEG as the page will send it),
    so the answer the note gives is the one the page shows.
    """
    import torch

    from ..checkpoint import load_checkpoint

    model, cfg = load_checkpoint(out)
    spec, pre = cfg.metadata["data"], cfg.preprocess
    folder = out / EXAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    candidates = _synthetic(spec, pre) if spec["kind"] == "synthetic" else _folder(spec, pre)
    index, answers = [], []
    for cand in candidates:
        save_options: dict[str, Any] = {"quality": 90} if cand.file.endswith(".jpg") else {}
        cand.image.save(folder / cand.file, **save_options)
        # a photo: the model answers the saved JPEG, as the page will send it, not the original
        pixels = cand.pixels if cand.pixels is not None else _preprocess(folder / cand.file, pre)
        with torch.inference_mode():
            top = cfg.class_names[int(model(pixels[None]).argmax(dim=-1)[0])]
        note = cand.note
        if spec["kind"] != "synthetic":
            note += f"; the model answers {top!r}" + (" (right)" if top == cand.label else " (wrong)")
        index.append({"file": cand.file, "label": cand.label, "note": note})
        answers.append({"file": cand.file, **cand.source, "label": cand.label, "top1": top})
    (folder / EXAMPLES_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    metrics = out / "metrics.json"
    if metrics.is_file():
        body = json.loads(metrics.read_text())
        body["examples"] = answers
        metrics.write_text(json.dumps(body, indent=2) + "\n")
    return index


def _preprocess(path: Path, pre: dict[str, Any]) -> torch.Tensor:
    """timm's evaluation transform (resize, centre crop, normalise) of an image file: ``[3, H, W]``."""
    from timm.data import create_transform

    cfg: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()
           if k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    with Image.open(path) as opened:
        pixels: torch.Tensor = create_transform(**cfg, is_training=False)(opened.convert("RGB"))
    return pixels
