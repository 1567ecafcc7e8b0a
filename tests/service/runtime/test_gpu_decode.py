"""service/runtime/gpu_decode.py on the CPU (torchvision's decoder; the CUDA run is tests/gpu/test_decode_cuda.py):
the batched path against the served CPU path, its per-image fallbacks, the same 400/413 errors, the
queue that batches concurrent requests, and the engine taking pixels already on its device."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from service_support import all_kinds, encode, photo

from bench.decode import VIT_224, cpu_pixels, equivalence
from bench.photos import photo_jpeg
from service.api_errors import ApiError, BadImage, TooManyPixels
from service.protocol import EncodedImage, WorkerStopping
from service.runtime import gpu_decode
from service.runtime.engine import Engine
from service.runtime.gpu_decode import BatchDecoder, DecodeQueue, decode_on


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


class Recorder:
    """A BatchDecoder stand-in: records the batches it is handed, each held until ``gate`` opens; an
    image decodes to its length, ``b"bad"`` to its error."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.gate = threading.Event()

    def each(self, images: list[bytes], sources: list[str]) -> list[torch.Tensor | ApiError]:
        self.batches.append(list(images))
        self.gate.wait(10.0)
        return [BadImage(f"{s}: bad") if d == b"bad" else torch.tensor(len(d)) for d, s in zip(images, sources)]


def test_decode_queue_batches_what_waits_while_it_decodes() -> None:
    """Requests that arrive while a batch decodes go together into the next one, up to ``max_batch``
    images (a larger request alone); a request cancelled while waiting is dropped; errors stay per image."""
    recorder = Recorder()
    queue = DecodeQueue(recorder, max_batch=4)  # type: ignore[arg-type]

    def images(*data: bytes) -> list[EncodedImage]:
        return [EncodedImage(d, f"images[{i}]") for i, d in enumerate(data)]

    callbacks = 0

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal callbacks
            callbacks += threading.current_thread().name == "patchlife-decode"
            return real(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        first = asyncio.create_task(queue.decode(images(b"a")))
        while not recorder.batches:
            await asyncio.sleep(0.001)
        gone = asyncio.create_task(queue.decode(images(b"zz")))
        pair = asyncio.create_task(queue.decode(images(b"bb", b"bad")))
        one = asyncio.create_task(queue.decode(images(b"dddd")))
        large = asyncio.create_task(queue.decode(images(*[b"x"] * 5)))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        recorder.gate.set()
        return await asyncio.gather(first, pair, one, large)

    first, pair, one, large = asyncio.run(main())
    queue.close()
    assert [len(b) for b in recorder.batches] == [1, 3, 5] and b"zz" not in recorder.batches[1]
    assert callbacks == 3, "one callback per decoded batch, not one per request"
    assert [int(t) for t in first] == [1] and int(pair[0]) == 2 and isinstance(pair[1], BadImage)
    assert [int(t) for t in one] == [4] and [int(t) for t in large] == [1] * 5
    with pytest.raises(WorkerStopping):
        asyncio.run(queue.decode(images(b"late")))


def test_engine_keeps_pixels_decoded_on_the_device_there(checkpoint_dir: Path) -> None:
    """Pixels already on the model's device are stacked there: no trip through pinned host memory (on
    ``meta``, which cannot be pinned; the upload stream set as on a GPU), also beside slot pixels."""
    engine = Engine(checkpoint_dir, device="cpu").to("meta")
    engine._upload_stream = object()  # type: ignore[assignment]  # the GPU branch: reached, it would fail
    shape = engine.card().input_shape
    on_device = [torch.empty(shape, dtype=torch.uint8, device="meta") for _ in range(3)]
    for batch in (on_device, [on_device[0], torch.zeros(shape, dtype=torch.uint8)]):
        out = engine._upload(batch)
        assert out.device.type == "meta" and tuple(out.shape) == (len(batch), *shape)


def test_decode_calls_are_bounded_by_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """PATCHLIFE_MAX_DECODE_PIXELS bounds what one device call decodes (and resizes in float)."""
    images = [photo_jpeg(640, 480, i) for i in range(3)]  # 307,200 pixels each
    calls: list[int] = []
    real = gpu_decode.decode_jpeg

    def counted(data: Any, **kw: Any) -> Any:
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, **kw)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", counted)
    whole = BatchDecoder(VIT_224, "cpu").pixels(images)
    chunked = BatchDecoder(VIT_224, "cpu", max_batch_pixels=700_000).pixels(images)
    assert calls == [3, 2, 1] and torch.equal(whole, chunked)
