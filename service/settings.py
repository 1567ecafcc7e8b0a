"""Every knob of the service, one environment variable each (prefix ``PATCHLIFE_``).

The settings table in docs/api.md is generated from this class (``python -m service.settings``
prints it; a test fails when the two disagree), so the field descriptions are the documentation.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.defaults import GRID_KEEP_RATES, GRID_SIZE, GRID_STEP


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PATCHLIFE_", env_file=None, extra="ignore", env_ignore_empty=True)

    # --- model -------------------------------------------------------------------------------
    checkpoint: Path | None = Field(
        None, description="Checkpoint directory (config.json + model.safetensors); empty: the embedded "
                          "default model.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; auto picks the GPU when there is one.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Compute precision; auto: bfloat16 on a GPU that supports it, else float32 (TF32 "
                            "matrix products allowed on a GPU). Half precision only on a GPU.")
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto", description="auto: on a GPU, capture a CUDA graph at warm-up for the head at each batch-size class "
                            "(1, 2, 4, ... max_batch_size) and for the tail at each (bucket, class); batches are "
                            "padded up to their class and other shapes run eagerly. off: always eager.")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where JPEGs are decoded and preprocessed. gpu: in the model process, in batches with "
                            "nvJPEG on the model's CUDA device (service/runtime/gpu_decode.py); the API processes only "
                            "read the header and pass the bytes on; other formats, refused JPEGs and /explain decode "
                            "on the CPU. Needs CUDA, refused with device=cpu. cpu: libjpeg-turbo/Pillow in the "
                            "request handler. auto: gpu when the model runs on CUDA.")
    keep_rate: float | None = Field(
        None, gt=0, le=1, description="Default keep rate; empty: the checkpoint's own schedule.")
    latency_objective_ms: float | None = Field(
        None, gt=0, description="Accuracy scaling: the time within which the service aims to answer. When the "
                                "queued work at the current keep rates would finish later than this after its "
                                "requests arrived, tail batches run at lower keep rates (down to each image's "
                                "floor) until the queue drains. Empty: off, every image runs at its own rate.")
    min_keep_rate: float | None = Field(
        None, gt=0, le=1, description="Accuracy scaling: the default floor of an image's keep rate (a request's "
                                      "min_keep_rate overrides it). Empty: the lowest keep rate whose held-out "
                                      "top-1 in the checkpoint's metrics.json evaluation is within 2 points of "
                                      "the default rate's; no such evaluation: no scaling for requests without "
                                      "their own floor.")
    warmup_batches: int = Field(2, ge=0, description="Forward passes run before /readyz turns ready.")

    # --- HTTP --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address (0.0.0.0 in the container).")
    port: int = Field(8000, ge=1, le=65535, description="Bind port.")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="Port of the Open Inference Protocol v2 over gRPC (KServe's and Triton's "
                                          "GRPCInferenceService), on the same host, worker and limits as HTTP; "
                                          "0: no gRPC.")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest accepted image file "
                                  "(one multipart part, one decoded base64 image, or a raw image body); "
                                  "checked while streaming, 413 past it.")
    max_request_bytes: int = Field(
        50 * 1024 * 1024, ge=1, description="Largest request body, all images together; checked against "
                                            "Content-Length before reading and again while streaming.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Decompression-bomb limit (width x height).")
    max_images_per_request: int = Field(32, ge=1, description="Most images in one request.")
    max_top_k: int = Field(20, ge=1, description="Largest accepted top_k.")
    max_request_pixels: int = Field(
        200_000_000, ge=1, description="Most pixels one request may ask to decode: width x height summed over its "
                                       "images, read from their headers before any is decoded; 413 past it.")
    max_decode_pixels: int = Field(
        80_000_000, ge=1, description="Pixels of 8-bit RGB being decoded at once, all requests together: bounds the "
                                      "memory of decoding (4 bytes a pixel, 320 MB by default). Each image holds "
                                      "what its decode costs, from its header: width x height times the bytes per "
                                      "pixel of its mode (about 2x an RGB pixel for 16-bit grey, 3x for float, 5x "
                                      "with alpha; service/frontend/decode_gate.py); a larger image holds the whole "
                                      "capacity. "
                                      "An image waits for room in arrival order.")
    decode_wait_ms: float = Field(
        10_000, gt=0, description="Longest an image waits for room to decode (PATCHLIFE_MAX_DECODE_PIXELS) "
                                  "before its request is answered 503 overloaded with Retry-After.")
    read_timeout_s: float = Field(
        10.0, gt=0, description="Slow clients: a request's headers must arrive within this many seconds of its first "
                                "byte, and each wait for the next piece of its body is bounded by it too (the "
                                "request's deadline also bounds the whole body); 408 request_timeout with "
                                "Connection: close past it.")
    keepalive_timeout_s: float = Field(
        5.0, gt=0, description="An open connection with no request in progress (new, or kept alive after an "
                               "answer) is closed after this many idle seconds.")
    max_header_bytes: int = Field(
        32768, ge=1024, description="Largest request line plus headers, in bytes (as nginx's 4 x 8 KiB buffers): "
                                    "past it 431 headers_too_large (414 uri_too_long for the URL alone) with "
                                    "Connection: close.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line (time, level, logger, message, "
                            "request_id, exception); both carry the request's X-Request-ID.")

    # --- access (service/frontend/access.py) --------------------------------------------------
    api_key_inference: SecretStr | None = Field(
        None, description="Key of the inference API group (POST /classify, /explain, /v2 infer; gRPC ModelInfer): "
                          "requests must send `Authorization: Bearer <key>` (gRPC metadata `authorization`), else "
                          "401 / UNAUTHENTICATED. Empty: open. Probes, the page's files and /docs stay open.")
    api_key_metadata: SecretStr | None = Field(
        None, description="Key of the metadata and statistics group (GET /v1/models, /v2, /v2/models/...: "
                          "metadata, config, stats; their gRPC calls), sent as for the inference key. Empty: open.")
    api_key_metrics: SecretStr | None = Field(
        None, description="Key of GET /metrics, sent as for the inference key (Prometheus: the scrape's "
                          "`authorization`). Empty: open.")

    # --- batching ----------------------------------------------------------------------------
    batching: Literal["budget", "fifo", "unbatched"] = Field(
        "budget", description="budget: group the tail by budget bucket; fifo: one batch at the "
                              "largest budget in it; unbatched: one image at a time.")
    max_batch_size: int = Field(32, ge=1, description="Most images in one head or tail batch.")
    max_delay_ms: float = Field(
        10.0, ge=0, description="Longest an image waits for its batch to fill while the other phase has work "
                                "queued (an otherwise idle worker runs a batch at once); no wait with "
                                "work_conserving=true.")
    max_batch_tokens: int = Field(
        200_000, ge=1, description="Token limit of one tail batch (sum over images of the tokens "
                                   "every tail block sees), like TGI's max_batch_total_tokens.")
    buckets: int = Field(
        GRID_SIZE, ge=1, description="Budget buckets fitted to the model's budgets: this many points at quantiles "
                                     "of the budgets its calibration images get at the model's keep rate and at "
                                     "bucket_keep_rates (plus the full budget); a budget runs at the cheapest "
                                     "point covering it.")
    bucket_keep_rates: str = Field(
        ",".join(map(str, GRID_KEEP_RATES)), description="Keep rates (comma-separated) whose budgets the bucket grid "
                                                         "is fitted to, besides the model's own.")
    bucket_step: int = Field(
        GRID_STEP, ge=1, description="Fallback grid for checkpoints without a calibration sample: patch counts "
                                     "rounded up to multiples of this.")
    max_batch_waste: float = Field(
        1.0, ge=0, description="budget mode: the cost model merges covered buckets into a tail batch when that "
                               "saves device time, as long as the tokens computed beyond the images' own budgets "
                               "stay within this fraction of those budgets (0: never mix buckets, so an answer "
                               "never depends on what else is queued).")
    work_conserving: bool = Field(
        False, description="true: run the oldest queued batch whenever the model thread is free instead of letting "
                           "it fill for up to max_delay_ms while the other phase has work. Off by default: where a "
                           "call has a large fixed cost, small batches run at once cost more than the wait "
                           "(measured figures and their command: docs/ops.md).")
    queue_capacity_images: int = Field(256, ge=1, description="Queued images before 503.")
    queue_capacity_tokens: int = Field(2_000_000, ge=1, description="Queued tail tokens before 503.")
    deadline_ms: float = Field(30_000, gt=0, description="Default per-request deadline; header "
                                                          "X-Request-Deadline-Ms overrides it.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="Time to finish queued work on shutdown.")
    torch_threads: int = Field(
        0, ge=0, description="Intra-op CPU threads of the model (torch.set_num_threads, applied in the worker "
                             "thread at start-up); 0: torch's default, one per core. Each batch waits for every thread "
                             "of the team, so on cores shared with other busy processes fewer threads can be faster; "
                             "on a machine of its own, all cores serve more (measured figures and their commands: "
                             "docs/ops.md).")
    unhealthy_after_failures: int = Field(
        3, ge=1, description="Consecutive failed model batches after which /readyz answers 503 with the error "
                             "(the next batch that succeeds clears it).")
    watchdog_batch_s: float = Field(
        120.0, gt=0, description="A model batch running longer than this turns /readyz to 503 (a hung device) "
                                 "until it returns.")
    shutdown_delay_s: float = Field(
        0.0, ge=0, description="After SIGTERM, how long /readyz answers 503 while requests are still served and "
                               "the listener stays open, so that a load balancer stops sending first; then new "
                               "requests are answered 503 and the drain (PATCHLIFE_SHUTDOWN_GRACE_S) runs.")


    # --- processes ---------------------------------------------------------------------------
    api_processes: str = Field(
        "auto", pattern=r"^(auto|\d{1,3})$",
        description="API processes beside the one model process: each runs the HTTP (and gRPC) front end on the "
                    "same port and hands preprocessed pixels to the model process through shared memory. auto: "
                    "the cores the model process does not need (beside a GPU it needs 2, on the CPU its torch "
                    "threads), at least 1. With API processes on the CPU, an unset PATCHLIFE_TORCH_THREADS "
                    "becomes the cores they leave. 0: one process does everything (tests, notebooks).")
    pixel_slots: int = Field(
        0, ge=0, description="Shared-memory pixel slots (one preprocessed image each) in the one pool all API "
                             "processes take from; a request that finds too few free is answered 503 + Retry-After. "
                             "0: enough that only a full queue refuses work: the queue's capacity, plus two "
                             "batches running, plus one request's images per API process.")

    model_stall_s: float = Field(
        3.0, gt=0, description="With API processes: once the model process has been ready, an API process that has "
                               "heard nothing from it (it sends its status every 0.5 s) for this many seconds answers "
                               "/readyz 503 with the reason until it speaks again; requests are still bounded by "
                               "their deadlines (504).")
    model_stall_exit_s: float = Field(
        60.0, ge=0, description="With API processes: a model process silent for this many seconds is killed by its "
                                "API processes, so that serve ends with a non-zero status (and a container is "
                                "restarted); /healthz answers 503 from then on. 0: never.")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.decode == "gpu" and self.device == "cpu":
            raise ValueError("PATCHLIFE_DECODE=gpu needs a CUDA device; use auto or cpu with device=cpu")
        if self.dtype in ("float16", "bfloat16") and self.device == "cpu":
            raise ValueError("PATCHLIFE_DTYPE=float16/bfloat16 needs a GPU; use float32 or auto with device=cpu")
        self.grid_keep_rates()  # raises on a malformed list
        return self

    def api_process_count(self, cuda: bool, cores: int) -> int:
        """``api_processes`` resolved: ``auto`` gives the API processes the cores the model process does
        not need (2 beside a GPU: its event loop and its model thread; on the CPU, its torch threads),
        and at least one (a CPU model with torch's default team then leaves it one core)."""
        if self.api_processes != "auto":
            return int(self.api_processes)
        needs = 2 if cuda else (self.torch_threads or cores)
        return max(1, cores - needs)

    def model_threads_beside(self, processes: int, cuda: bool, cores: int) -> Settings:
        """With API processes on the CPU, an unset ``torch_threads`` (one per core) becomes the cores they
        leave: a model's thread team that spans every core busy-waits on the cores the API processes need."""
        if cuda or self.torch_threads or processes <= 0:
            return self
        return self.model_copy(update={"torch_threads": max(1, cores - processes)})

    def pool_slots(self, processes: int) -> int:
        """The shared pool's slots: what the queue can hold, the head and tail batches running (their
        slots are held until the answer) and a request on its way in each API process."""
        if self.pixel_slots:
            return self.pixel_slots
        return (self.queue_capacity_images + 2 * self.max_batch_size
                + max(1, processes) * self.max_images_per_request)

    def grid_keep_rates(self) -> tuple[float, ...]:
        try:
            rates = tuple(float(v) for v in self.bucket_keep_rates.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"PATCHLIFE_BUCKET_KEEP_RATES must be comma-separated numbers, "
                             f"got {self.bucket_keep_rates!r}") from None
        if any(not 0 < r <= 1 for r in rates):
            raise ValueError(f"PATCHLIFE_BUCKET_KEEP_RATES must lie in (0, 1], got {self.bucket_keep_rates!r}")
        return rates


@lru_cache
def get_settings() -> Settings:
    return Settings()


def markdown_table() -> str:
    """The settings table of docs/api.md: variable, default, meaning, one row per field."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "(none)" if field.default is None else f"`{field.default}`"
        rows.append(f"| `PATCHLIFE_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
