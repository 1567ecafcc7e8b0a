"""Input data for Triton's perf_analyzer (``--input-data``): real images of the synthetic task.

    python -m bench.perf_inputs /tmp/pa            # writes png.json, jpeg.json, pixels.json
    perf_analyzer -m patchlife-default -i grpc -u 127.0.0.1:8001 --input-data /tmp/pa/png.json ...

The images are ``patchlife loadtest``'s mix (the counting task's scenes, from empty to busy), so the
two tools load the server with the same pictures: ``png.json`` and ``jpeg.json`` send them encoded, as
the ``images`` input (BYTES, base64 in the file, raw bytes on the wire); ``pixels.json`` sends their
RGB pixels as the ``pixels`` input (UINT8 ``[H, W, 3]`` per image, the batch dimension added by
perf_analyzer). perf_analyzer cycles through the entries, one per request.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .loadtest import make_mix


def _encoded(png: bytes, fmt: str) -> bytes:
    if fmt == "PNG":
        return png
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, fmt, quality=90)
    return buf.getvalue()


def _element(data: bytes) -> bytes:
    """perf_analyzer takes ``b64`` as the tensor's raw bytes: a BYTES element is length-prefixed."""
    return len(data).to_bytes(4, "little") + data


def input_data(pngs: list[bytes]) -> dict[str, dict[str, Any]]:
    """perf_analyzer's JSON documents, by file name, for these PNG images."""
    out: dict[str, dict[str, Any]] = {}
    for name, fmt in (("png.json", "PNG"), ("jpeg.json", "JPEG")):
        out[name] = {"data": [{"images": {"b64": base64.b64encode(_element(_encoded(p, fmt))).decode()}}
                              for p in pngs]}
    pixels = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]
    out["pixels.json"] = {"data": [{"pixels": {"content": a.ravel().tolist(), "shape": list(a.shape)}}
                                   for a in pixels]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf_inputs", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="folder to write png.json, jpeg.json and pixels.json into")
    p.add_argument("--images", type=int, default=32, help="distinct images (perf_analyzer cycles through them)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, doc in input_data([png for png, _ in make_mix(args.images, [None])]).items():
        (args.out / name).write_text(json.dumps(doc))
        print(args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
