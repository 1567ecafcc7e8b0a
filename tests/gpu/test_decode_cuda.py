"""nvJPEG batched decoding on CUDA (service/runtime/gpu_decode.py): the CPU path's pixels within the measured
tolerance, EXIF orientation, per-image fallbacks, and the output on the device."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from service_support import all_kinds

from bench.decode import VIT_224, cpu_pixels, equivalence
from bench.photos import PHOTO_SIZES, photo_jpeg
from service.app import create_app
from service.runtime.gpu_decode import BatchDecoder
from service.settings import Settings

pytestmark = pytest.mark.gpu


def test_nvjpeg_agrees_with_the_cpu_path() -> None:
    photos = [photo_jpeg(w, h, seed) for seed, (_, w, h) in enumerate(PHOTO_SIZES)]
    turned = [photo_jpeg(480, 360, 10 + o, orientation=o) for o in range(2, 9)]
    result = equivalence([*all_kinds().values(), *photos, *turned], "cuda")
    print(f"\nnvJPEG vs CPU path: {result}")
    assert result["classes_seen"] >= 3
    assert result["top1_agreement"] >= 0.9 and result["max_budget_diff"] <= 10 and result["mean_pixel_diff"] < 1.5


def test_orientation_and_fallbacks_on_the_device() -> None:
    kinds = all_kinds()
    images = [photo_jpeg(480, 360, o, orientation=o) for o in range(1, 9)] + [kinds["png"], kinds["jpeg_cmyk"]]
    decoder = BatchDecoder(VIT_224, "cuda")
    pixels = decoder.pixels(images)
    assert pixels.device.type == "cuda" and pixels.shape == (10, 3, 224, 224)
    assert decoder.decoded == 8 and decoder.fallbacks == {"format": 2}
    for i, data in enumerate(images):
        diff = (pixels[i].cpu().int() - cpu_pixels(data, VIT_224).int()).abs()
        assert float(diff.float().mean()) < 1.5, i
    x = decoder(images[:3])
    assert x.is_cuda and x.dtype == torch.float32


def test_the_service_decodes_jpegs_on_the_device(checkpoints: dict[str, Path]) -> None:
    """PATCHLIFE_DECODE=gpu through the single-process app on CUDA: JPEGs reach the model process
    undecoded and are decoded by nvJPEG; the answers agree with decode=cpu on the same device; a
    corrupt JPEG is 400 for its request alone."""
    photos = [photo_jpeg(w, h, seed) for seed, (_, w, h) in enumerate(PHOTO_SIZES)]
    photos += [photo_jpeg(480, 360, 10 + o, orientation=o) for o in range(2, 9)]
    answers: dict[str, list[dict[str, Any]]] = {}
    for decode in ("cpu", "gpu"):
        settings = Settings(checkpoint=checkpoints["calibrated"], device="cuda", decode=decode,  # type: ignore[arg-type]
                            warmup_batches=1, max_delay_ms=1.0, grpc_port=0)
        with TestClient(create_app(settings)) as client:
            end = time.monotonic() + 180
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < end
                time.sleep(0.1)
            model = client.app.state.frontend.model  # type: ignore[attr-defined]
            assert (model.decoder is not None) == (decode == "gpu")
            answers[decode] = []
            for data in photos:
                r = client.post("/classify", files={"file": ("p.jpg", data, "image/jpeg")})
                assert r.status_code == 200, r.text
                answers[decode].append(r.json()["results"][0])
            bad = client.post("/classify", files={"file": ("c.jpg", photo_jpeg(200, 200)[:2000], "image/jpeg")})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_image", bad.text
            if decode == "gpu":
                assert model.decoder.decoder.decoded >= len(photos)
    same = sum(a["labels"][0]["index"] == b["labels"][0]["index"] for a, b in zip(answers["gpu"], answers["cpu"]))
    budget = max(abs(x - y) for a, b in zip(answers["gpu"], answers["cpu"])
                 for x, y in zip(a["budget"]["patch_counts"], b["budget"]["patch_counts"]))
    print(f"\nservice on cuda, decode=gpu vs decode=cpu: top-1 equal {same}/{len(photos)}, max budget diff {budget}")
    assert same >= 0.9 * len(photos) and budget <= 10
