"""The request mix of ``patchlife loadtest``: which images, at which keep rates, encoded once.

The mix is fixed (seeded), so every batching mode and every pass sees the same requests in the same
order. Its kinds cycle image by image: the synthetic counting task's PNG scenes (budgets vary with
their content) and photo-like JPEGs made by ``bench/photos.py`` at three sizes, so decoding costs
what it costs for a phone's or a camera's picture.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import httpx
from PIL import Image

Mix = list[tuple[bytes, float | None]]  # (PNG or JPEG bytes, keep rate), one per image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _synthetic_images(n: int, seed: int) -> list[Image.Image]:
    """The synthetic counting task's scenes (0-11 objects): budgets vary with their content."""
    from model.training.data import SyntheticShapes  # the package ships with the service: always there

    data = SyntheticShapes(n, seed=seed)
    return [data.image(i)[0] for i in range(n)]


def labelled_scenes(n: int, seed: int) -> tuple[Mix, list[str]]:
    """``n`` scenes of the counting task's item stream ``seed`` as PNGs at the model's default keep rate,
    and each one's class name (what a correct answer's top label is). The training recipe draws its
    training images from stream ``2 * seed`` and its held-out ones from ``2 * seed + 1``: an odd
    stream of the recipe's seed (1 for the embedded model) is held out."""
    from model.training.data import SyntheticShapes

    data = SyntheticShapes(n, seed=seed)
    items = [data.image(i) for i in range(n)]
    return [(_png(img), None) for img, _ in items], [label for _, label in items]


# Photo-like JPEGs (bench/photos.py) the mix can hold beside the synthetic scenes: name -> (width, height)
PHOTOS = {"photo224": (224, 224), "photo640": (640, 480), "photo1000": (1000, 872), "photo1500": (1500, 1000)}
MIX_KINDS = ("scenes", *PHOTOS)
DISTINCT_PHOTOS = 16  # per kind: enough to defeat any cache, few enough to make quickly


def make_mix(n: int, keep_rates: list[float | None], seed: int = 7, kinds: tuple[str, ...] = ("scenes",)) -> Mix:
    """``n`` (image bytes, keep rate) pairs; kinds cycle image by image (``scenes``: the synthetic task's
    PNGs; ``photo*``: JPEGs of ``PHOTOS``' sizes), and keep rates cycle so each meets every kind of image."""
    from .photos import photo_jpeg

    scenes = iter(_synthetic_images(sum(kinds[i % len(kinds)] == "scenes" for i in range(n)), seed))
    photos: dict[tuple[str, int], bytes] = {}
    out: Mix = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "scenes":
            data = _png(next(scenes))
        else:
            key = (kind, (i // len(kinds)) % DISTINCT_PHOTOS)
            if key not in photos:
                photos[key] = photo_jpeg(*PHOTOS[kind], seed=seed * 1000 + key[1])
            data = photos[key]
        out.append((data, keep_rates[i % len(keep_rates)]))
    return out


def _media(data: bytes) -> tuple[str, str]:
    """(file extension, content type) of a mix image."""
    return ("jpg", "image/jpeg") if data[:2] == b"\xff\xd8" else ("png", "image/png")


@dataclass(frozen=True)
class LoadRequest:
    """One request, encoded once: POST ``path`` with ``body`` (multipart, ``images`` files)."""

    path: str
    body: bytes
    headers: dict[str, str]
    images: int
    mix: Mix  # the (PNG, keep rate) of each image it carries
    labels: tuple[str, ...] = ()  # each image's class name, for labelled scenes (else empty)
    answer: bytes = b'"timings_ms"'  # counted in a 200's body: ``answers`` times (None: once per image)
    answers: int | None = None


def make_requests(mix: Mix, per_request: int, labels: list[str] | None = None,
                  params: dict[str, str] | None = None) -> list[LoadRequest]:
    """``len(mix)`` requests of ``per_request`` images each.

    Request ``k`` carries images ``k*n .. k*n+n-1`` of the mix (cyclically) at the keep rate of mix
    entry ``k``: with one image per request that is the mix itself, and with more the keep rates
    still cycle from request to request. ``labels`` (one per mix image) go with the images they
    label; ``params`` are added to every request's query (e.g. ``min_keep_rate``).
    """
    out = []
    for k in range(len(mix)):
        rate = mix[k][1]
        picked = [(k * per_request + j) % len(mix) for j in range(per_request)]
        pngs = [mix[i][0] for i in picked]
        files = [("files", (f"{j}.{_media(png)[0]}", png, _media(png)[1])) for j, png in enumerate(pngs)]
        query = ({} if rate is None else {"keep_rate": str(rate)}) | (params or {})
        request = httpx.Request("POST", "http://loadtest/classify", params=query, files=files)
        path = request.url.raw_path.decode()
        out.append(LoadRequest(path, request.read(), {"content-type": request.headers["content-type"]},
                               len(pngs), [(png, rate) for png in pngs],
                               tuple(labels[i] for i in picked) if labels is not None else ()))
    return out
