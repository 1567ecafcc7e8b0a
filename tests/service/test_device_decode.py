"""PATCHLIFE_DECODE wired through the service: the front end passes JPEGs on undecoded and the model
process decodes them in batches (service/runtime/gpu_decode.py). CI has no GPU, so the device path runs
on the CPU here (torchvision's decoder), forced by patching ``gpu_decode.decode_on`` (no public setting
allows gpu decoding without CUDA); tests/gpu/test_decode_cuda.py runs nvJPEG itself."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import all_kinds, wait_ready

from bench.child import free_port, stop
from bench.photos import photo_image, photo_jpeg
from service.app import create_app
from service.metrics import Metrics
from service.protocol import BadInput, EncodedImage, ImageResult
from service.runtime import gpu_decode
from service.runtime.local import LocalModel
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
BASE = dict(device="cpu", warmup_batches=1, max_delay_ms=1.0, max_images_per_request=4, grpc_port=0)


def photos() -> list[bytes]:
    """Generated photos of several sizes, and one of each EXIF orientation."""
    sizes = [(224, 224), (640, 480), (1000, 872), (300, 700), (480, 640), (800, 600), (256, 320), (333, 222)]
    plain = [photo_jpeg(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    turned = [photo_jpeg(480, 360, 20 + o, orientation=o) for o in range(2, 9)]
    return plain + turned


@pytest.fixture(scope="module")
def fallbacks() -> list[str]:
    return []


@pytest.fixture(scope="module")
def device_client(checkpoint_dir: Path, fallbacks: list[str]) -> Iterator[TestClient]:
    """The single-process app with the device decode path on the CPU, and ``Metrics.decode_fallback``
    recording into ``fallbacks`` (job A's metric; LocalModel looks it up by name)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_decode, "decode_on", lambda mode, device: "gpu")
        mp.setattr(Metrics, "decode_fallback", lambda self, reason: fallbacks.append(reason), raising=False)
        client = TestClient(create_app(Settings(checkpoint=checkpoint_dir, **BASE)))  # type: ignore[arg-type]
        client.__enter__()
        wait_ready(client)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def cpu_client(checkpoint_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(checkpoint=checkpoint_dir, **BASE))) as client:  # type: ignore[arg-type]
        wait_ready(client)
        yield client


def classify(client: TestClient, data: bytes, name: str = "p.jpg") -> dict[str, Any]:
    r = client.post("/classify", files={"file": (name, data, "image/jpeg")})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]  # type: ignore[no-any-return]


def model_of(client: TestClient) -> LocalModel:
    model = client.app.state.frontend.model  # type: ignore[attr-defined]
    assert isinstance(model, LocalModel)
    return model


def test_card_says_who_decodes(device_client: TestClient, cpu_client: TestClient) -> None:
    assert device_client.app.state.frontend.card.decodes_jpeg  # type: ignore[attr-defined]
    assert not cpu_client.app.state.frontend.card.decodes_jpeg  # type: ignore[attr-defined]
    assert model_of(cpu_client).decoder is None


def test_answers_agree_with_the_cpu_path(device_client: TestClient, cpu_client: TestClient) -> None:
    decoder = model_of(device_client).decoder
    assert decoder is not None
    before = decoder.decoder.decoded
    images = photos()
    top1_same, budget_diff, lives_diff, prob_diff = 0, 0, 0.0, 0.0
    for data in images:
        dev, cpu = classify(device_client, data), classify(cpu_client, data)
        top1_same += dev["labels"][0]["index"] == cpu["labels"][0]["index"]
        budget_diff = max(budget_diff, *(abs(a - b) for a, b in zip(dev["budget"]["patch_counts"],
                                                                       cpu["budget"]["patch_counts"], strict=True)))
        dv, cv = dev["lifespans"]["values"], cpu["lifespans"]["values"]
        lives_diff = max(lives_diff, *(abs(a - b) for dr, cr in zip(dv, cv, strict=True)
                                       for a, b in zip(dr, cr, strict=True)))
        dp = {lb["index"]: lb["probability"] for lb in dev["labels"]}
        prob_diff = max(prob_diff, *(abs(dp[lb["index"]] - lb["probability"]) for lb in cpu["labels"]))
    print(f"\ndevice decode path (torchvision on cpu) vs CPU path, {len(images)} photos through /classify: "
          f"top-1 equal {top1_same}/{len(images)}, max budget diff {budget_diff} patches, "
          f"max lifespan diff {lives_diff:.3f} layers, max probability diff {prob_diff:.4f}")
    assert decoder.decoder.decoded - before == len(images)  # every photo went the device path
    assert top1_same == len(images)
    assert budget_diff <= 2 and lives_diff < 1.0  # a lost EXIF rotation moves lives by whole layers


def jpeg(im: Image.Image, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_honoured(device_client: TestClient) -> None:
    """One scene stored upright, and stored turned with the EXIF tag that turns it back: one answer."""
    scene = photo_image(480, 352, 7)  # sides multiple of 16: the turned JPEGs' blocks hold the same pixels
    plain = classify(device_client, jpeg(scene))
    stored_as = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    for o, turn in stored_as.items():
        turned = classify(device_client, jpeg(scene.transpose(turn), o))
        assert turned["labels"][0]["index"] == plain["labels"][0]["index"], o
        assert turned["budget"]["patch_counts"] == plain["budget"]["patch_counts"], o
        lives = zip(turned["lifespans"]["values"], plain["lifespans"]["values"], strict=True)
        assert max(abs(a - b) for tr, pr in lives for a, b in zip(tr, pr, strict=True)) < 0.5, o


def test_other_formats_decode_in_the_front_end(device_client: TestClient) -> None:
    """A PNG or CMYK JPEG never reaches the device decoder through the service; sent to the model
    process anyway, it falls back to Pillow there, counted by reason."""
    model = model_of(device_client)
    assert model.decoder is not None
    decoded_before, fallbacks_before = model.decoder.decoder.decoded, dict(model.decoder.decoder.fallbacks)
    kinds = all_kinds()
    for kind in ("png", "jpeg_cmyk", "webp"):
        classify(device_client, kinds[kind], f"x.{kind}")
    assert model.decoder.decoder.decoded == decoded_before
    assert dict(model.decoder.decoder.fallbacks) == fallbacks_before


def submit(client: TestClient, *batches: list[Any]) -> list[list[ImageResult] | BaseException]:
    """``model.submit`` of each batch at once, on the app's event loop (they are decoded together)."""
    model = model_of(client)

    async def run() -> list[list[ImageResult] | BaseException]:
        deadline = model.clock() + 30.0
        return await asyncio.gather(*(model.submit(b, None, deadline) for b in batches), return_exceptions=True)

    return client.portal.call(run)  # type: ignore[union-attr, no-any-return]


def test_fallbacks_are_counted(device_client: TestClient, fallbacks: list[str]) -> None:
    kinds = all_kinds()
    model = model_of(device_client)
    assert model.decoder is not None
    counted = len(fallbacks)
    (png,) = submit(device_client, [EncodedImage(kinds["png"], "a.png"), EncodedImage(kinds["jpeg_cmyk"], "c.jpg")])
    assert isinstance(png, list) and len(png) == 2
    assert fallbacks[counted:] == ["format", "format"]
    assert model.decoder.decoder.fallbacks["format"] >= 2


def test_a_corrupt_jpeg_fails_only_its_request(device_client: TestClient, cpu_client: TestClient) -> None:
    good = photo_jpeg(320, 240, 3)
    corrupt = photo_jpeg(200, 200)[:2000]  # the header reads, the data does not
    bad, fine = submit(device_client, [EncodedImage(good, "files[0]"), EncodedImage(corrupt, "files[1]")],
                       [EncodedImage(good, "file")])
    assert isinstance(bad, BadInput) and str(bad).startswith("files[1]: ")
    assert isinstance(fine, list) and len(fine) == 1
    dev = device_client.post("/classify", files={"file": ("c.jpg", corrupt, "image/jpeg")})
    cpu = cpu_client.post("/classify", files={"file": ("c.jpg", corrupt, "image/jpeg")})
    assert dev.status_code == cpu.status_code == 400
    assert dev.json()["error"]["code"] == cpu.json()["error"]["code"] == "bad_image"
    assert classify(device_client, good)["labels"]  # the service goes on


def test_header_limits_hold_before_passing_on(checkpoint_dir: Path) -> None:
    """413 (pixel limit, request pixel budget) and 400 (unreadable header) from the front end, as on the
    CPU path, before any byte goes to the model process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_decode, "decode_on", lambda mode, device: "gpu")
        settings = Settings(checkpoint=checkpoint_dir, max_image_pixels=300_000, max_request_pixels=400_000,
                            **BASE)  # type: ignore[arg-type]
        with TestClient(create_app(settings)) as client:
            wait_ready(client)
            big = client.post("/classify", files={"file": ("b.jpg", photo_jpeg(640, 480), "image/jpeg")})
            assert big.status_code == 413 and big.json()["error"]["code"] == "image_too_many_pixels"
            pair = [("files", (f"{i}.jpg", photo_jpeg(500, 500, i), "image/jpeg")) for i in range(2)]
            over = client.post("/classify", files=pair)
            assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_many_pixels"
            junk = client.post("/classify", files={"file": ("j.jpg", b"\xff\xd8\xff\xe0garbage", "image/jpeg")})
            assert junk.status_code == 400 and junk.json()["error"]["code"] == "bad_image"
            assert model_of(client).decoder.decoder.decoded == 0  # type: ignore[union-attr]


def test_explain_decodes_in_the_front_end(device_client: TestClient) -> None:
    model = model_of(device_client)
    assert model.decoder is not None
    before = model.decoder.decoder.decoded
    r = device_client.post("/explain", files={"file": ("p.jpg", photo_jpeg(320, 240, 5), "image/jpeg")})
    assert r.status_code == 200, r.text[:300]
    assert model.decoder.decoder.decoded == before


def test_passed_on_jpegs_are_not_decoded_in_the_front_end(device_client: TestClient,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No decode in the front end for them; the decode metric still gets one sample per image (the
    header read, which is all the front end spent)."""
    from service.frontend import pipeline

    def no_decode(*_: Any) -> Any:
        raise AssertionError("a JPEG for the model process was decoded in the front end")

    monkeypatch.setattr(pipeline, "decode_one", no_decode)
    registry = device_client.app.state.frontend.metrics.registry  # type: ignore[attr-defined]
    count = registry.get_sample_value("patchlife_image_decode_seconds_count") or 0.0
    result = classify(device_client, photo_jpeg(3000, 2000, 4))
    assert result["timings_ms"]["decode"] >= 0.0
    assert registry.get_sample_value("patchlife_image_decode_seconds_count") == count + 1


# ``patchlife serve`` with the device path forced onto the CPU in the model process (the parent: the API
# processes it spawns decode in the front end and never call decode_on)
LAUNCH = ("import sys; from service.runtime import gpu_decode; gpu_decode.decode_on = lambda mode, device: 'gpu'; "
          "from cli.main import main; raise SystemExit(main())")


@contextlib.contextmanager
def device_decode_server(checkpoint: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {**os.environ, "PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_WARMUP_BATCHES": "1", "PATCHLIFE_API_PROCESSES": "1",
           "PATCHLIFE_HOST": "127.0.0.1", "PATCHLIFE_PORT": str(port), "PATCHLIFE_GRPC_PORT": "0"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", "--checkpoint", str(checkpoint),
                                 "--log-level", "info"], env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            end = time.monotonic() + 180.0
            while True:
                assert proc.poll() is None and time.monotonic() < end, "server did not start"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=5.0).status_code == 200:
                        break
                time.sleep(0.1)
            yield proc, url
        finally:
            stop(proc)
            log.seek(0)
            proc.stderr = io.BytesIO(log.read())  # type: ignore[assignment]


def test_a_multi_process_server_decodes_in_its_model_process(checkpoint_dir: Path, device_client: TestClient) -> None:
    """The JPEGs cross the hand-off inline and are decoded in the model process: the answers are the
    single-process device path's; a corrupt JPEG is a 400 there too, and a PNG decodes in the API process."""
    images = photos()[:6]
    corrupt = photo_jpeg(200, 200)[:2000]
    with device_decode_server(checkpoint_dir) as (proc, url), httpx.Client(base_url=url, timeout=30.0) as http:
        answers = []
        for data in images:
            r = http.post("/classify", files={"file": ("p.jpg", data, "image/jpeg")})
            assert r.status_code == 200, r.text
            answers.append(r.json()["results"][0])
        bad = http.post("/classify", files={"file": ("c.jpg", corrupt, "image/jpeg")})
        png = http.post("/classify", files={"file": ("p.png", all_kinds()["png"], "image/png")})
        after = http.post("/classify", files={"file": ("p.jpg", images[0], "image/jpeg")})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_image", bad.text
    assert png.status_code == 200 and after.status_code == 200
    for data, remote in zip(images, answers, strict=True):
        local = classify(device_client, data)
        assert remote["labels"][0]["index"] == local["labels"][0]["index"]
        assert remote["budget"]["patch_counts"] == local["budget"]["patch_counts"]
    assert b"JPEGs are decoded in batches on cpu" in proc.stderr.read()  # type: ignore[union-attr]
