"""Peak memory one request costs the server, for the largest body of each kind it accepts.

    python -m bench.body_memory [--checkpoint DIR] [--repeat 2]

Starts ``patchlife serve`` in one process (``PATCHLIFE_API_PROCESSES=0``, so that the process that
reads the body is the one measured) with the default limits, then for each body kind sends the
largest body the limits accept (``PATCHLIFE_MAX_REQUEST_BYTES``, each image at
``PATCHLIFE_MAX_UPLOAD_BYTES``): files that are not images, so that the whole body is read and parsed
and the request is then answered 400 at the first image's header (decoding is bounded apart, by
``PATCHLIFE_MAX_DECODE_PIXELS``, for all requests together). Before each request the process's peak
RSS is reset (``/proc/PID/clear_refs``); the figure is the peak during the request minus the RSS
before it, in MiB, and its ratio to the body's size. Prints one line per kind.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import httpx

from .child import serve_child
from .proctree import rss_bytes

MIB = 2**20
MAX_REQUEST = 50 * MIB   # the defaults of service/settings.py
MAX_UPLOAD = 10 * MIB


def _junk(n: int, seed: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + os.urandom(n - 8) if seed >= 0 else b""


def _multipart() -> tuple[dict[str, str], bytes]:
    size = MAX_UPLOAD - 4096
    count = (MAX_REQUEST - 4096) // (size + 200)
    parts = [b'--b\r\nContent-Disposition: form-data; name="files"; filename="%d.png"\r\nContent-Type: image/png'
             b"\r\n\r\n" % i + _junk(size, i) + b"\r\n" for i in range(count)]
    return {"content-type": "multipart/form-data; boundary=b"}, b"".join(parts) + b"--b--\r\n"


def _b64_images() -> list[str]:
    size = MAX_UPLOAD - 4096
    count = (MAX_REQUEST - 4096) // (size * 4 // 3 + 8)
    return [base64.b64encode(_junk(size, i)).decode() for i in range(count)]


def _json() -> tuple[dict[str, str], bytes]:
    return {"content-type": "application/json"}, json.dumps({"images": _b64_images()}).encode()


def _raw() -> tuple[dict[str, str], bytes]:
    return {"content-type": "image/png"}, _junk(MAX_UPLOAD - 4096, 0)


def _v2_json() -> tuple[dict[str, str], bytes]:
    data = _b64_images()
    tensor = {"name": "images", "datatype": "BYTES", "shape": [len(data)], "data": data}
    return {"content-type": "application/json"}, json.dumps({"inputs": [tensor]}).encode()


def _v2_binary() -> tuple[dict[str, str], bytes]:
    size = MAX_UPLOAD - 4096
    files = [_junk(size, i) for i in range((MAX_REQUEST - 4096) // (size + 4))]
    blob = b"".join(struct.pack("<I", len(f)) + f for f in files)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(files)],
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return ({"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))},
            head + blob)


KINDS: dict[str, tuple[str, Callable[[], tuple[dict[str, str], bytes]]]] = {
    "multipart": ("/classify", _multipart), "json base64": ("/classify", _json), "raw image": ("/classify", _raw),
    "v2 json": ("/v2/models/{model}/infer", _v2_json), "v2 binary": ("/v2/models/{model}/infer", _v2_binary)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--repeat", type=int, default=2, help="requests per kind; the largest peak is printed")
    args = p.parse_args(argv)
    env = {"PATCHLIFE_API_PROCESSES": "0", "PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_WARMUP_BATCHES": "1"}
    extra = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    with serve_child(env, extra, cwd=str(Path(__file__).resolve().parents[1])) as child:
        model = httpx.get(child.url + "/v1/models", timeout=10).json()["name"]
        print(f"{'body kind':<12} {'body MiB':>9} {'peak MiB':>9} {'x body':>7}  status")
        for kind, (path, make) in KINDS.items():
            headers, body = make()
            peaks, status = [], 0
            for _ in range(args.repeat):
                Path(f"/proc/{child.proc.pid}/clear_refs").write_text("5")  # peak RSS := RSS now
                before = rss_bytes(child.proc.pid)["VmRSS"]
                r = httpx.post(child.url + path.format(model=model), content=body, headers=headers, timeout=120)
                status = r.status_code
                peaks.append(rss_bytes(child.proc.pid)["VmHWM"] - before)
            peak = max(peaks)
            print(f"{kind:<12} {len(body) / MIB:>9.1f} {peak / MIB:>9.1f} {peak / len(body):>7.2f}  {status}",
                  flush=True)


if __name__ == "__main__":
    main()
