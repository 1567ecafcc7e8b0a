"""nvJPEG batched decoding on CUDA (service/runtime/gpu_decode.py): the CPU path's pixels within the measured
tolerance, EXIF orientation, per-image fallbacks, and the output on the device."""

from __future__ import annotations

import pytest
import torch
from service_support import all_kinds

from bench.decode import VIT_224, cpu_pixels, equivalence
from bench.photos import PHOTO_SIZES, photo_jpeg
from service.runtime.gpu_decode import BatchDecoder

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
