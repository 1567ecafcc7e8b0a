"""Batched JPEG decoding on the model's device: list of encoded images -> ``[B, 3, H, W]`` model input.

It runs in the model process (``service/runtime/local.py``): when PATCHLIFE_DECODE says so, the API
processes pass JPEGs on undecoded (:class:`~service.protocol.EncodedImage`) and :class:`DecodeQueue`
decodes those of concurrent requests together, in a thread of its own.

On CUDA, ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes a whole batch with nvJPEG; the
resize, centre crop, EXIF rotation and mean/std normalisation then run on the device, by the numbers
of :func:`service.preprocess.view_geometry` (the CPU path's geometry). Images of the same stored
size and orientation are resized in one call. The same code runs with ``device="cpu"`` (torchvision's
libjpeg-turbo), which is how CI tests it.

Per image, the CPU path (:mod:`service.decode` + :mod:`service.preprocess`) takes over for what
nvJPEG should not or cannot decode, counted in ``BatchDecoder.fallbacks`` by reason (and passed to
``on_fallback``, the ``patchlife_decode_fallbacks_total`` metric):

  * ``format``: not a JPEG, or a CMYK/YCCK JPEG (Pillow handles Adobe's inverted CMYK);
  * ``refused``: torchvision raised on it (a batch that fails is retried image by image first).

Headers are read by Pillow first, so the pixel limit (413) and unreadable files (400) are the same
errors as on the CPU path. The pixels differ slightly from the CPU path's (a full-size decode resized
in float on the device, against a DCT-scaled decode resized by Pillow in 8-bit): docs/api.md gives
the measured agreement.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import InterpolationMode

from ..api_errors import ApiError
from ..decode import decode_stored, device_decodable, exif_orientation, open_header
from ..preprocess import ViewGeometry, fast_config, model_input, resize_side, view_geometry
from ..protocol import EncodedImage, WorkerStopping

DecodeMode = Literal["auto", "cpu", "gpu"]
_TORCH_ORIENT = {  # EXIF orientation -> [.., H, W] tensor op equal to decode.UPRIGHT's Pillow transpose
    2: lambda x: x.flip(-1), 3: lambda x: x.flip(-2, -1), 4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2), 6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: torch.rot90(x, 2, (-2, -1)).transpose(-1, -2), 8: lambda x: torch.rot90(x, 1, (-2, -1))}


def decode_on(mode: str, device: torch.device) -> Literal["cpu", "gpu"]:
    """Where images are decoded for a model on ``device`` (PATCHLIFE_DECODE): auto is the GPU when the
    model runs on CUDA; gpu without CUDA is an error."""
    if mode == "gpu" and device.type != "cuda":
        raise ValueError(f"PATCHLIFE_DECODE=gpu needs the model on a CUDA device (it is on {device.type})")
    return "gpu" if mode == "gpu" or (mode == "auto" and device.type == "cuda") else "cpu"


class BatchDecoder:
    """Encoded images -> the model's input on ``device``, in batches.

    Args:
        preprocess: the checkpoint's preprocessing config (``engine.config.preprocess``).
        device: where to decode and preprocess; ``cuda`` uses nvJPEG.
        max_pixels: the per-image pixel limit (PATCHLIFE_MAX_IMAGE_PIXELS).
        on_fallback: called with the reason of each image decoded on the CPU (a metric).
        max_batch_pixels: most stored pixels decoded in one call (PATCHLIFE_MAX_DECODE_PIXELS): the
            decoded images and their float resize copies of one call are what the device holds.
    """

    def __init__(self, preprocess: dict[str, Any], device: torch.device | str, max_pixels: int = 40_000_000,
                 on_fallback: Callable[[str], None] | None = None, max_batch_pixels: int = 80_000_000) -> None:
        if not fast_config(preprocess):
            raise ValueError(f"no device preprocessing for {preprocess}: only centre crops of a square input, "
                             "bilinear or bicubic")
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.max_pixels, self.max_batch_pixels = max_pixels, max_batch_pixels
        self.side = int(preprocess["input_size"][-1])
        self.mode = InterpolationMode(preprocess.get("interpolation", "bilinear")).value
        mean = torch.tensor(preprocess.get("mean", IMAGENET_DEFAULT_MEAN), dtype=torch.float32)
        std = torch.tensor(preprocess.get("std", IMAGENET_DEFAULT_STD), dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, -1, 1, 1).to(self.device)
        self.on_fallback = on_fallback
        self.fallbacks: Counter[str] = Counter()  # images decoded on the CPU, by reason
        self.decoded = 0                           # images decoded by torchvision on ``device``

    def __call__(self, images: Sequence[bytes], sources: Sequence[str] | None = None) -> torch.Tensor:
        """``float32 [B, 3, H, W]`` on the device, mean/std-normalised."""
        return self.normalize(self.pixels(images, sources))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` -> (x / 255 - mean) / std as one multiply-add."""
        return pixels.float() * self._scale + self._shift

    def pixels(self, images: Sequence[bytes], sources: Sequence[str] | None = None) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` on the device: what the CPU path's ``model_input`` gives, stacked.
        Raises the CPU path's BadImage (400) / TooManyPixels (413) for a bad image."""
        out: list[torch.Tensor] = []
        for item in self.each(images, sources):
            if isinstance(item, ApiError):
                raise item
            out.append(item)
        if not out:
            return torch.empty((0, 3, self.side, self.side), dtype=torch.uint8, device=self.device)
        return torch.stack(out)

    def each(self, images: Sequence[bytes], sources: Sequence[str] | None = None) -> list[torch.Tensor | ApiError]:
        """Per image, ``uint8 [3, H, W]`` on the device or the error of that image alone (the CPU path's
        BadImage / TooManyPixels), so that a bad file fails only the request that sent it."""
        names = list(sources) if sources is not None else [f"images[{i}]" for i in range(len(images))]
        out: list[torch.Tensor | ApiError | None] = [None] * len(images)
        orientation: dict[int, int] = {}
        pixels: dict[int, int] = {}
        for i, data in enumerate(images):
            try:
                header = open_header(data, self.max_pixels, names[i])
            except ApiError as exc:
                out[i] = exc
                continue
            if device_decodable(header.format, header.mode):
                orientation[i], pixels[i] = exif_orientation(header), header.size[0] * header.size[1]
            else:
                out[i] = self._on_cpu(data, names[i], "format")
        for chunk in _chunks(list(orientation), pixels, self.max_batch_pixels):
            self._decode_chunk(chunk, images, names, orientation, out)
        return [item for item in out if item is not None]

    def _decode_chunk(self, chunk: list[int], images: Sequence[bytes], names: list[str], orientation: dict[int, int],
                      out: list[torch.Tensor | ApiError | None]) -> None:
        """Decode the images ``chunk`` indexes in one call, then resize those of one stored size together."""
        groups: dict[tuple[int, int, int], list[tuple[int, torch.Tensor]]] = {}
        for i, tensor in zip(chunk, self._decode([images[i] for i in chunk]), strict=True):
            if tensor is None:
                out[i] = self._on_cpu(images[i], names[i], "refused")
                continue
            groups.setdefault((tensor.shape[-1], tensor.shape[-2], orientation[i]), []).append((i, tensor))
        for (w, h, o), members in groups.items():
            view = self._view(torch.stack([t for _, t in members]), view_geometry(w, h, o, self.preprocess))
            for j, (i, _) in enumerate(members):
                out[i] = view[j]
            self.decoded += len(members)

    def _decode(self, images: list[bytes]) -> list[torch.Tensor | None]:
        """torchvision's decode of the whole list; when the batch fails, each image alone (None: refused)."""
        if not images:
            return []
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images]
        with warnings.catch_warnings():  # torchvision 0.29 announces TorchCodec on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                pass
            out: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _view(self, batch: torch.Tensor, geo: ViewGeometry) -> torch.Tensor:
        """``uint8 [N, 3, h, w]`` stored images of one size -> ``uint8 [N, 3, side, side]``: aspect crop,
        resize (antialiased, Pillow's filters), centre crop, EXIF rotation."""
        left, top, right, bottom = geo.region
        x = batch[..., top:bottom, left:right].float()
        rw, rh = geo.resized
        if (rw, rh) != (right - left, bottom - top):
            x = F.interpolate(x, size=(rh, rw), mode=self.mode, antialias=True, align_corners=False)
        cl, ct, cr, cb = geo.crop
        x = x[..., ct:cb, cl:cr]
        if (turn := _TORCH_ORIENT.get(geo.orientation)) is not None:
            x = turn(x)
        return x.round_().clamp_(0, 255).to(torch.uint8)

    def _on_cpu(self, data: bytes, source: str, reason: str) -> torch.Tensor | ApiError:
        self.fallbacks[reason] += 1
        if self.on_fallback is not None:
            self.on_fallback(reason)
        try:
            decoded = decode_stored(data, self.max_pixels, min_side=resize_side(self.preprocess), source=source)
            return model_input(decoded, self.preprocess, _no_fallback, source).to(self.device)
        except ApiError as exc:
            return exc


def _chunks(indices: list[int], pixels: dict[int, int], most: int) -> list[list[int]]:
    """``indices`` in order, cut into runs of at most ``most`` pixels (an image larger alone)."""
    runs: list[list[int]] = []
    total = 0
    for i in indices:
        if not runs or total + pixels[i] > most:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += pixels[i]
    return runs


def _no_fallback(_image: Any) -> torch.Tensor:
    raise AssertionError("fast_config was checked in BatchDecoder.__init__")


@dataclass
class _Job:
    images: Sequence[EncodedImage]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[torch.Tensor | ApiError]]


class DecodeQueue:
    """The encoded images of concurrent requests, decoded together by one :class:`BatchDecoder` in a
    thread of its own (never on the event loop).

    Whenever the thread is free it takes whatever requests are waiting, up to ``max_batch`` images
    (a larger request goes alone), and decodes them as one batch. On CUDA it decodes on a stream of
    its own (the model's batches on the default stream neither wait for it nor hold it up), waits
    for that stream only, so the tensors it hands back are ready, and marks them used by the default
    stream, where the worker reads them: the allocator reuses their memory only once that stream has
    passed the batch that read them.
    """

    def __init__(self, decoder: BatchDecoder, max_batch: int = 64) -> None:
        self.decoder, self.max_batch = decoder, max_batch
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None

    async def decode(self, images: Sequence[EncodedImage]) -> list[torch.Tensor | ApiError]:
        """Per image, ``uint8 [3, H, W]`` on the decoder's device, or that image's error."""
        loop = asyncio.get_running_loop()
        job = _Job(images, loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise WorkerStopping("the model is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="patchlife-decode", daemon=True)
                self._thread.start()
            self._waiting.append(job)
            self._cond.notify()
        return await job.future

    def close(self) -> None:
        """Decode what is waiting, then end the thread (blocking: call it from a thread)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            jobs: list[_Job] = []
            count = 0
            while self._waiting and (not jobs or count + len(self._waiting[0].images) <= self.max_batch):
                job = self._waiting.popleft()
                if not job.future.cancelled():  # its request went away while waiting
                    jobs.append(job)
                    count += len(job.images)
            return jobs if jobs or not self._closed else None

    def _run(self) -> None:
        device = self.decoder.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while (jobs := self._take()) is not None:
                self._decode(jobs, stream)

    def _decode(self, jobs: list[_Job], stream: torch.cuda.Stream | None) -> None:
        images = [im for job in jobs for im in job.images]
        out: list[torch.Tensor | ApiError] | BaseException
        try:
            decoded = self.decoder.each([im.data for im in images], [im.source for im in images])
            if stream is not None:
                stream.synchronize()
                reader = torch.cuda.default_stream(self.decoder.device)
                for t in decoded:
                    if isinstance(t, torch.Tensor):
                        t.record_stream(reader)
            out = decoded
        except Exception as exc:  # a bug or a device error: the requests of this batch fail, the thread lives
            out = exc
        at = 0
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, _Decoded | BaseException]]] = {}
        for job in jobs:
            part = out if isinstance(out, BaseException) else out[at:at + len(job.images)]
            at += len(job.images)
            by_loop.setdefault(job.loop, []).append((job, part))
        for loop, answers in by_loop.items():  # one callback per event loop for the whole batch
            with contextlib.suppress(RuntimeError):  # its event loop has closed: nobody waits
                loop.call_soon_threadsafe(_settle, answers)


_Decoded = list[torch.Tensor | ApiError]


def _settle(answers: list[tuple[_Job, _Decoded | BaseException]]) -> None:
    for job, result in answers:
        if job.future.done():  # cancelled meanwhile
            continue
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)
