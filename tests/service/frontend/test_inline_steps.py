"""What the API process runs on its event loop rather than in the thread pool (service/frontend/pipeline.py,
infer.py): image headers read from the file's start, small v2 bodies. The loop's answer is the
thread's answer, and what the loop cannot read cheaply goes to the pool in one round trip."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from service_support import all_kinds

from bench.photos import photo_image, photo_jpeg, photo_png
from service.decode import header_info
from service.frontend import infer, oip, pipeline
from service.frontend.errors import ApiError, BadImage, TooManyPixels
from service.frontend.upload import RawImage, UploadLimits

LIMIT = 40_000_000
BENCH_INPUTS = {"png64": photo_png(64, 64, seed=1), "jpeg224": photo_jpeg(224, 224, seed=1),
                "jpeg451x300": photo_jpeg(451, 300, seed=1), "jpeg1000x872": photo_jpeg(1000, 872, seed=1)}

_JPEG = photo_jpeg(64, 64, seed=3)
TRUNCATED = _JPEG[:_JPEG.index(b"\xff\xda") + 40]  # cut 40 bytes into the scan


def crafted_jpeg(markers: int) -> bytes:
    """A valid JPEG behind ``markers`` empty comment markers: Pillow walks each one in Python."""
    good = photo_jpeg(64, 64, seed=2)
    return good[:2] + b"\xff\xfe\x00\x02" * markers + good[2:]


def count_trips(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[str]:
    """Record every thread-pool round trip ``module`` makes (and still make it)."""
    import anyio

    trips: list[str] = []
    real = anyio.to_thread.run_sync

    async def counted(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(module.anyio.to_thread, "run_sync", counted)
    return trips


@pytest.mark.parametrize("name", sorted(all_kinds()) + sorted(BENCH_INPUTS))
def test_the_loop_reads_the_header_the_whole_file_has_or_leaves_it(name: str) -> None:
    data = {**all_kinds(), **BENCH_INPUTS}[name]
    found = pipeline.inline_header(RawImage(data, None, name), LIMIT)
    assert found is None or found == header_info(data, LIMIT)


@pytest.mark.parametrize("name", sorted(BENCH_INPUTS))
def test_photos_without_big_metadata_have_their_header_read_on_the_loop(name: str) -> None:
    assert pipeline.inline_header(RawImage(BENCH_INPUTS[name], None, name), LIMIT) == header_info(
        BENCH_INPUTS[name], LIMIT)


@pytest.mark.parametrize("name", ["tiff", "bmp", "gif_animated", "webp"])
def test_other_formats_are_read_whole_in_the_pool(name: str) -> None:
    """A TIFF's reader, given a cut file, may skip a tag and read another mode: no format but JPEG and
    PNG is read from its start."""
    assert pipeline.inline_header(RawImage(all_kinds()[name], None, name), LIMIT) is None


def test_a_header_past_the_inline_bytes_is_read_whole_in_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    crafted = crafted_jpeg(5_000)  # 20 kB of markers before the frame header
    assert pipeline.inline_header(RawImage(crafted, None, "x"), LIMIT) is None
    trips = count_trips(monkeypatch, pipeline)
    raws = [RawImage(BENCH_INPUTS["png64"], None, "a"), RawImage(crafted, None, "b"), RawImage(crafted, None, "c")]
    headers = asyncio.run(pipeline.read_headers(raws, LIMIT, LIMIT))
    assert [h for h, _ in headers] == [header_info(r.data, LIMIT) for r in raws]
    assert trips == ["_remaining_headers"]  # one trip for both, none for the PNG's


def test_headers_at_the_start_make_no_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    trips = count_trips(monkeypatch, pipeline)
    raws = [RawImage(data, None, name) for name, data in BENCH_INPUTS.items()]
    headers = asyncio.run(pipeline.read_headers(raws, LIMIT, LIMIT))
    assert trips == [] and [h.pixels for h, _ in headers] == [64 * 64, 224 * 224, 451 * 300, 1000 * 872]
    assert all(seconds >= 0.0 for _, seconds in headers)


@pytest.mark.parametrize(("data", "error"), [
    (b"GIF89a\x01", BadImage), (b"not an image at all", BadImage), (b"", BadImage),
    (TRUNCATED, None),  # its header is whole: the file's truncation shows at decode, as it did before
])
def test_wrong_headers_get_the_whole_files_answer(data: bytes, error: type[ApiError] | None) -> None:
    raws = [RawImage(data, None, "files[0]")]
    if error is None:
        assert asyncio.run(pipeline.read_headers(raws, LIMIT, LIMIT))[0][0] == header_info(data, LIMIT)
        return
    with pytest.raises(error) as from_pipeline:
        asyncio.run(pipeline.read_headers(raws, LIMIT, LIMIT))
    with pytest.raises(error) as from_whole:
        header_info(data, LIMIT, source="files[0]")
    assert from_pipeline.value.message == from_whole.value.message


def test_an_image_over_the_pixel_limit_is_413_from_the_loop_too() -> None:
    big = photo_jpeg(1000, 872, seed=1)
    with pytest.raises(TooManyPixels, match="PATCHLIFE_MAX_IMAGE_PIXELS"):
        asyncio.run(pipeline.read_headers([RawImage(big, None, "big")], 500_000, LIMIT))


def v2_pixels_body(images: int, side: int = 224) -> tuple[bytes, str]:
    pixels = np.stack([np.asarray(photo_image(side, side, seed=i).convert("RGB")) for i in range(images)])
    raw = pixels.tobytes()
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, str(len(head))


def v2_json_body(side: int) -> tuple[bytes, None]:
    data = [int(v) for v in np.asarray(photo_image(side, side, seed=0).convert("RGB")).ravel()]
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, side, side, 3],
                                   "data": data}]}).encode(), None


@pytest.mark.parametrize(("body", "trips"), [
    (v2_pixels_body(1), []),  # one 224-px image: parsed on the loop
    (v2_pixels_body(16), ["parse_request"]),  # 2.4 MB, copied twice by the parse: in the pool
    (v2_json_body(8), []),  # 192 numbers as JSON
    (v2_json_body(64), ["parse_request"]),  # a JSON header of 12k numbers
])
def test_small_v2_bodies_are_parsed_on_the_loop(monkeypatch: pytest.MonkeyPatch, body: tuple[bytes, str | None],
                                                trips: list[str]) -> None:
    data, head_length = body
    limits = UploadLimits(len(data), len(data), 16)
    made = count_trips(monkeypatch, infer)
    parsed = asyncio.run(infer.parse_body(data, head_length, limits, LIMIT))
    want = oip.parse_request(data, head_length, limits, LIMIT)
    assert made == trips
    got = [a for a in parsed.items if isinstance(a, np.ndarray)]
    wanted = [a for a in want.items if isinstance(a, np.ndarray)]
    assert len(got) == len(parsed.items) == len(wanted) and all(
        np.array_equal(a, b) for a, b in zip(got, wanted, strict=True))


@pytest.mark.parametrize("head_length", ["abc", "-5", "9" * 5000])
def test_a_bad_header_length_is_the_parsers_400_wherever_it_runs(head_length: str) -> None:
    data, _ = v2_pixels_body(1, side=8)
    limits = UploadLimits(len(data), len(data), 16)
    with pytest.raises(ApiError) as exc:
        asyncio.run(infer.parse_body(data, head_length, limits, LIMIT))
    assert exc.value.status == 400


def grpc_pixels(images: int, typed: bool = False) -> Any:
    from service.frontend.grpc import grpc_service_pb2 as pb

    pixels = np.zeros((images, 224, 224, 3), np.uint8)
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    if typed:
        tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    else:
        msg.raw_input_contents.append(pixels.tobytes())
    return msg


@pytest.mark.parametrize(("images", "typed", "inline"), [(1, False, True), (16, False, False), (1, True, False)])
def test_grpc_converts_small_raw_requests_on_the_loop(images: int, typed: bool, inline: bool) -> None:
    """As a REST body: one 224-px image as raw contents on the loop; 16 images, or typed contents
    (converted value by value), in the pool."""
    from service.frontend.grpc import convert

    msg = grpc_pixels(images, typed)
    assert convert.converts_inline(msg) is inline
    parsed = convert.infer_request(msg, UploadLimits(10_000_000, 100_000_000, 16), LIMIT)
    assert len(parsed.items) == images
