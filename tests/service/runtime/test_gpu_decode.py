"""service/runtime/gpu_decode.py on the CPU (torchvision's decoder; the CUDA run is tests/gpu/test_decode_cuda.py):
the batched path against the served CPU path, its per-image fallbacks, and the same 400/413 errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from service_support import all_kinds, encode, photo

from bench.decode import VIT_224, cpu_pixels, equivalence
from bench.photos import photo_jpeg
from service.api_errors import BadImage, TooManyPixels
from service.runtime import gpu_decode
from service.runtime.gpu_decode import BatchDecoder, decode_on


def equivalence_images() -> list[bytes]:
    """The test images of every kind, generated photos up to 1000 px, and each EXIF orientation."""
    photos = [photo_jpeg(w, h, seed) for seed, (w, h) in enumerate([(224, 224), (640, 480), (1000, 872), (300, 700)])]
    turned = [photo_jpeg(480, 360, 10 + o, orientation=o) for o in range(2, 9)]
    return [*all_kinds().values(), *photos, *turned]


def test_batched_decoder_agrees_with_the_cpu_path() -> None:
    result = equivalence(equivalence_images(), "cpu")
    print(f"\nbatched decoder (torchvision, cpu) vs CPU path: {result}")
    assert result["classes_seen"] >= 3  # top-1 varies between images, so agreement is not trivial
    assert result["top1_agreement"] >= 0.9 and result["max_budget_diff"] <= 10
    assert result["mean_pixel_diff"] < 1.0


def test_pixels_match_per_image_and_orientation() -> None:
    images = [photo_jpeg(480, 360, o, orientation=o) for o in range(1, 9)]
    out = BatchDecoder(VIT_224, "cpu").pixels(images)
    for i, data in enumerate(images):
        diff = (out[i].int() - cpu_pixels(data, VIT_224).int()).abs()
        assert float(diff.float().mean()) < 0.5 and int(diff.max()) <= 8, i  # a wrong rotation would be ~30


def test_output_is_normalised_and_other_formats_fall_back() -> None:
    kinds = all_kinds()
    decoder = BatchDecoder(VIT_224, "cpu")
    images = [kinds["jpeg"], kinds["png"], kinds["jpeg_cmyk"], kinds["jpeg_gray"], kinds["webp"]]
    x = decoder(images)
    assert x.shape == (5, 3, 224, 224) and x.dtype == torch.float32 and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert decoder.fallbacks == {"format": 3} and decoder.decoded == 2
    cmyk = cpu_pixels(kinds["jpeg_cmyk"], VIT_224)
    assert torch.equal(decoder.pixels([kinds["jpeg_cmyk"]])[0], cmyk)  # the CPU path's own pixels


def test_refused_jpegs_are_decoded_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    good, refused = photo_jpeg(320, 240, 1), photo_jpeg(320, 240, 2)
    real = gpu_decode.decode_jpeg

    def flaky(data: Any, **kw: Any) -> Any:
        items = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) == refused for t in items):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", flaky)
    decoder = BatchDecoder(VIT_224, "cpu")
    out = decoder.pixels([good, refused, good])
    assert decoder.fallbacks == {"refused": 1} and decoder.decoded == 2
    assert torch.equal(out[1], cpu_pixels(refused, VIT_224)) and torch.equal(out[0], out[2])


def test_bad_images_get_the_cpu_paths_errors() -> None:
    decoder = BatchDecoder(VIT_224, "cpu", max_pixels=100_000)
    with pytest.raises(TooManyPixels, match=r"^files\[1\]: "):
        decoder.pixels([photo_jpeg(64, 64), photo_jpeg(640, 480)], ["files[0]", "files[1]"])
    truncated = photo_jpeg(200, 200)[:2000]  # the header reads, the data does not: refused, then 400
    with pytest.raises(BadImage):
        decoder.pixels([truncated])
    with pytest.raises(BadImage):
        decoder.pixels([encode(photo(), "PNG")[:60]])


def test_decode_setting() -> None:
    assert decode_on("auto", torch.device("cpu")) == "cpu" and decode_on("cpu", torch.device("cpu")) == "cpu"
    assert decode_on("auto", torch.device("cuda")) == "gpu" and decode_on("cpu", torch.device("cuda")) == "cpu"
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        decode_on("gpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="no device preprocessing"):
        BatchDecoder({**VIT_224, "crop_mode": "squash"}, "cpu")
